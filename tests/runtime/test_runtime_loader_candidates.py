"""The loader with ``backend = auto`` moves on to the next admissible candidate when the choice's
session cannot be proved (onnxruntime-gpu lists TensorRT and CUDA whether or not they work), and a
model loaded with ``allow_fallback`` names the backend that really runs.  The GPU box is simulated:
this onnxruntime has no CUDA / TensorRT, so asking for them runs on the CPU, as it does on a GPU
box where TensorRT is not installed."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest

from runtime.backends.base import Probe, Session
from runtime.backends.registry import probe_all, ran_on
from runtime.errors import FallbackError, SelectionError
from runtime.hardware import GpuInfo, HardwareProfile, default_threads, probe_hardware
from runtime.loader import LoaderOptions, load_model, open_first
from runtime.selection import Candidate, Decision, Verdict
from tests.runtime.conftest import publish_mlp

ORT_ALL = ["ort-tensorrt", "ort-cuda", "ort-cpu"]


@pytest.fixture(scope="module")
def gpu_probes() -> list[Probe]:
    """A box with onnxruntime-gpu (TensorRT, CUDA listed) and an NVIDIA GPU that nvidia-smi sees."""
    real = probe_hardware(nvidia_smi="/nonexistent")
    assert real.onnxruntime is not None
    ort = msgspec.structs.replace(
        real.onnxruntime, providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    )
    box: HardwareProfile = msgspec.structs.replace(
        real, onnxruntime=ort, gpus=(GpuInfo(name="NVIDIA A10"),), nvidia_smi="/usr/bin/nvidia-smi"
    )
    return probe_all(box)


def test_auto_moves_on_to_the_next_candidate_and_logs_each_failed_proof(
    tmp_path: Path, gpu_probes: list[Probe], caplog: pytest.LogCaptureFixture
) -> None:
    repo = publish_mlp(tmp_path / "models", ORT_ALL)
    with caplog.at_level(logging.WARNING, logger="runtime.loader"):
        model = load_model(repo, "mlp", options=LoaderOptions(), probes=gpu_probes)
    try:
        assert model.backend == "ort-cpu"
        assert model.session.active[0] == "CPUExecutionProvider" and model.session.fallback is None
    finally:
        model.close()
    failed = [r.getMessage() for r in caplog.records if "could not be opened and proved" in r.getMessage()]
    assert [m.split(":")[1].strip().split()[0] for m in failed] == [
        "ort-tensorrt/onnx-fp32/fp32",
        "ort-cuda/onnx-fp32/fp32",
    ]
    assert all("FallbackError" in m for m in failed)


def test_a_forced_backend_still_fails_loudly(tmp_path: Path, gpu_probes: list[Probe]) -> None:
    repo = publish_mlp(tmp_path / "models", ORT_ALL)
    with pytest.raises(FallbackError, match="TensorrtExecutionProvider"):
        load_model(repo, "mlp", options=LoaderOptions(backend="ort-tensorrt"), probes=gpu_probes)


def test_when_every_candidate_fails_the_error_lists_each(tmp_path: Path, gpu_probes: list[Probe]) -> None:
    repo = publish_mlp(tmp_path / "models", ["ort-tensorrt", "ort-cuda"])
    with pytest.raises(SelectionError) as err:
        load_model(repo, "mlp", options=LoaderOptions(), probes=gpu_probes)
    text = str(err.value)
    assert "every admissible" in text
    assert "ort-tensorrt/onnx-fp32/fp32: could not be opened and proved here: FallbackError" in text
    assert "ort-cuda/onnx-fp32/fp32: could not be opened and proved here: FallbackError" in text


def test_an_allowed_fallback_reports_the_backend_that_ran(tmp_path: Path, gpu_probes: list[Probe]) -> None:
    repo = publish_mlp(tmp_path / "models", ORT_ALL)
    model = load_model(repo, "mlp", options=LoaderOptions(backend="ort-cuda", allow_fallback=True), probes=gpu_probes)
    try:
        assert model.session.active[0] == "CPUExecutionProvider"
        assert model.session.fallback == "CUDAExecutionProvider -> CPUExecutionProvider"
        assert (model.backend, model.exec_precision) == ("ort-cpu", "fp32")
    finally:
        model.close()


def test_workers_share_the_cores_of_a_threads_0_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an 8-core budget one worker's session takes 8 threads, each of two workers' 4 (on the 2-core CI
    box both were 1, and a loader that ignored ``workers`` passed)."""
    import psutil

    import runtime.hardware as hardware

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda *a, **k: None)
    assert (default_threads(1), default_threads(2)) == (8, 4)
    repo = publish_mlp(tmp_path / "models", ["ort-cpu"])
    for workers, threads in ((1, 8), (2, 4)):
        model = load_model(repo, "mlp", options=LoaderOptions(backend="ort-cpu", workers=workers))
        try:
            assert model.session.threads == threads  # type: ignore[attr-defined]
        finally:
            model.close()


def test_ran_on_maps_what_the_proof_found_to_a_backend() -> None:
    assert ran_on("ort-cuda", ("CPUExecutionProvider",)) == "ort-cpu"
    assert ran_on("ort-tensorrt", ("CUDAExecutionProvider", "CPUExecutionProvider")) == "ort-cuda"
    assert ran_on("ort-cuda", ("CUDAExecutionProvider",)) == "ort-cuda"
    assert ran_on("ov-gpu", ("CPU",)) == "ov-cpu"
    assert ran_on("ov-auto", ("GPU.0",)) == "ov-auto"
    assert ran_on("ov-npu", ("NPU",)) == "ov-npu"
    assert ran_on("fake", ("x",)) == "fake"


class _Stub:
    backend = "stub"
    input_names = ("x",)
    output_names = ("y",)

    def __init__(self, active: tuple[str, ...], fallback: str | None = None, exec_precision: str = "fp32") -> None:
        self.active, self.fallback, self.exec_precision = active, fallback, exec_precision

    def run(self, inputs: object, outputs: object = None) -> dict[str, object]:
        return {}

    def close(self) -> None:
        pass


def _decision() -> Decision:
    a, b, c = Candidate("ov-gpu", "ov", "fp16"), Candidate("ov-cpu", "ov", "bf16"), Candidate("ort-cpu", "onnx", "fp32")
    return Decision(
        choice=a,
        verdicts=(
            Verdict(a, True, "#1", 3.0),
            Verdict(b, True, "#2", 2.0),
            Verdict(c, True, "#3", 1.0),
            Verdict(Candidate("ort-cuda", "onnx", "fp32"), False, "no GPU", 0.0),
        ),
    )


def test_open_first_records_failures_as_rejected_verdicts() -> None:
    tried: list[str] = []

    def open_candidate(cand: Candidate) -> tuple[Session, Session, int]:
        tried.append(str(cand))
        if cand.backend == "ov-gpu":
            raise FallbackError("ov-gpu: asked OpenVINO for GPU/fp16, the compiled model runs CPU/bf16", "GPU", ["CPU"])
        s = _Stub(("CPU",), exec_precision="bf16")
        return s, s, 1

    opened = open_first(_decision(), open_candidate, where="m/1")
    assert tried == ["ov-gpu/ov/fp16", "ov-cpu/ov/bf16"]
    assert (str(opened.candidate), opened.backend, opened.exec_precision) == ("ov-cpu/ov/bf16", "ov-cpu", "bf16")
    (failed,) = opened.failed
    assert not failed.admissible and "FallbackError" in failed.reason and "GPU/fp16" in failed.reason
    d = opened.decision
    assert d.choice == opened.candidate and d.verdicts[0].candidate == opened.candidate
    assert [str(v.candidate) for v in d.admissible] == ["ov-cpu/ov/bf16", "ort-cpu/onnx/fp32"]
    assert failed in d.rejected


def test_open_first_skips_what_is_no_longer_admissible_and_reports_a_fallback() -> None:
    """A cached decision's runners-up are tried only while the fresh ranking admits them."""
    tried: list[str] = []

    def open_candidate(cand: Candidate) -> tuple[Session, Session, int]:
        tried.append(str(cand))
        if cand.backend != "ort-cpu":
            raise FallbackError("no", "x", [])
        s = _Stub(("CPUExecutionProvider",))
        return s, s, 1

    base = _decision()
    fresh = Decision(
        choice=base.choice,
        verdicts=tuple(
            Verdict(v.candidate, False, "gone", 0.0) if v.candidate.backend == "ov-cpu" else v for v in base.verdicts
        ),
    )
    opened = open_first(base, open_candidate, where="m/1", fresh=fresh)
    assert tried == ["ov-gpu/ov/fp16", "ort-cpu/onnx/fp32"]
    assert opened.backend == "ort-cpu"

    def falls_back(cand: Candidate) -> tuple[Session, Session, int]:
        s = _Stub(("CPU",), fallback="GPU/fp16 -> CPU/bf16", exec_precision="bf16")
        return s, s, 1

    opened = open_first(base, falls_back, where="m/1")
    assert (opened.backend, opened.exec_precision) == ("ov-cpu", "bf16")  # what ran, not what was chosen
    with pytest.raises(FallbackError):
        open_first(base, open_candidate, where="m/1", forced=True)
