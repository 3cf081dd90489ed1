"""Every documented ``GET /v1/audit`` filter reaches the log's query under the log's own name
(a filter dropped on the way would answer the whole log)."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import TestClient

from .conftest import audit_api_app


def test_each_filter_is_passed_to_the_query(tmp_path: Path) -> None:
    app, reader = audit_api_app(tmp_path)
    params = {
        "event": "inference",
        "actor": "k1",
        "model": "minilm",
        "outcome": "failure",
        "request_id": "r1",
        "job_id": "j1",
    }
    with TestClient(app) as c:
        assert c.get("/v1/audit", params=params).status_code == 200
    call = reader.calls[-1]
    assert {k: call[k] for k in ("event", "actor", "model_name", "outcome", "request_id", "job_id")} == {
        "event": "inference",
        "actor": "k1",
        "model_name": "minilm",
        "outcome": "failure",
        "request_id": "r1",
        "job_id": "j1",
    }
