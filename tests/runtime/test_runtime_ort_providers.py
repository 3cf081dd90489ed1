"""What the ONNX Runtime GPU backends ask onnxruntime for (no GPU here: the provider list handed to
``InferenceSession`` is captured).  fp32 means fp32: the CUDA EP gets ``use_tf32 = 0`` (its default
computes fp32 MatMul/Conv in TF32 on Ampere+); TensorRT falls to CUDA, not to the CPU, for the
nodes it rejects, and runs with NVIDIA_TF32_OVERRIDE=0 (it has no per-session TF32 switch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime
import pytest

from runtime.backends.base import OpenOptions
from runtime.backends.ort import OrtBackend

CUDA_FP32 = ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0})


def test_cuda_is_asked_for_fp32_not_tf32() -> None:
    assert OrtBackend("ort-cuda")._provider_list(OpenOptions()) == [CUDA_FP32, "CPUExecutionProvider"]


def test_tensorrt_falls_to_cuda_then_cpu(tmp_path: Path) -> None:
    providers = OrtBackend("ort-tensorrt")._provider_list(OpenOptions(cache_dir=tmp_path))
    names = [p if isinstance(p, str) else p[0] for p in providers]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers[1] == CUDA_FP32
    trt = providers[0][1]  # type: ignore[index]
    assert trt["trt_engine_cache_path"] == str(tmp_path / "trt")


class _FakeSession:
    """Stands in for InferenceSession on a GPU box: every requested provider loads."""

    seen: list[Any] = []
    env: list[str | None] = []

    def __init__(self, path: str, so: Any, providers: list[Any]) -> None:
        _FakeSession.seen.append(providers)
        _FakeSession.env.append(os.environ.get("NVIDIA_TF32_OVERRIDE"))
        self._providers = [p if isinstance(p, str) else p[0] for p in providers]

    def get_providers(self) -> list[str]:
        return self._providers

    def get_inputs(self) -> list[Any]:
        return []

    def get_outputs(self) -> list[Any]:
        return []


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-tensorrt"])
def test_open_hands_the_fp32_provider_options_to_onnxruntime(
    backend: str, tiny_mlp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "restored after the test")  # so that the open's value is undone
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE")
    _FakeSession.seen.clear()
    _FakeSession.env.clear()
    session = OrtBackend(backend).open(tiny_mlp, OpenOptions())
    (providers,) = _FakeSession.seen
    assert CUDA_FP32 in providers
    assert session.active[-1] == "CPUExecutionProvider" and session.fallback is None
    (env,) = _FakeSession.env
    assert env == ("0" if backend == "ort-tensorrt" else None)


def test_an_operator_tf32_override_is_kept_but_warned(
    tiny_mlp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(onnxruntime, "InferenceSession", _FakeSession)
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
    OrtBackend("ort-tensorrt").open(tiny_mlp, OpenOptions())
    assert os.environ["NVIDIA_TF32_OVERRIDE"] == "1"
    assert any("TF32" in r.getMessage() for r in caplog.records)
