"""A model whose session fell back (``allow_fallback``) says so where the API describes it: the
KServe metadata, ``/metrics`` model_info and every audit record of a request to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from api.kserve import model_metadata
from api.metrics import ModelInfo
from tests.api.conftest import MemoryAudit, infer_json, tensor_model

FELL_BACK = "CUDAExecutionProvider -> CPUExecutionProvider"


def _fallen_back(tmp_path: Path) -> Any:
    model = tensor_model(tmp_path, name="fb")
    model.backend = "ort-cpu"  # what the loader reports: the backend that ran (runtime tests prove it)
    model.session.fallback = FELL_BACK
    return model


def test_kserve_metadata_names_the_fallback_and_the_precision(tmp_path: Path) -> None:
    params = model_metadata(_fallen_back(tmp_path))["parameters"]
    assert params["backend"] == "ort-cpu"
    assert params["fallback"] == FELL_BACK
    assert params["exec_precision"] == "fp32"
    assert model_metadata(tensor_model(tmp_path))["parameters"]["fallback"] == ""


def test_model_info_carries_the_fallback_label(tmp_path: Path) -> None:
    info = ModelInfo.of(_fallen_back(tmp_path))
    assert (info.backend, info.fallback) == ("ort-cpu", FELL_BACK)
    assert ModelInfo.of(tensor_model(tmp_path)).fallback == ""


def test_http_metadata_metrics_and_audit_say_the_session_fell_back(
    tmp_path: Path, client_factory: Any, audit: MemoryAudit
) -> None:
    fallen, plain = _fallen_back(tmp_path), tensor_model(tmp_path, name="plain")
    client = client_factory([fallen, plain])

    meta = client.get("/v2/models/fb")
    assert meta.status_code == 200, meta.text
    assert meta.json()["parameters"]["fallback"] == FELL_BACK

    metrics = client.get("/metrics").text
    info = [line for line in metrics.splitlines() if line.startswith("inferbox_model_info{")]
    fb_line = next(line for line in info if 'model="fb"' in line)
    plain_line = next(line for line in info if 'model="plain"' in line)
    assert 'backend="ort-cpu"' in fb_line and f'fallback="{FELL_BACK}"' in fb_line
    assert 'fallback=""' in plain_line

    x = np.zeros((1, 4), dtype=np.float32)
    ids = np.zeros((1, 3), dtype=np.int64)
    for name in ("fb", "plain"):
        r = client.post(f"/v2/models/{name}/infer", json=infer_json({"x": x, "ids": ids}))
        assert r.status_code == 200, r.text
    records = {e.model_name: e for e in audit.events if e.event == "inference"}
    assert records["fb"].backend == "ort-cpu"
    assert records["fb"].details["fallback"] == FELL_BACK
    assert "fallback" not in records["plain"].details
