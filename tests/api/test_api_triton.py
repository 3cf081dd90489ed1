"""Triton's model configuration and statistics extensions (``/v2/models/.../config`` and ``.../stats``).

The statistics are held to what the requests sent: rows, requests, batches and the batch sizes
must add up to the traffic, and a failed request must count as a failure of its version.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.keys import KeyStore

from .conftest import DIM, MemoryAudit, infer_json, make_registry, tensor_model, text_model

X = np.arange(8, dtype=np.float32).reshape(2, 4)
IDS = np.arange(6, dtype=np.int64).reshape(2, 3)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = KeyStore(tmp_path / "state.db")
    yield s
    s.close()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _stat(body: dict[str, Any], name: str) -> dict[str, Any]:
    found = [s for s in body["model_stats"] if s["name"] == name]
    assert len(found) == 1, body
    return found[0]


def test_config_is_the_metadata_in_tritons_terms(client_factory: Any) -> None:
    c = client_factory(max_batch_size=16, max_queue_delay_s=0.003)
    r = c.get("/v2/models/tabular/config")
    assert r.status_code == 200, r.text
    cfg = r.json()
    assert cfg["name"] == "tabular" and cfg["max_batch_size"] == 0
    assert cfg["input"] == [
        {"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]},
        {"name": "ids", "data_type": "TYPE_INT64", "dims": [-1, 3]},
    ]
    assert cfg["output"] == [
        {"name": "y", "data_type": "TYPE_FP32", "dims": [-1, 3]},
        {"name": "z", "data_type": "TYPE_INT32", "dims": [-1, 2]},
    ]
    assert cfg["instance_group"] == [{"name": "tabular_0", "kind": "KIND_CPU", "count": 1}]
    params = {k: v["string_value"] for k, v in cfg["parameters"].items()}
    assert params["server_max_batch_size"] == "16" and params["max_queue_delay_ms"] == "3"
    assert params["version"] == "1" and params["variant"] == "onnx-fp32"
    meta = c.get("/v2/models/tabular").json()
    assert cfg["platform"] == meta["platform"]

    text = c.get("/v2/models/minilm/versions/1/config").json()
    assert text["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [-1]}]
    assert text["output"][0]["data_type"] == "TYPE_FP32" and text["output"][0]["dims"] == [-1, DIM]
    assert c.get("/v2/models/minilm/versions/7/config").status_code == 404
    assert c.get("/v2/models/ghost/config").status_code == 404
    assert {"model_configuration", "statistics"} <= set(c.get("/v2").json()["extensions"])


def test_statistics_add_up_to_the_traffic(client_factory: Any, audit: MemoryAudit) -> None:
    c = client_factory()
    before = time.time()
    fresh = _stat(c.get("/v2/models/stats").json(), "minilm")
    assert fresh["version"] == "1" and fresh["inference_count"] == 0 and fresh["execution_count"] == 0
    assert fresh["last_inference"] == 0 and fresh["batch_stats"] == []
    assert fresh["inference_stats"]["success"] == {"count": 0, "ns": 0}

    for i in range(5):  # 5 requests of 3 texts on /v1/embeddings
        r = c.post("/v1/embeddings", json={"model": "minilm", "input": [f"a{i}", "b b", "c c c"]})
        assert r.status_code == 200, r.text
    kserve = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x", "y"]}]}
    assert c.post("/v2/models/minilm/infer", json=kserve).status_code == 200
    wrong = {"inputs": [{"name": "words", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    assert c.post("/v2/models/minilm/infer", json=wrong).status_code == 400
    assert c.get("/v2/models/minilm").status_code == 200  # metadata: not an inference
    assert c.post("/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS})).status_code == 200

    s = _stat(c.get("/v2/models/minilm/stats").json(), "minilm")
    inf = s["inference_stats"]
    assert inf["success"]["count"] == 6 and inf["fail"]["count"] == 1
    assert inf["success"]["ns"] > 0 and inf["fail"]["ns"] > 0
    assert s["inference_count"] == 17  # rows: 5 x 3 texts + 2
    # per request answered, as Triton counts them (ns / count: a request's average, next to success's)
    assert inf["queue"]["count"] == 6 and inf["compute_infer"]["count"] == 6
    assert inf["compute_infer"]["ns"] > 0
    batches = s["batch_stats"]
    assert sum(b["compute_infer"]["count"] for b in batches) == s["execution_count"] >= 1
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == 17
    assert all(b["compute_infer"]["ns"] > 0 for b in batches)
    assert before * 1000 - 1 <= s["last_inference"] <= time.time() * 1000 + 1

    tab = _stat(c.get("/v2/models/tabular/versions/1/stats").json(), "tabular")
    assert tab["inference_count"] == 2  # one request of 2 rows
    assert tab["inference_stats"]["queue"]["count"] == 1 and tab["inference_stats"]["success"]["count"] == 1
    everything = c.get("/v2/models/stats").json()
    assert {m["name"] for m in everything["model_stats"]} == {"minilm", "tabular"}
    assert c.get("/v2/models/tabular/versions/2/stats").status_code == 404
    # reading them is a metadata read in the audit log, not an inference
    assert audit.events[-1].event == "metadata"


def test_a_new_version_counts_from_zero(tmp_path: Path, client_factory: Any) -> None:
    registry = make_registry([text_model(tmp_path)])
    c = client_factory(registry=registry)
    assert c.post("/v1/embeddings", json={"model": "minilm", "input": ["a", "b"]}).status_code == 200
    registry.add(text_model(tmp_path, version=2))
    assert c.post("/v1/embeddings", json={"model": "minilm", "input": ["c"]}).status_code == 200
    s = _stat(c.get("/v2/models/minilm/stats").json(), "minilm")
    assert s["version"] == "2" and s["inference_count"] == 1
    assert s["inference_stats"]["success"]["count"] == 1
    # the same version loaded again (an unload and a load) counts from zero too, its requests as its batches
    registry.add(text_model(tmp_path, version=2))
    s = _stat(c.get("/v2/models/minilm/stats").json(), "minilm")
    assert s["inference_count"] == 0 and s["inference_stats"]["success"]["count"] == 0


def test_a_narrowed_key_sees_only_its_models(client_factory: Any, store: KeyStore) -> None:
    c = client_factory(keys=store)
    _, only_tabular = store.create(["infer:tabular"])
    _, admin = store.create(["models:admin"])
    body = c.get("/v2/models/stats", headers=_h(only_tabular)).json()
    assert [m["name"] for m in body["model_stats"]] == ["tabular"]
    assert c.get("/v2/models/minilm/stats", headers=_h(only_tabular)).status_code == 403
    assert c.get("/v2/models/minilm/config", headers=_h(only_tabular)).status_code == 403
    assert c.get("/v2/models/tabular/config", headers=_h(only_tabular)).status_code == 200
    assert c.get("/v2/models/stats", headers=_h(admin)).status_code == 403
    assert c.get("/v2/models/stats").status_code == 401


def test_the_statistics_route_wins_over_a_model_named_stats(tmp_path: Path, client_factory: Any) -> None:
    # a package can no longer be called "stats" (runtime.package.RESERVED_NAMES); one published before
    # keeps its other routes, and its metadata under its version
    c = client_factory([tensor_model(tmp_path, name="stats")])
    assert c.get("/v2/models/stats/ready").json() == {"name": "stats", "ready": True}
    assert [m["name"] for m in c.get("/v2/models/stats").json()["model_stats"]] == ["stats"]
    assert c.get("/v2/models/stats/versions/1").json()["name"] == "stats"
    assert _stat(c.get("/v2/models/stats/stats").json(), "stats")["version"] == "1"
