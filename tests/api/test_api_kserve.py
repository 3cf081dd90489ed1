"""KServe v2 routes in process: metadata, health, infer (JSON nested/flat, binary), repository, errors."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from api.codec import DATATYPES, encode_bytes_elements
from runtime.serving import IndexEntry

from .conftest import MAX_LENGTH, infer_json, make_registry, tensor_model, text_model

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
IDS = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)


def _expected(tmp_path: Path, x: np.ndarray = X, ids: np.ndarray = IDS) -> dict[str, np.ndarray]:
    return tensor_model(tmp_path, name="ref").session.run({"x": x, "ids": ids})


def _outputs(body: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        o["name"]: np.asarray(o["data"], dtype=DATATYPES[o["datatype"]]).reshape(o["shape"]) for o in body["outputs"]
    }


def test_server_metadata_and_health(client_factory: Any) -> None:
    c = client_factory()
    assert c.get("/v2").json() == {
        "name": "inferbox",
        "version": "0.1.0",
        "extensions": [
            "binary_tensor_data",
            "classification",
            "model_repository",
            "model_configuration",
            "statistics",
        ],
    }
    assert c.get("/v2/health/live").json() == {"live": True}
    r = c.get("/v2/health/ready")
    assert (r.status_code, r.json()) == (200, {"ready": True})


def test_not_ready_without_models(client_factory: Any) -> None:
    c = client_factory([])
    r = c.get("/v2/health/ready")
    assert (r.status_code, r.json()) == (503, {"ready": False})


def test_model_metadata_and_ready(client_factory: Any) -> None:
    c = client_factory()
    meta = c.get("/v2/models/tabular").json()
    assert meta["name"] == "tabular" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
    ]
    assert meta["outputs"][1] == {"name": "z", "datatype": "INT32", "shape": [-1, 2]}
    assert c.get("/v2/models/tabular/versions/1").json()["name"] == "tabular"
    assert c.get("/v2/models/minilm").json()["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert c.get("/v2/models/tabular/ready").json() == {"name": "tabular", "ready": True}
    assert c.get("/v2/models/tabular/versions/1/ready").status_code == 200
    assert c.get("/v2/models/tabular/versions/2").status_code == 404
    assert c.get("/v2/models/nope/ready").status_code == 404


def test_ready_false_for_a_model_on_disk_but_not_loaded(client_factory: Any, tmp_path: Path) -> None:
    registry = make_registry([tensor_model(tmp_path)], on_disk=[IndexEntry("other", 3, "UNAVAILABLE", "")])
    c = client_factory(registry=registry)
    r = c.get("/v2/models/other/ready")
    assert (r.status_code, r.json()) == (503, {"name": "other", "ready": False})


@pytest.mark.parametrize("nested", [False, True])
def test_infer_json_matches_the_session(client_factory: Any, tmp_path: Path, nested: bool) -> None:
    c = client_factory()
    body = infer_json({"x": X, "ids": IDS}, id="req-7", parameters={"trace": "t1"})
    if nested:
        body["inputs"][0]["data"] = X.tolist()
        body["inputs"][1]["data"] = IDS.tolist()
    r = c.post("/v2/models/tabular/infer", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["id"] == "req-7" and got["model_name"] == "tabular" and got["model_version"] == "1"
    assert got["parameters"] == {"trace": "t1"}
    expected = _expected(tmp_path)
    out = _outputs(got)
    np.testing.assert_array_equal(out["y"], expected["y"])
    np.testing.assert_array_equal(out["z"], expected["z"])
    assert c.post("/v2/models/tabular/versions/1/infer", json=body).json()["outputs"] == got["outputs"]


def test_requested_outputs_are_honoured(client_factory: Any) -> None:
    c = client_factory()
    r = c.post("/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS}, outputs=[{"name": "z"}]))
    assert [o["name"] for o in r.json()["outputs"]] == ["z"]
    r = c.post("/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS}, outputs=[{"name": "nope"}]))
    assert r.status_code == 400
    assert "outputs[0].name" in r.json()["error"] and "nope" in r.json()["error"]


def test_binary_request_and_response_roundtrip(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory()
    xb, ib = X.tobytes(), IDS.tobytes()
    header = msgspec.json.encode(
        {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": len(xb)}},
                {"name": "ids", "shape": [2, 3], "datatype": "INT64", "parameters": {"binary_data_size": len(ib)}},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        }
    )
    r = c.post(
        "/v2/models/tabular/infer",
        content=header + xb + ib,
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    meta = msgspec.json.decode(r.content[:n])
    y_meta, z_meta = meta["outputs"]
    assert y_meta["parameters"]["binary_data_size"] == 2 * 3 * 4 and "data" not in y_meta
    expected = _expected(tmp_path)
    y = np.frombuffer(r.content[n:], dtype="<f4").reshape(y_meta["shape"])
    np.testing.assert_array_equal(y, expected["y"])
    np.testing.assert_array_equal(np.asarray(z_meta["data"], dtype=np.int32).reshape(2, 2), expected["z"])


def test_binary_data_output_request_parameter(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory()
    r = c.post(
        "/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS}, parameters={"binary_data_output": True})
    )
    n = int(r.headers["inference-header-content-length"])
    meta = msgspec.json.decode(r.content[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    assert sizes == [24, 16]
    expected = _expected(tmp_path)
    z = np.frombuffer(r.content[n + 24 :], dtype="<i4").reshape(2, 2)
    np.testing.assert_array_equal(z, expected["z"])
    assert "binary_data_output" not in meta.get("parameters", {})


def test_text_model_takes_bytes_json_and_binary(client_factory: Any, tmp_path: Path) -> None:
    c = client_factory()
    texts = ["hello world", "a somewhat longer sentence about inference"]
    ref = text_model(tmp_path, name="ref")
    expected, _ = ref.embed(texts, truncate=True)
    r = c.post(
        "/v2/models/minilm/infer", json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}
    )
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "sentence_embedding" and out["shape"] == [2, 8]
    np.testing.assert_allclose(np.asarray(out["data"], dtype=np.float32).reshape(2, 8), expected, rtol=1e-6)
    raw = encode_bytes_elements(texts)
    header = msgspec.json.encode(
        {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]}
    )
    r = c.post(
        "/v2/models/minilm/infer", content=header + raw, headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 8), expected, rtol=1e-6
    )


ERRORS = [
    # (description, body or transform, status, field named in the message)
    ("wrong dtype", lambda b: b["inputs"][0].update(datatype="FP64"), 400, "inputs[x].datatype"),
    ("wrong shape", lambda b: b["inputs"][0].update(shape=[4, 2]), 400, "inputs[x].shape"),
    ("wrong rank", lambda b: b["inputs"][0].update(shape=[8], data=list(range(8))), 400, "inputs[x].shape"),
    ("shape vs data", lambda b: b["inputs"][0].update(shape=[3, 4]), 400, "inputs[0].data"),
    ("unknown input", lambda b: b["inputs"][0].update(name="w"), 400, "w"),
    ("missing input", lambda b: b["inputs"].pop(1), 400, "ids"),
    ("bad datatype", lambda b: b["inputs"][0].update(datatype="BF16"), 400, "inputs[0].datatype"),
    ("strings in numbers", lambda b: b["inputs"][1].update(data=["a"] * 6), 400, "inputs[1].data"),
    ("unknown output", lambda b: b.update(outputs=[{"name": "q"}]), 400, "outputs[0].name"),
    ("batch mismatch", lambda b: b["inputs"][1].update(shape=[1, 3], data=[1, 2, 3]), 400, "inputs[ids].shape"),
    ("no inputs", lambda b: b.update(inputs=[]), 400, "inputs"),
    ("inputs not a list", lambda b: b.update(inputs={"a": 1}), 400, "inputs"),
]


@pytest.mark.parametrize(("what", "change", "status", "field"), ERRORS, ids=[e[0] for e in ERRORS])
def test_error_table(client_factory: Any, what: str, change: Any, status: int, field: str) -> None:
    c = client_factory()
    body = infer_json({"x": X, "ids": IDS})
    change(body)
    r = c.post("/v2/models/tabular/infer", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    assert field in r.json()["error"]


def test_nan_and_inf_are_refused(client_factory: Any) -> None:
    c = client_factory()
    bad = X.copy()
    bad[0, 1] = np.nan
    raw = bad.tobytes() + IDS.tobytes()
    header = msgspec.json.encode(
        {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}},
                {"name": "ids", "shape": [2, 3], "datatype": "INT64", "parameters": {"binary_data_size": 48}},
            ]
        }
    )
    r = c.post(
        "/v2/models/tabular/infer", content=header + raw, headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert r.status_code == 400
    assert "inputs[x].data" in r.json()["error"] and "NaN" in r.json()["error"]
    # JSON has no NaN literal; a client sending one gets a 400 too
    text = msgspec.json.encode(infer_json({"x": X, "ids": IDS})).replace(b"0.0,", b"NaN,", 1)
    assert c.post("/v2/models/tabular/infer", content=text).status_code == 400


def test_unknown_model_and_version_are_404(client_factory: Any) -> None:
    c = client_factory()
    body = infer_json({"x": X, "ids": IDS})
    r = c.post("/v2/models/nope/infer", json=body)
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = c.post("/v2/models/tabular/versions/9/infer", json=body)
    assert r.status_code == 404 and "version 9" in r.json()["error"]
    r = c.post("/v2/models/tabular/versions/x/infer", json=body)
    assert r.status_code in (400, 404)


def test_limits_inputs_elements_depth(client_factory: Any) -> None:
    c = client_factory(max_inputs=1, max_tensor_elements=6, max_json_depth=4)
    r = c.post("/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS}))
    assert r.status_code == 400 and "inputs" in r.json()["error"]
    c = client_factory(max_tensor_elements=6)
    r = c.post("/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS}))
    assert r.status_code == 400 and "inputs[0].shape" in r.json()["error"] and "max_tensor_elements" in r.text
    c = client_factory(max_json_depth=4)
    body = infer_json({"x": X, "ids": IDS})
    body["inputs"][0]["data"] = X.tolist()
    r = c.post("/v2/models/tabular/infer", json=body)
    assert r.status_code == 400 and "depth" in r.json()["error"]


def test_repository_index_load_unload(client_factory: Any, tmp_path: Path) -> None:
    spare = tensor_model(tmp_path, name="spare", version=2)
    registry = make_registry(
        [tensor_model(tmp_path)],
        on_disk=[IndexEntry("tabular", 1, "UNAVAILABLE", ""), IndexEntry("spare", 2, "UNAVAILABLE", "")],
        extra={"spare": lambda: spare},
    )
    c = client_factory(registry=registry)
    assert c.post("/v2/repository/index").json() == [
        {"name": "spare", "version": "2", "state": "UNAVAILABLE", "reason": ""},
        {"name": "tabular", "version": "1", "state": "READY", "reason": ""},
    ]
    assert c.post("/v2/repository/index", json={"ready": True}).json() == [
        {"name": "tabular", "version": "1", "state": "READY", "reason": ""}
    ]
    assert c.post("/v2/models/spare/infer", json=infer_json({"x": X, "ids": IDS})).status_code == 404
    r = c.post("/v2/repository/models/spare/load")
    assert r.status_code == 200, r.text
    assert c.post("/v2/models/spare/infer", json=infer_json({"x": X, "ids": IDS})).status_code == 200
    assert c.post("/v2/repository/models/tabular/unload").status_code == 200
    assert c.post("/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS})).status_code == 404
    assert c.post("/v2/repository/models/tabular/unload").status_code == 404
    assert c.post("/v2/repository/models/ghost/load").status_code == 404
    assert c.get("/v2/models/tabular").status_code == 404


def test_bytes_length_prefix_is_little_endian() -> None:
    assert encode_bytes_elements(["ab"]) == struct.pack("<I", 2) + b"ab"


def test_repository_routes_check_their_bodies_and_keep_the_box_s_paths(client_factory: Any, tmp_path: Path) -> None:
    """load / unload read their body and never parsed it (200 for "this is not json"); a model not in the
    repository answered with the repository's folder on the box (runtime.repository's CLI wording)."""
    from runtime.errors import ModelNotFoundError
    from runtime.serving import ModelRegistry

    folder = "/var/lib/inferbox/models"

    def loader(name: str, version: int | None) -> Any:
        raise ModelNotFoundError(f"model {name!r} is not in the repository {folder} (models there: tabular)")

    registry = ModelRegistry(loader, lambda: [IndexEntry("tabular", 1, "READY", "")])
    registry.add(tensor_model(tmp_path))
    c = client_factory(registry=registry)
    r = c.post("/v2/repository/models/ghost/load")
    assert r.status_code == 404 and folder not in r.text and "models there: tabular" in r.text, r.text
    for route in ("/v2/repository/models/tabular/load", "/v2/repository/models/tabular/unload"):
        r = c.post(route, content=b"this is not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"], (route, r.text)
        r = c.post(route, json={"parameters": 5})
        assert r.status_code == 400 and "parameters" in r.json()["error"], (route, r.text)
    r = c.post("/v2/repository/index", json={"ready": "yes"})
    assert r.status_code == 400 and "ready" in r.json()["error"]
    assert c.post("/v2/repository/models/tabular/unload", json={"parameters": {}}).status_code == 200


def test_a_model_name_no_folder_can_have_is_not_found_and_not_repeated_in_full(
    client_factory: Any, tmp_path: Path
) -> None:
    """A name over the file system's 255 bytes made the load's folder listing fail (ENAMETOOLONG: a 500);
    and an answer repeated a name of any length (a 100 kB model name made a 100 kB 404)."""
    from runtime.repository import Repository
    from runtime.serving import ModelRegistry

    repository = Repository(tmp_path / "models")

    def loader(name: str, version: int | None) -> Any:
        repository.open(name, version)
        raise AssertionError("no package is there")

    registry = ModelRegistry(loader, lambda: [])
    registry.add(tensor_model(tmp_path))
    c = client_factory(registry=registry)
    for name in ("a" * 256, "\u20ac" * 90, "b" * 5000):
        r = c.post(f"/v2/repository/models/{name}/load")
        assert r.status_code == 404, (len(name), r.text)
        assert len(r.text) < 600, r.text
        assert (f"({len(name)} characters)" in r.json()["error"]) is (len(name) > 100), r.text
    r = c.post("/v1/embeddings", json={"model": "m" * 100_000, "input": "x"})
    assert r.status_code == 404 and len(r.text) < 600, r.text[:300]
    r = c.post(f"/v2/models/{'c' * 3000}/infer", json=infer_json({"x": X, "ids": IDS}))
    assert r.status_code == 404 and len(r.text) < 600, r.text[:300]


def test_with_several_workers_the_repository_routes_say_they_would_reach_one(
    client_factory: Any, tmp_path: Path
) -> None:
    """Each worker process holds its own models: a load or unload changed the one that took the request
    (after one load, 7 of 20 requests were still answered by the old version)."""
    from litestar.testing import TestClient

    from api.app import create_app
    from api.config import ApiConfig

    app = create_app(
        registry=make_registry([tensor_model(tmp_path)]), config=ApiConfig(auth=False, workers=2), audit=None, keys=None
    )
    with TestClient(app) as c:
        for route in ("/v2/repository/models/tabular/load", "/v2/repository/models/tabular/unload"):
            r = c.post(route)
            assert r.status_code == 409 and "2 worker processes" in r.json()["error"], r.text
            assert "systemctl restart inferbox-api" in r.json()["error"]
        assert c.post("/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS})).status_code == 200
        assert c.post("/v2/repository/index").status_code == 200


def test_a_failed_load_of_the_newest_version_gives_its_reason_in_the_index_and_the_log(
    client_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A load without a version (the newest) that failed kept no reason (the index said "") and logged
    nothing: the operator saw a 409 and an UNAVAILABLE row without a word why."""
    import logging

    from runtime.errors import IntegrityError
    from runtime.serving import ModelRegistry

    def loader(name: str, version: int | None) -> Any:
        raise IntegrityError("openvino/model.int8.bin does not match its hash in the manifest")

    registry = ModelRegistry(loader, lambda: [IndexEntry("tabular", 1, "UNAVAILABLE", "")])
    c = client_factory(registry=registry)
    with caplog.at_level(logging.WARNING, logger="runtime.serving"):
        assert c.post("/v2/repository/models/tabular/load").status_code == 409
    (row,) = c.post("/v2/repository/index").json()
    assert row["state"] == "UNAVAILABLE" and "does not match its hash" in row["reason"]
    assert any("'tabular' version 1 did not load" in r.getMessage() for r in caplog.records)


def test_a_load_that_replaces_a_version_says_which_in_its_record(
    client_factory: Any, tmp_path: Path, audit: Any
) -> None:
    """A swap wrote model_load for the new version and nothing about the one it replaced."""
    old = tensor_model(tmp_path, version=1)
    new = tensor_model(tmp_path, version=2)
    registry = make_registry(
        [old],
        on_disk=[IndexEntry("tabular", 1, "READY", ""), IndexEntry("tabular", 2, "UNAVAILABLE", "")],
        extra={"tabular": lambda: new},
    )
    c = client_factory(registry=registry)
    assert c.post("/v2/repository/models/tabular/load").status_code == 200
    load = audit.events[-1]
    assert load.event == "model_load" and load.model_version == "2"
    assert load.details["replaced_version"] == "1" and load.details["replaced_sha256"] == old.package_sha256


def test_a_load_whose_client_hung_up_finishes_and_is_recorded_as_done(
    tmp_path: Path, audit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disconnect cancels a request; a load (run in a thread, which goes on) was then recorded as a failed
    499 while the model did load: the log denied a change that happened."""
    import asyncio
    import threading

    import api.envelope
    from api.app import create_app
    from api.config import ApiConfig

    from .test_api_serving import _asgi_call

    monkeypatch.setattr(api.envelope, "DISCONNECT_AFTER_S", 0.0)  # listen at once (0.25 s in service)

    entered, release = threading.Event(), threading.Event()
    spare = tensor_model(tmp_path, name="spare", version=2)

    def slow() -> Any:
        entered.set()
        assert release.wait(10)
        return spare

    registry = make_registry([], on_disk=[IndexEntry("spare", 2, "UNAVAILABLE", "")], extra={"spare": slow})
    app = create_app(registry=registry, config=ApiConfig(auth=False), audit=audit, keys=None)

    async def main() -> list[Any]:
        hangup = asyncio.Event()
        call = asyncio.ensure_future(
            _asgi_call(app, "/v2/repository/models/spare/load", [{"type": "http.request", "body": b""}], hangup)
        )
        await asyncio.to_thread(entered.wait, 10)
        hangup.set()  # the client goes while the model loads
        for _ in range(20):
            await asyncio.sleep(0)
        release.set()
        return await asyncio.wait_for(call, 10)

    sent = asyncio.run(main())
    assert sent and sent[0]["status"] == 200  # answered (to nobody), not cancelled
    assert [m.name for m in registry.loaded()] == ["spare"]
    load = audit.events[-1]
    assert (load.event, load.status, load.outcome, load.model_version) == ("model_load", 200, "success", "2")


def test_a_text_models_errors_name_this_requests_fields(client_factory: Any) -> None:
    """The tokenizer's words are OpenAI's (input[1]); a KServe request has inputs[0].data[1]. A
    tensor datatype sent to the text model named only "inputs"."""
    c = client_factory(truncate=False)
    long = " ".join(["word"] * (MAX_LENGTH * 2))
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["short", long]}]}
    r = c.post("/v2/models/minilm/infer", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("inputs[0].data[1] has "), r.text
    assert "input[1]" not in r.text
    body = {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    r = c.post("/v2/models/minilm/infer", json=body)
    assert r.status_code == 400 and r.json()["error"].startswith("inputs[0].datatype: model 'minilm' takes BYTES"), (
        r.text
    )
    # the OpenAI route keeps its own field
    r = c.post("/v1/embeddings", json={"model": "minilm", "input": ["short", long]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]", r.text


def test_kserve_answers_say_which_version_and_variant_answered(
    client_factory: Any, tmp_path: Path, minilm_repository: Path
) -> None:
    """/v1/embeddings and /v1/rerank carried X-Model-Version and X-Model-Variant; KServe's infer carried
    neither, so a client of it could not tell two variants' vectors (or a swap) apart from the headers.
    Real ONNX Runtime sessions: the MiniLM package (text) and a tiny MLP package (tensor)."""
    from runtime.loader import LoaderOptions, load_model
    from tests.runtime.conftest import publish_mlp

    options = LoaderOptions(backend="ort-cpu")
    publish_mlp(tmp_path / "models", ["ort-cpu"], "mlp", version=4)
    mlp = load_model(tmp_path / "models", "mlp", options=options)
    minilm = load_model(minilm_repository, "minilm", options=options)
    c = client_factory(registry=make_registry([mlp, minilm]))
    x = np.ones((2, 8), dtype=np.float32)
    tensor_json = c.post("/v2/models/mlp/infer", json=infer_json({"x": x}))
    tensor_binary = c.post(
        "/v2/models/mlp/versions/4/infer",
        json=infer_json({"x": x}, parameters={"binary_data_output": True}),
    )
    text = c.post(
        "/v2/models/minilm/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a short text"]}]},
    )
    for r, model in ((tensor_json, mlp), (tensor_binary, mlp), (text, minilm)):
        assert r.status_code == 200, r.text
        assert r.headers["X-Model-Version"] == str(model.version)
        assert r.headers["X-Model-Variant"] == f"{model.backend}/{model.variant}/{model.exec_precision}"
    assert tensor_json.headers["X-Model-Variant"] == "ort-cpu/onnx-fp32/fp32"
    assert "Inference-Header-Content-Length" in tensor_binary.headers
