"""Review 14: an untimed GPU ranks above the export's CPU timings, OpenVINO AUTO over the CPU alone
gets the CPU's streams, the autotune cache is read only with autotune on, a load on the fake backend
warns, and the KServe metadata names the proved device."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from api.kserve import model_metadata
from runtime.autotune import DecisionCache, cache_key
from runtime.backends.base import Probe, Session
from runtime.errors import FallbackError
from runtime.hardware import probe_hardware
from runtime.loader import LoaderOptions, load_model, open_first, preference_for
from runtime.manifest import Accuracy, Manifest, Timing, Variant
from runtime.repository import Repository
from runtime.selection import Candidate, Decision, Preference, Verdict, rank, runs_on_cpu
from runtime.streams import plan_for
from tests.runtime.conftest import publish_mlp
from tests.runtime.test_runtime_selection import manifest

# -- 5. ranking on a CUDA box -----------------------------------------------------------------------


def _probe(name: str, device: str, speed: int, runtime: str, **details: str) -> Probe:
    formats = ("onnx", "openvino") if runtime == "openvino" else ("onnx",)
    return Probe(name, True, "found", runtime, device, ("fp32",), formats, speed, dict(details))  # type: ignore[arg-type]


def _cuda_box() -> list[Probe]:
    """onnxruntime-gpu listing TensorRT (without TensorRT installed) and CUDA; OpenVINO over the CPU."""
    return [
        _probe("ort-cpu", "cpu", 15, "onnxruntime"),
        _probe("ort-cuda", "cuda:0", 40, "onnxruntime"),
        _probe("ort-tensorrt", "cuda:0", 50, "onnxruntime"),
        _probe("ov-cpu", "CPU", 20, "openvino", devices="CPU"),
        _probe("ov-auto", "AUTO", 19, "openvino", devices="CPU"),
    ]


def _acc(runtime: str) -> Accuracy:
    return Accuracy(
        runtime=runtime,  # type: ignore[arg-type]
        exec_precision="fp32",
        samples=8,
        metrics={},
        gate={},
        passed=True,
        reference="pytorch",
    )


def _timing(backend: str, items_per_s: float) -> Timing:
    return Timing(
        backend=backend,
        exec_precision="fp32",
        scenario="b32-typical",
        batch=32,
        seq_len=128,
        p50_ms=10.0,
        p99_ms=12.0,
        items_per_s=items_per_s,
        threads=2,
    )


def _exported_on_a_cpu() -> Manifest:
    """MiniLM's shape: fp32 ONNX for every ORT backend, OpenVINO fp32 and INT8, timed on the CPU only."""
    ort = ["ort-cpu", "ort-cuda", "ort-tensorrt"]
    ov = ["ov-cpu", "ov-auto"]

    def variant(vid: str, fmt: str, precision: str, backends: list[str], timings: list[Timing]) -> Variant:
        runtime = "openvino" if fmt == "openvino" else "onnxruntime"
        return Variant(
            id=vid,
            format=fmt,  # type: ignore[arg-type]
            precision=precision,  # type: ignore[arg-type]
            files=[f"{vid}.bin"],
            backends=backends,
            recipe="",
            accuracy=[_acc(runtime)],
            timings=timings,
        )

    return manifest(
        variant("onnx-fp32", "onnx", "fp32", ort, [_timing("ort-cpu", 106.8)]),
        variant("ov-fp32", "openvino", "fp32", ov, [_timing("ov-cpu", 122.6)]),
        variant("ov-int8", "openvino", "int8", ov, [_timing("ov-cpu", 298.7)]),
    )


def test_an_untimed_gpu_ranks_above_every_timed_cpu_candidate() -> None:
    decision = rank(_cuda_box(), _exported_on_a_cpu(), Preference())
    order = [str(v.candidate) for v in decision.admissible]
    assert order[:2] == ["ort-tensorrt/onnx-fp32/fp32", "ort-cuda/onnx-fp32/fp32"]
    assert order[2] == "ov-cpu/ov-int8/fp32"  # then the timings measured at export
    assert "an accelerator, ranked above the timed candidates" in decision.admissible[1].reason
    # AUTO over the CPU alone is a CPU: its estimate (19 x 2.4) does not beat ov-cpu int8's (20 x 2.4)
    assert order.index("ov-auto/ov-int8/fp32") > order.index("ort-cpu/onnx-fp32/fp32")


def test_when_tensorrt_cannot_be_proved_cuda_is_opened_next_not_a_cpu_candidate() -> None:
    decision = rank(_cuda_box(), _exported_on_a_cpu(), Preference())
    tried: list[Candidate] = []

    def open_candidate(cand: Candidate) -> tuple[Session, Session, int]:
        tried.append(cand)
        if cand.backend == "ort-tensorrt":
            raise FallbackError("TensorRT is not installed", requested="TensorRT", active=["CUDA"])
        if cand.backend != "ort-cuda":
            raise AssertionError(f"{cand} was opened before the GPU")
        session = _Proved()
        return session, session, 1  # type: ignore[return-value]

    opened = open_first(decision, open_candidate, where="minilm/1")
    assert opened.candidate == Candidate("ort-cuda", "onnx-fp32", "fp32")
    assert [c.backend for c in tried] == ["ort-tensorrt", "ort-cuda"]


class _Proved:
    active = ("CUDAExecutionProvider",)
    fallback = None


def test_the_ranking_never_skips_an_accuracy_gate_for_the_gpu() -> None:
    man = _exported_on_a_cpu()
    failed = msgspec.structs.replace(_acc("onnxruntime"), passed=False)
    onnx = msgspec.structs.replace(man.variants[0], accuracy=[failed])
    man = msgspec.structs.replace(man, variants=[onnx, *man.variants[1:]])
    decision = rank(_cuda_box(), man, Preference())
    assert all(v.candidate.backend not in ("ort-cuda", "ort-tensorrt") for v in decision.admissible)
    assert decision.choice == Candidate("ov-cpu", "ov-int8", "fp32")


# -- 4c. OpenVINO AUTO over the CPU alone --------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "on_cpu", "streams"),
    [("CPU", True, 2), ("CPU,GPU.0", False, 1), ("GPU", False, 1), ("", False, 1)],
)
def test_ov_auto_gets_the_streams_of_the_device_it_can_pick(devices: str, on_cpu: bool, streams: int) -> None:
    auto = _probe("ov-auto", "AUTO", 19, "openvino", devices=devices)
    assert runs_on_cpu(auto) is on_cpu
    assert plan_for("ov-auto", [auto], 0, 4) == (streams, 2 if streams == 2 else 4)


def test_cpu_and_gpu_devices_are_what_they_say() -> None:
    assert runs_on_cpu(_probe("ort-cpu", "cpu", 15, "onnxruntime"))
    assert runs_on_cpu(_probe("ov-cpu", "CPU", 20, "openvino", devices="CPU,GPU"))
    assert not runs_on_cpu(_probe("ort-cuda", "cuda:0", 40, "onnxruntime"))
    assert not runs_on_cpu(_probe("ov-npu", "NPU", 25, "openvino", devices="CPU,NPU"))


# -- 4a, 3, 6: loads of a real package ------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_mlp(tmp_path_factory.mktemp("repo14"), ["ort-cpu"])


def _loaded_line(caplog: pytest.LogCaptureFixture) -> str:
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded mlp/1"))


def test_the_autotune_cache_is_read_only_with_autotune_on(
    repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_file = tmp_path / "cache" / "decisions.json"
    options = LoaderOptions(backend="ort-cpu", decision_cache=cache_file, streams=1)
    sha = Repository(repo).open("mlp", None, verify_hashes=False).sha256
    chosen = Candidate("ort-cpu", "onnx-fp32", "fp32")
    tuned = Decision(chosen, (Verdict(chosen, True, "autotuned: median 1 ms", 1e3),), "autotune")
    DecisionCache(cache_file).put(cache_key(probe_hardware().fingerprint(), sha, preference_for(options)), tuned)
    with caplog.at_level(logging.INFO, logger="runtime.loader"):
        load_model(repo, "mlp", options=options)
    assert "decided by rank" in _loaded_line(caplog)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runtime.loader"):
        load_model(repo, "mlp", options=LoaderOptions(**{**options.__dict__, "autotune": True}))
    assert "decided by cache" in _loaded_line(caplog)


def test_every_load_on_the_fake_backend_warns(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="runtime.loader"):
            model = load_model(repo, "mlp", options=LoaderOptions(backend="fake", streams=1))
        assert model.backend == "fake"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warned if "made-up outputs" in w and "for tests only" in w]) == 2, warned


def test_a_real_load_does_not_warn_of_the_fake_backend(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime.loader"):
        load_model(repo, "mlp", options=LoaderOptions(backend="ort-cpu", streams=1))
    assert not any("fake backend" in r.getMessage() for r in caplog.records)


def test_kserve_metadata_names_what_the_session_proved_it_runs_on(repo: Path) -> None:
    model = load_model(repo, "mlp", options=LoaderOptions(backend="ort-cpu", streams=1))
    params = model_metadata(model)["parameters"]
    assert params["active"] == ",".join(model.session.active) == "CPUExecutionProvider"
    assert params["backend"] == "ort-cpu"
