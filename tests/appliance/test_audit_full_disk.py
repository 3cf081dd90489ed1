"""A server whose audit log cannot be written (a full disk): every request is refused with 503, so
``/v2/health/ready`` says not ready (a load balancer sends the traffic elsewhere), and the log says
so once when the writes start failing and once when they work again, not once per request."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from litestar.testing import TestClient

from api.app import create_app
from api.config import ApiConfig
from appliance.audit.log import AuditLog
from tests.api.conftest import make_registry, text_model


def _served_log(tmp_path: Path) -> tuple[AuditLog, Any]:
    """A started audit log (its writer polling often) and an app that records into it."""
    log = AuditLog(
        tmp_path / "audit.db",
        signing_key=Ed25519PrivateKey.generate(),
        digest_keys_dir=tmp_path / "d",
        idle_poll_s=0.05,
    )
    log.start()
    app = create_app(registry=make_registry([text_model(tmp_path)]), config=ApiConfig(auth=False), audit=log, keys=None)
    return log, app


def test_a_log_that_cannot_be_written_makes_the_server_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log, app = _served_log(tmp_path)
    body = {"model": "minilm", "input": "a"}
    try:
        with TestClient(app) as c:
            assert c.post("/v1/embeddings", json=body).status_code == 200
            assert c.get("/v2/health/ready").status_code == 200

            def full(*args: Any) -> Any:
                raise sqlite3.OperationalError("database or disk is full")

            caplog.set_level(logging.DEBUG)
            monkeypatch.setattr(log, "_write_batch", full)
            monkeypatch.setattr(log, "_write_checkpoint", full)
            assert [c.post("/v1/embeddings", json=body).status_code for _ in range(5)] == [503] * 5
            ready = c.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json() == {"ready": False}
            loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(loud) == 1 and "audit append failed" in loud[0].getMessage(), [r.getMessage() for r in loud]
            assert "free space in" in loud[0].getMessage()
            # /metrics shows it too (it showed nothing: an alert had only the 503s to go on)
            text = c.get("/metrics").text.splitlines()
            assert "inferbox_audit_up 0" in text and "inferbox_audit_refused_records_total 5" in text

            monkeypatch.undo()  # space freed: with no request sent (a load balancer sends none to a box
            # that is not ready), the writer's own idle write finds out, and the box is ready again
            deadline = time.monotonic() + 10
            while c.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "still not ready after the log could be written again"
                time.sleep(0.05)  # polling for the writer's idle tick, not an assertion
            assert c.post("/v1/embeddings", json=body).status_code == 200
            again = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the audit log is written")]
            assert again == ["the audit log is written again; 5 records were refused meanwhile"]
            text = c.get("/metrics").text.splitlines()
            assert "inferbox_audit_up 1" in text
            assert "inferbox_audit_refused_records_total 5" in text  # a counter: it does not start again
    finally:
        log.close()


def test_an_append_waiting_on_another_process_s_lock_makes_the_server_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune (or any process) holding the audit database's write lock held every request for up to the
    busy timeout (30 s) while readiness said 200 and /metrics showed nothing but a pending record."""
    import threading

    from api import kserve

    monkeypatch.setattr(kserve, "AUDIT_STALL_S", 0.3)
    log, app = _served_log(tmp_path)
    body = {"model": "minilm", "input": "a"}
    try:
        with TestClient(app) as c:
            assert c.post("/v1/embeddings", json=body).status_code == 200
            other = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another process's long write
            answers: list[int] = []
            waiting = threading.Thread(target=lambda: answers.append(c.post("/v1/embeddings", json=body).status_code))
            waiting.start()
            deadline = time.monotonic() + 10
            while c.get("/v2/health/ready").status_code == 200:
                assert time.monotonic() < deadline, "still ready while the append waits"
                time.sleep(0.05)  # polling, not an assertion
            stalled = [
                line
                for line in c.get("/metrics").text.splitlines()
                if line.startswith("inferbox_audit_write_stalled_seconds ")
            ]
            assert float(stalled[0].split()[1]) > 0.3
            other.execute("ROLLBACK")
            other.close()
            waiting.join(30)
            assert answers == [200]  # it waited, then was answered: nothing refused
            assert c.get("/v2/health/ready").status_code == 200
    finally:
        log.close()
