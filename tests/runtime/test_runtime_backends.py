from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from msgspec.structs import replace

from runtime.backends.base import Backend, OpenOptions, Probe, Session
from runtime.backends.fake import FakeBackend
from runtime.backends.openvino import OpenVinoBackend
from runtime.backends.ort import OrtBackend
from runtime.backends.registry import BACKENDS, get_backend, probe_all
from runtime.errors import BackendError, BackendUnavailableError, FallbackError, InputError
from runtime.hardware import GpuInfo, HardwareProfile, OrtInfo, OvDevice, OvInfo

FP32 = OpenOptions(intra_op_threads=1, exec_precision="fp32")


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 8)).astype(np.float32)


def _reference(model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The MLP computed with numpy from the ONNX initializers (float64)."""
    import onnx
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(str(model)).graph.initializer}
    hidden = np.maximum(x.astype(np.float64) @ w["W1"] + w["B1"], 0)
    return {"hidden": hidden, "logits": hidden @ w["W2"] + w["B2"]}


# ---------------------------------------------------------------- registry / probes


def test_registry_names_and_unknown_backend() -> None:
    assert set(BACKENDS) == {
        "ort-cpu",
        "ort-cuda",
        "ort-tensorrt",
        "ort-openvino",
        "ov-cpu",
        "ov-gpu",
        "ov-npu",
        "ov-auto",
        "fake",
    }
    for name in BACKENDS:
        assert get_backend(name).name == name
    with pytest.raises(BackendUnavailableError, match=r"unknown backend 'ort-rocm'.*ort-cpu.*ov-cpu"):
        get_backend("ort-rocm")


def test_probe_all_on_this_box(hardware: HardwareProfile) -> None:
    probes = {p.name: p for p in probe_all(hardware)}
    assert list(probes) == list(BACKENDS)
    assert probes["ort-cpu"].usable and probes["ov-cpu"].usable and probes["fake"].usable
    assert probes["ov-auto"].usable
    assert not probes["ort-cuda"].usable
    assert probes["ort-cuda"].reason == (
        "CUDAExecutionProvider not in this onnxruntime build (install the gpu profile: onnxruntime-gpu)"
    )
    assert not probes["ort-tensorrt"].usable and "TensorrtExecutionProvider" in probes["ort-tensorrt"].reason
    assert not probes["ov-gpu"].usable and "no GPU device in OpenVINO" in probes["ov-gpu"].reason
    assert not probes["ov-npu"].usable and "no NPU device" in probes["ov-npu"].reason
    cpu = hardware.ov_device("CPU")
    assert cpu is not None
    assert ("bf16" in probes["ov-cpu"].precisions) == ("BF16" in cpu.capabilities)
    assert "fp16" not in probes["ov-cpu"].precisions
    assert probes["ov-cpu"].formats == ("onnx", "openvino")
    assert probes["ort-cpu"].formats == ("onnx",) and probes["ort-cpu"].precisions == ("fp32",)
    speed = {n: p.speed_class for n, p in probes.items()}
    assert speed["ort-tensorrt"] > speed["ort-cuda"] > speed["ov-gpu"] > speed["ov-cpu"] > speed["ort-cpu"]
    assert speed["ort-cpu"] > speed["fake"] == 0


def test_probe_all_without_profile_probes_once_and_works() -> None:
    assert [p.name for p in probe_all()] == list(BACKENDS)


GPU_BOX = HardwareProfile(
    cpu_model="test",
    onnxruntime=OrtInfo(
        version="1.32.0", providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    ),
    openvino=OvInfo(
        version="2026.4",
        devices=(
            OvDevice(name="CPU", capabilities=("FP32", "INT8")),
            OvDevice(name="GPU.0", full_name="Intel Arc", capabilities=("FP32", "FP16", "INT8")),
        ),
    ),
    gpus=(GpuInfo(name="NVIDIA L4", memory_total_mib=23034, driver_version="570"),),
    nvidia_smi="/usr/bin/nvidia-smi",
)


@pytest.mark.parametrize(
    ("profile", "name", "usable", "reason"),
    [
        (GPU_BOX, "ort-cuda", True, "CUDAExecutionProvider in onnxruntime 1.32.0; GPU 0: NVIDIA L4"),
        (GPU_BOX, "ort-tensorrt", True, "TensorrtExecutionProvider in onnxruntime 1.32.0; GPU 0: NVIDIA L4"),
        (GPU_BOX, "ort-openvino", False, "OpenVINOExecutionProvider not in this onnxruntime build"),
        (replace(GPU_BOX, gpus=(), nvidia_smi=None), "ort-cuda", False, "no NVIDIA GPU found (nvidia-smi absent)"),
        (replace(GPU_BOX, gpus=()), "ort-tensorrt", False, "no NVIDIA GPU found (nvidia-smi lists none)"),
        (replace(GPU_BOX, onnxruntime=None), "ort-cpu", False, "onnxruntime not installed: pip install inferbox"),
        (GPU_BOX, "ov-gpu", True, "GPU.0 (Intel Arc)"),
        (GPU_BOX, "ov-npu", False, "no NPU device in OpenVINO (devices: ['CPU', 'GPU.0'])"),
        (replace(GPU_BOX, openvino=None), "ov-cpu", False, "openvino not installed: pip install inferbox"),
    ],
)
def test_probe_decisions_from_injected_profiles(profile: HardwareProfile, name: str, usable: bool, reason: str) -> None:
    probe = get_backend(name).probe(profile)  # type: ignore[call-arg]
    assert probe.usable is usable
    assert probe.reason.startswith(reason)


def test_ov_precisions_from_device_capabilities() -> None:
    gpu = OpenVinoBackend("ov-gpu").probe(GPU_BOX)
    assert gpu.precisions == ("fp32", "fp16")
    auto = OpenVinoBackend("ov-auto").probe(GPU_BOX)
    assert auto.precisions == ("fp32",)  # only what every device AUTO may pick can do
    cpu_box = replace(
        GPU_BOX, openvino=OvInfo(version="x", devices=(OvDevice(name="CPU", capabilities=("FP32", "BF16", "FP16")),))
    )
    assert OpenVinoBackend("ov-cpu").probe(cpu_box).precisions == ("fp32", "bf16")


def test_probe_all_survives_a_broken_backend(monkeypatch: pytest.MonkeyPatch, hardware: HardwareProfile) -> None:
    class Broken:
        name = "ort-broken"

        def probe(self) -> Probe:
            raise RuntimeError("driver exploded")

        def open(self, model_path: Path, options: OpenOptions) -> Session:
            raise AssertionError

    monkeypatch.setitem(BACKENDS, "ort-broken", Broken)
    probe = {p.name: p for p in probe_all(hardware)}["ort-broken"]
    assert not probe.usable and probe.runtime == "onnxruntime"
    assert "driver exploded" in probe.reason


# ---------------------------------------------------------------- sessions on real runtimes


@pytest.fixture(scope="module")
def ort_session(tiny_mlp: Path) -> Session:
    return OrtBackend("ort-cpu").open(tiny_mlp, FP32)


@pytest.fixture(scope="module")
def ov_session(tiny_mlp: Path) -> Session:
    return OpenVinoBackend("ov-cpu").open(tiny_mlp, FP32)


@pytest.mark.parametrize("batch", [1, 7])
def test_ort_and_openvino_agree_fp32(ort_session: Session, ov_session: Session, tiny_mlp: Path, batch: int) -> None:
    x = _x(batch, seed=batch)
    ref = _reference(tiny_mlp, x)
    a = ort_session.run({"x": x})
    b = ov_session.run({"x": x})
    for name in ("hidden", "logits"):
        assert a[name].shape == b[name].shape == ref[name].shape
        assert a[name].dtype == b[name].dtype == np.float32
        np.testing.assert_allclose(a[name], ref[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-5)


def test_sessions_prove_what_runs(ort_session: Session, ov_session: Session) -> None:
    assert isinstance(ort_session, Session) and isinstance(ov_session, Session)
    assert ort_session.active[0] == "CPUExecutionProvider" and ort_session.fallback is None
    assert ov_session.active == ("CPU",) and ov_session.fallback is None
    assert ov_session.exec_precision == "fp32"  # type: ignore[attr-defined]
    for s in (ort_session, ov_session):
        assert s.input_names == ("x",)
        assert s.output_names == ("hidden", "logits")


def test_outputs_filter(ort_session: Session, ov_session: Session) -> None:
    x = _x(3)
    for s in (ort_session, ov_session):
        only = s.run({"x": x}, outputs=["logits"])
        assert list(only) == ["logits"]
        np.testing.assert_allclose(only["logits"], s.run({"x": x})["logits"], rtol=1e-6)
        with pytest.raises(InputError, match="unknown output 'nope'") as err:
            s.run({"x": x}, outputs=["nope"])
        assert err.value.field == "outputs"


@pytest.mark.parametrize(
    ("inputs", "match", "field"),
    [
        ({}, "missing input 'x'", "x"),
        ({"x": np.zeros((2, 8), np.float32), "y": np.zeros(1)}, "unknown input 'y'", "y"),
        ({"x": np.zeros((2, 8), np.float64)}, "dtype float64, the model wants float32", "x"),
        ({"x": np.zeros((2, 5), np.float32)}, "size 5 on axis 1, the model wants 8", "x"),
        ({"x": np.zeros(8, np.float32)}, "rank 1", "x"),
    ],
)
def test_bad_inputs_are_input_errors(
    ort_session: Session, ov_session: Session, inputs: dict[str, np.ndarray], match: str, field: str
) -> None:
    for s in (ort_session, ov_session):
        with pytest.raises(InputError, match=match) as err:
            s.run(inputs)
        assert err.value.field == field


def test_openvino_opens_ir_xml(tiny_mlp: Path, tiny_mlp_ir: Path) -> None:
    session = OpenVinoBackend("ov-cpu").open(tiny_mlp_ir, FP32)
    assert session.input_names == ("x",) and set(session.output_names) == {"hidden", "logits"}
    x = _x(7, seed=3)
    out = session.run({"x": x})
    np.testing.assert_allclose(out["logits"], _reference(tiny_mlp, x)["logits"], rtol=1e-5, atol=1e-5)


def test_dynamic_batch_and_sequence(tiny_embedder: Path) -> None:
    ov = OpenVinoBackend("ov-cpu").open(tiny_embedder, FP32)
    ort = OrtBackend("ort-cpu").open(tiny_embedder, FP32)
    for batch, seq in ((1, 3), (7, 11), (2, 1)):
        ids = np.random.default_rng(seq).integers(0, 64, (batch, seq)).astype(np.int64)
        mask = np.ones((batch, seq), np.int64)
        mask[0, -1] = 0
        a = ort.run({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
        b = ov.run({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
        assert a.shape == b.shape == (batch, seq, 8)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert np.all(a[0, -1] == 0)


def test_openvino_precision_hint_is_really_set(tiny_mlp: Path, hardware: HardwareProfile) -> None:
    backend = OpenVinoBackend("ov-cpu")
    assert backend.compile_config(OpenOptions(exec_precision="fp32"))["INFERENCE_PRECISION_HINT"] == "f32"
    fp32 = backend.open(tiny_mlp, FP32)
    compiled = fp32._compiled
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    x = _x(7, seed=11)
    ref = fp32.run({"x": x})
    if "bf16" in backend.probe(hardware).precisions:
        bf16 = backend.open(tiny_mlp, OpenOptions(intra_op_threads=1, exec_precision="bf16"))
        assert bf16.exec_precision == "bf16" and bf16.fallback is None
        assert bf16._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
        got = bf16.run({"x": x})["logits"]
        np.testing.assert_allclose(got, ref["logits"], rtol=5e-2, atol=5e-2)
        assert not np.array_equal(got, ref["logits"])  # bf16 compute really happened
    else:
        with pytest.raises(FallbackError):
            backend.open(tiny_mlp, OpenOptions(intra_op_threads=1, exec_precision="bf16"))


def test_openvino_auto_proves_device_and_precision(tiny_mlp: Path) -> None:
    session = OpenVinoBackend("ov-auto").open(tiny_mlp, FP32)
    assert session.active and session.active[0].startswith("CPU")
    assert session.exec_precision == "fp32" and session.fallback is None
    x = _x(2)
    np.testing.assert_allclose(session.run({"x": x})["logits"], _reference(tiny_mlp, x)["logits"], rtol=1e-5, atol=1e-5)


def test_openvino_precision_mismatch_is_detected(
    tiny_mlp: Path, hardware: HardwareProfile, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fp16 on a CPU without fp16 compute: OpenVINO computes in bf16 (or fp32) instead, without a word.
    import runtime.backends.openvino as ov_backend

    backend = OpenVinoBackend("ov-cpu")
    options = OpenOptions(intra_op_threads=1, exec_precision="fp16")
    cpu = hardware.ov_device("CPU")
    assert cpu is not None
    if "FP16" in cpu.capabilities:
        # This CPU computes fp16 (AVX512-FP16 / AMX, seen on the 2026-12-04 box) and OpenVINO
        # honours the hint: no precision is swapped here, so the compiled model's answer is made
        # to be what a CPU without fp16 reads back, and the detection on it is what is tested.
        monkeypatch.setattr(ov_backend, "_read_precision", lambda compiled, device, devices: "bf16")
    with pytest.raises(FallbackError, match=r"asked OpenVINO for CPU/fp16, the compiled model runs CPU/") as err:
        backend.open(tiny_mlp, options)
    assert err.value.requested == "CPU/fp16"
    with caplog.at_level(logging.WARNING, logger="runtime.backends.openvino"):
        session = backend.open(tiny_mlp, OpenOptions(intra_op_threads=1, exec_precision="fp16", allow_fallback=True))
    assert session.fallback is not None and session.fallback.startswith("CPU/fp16 -> CPU/")
    assert session.exec_precision in ("bf16", "fp32")
    assert "running anyway" in caplog.text


def test_openvino_absent_device_is_unavailable(tiny_mlp: Path, hardware: HardwareProfile) -> None:
    assert hardware.ov_device("NPU") is None
    with pytest.raises(BackendUnavailableError, match="no NPU device"):
        OpenVinoBackend("ov-npu").open(tiny_mlp, FP32)


def test_openvino_config_options(tmp_path: Path, tiny_mlp: Path) -> None:
    backend = OpenVinoBackend("ov-cpu")
    options = OpenOptions(
        intra_op_threads=2, exec_precision="fp32", performance_hint="throughput", num_streams=2, cache_dir=tmp_path
    )
    config = backend.compile_config(options)
    assert config == {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": 2,
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": 2,
        "CACHE_DIR": str(tmp_path / "openvino"),
    }
    session = backend.open(tiny_mlp, options)
    compiled = session._compiled
    assert compiled.get_property("NUM_STREAMS") == 2
    (folder,) = [p for p in (tmp_path / "openvino").iterdir() if p.is_dir()]
    assert any(folder.glob("*.blob"))  # the compiled blob was cached, in the model's own folder
    with pytest.raises(BackendError, match="exec_precision 'int4'"):
        backend.compile_config(OpenOptions(exec_precision="int4"))


def test_compiled_blobs_no_load_used_for_30_days_are_removed(tmp_path: Path, tiny_mlp: Path) -> None:
    # OpenVINO never removes a blob: <home>/cache/openvino grew with every version ever loaded
    import os
    import time

    from runtime.backends.openvino import CACHE_STALE_S, model_cache

    root = tmp_path / "openvino"
    old_folder, recent = root / "0123456789abcdef", root / "fedcba9876543210"
    for folder in (old_folder, recent):
        folder.mkdir(parents=True)
        (folder / "x.blob").write_bytes(b"blob")
    flat = root / "1234.blob"  # the layout before: blobs straight in the cache
    flat.write_bytes(b"blob")
    lock = root / ".compile.lock"
    lock.write_bytes(b"")
    stale = time.time() - CACHE_STALE_S - 60
    for path in (old_folder, flat, lock):
        os.utime(path, (stale, stale))
    os.utime(recent, (time.time() - 3600, time.time() - 3600))
    mine = model_cache(root, tiny_mlp)
    assert mine.is_dir() and mine == model_cache(root, tiny_mlp)  # one folder per model file
    assert not old_folder.exists() and not flat.exists()
    assert recent.exists() and lock.exists()


# ---------------------------------------------------------------- ORT fallback proof


def test_ort_cuda_on_cpu_only_build_is_a_fallback_error(tiny_mlp: Path) -> None:
    # The real onnxruntime here has no CUDA EP: it warns and silently runs on CPU.
    with pytest.raises(FallbackError, match="asked onnxruntime for CUDAExecutionProvider") as err:
        get_backend("ort-cuda").open(tiny_mlp, FP32)
    assert err.value.requested == "CUDAExecutionProvider"
    assert err.value.active == ["CPUExecutionProvider"]
    assert "allow_fallback" in str(err.value)


def test_ort_allowed_fallback_is_recorded(tiny_mlp: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime.backends.ort"):
        session = OrtBackend("ort-tensorrt").open(
            tiny_mlp, OpenOptions(intra_op_threads=1, allow_fallback=True, cache_dir=None)
        )
    assert session.fallback == "TensorrtExecutionProvider -> CPUExecutionProvider"
    assert session.active == ("CPUExecutionProvider",)
    assert "running anyway" in caplog.text
    out = session.run({"x": _x(2)})
    np.testing.assert_allclose(out["logits"], _reference(tiny_mlp, _x(2))["logits"], rtol=1e-5, atol=1e-5)


def test_ort_injected_provider_list(tiny_mlp: Path) -> None:
    # A provider onnxruntime cannot even create ("EP Error ... Falling back"): same proof.
    backend = OrtBackend("ort-openvino", providers=["BogusExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(FallbackError, match="BogusExecutionProvider"):
        backend.open(tiny_mlp, FP32)
    session = backend.open(tiny_mlp, OpenOptions(intra_op_threads=1, allow_fallback=True))
    assert session.fallback == "BogusExecutionProvider -> CPUExecutionProvider"


def test_ort_sets_threads_and_refuses_other_precisions(tiny_mlp: Path) -> None:
    session = OrtBackend("ort-cpu").open(tiny_mlp, OpenOptions(intra_op_threads=2, inter_op_threads=1))
    opts = session._session.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    with pytest.raises(BackendError, match="computes in fp32 only"):
        OrtBackend("ort-cpu").open(tiny_mlp, OpenOptions(exec_precision="bf16"))


def test_bad_model_file_is_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    backend: Backend
    for backend in (OrtBackend("ort-cpu"), OpenVinoBackend("ov-cpu"), FakeBackend()):
        with pytest.raises(BackendError, match=r"bad\.onnx"):
            backend.open(bad, FP32)


def test_closed_session_refuses_to_run(tiny_mlp: Path) -> None:
    for backend in (OrtBackend("ort-cpu"), OpenVinoBackend("ov-cpu"), FakeBackend()):
        session = backend.open(tiny_mlp, FP32)
        session.close()
        with pytest.raises(BackendError, match="closed"):
            session.run({"x": _x(1)})


# ---------------------------------------------------------------- fake backend


def test_fake_is_deterministic_and_batch_consistent(tiny_mlp: Path) -> None:
    session = get_backend("fake").open(tiny_mlp, FP32)
    assert session.active == ("fake",) and session.fallback is None
    assert session.input_names == ("x",) and session.output_names == ("hidden", "logits")
    x = _x(7, seed=5)
    batch = session.run({"x": x})
    assert batch["hidden"].shape == (7, 16) and batch["logits"].shape == (7, 4)
    assert batch["logits"].dtype == np.float32
    again = FakeBackend().open(tiny_mlp, FP32).run({"x": x})
    for name in ("hidden", "logits"):
        np.testing.assert_array_equal(batch[name], again[name])
    for i in range(7):
        alone = session.run({"x": x[i : i + 1]})
        np.testing.assert_array_equal(alone["logits"][0], batch["logits"][i])
    assert not np.array_equal(batch["logits"][0], batch["logits"][1])  # depends on the row
    assert session.batch_sizes == [7, 1, 1, 1, 1, 1, 1, 1]  # type: ignore[attr-defined]
    assert list(session.run({"x": x}, outputs=["hidden"])) == ["hidden"]


def test_fake_token_outputs_ignore_padding(tiny_embedder: Path) -> None:
    session = FakeBackend().open(tiny_embedder, FP32)
    ids = np.array([[5, 9, 3, 0, 0], [7, 0, 0, 0, 0]], np.int64)
    mask = (ids != 0).astype(np.int64)
    padded = session.run({"input_ids": ids, "attention_mask": mask})["token_embeddings"]
    assert padded.shape == (2, 5, 8)  # seq taken from the inputs' "seq" dim
    alone = session.run({"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3]})["token_embeddings"]
    np.testing.assert_array_equal(alone[0], padded[0, :3])


def test_fake_json_spec_and_delay(tmp_path: Path) -> None:
    spec = tmp_path / "model.json"
    spec.write_text(
        json.dumps(
            {
                "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
                "outputs": [
                    {"name": "y", "dtype": "float32", "shape": [-1, 3]},
                    {"name": "k", "dtype": "int64", "shape": [-1]},
                ],
            }
        )
    )
    slept: list[float] = []
    session = FakeBackend(delay_s=0.25, sleep=slept.append).open(spec, FP32)
    out = session.run({"x": np.ones((2, 4), np.float32)})
    assert out["y"].shape == (2, 3) and out["k"].shape == (2,) and out["k"].dtype == np.int64
    assert slept == [0.25]
    with pytest.raises(InputError, match="size 5 on axis 1"):
        session.run({"x": np.ones((2, 5), np.float32)})
    probe = FakeBackend().probe()
    assert probe.usable and probe.speed_class == 0 and probe.runtime == "fake" and probe.formats == ("onnx",)


def test_ort_provider_options(tmp_path: Path) -> None:
    options = OpenOptions(cache_dir=tmp_path)
    trt = OrtBackend("ort-tensorrt")._provider_list(options)
    assert trt == [
        (
            "TensorrtExecutionProvider",
            {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "trt")},
        ),
        # the nodes TensorRT rejects run on CUDA (in fp32), not on the CPU
        ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0}),
        "CPUExecutionProvider",
    ]
    assert (tmp_path / "trt").is_dir()
    assert OrtBackend("ort-cuda")._provider_list(OpenOptions())[0] == (
        "CUDAExecutionProvider",
        {"device_id": 0, "use_tf32": 0},
    )
    ov_name, ov_opts = OrtBackend("ort-openvino")._provider_list(OpenOptions())[0]
    assert ov_name == "OpenVINOExecutionProvider" and ov_opts == {"device_type": "CPU", "precision": "FP32"}
    assert OrtBackend("ort-cpu")._provider_list(options) == ["CPUExecutionProvider"]


def test_ort_provider_that_raises_at_creation(tiny_mlp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # onnxruntime 1.32 warns and falls back; other builds raise when an EP cannot be created. Handle both.
    import onnxruntime

    real = onnxruntime.InferenceSession

    def strict_session(path: str, so: object, providers: list[object]) -> object:
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]  # type: ignore[index]
        if first != "CPUExecutionProvider":
            raise RuntimeError(f"EP Error: could not create {first}")
        return real(path, so, providers=providers)

    monkeypatch.setattr(onnxruntime, "InferenceSession", strict_session)
    with pytest.raises(FallbackError, match="could not create CUDAExecutionProvider") as err:
        OrtBackend("ort-cuda").open(tiny_mlp, FP32)
    assert err.value.active == []
    session = OrtBackend("ort-cuda").open(tiny_mlp, OpenOptions(intra_op_threads=1, allow_fallback=True))
    assert session.fallback == "CUDAExecutionProvider -> CPUExecutionProvider"
    assert set(session.run({"x": _x(1)})) == {"hidden", "logits"}


def test_a_compile_with_the_cache_holds_the_cache_lock_another_process_waits_for(
    tmp_path: Path, tiny_mlp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers (or a server's workers, or the batch worker) share cache/openvino: one that mapped a
    blob another was writing died of SIGBUS.  A compile with the cache holds an exclusive flock on
    <cache>/openvino/.compile.lock, which another process cannot take meanwhile."""
    import subprocess
    import sys

    backend = OpenVinoBackend("ov-cpu")
    core = backend._get_core()
    seen: list[int] = []
    real = core.compile_model
    probe = (
        "import fcntl, sys\n"
        "f = open(sys.argv[1], 'a+b')\n"
        "try:\n    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(7)\n"
    )
    lock = tmp_path / "openvino" / ".compile.lock"

    class Watched:
        def __getattr__(self, name: str) -> Any:
            return getattr(core, name)

        def compile_model(self, *args: Any) -> Any:
            seen.append(subprocess.run([sys.executable, "-c", probe, str(lock)], check=False).returncode)
            return real(*args)

    monkeypatch.setattr(backend, "_get_core", Watched)
    backend.open(tiny_mlp, OpenOptions(intra_op_threads=1, exec_precision="fp32", cache_dir=tmp_path))
    assert seen == [7]  # held during the compile
    done = subprocess.run([sys.executable, "-c", probe, str(lock)], check=False)
    assert done.returncode == 0  # and let go after it


def test_an_ort_open_hands_on_warnings_other_threads_raised_meanwhile(
    tiny_mlp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open catches warnings process-wide: a Litestar DeprecationWarning the event loop raised
    during it was logged as "onnxruntime warned" (review 14). Now only onnxruntime's own are logged
    as its; the others go on to Python's warnings as if nothing had caught them."""
    import warnings

    import onnxruntime

    real = onnxruntime.InferenceSession

    def opening(*args: Any, **kwargs: Any) -> Any:
        warnings.warn("from elsewhere", DeprecationWarning, stacklevel=1)  # this file: not onnxruntime's
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", opening)
    before = list(warnings.filters)
    with (
        caplog.at_level(logging.INFO, logger="runtime.backends.ort"),
        pytest.warns(DeprecationWarning, match="from elsewhere"),
    ):
        OrtBackend("ort-cpu").open(tiny_mlp, FP32).close()
    assert not [r for r in caplog.records if "from elsewhere" in r.getMessage()]
    assert warnings.filters == before


def test_openvino_sessions_closed_first_in_first_out_leave_signals_working(tiny_mlp_ir: Path, tmp_path: Path) -> None:
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack per Core and puts back the one
    it saw: with a Core per open, two sessions closed in the order they were opened left the thread
    on a freed stack, and the next signal (Ctrl-C, SIGTERM, SIGHUP) was a segmentation fault. It
    broke a test process that had exported in-process, and then its SIGHUP test (review 14)."""
    import subprocess
    import sys

    script = tmp_path / "fifo.py"
    script.write_text(
        "import gc, os, signal, sys, time\n"
        # a test run started in the background by a non-interactive shell (`sh -c 'make test &'`)
        # hands every process SIGINT ignored, and the signal was a no-op (exit 0, nothing printed);
        # the alternate signal stack is what is tested
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "from runtime.backends.base import OpenOptions\n"
        "from runtime.backends.openvino import OpenVinoBackend\n"
        "from runtime.hardware import probe_hardware\n"
        "probe_hardware()\n"
        "first = OpenVinoBackend('ov-cpu').open(sys.argv[1], OpenOptions(exec_precision='fp32'))\n"
        "second = OpenVinoBackend('ov-cpu').open(sys.argv[1], OpenOptions(exec_precision='fp32'))\n"
        "first.close(); del first; gc.collect()\n"
        "second.close(); del second; gc.collect()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(1)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted cleanly')\n"
    )
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, str(script), str(tiny_mlp_ir)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0 and "interrupted cleanly" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_an_input_onnxruntime_rejects_is_an_input_error_and_writes_nothing_to_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A client's out-of-range token id is a 400 for that client; onnxruntime's own coloured
    ``[E:onnxruntime...]`` line for it went to the service's stderr, one per bad request."""
    import onnx
    from onnx import TensorProto, helper

    table = helper.make_tensor("E", TensorProto.FLOAT, [4, 2], np.arange(8, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "i"], ["y"])],
        "gather",
        [helper.make_tensor_value_info("i", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [table],
    )
    path = tmp_path / "gather.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    session = OrtBackend("ort-cpu").open(path, OpenOptions())
    capfd.readouterr()
    with pytest.raises(InputError, match="out of data bounds"):
        session.run({"i": np.array([9], np.int64)})
    np.testing.assert_array_equal(session.run({"i": np.array([1], np.int64)})["y"], [[2.0, 3.0]])
    assert capfd.readouterr().err == ""
