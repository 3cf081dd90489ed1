"""Every error a route family answers has that family's shape, the envelope's own 500 / 503 included."""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.api.conftest import MemoryAudit, infer_json


def _openai(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return dict(error)


def test_the_audit_refusal_has_each_familys_shape(client_factory: Any, audit: MemoryAudit) -> None:
    c = client_factory()
    audit.fail = True
    error = _openai(c.post("/v1/embeddings", json={"model": "minilm", "input": "a"}), 503)
    assert "audit log cannot be written" in error["message"] and error["type"] == "server_error"
    x, ids = np.zeros((1, 4), dtype=np.float32), np.zeros((1, 3), dtype=np.int64)
    kserve = c.post("/v2/models/tabular/infer", json=infer_json({"x": x, "ids": ids}))
    assert kserve.status_code == 503 and isinstance(kserve.json()["error"], str)
    assert kserve.headers["retry-after"] == "5"


def test_a_path_that_does_not_exist_is_not_a_missing_model(client_factory: Any) -> None:
    c = client_factory()
    assert _openai(c.get("/v1/nothing"), 404)["code"] is None
    assert _openai(c.post("/v1/embeddings", json={"model": "nope", "input": "a"}), 404)["code"] == "model_not_found"


def test_a_loaded_model_of_another_kind_is_not_a_missing_model(client_factory: Any) -> None:
    """`/v1/embeddings` given a tensor model, or `/v1/rerank` an embedding model, answered code
    model_not_found, which docs/api.md keeps for a model that is not there (review 14)."""
    c = client_factory()
    for path, body in (
        ("/v1/embeddings", {"model": "tabular", "input": "a"}),
        ("/v1/rerank", {"model": "minilm", "query": "q", "documents": ["d"]}),
    ):
        error = _openai(c.post(path, json=body), 404)
        assert error["code"] is None and error["param"] == "model", (path, error)
        assert error["message"].startswith("model: ") and "GET /v1/models" in error["message"]


def test_a_bad_query_parameter_is_named_without_internals(client_factory: Any) -> None:
    c = client_factory()
    error = _openai(c.get("/v1/audit", params={"limit": "x"}), 400)
    assert error["param"] == "limit" and error["message"].startswith("limit: ")
    assert "ParamType" not in error["message"] and "[{" not in error["message"]


def _collect(sent: list[Any]) -> Any:
    async def send(message: Any) -> None:
        sent.append(message)

    return send


def test_the_envelopes_own_500_has_each_familys_shape() -> None:
    import asyncio

    from api.envelope import envelope
    from api.metrics import Metrics

    async def silent(scope: Any, receive: Any, send: Any) -> None:  # an app that answers nothing
        return None

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    for path, openai in (("/v1/embeddings", True), ("/v2/rerank", True), ("/v2/models/m/infer", False)):
        sent: list[Any] = []
        app = envelope(silent, audit=None, metrics=Metrics(), clock=lambda: 1.0)
        asyncio.run(app({"type": "http", "method": "POST", "path": path, "headers": []}, receive, _collect(sent)))
        import json

        assert sent[0]["status"] == 500 and (b"content-type", b"application/json") in sent[0]["headers"]
        body = json.loads(sent[1]["body"])
        assert isinstance(body["error"], dict) is openai, (path, body)


def test_the_audit_api_on_a_server_without_the_audit_log_is_a_plain_404(client_factory: Any) -> None:
    error = _openai(client_factory().get("/v1/audit"), 404)
    assert error["code"] is None and "audit log is off" in error["message"]
