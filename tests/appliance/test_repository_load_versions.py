"""``POST /v2/repository/models/NAME/load`` on the server's own registry (real packages, real ONNX Runtime
sessions): after ``inferbox models remove`` of the loaded version, the load serves the newest version left
(a rollback); the answer says which version serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from litestar.testing import TestClient

from appliance import server as server_mod
from appliance.models.removing import remove_package
from appliance.settings import Settings, load_settings
from tests.runtime.conftest import publish_embedder, publish_mlp

X = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8], "data": X.ravel().tolist()}]}


@pytest.fixture
def box(tmp_path: Path) -> Iterator[tuple[Settings, TestClient[Any]]]:
    home = tmp_path / "home"
    for version in (1, 2, 3):  # the seed is the version: each answers its own logits
        publish_mlp(home / "models", ["ort-cpu"], "mlp", version=version, seed=version)
    settings = load_settings({"home": home, "auth": False, "audit": False, "backend": "ort-cpu"}, environ={})
    with TestClient(server_mod.build_app(settings)) as client:
        yield settings, client


def _logits(settings: Settings, version: int) -> np.ndarray:
    path = settings.repository / "mlp" / str(version) / "onnx" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"x": X})[0])


def _served(client: TestClient[Any]) -> tuple[str, np.ndarray]:
    """(the model_version, the logits) of one inference."""
    r = client.post("/v2/models/mlp/infer", json=BODY)
    assert r.status_code == 200, r.text
    logits = next(o for o in r.json()["outputs"] if o["name"] == "logits")
    return r.json()["model_version"], np.asarray(logits["data"], np.float32).reshape(2, 4)


def test_a_load_after_the_loaded_version_was_removed_serves_the_newest_left(
    box: tuple[Settings, TestClient[Any]],
) -> None:
    """The load answered 200 and left the removed version 3 serving (it returned early: nothing on disk
    was newer than what was loaded)."""
    settings, client = box
    assert _served(client)[0] == "3"
    expected_v2 = _logits(settings, 2)
    remove_package(settings, "mlp", 3)
    r = client.post("/v2/repository/models/mlp/load")
    assert r.status_code == 200, r.text
    assert r.json() == {}  # KServe's answer; the header says what serves now
    assert r.headers["X-Model-Version"] == "2"
    assert r.headers["X-Model-Variant"] == "ort-cpu/onnx-fp32/fp32"
    assert client.get("/v2/models/mlp").json()["versions"] == ["2"]
    version, logits = _served(client)
    assert version == "2"
    np.testing.assert_allclose(logits, expected_v2, rtol=1e-5, atol=1e-6)
    rows = {e["version"]: e["state"] for e in client.post("/v2/repository/index").json()}
    assert rows == {"1": "UNAVAILABLE", "2": "READY"}, rows


def test_a_load_serves_another_package_put_under_the_loaded_version_number(
    box: tuple[Settings, TestClient[Any]],
) -> None:
    """Version 3 removed and a new version 3 exported (the next free number): the same number, another
    package; the load must not keep the removed one."""
    settings, client = box
    remove_package(settings, "mlp", 3)
    publish_mlp(settings.repository, ["ort-cpu"], "mlp", version=3, seed=33)
    r = client.post("/v2/repository/models/mlp/load")
    assert r.status_code == 200 and r.headers["X-Model-Version"] == "3", r.text
    np.testing.assert_allclose(_served(client)[1], _logits(settings, 3), rtol=1e-5, atol=1e-6)


def test_a_load_of_a_model_whose_every_version_was_removed_says_what_still_serves(
    box: tuple[Settings, TestClient[Any]],
) -> None:
    settings, client = box
    for version in (1, 2, 3):
        remove_package(settings, "mlp", version)
    r = client.post("/v2/repository/models/mlp/load")
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert "not in the repository" in error and "version 3" in error and "/v2/repository/models/mlp/unload" in error
    assert _served(client)[0] == "3"  # nothing changed: a load does not unload
    assert client.post("/v2/repository/models/mlp/unload").status_code == 200
    assert client.post("/v2/models/mlp/infer", json=BODY).status_code == 404


def test_a_load_of_a_version_with_another_interface_warns_in_the_server_log(
    box: tuple[Settings, TestClient[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Export and import refuse such a version unless told it is meant (``--new-interface``); the load
    that swaps it in says so in the log, for whoever wonders why a client broke."""
    import logging

    settings, client = box
    publish_embedder(settings.repository, "mlp", version=4, dim=8)  # a text embedding model under mlp's name
    with caplog.at_level(logging.WARNING, logger="runtime.serving"):
        r = client.post("/v2/repository/models/mlp/load")
    assert r.status_code == 200 and r.headers["X-Model-Version"] == "4", r.text
    (warning,) = [m.getMessage() for m in caplog.records if "another interface" in m.getMessage()]
    assert "'mlp' version 4 replaced version 3 with another interface: task tensor -> feature-extraction" in warning
    assert "embedding dimension none -> 8" in warning
    r = client.post("/v1/embeddings", json={"model": "mlp", "input": ["a text"]})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8, r.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.serving"):
        publish_embedder(settings.repository, "mlp", version=5, dim=8)  # the same interface again: no word
        assert client.post("/v2/repository/models/mlp/load").headers["X-Model-Version"] == "5"
    assert not [m for m in caplog.records if "another interface" in m.getMessage()]
