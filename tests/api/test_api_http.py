"""One real HTTP round: uvicorn serving create_app(...) on 127.0.0.1, hit with httpx."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from api.app import create_app
from api.config import ApiConfig
from appliance.keys import KeyStore

from .conftest import MemoryAudit, infer_json, make_registry, tensor_model, text_model


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, MemoryAudit]]:
    store = KeyStore(tmp_path / "state.db")
    _, key = store.create(["infer"])
    audit = MemoryAudit()
    app = create_app(
        registry=make_registry([tensor_model(tmp_path), text_model(tmp_path)]),
        config=ApiConfig(auth=True),
        audit=audit,
        keys=store,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:  # waiting for readiness, not asserting on time
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", key, audit
    server.should_exit = True
    thread.join(20)
    sock.close()
    store.close()


def test_real_http_round(served: tuple[str, str, MemoryAudit], tmp_path: Path) -> None:
    base, key, audit = served
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, timeout=20) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2").status_code == 401
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        ids = np.arange(3, dtype=np.int64).reshape(1, 3)
        r = c.post("/v2/models/tabular/infer", json=infer_json({"x": x, "ids": ids}), headers=auth)
        assert r.status_code == 200 and r.headers["x-request-id"]
        expected = tensor_model(tmp_path, name="ref").session.run({"x": x, "ids": ids})
        y = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 3)
        np.testing.assert_array_equal(y, expected["y"])
        r = c.post("/v1/embeddings", json={"input": ["hello there"], "model": "minilm"}, headers=auth)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8
        assert "inferbox_requests_total" in c.get("/metrics").text
    assert [e.status for e in audit.events] == [401, 200, 200]  # health and /metrics are not audited


def test_a_body_in_many_chunks_and_a_streamed_file_pass_the_envelope(served: tuple[str, str, MemoryAudit]) -> None:
    """The envelope hands the request body's chunks straight through and ends a streamed answer
    it holds (the docs' 1 MB script goes out in many chunks) over a real connection."""
    base, key, audit = served
    body = b'{"model": "minilm", "input": ["sent ten bytes at a time"]}'

    def slowly() -> Iterator[bytes]:
        for i in range(0, len(body), 10):
            time.sleep(0.01)  # separate reads on the server side, not a timing assertion
            yield body[i : i + 10]

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=base, timeout=20) as c:
        chunked = c.post("/v1/embeddings", content=slowly(), headers=headers)
        whole = c.post("/v1/embeddings", content=body, headers=headers)
        assert chunked.status_code == whole.status_code == 200, chunked.text
        assert chunked.json()["data"] == whole.json()["data"]
        script = c.get("/docs/assets/swagger-ui-bundle.js")
        assert script.status_code == 200 and len(script.content) > 500_000
    assert audit.events[0].input_digest == audit.events[1].input_digest  # the same bytes arrived


def test_a_listener_waiting_after_the_answer_began_is_told_the_exchange_is_over() -> None:
    """A streaming answer listens for the disconnect while it sends (Litestar's streaming
    response), here before the client has sent its whole body: once the answer is complete the
    listener hears ``http.disconnect`` instead of waiting for a client that waits for the answer."""
    import asyncio

    from api.envelope import envelope
    from api.metrics import Metrics

    heard: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        listener = asyncio.ensure_future(receive())
        await asyncio.sleep(0)  # the listener now waits on receive
        await send({"type": "http.response.body", "body": b"done", "more_body": False})
        heard.append((await asyncio.wait_for(listener, 5))["type"])

    async def receive() -> Any:
        await asyncio.Event().wait()  # the rest of the client's body never comes

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    wrapped = envelope(app, audit=None, metrics=Metrics(), clock=lambda: 1.0)
    scope = {"type": "http", "method": "POST", "path": "/stream", "headers": []}
    asyncio.run(wrapped(scope, receive, send))
    assert heard == ["http.disconnect"] and sent[-1]["body"] == b"done"


def test_metrics_show_the_thread_cpu_split_only_where_it_can_be_read() -> None:
    from api.metrics import Metrics
    from runtime.threads import ThreadCpu

    readings = [{1: ("loop", 125), 2: ("inference", 400)}, {}]
    metrics = Metrics(thread_cpu=ThreadCpu(lambda: readings.pop(0), tick=100))
    text = metrics.render({}, [])
    assert "# TYPE inferbox_thread_cpu_seconds_total counter" in text
    assert 'inferbox_thread_cpu_seconds_total{thread="loop"} 1.25' in text
    assert 'inferbox_thread_cpu_seconds_total{thread="inference"} 4' in text
    assert 'inferbox_thread_cpu_seconds_total{thread="audit"} 0' in text
    assert "inferbox_thread_cpu_seconds_total" not in metrics.render({}, [])  # not Linux: no series

    def broken() -> dict[int, tuple[str, int]]:
        raise OSError("too many open files")

    text = Metrics(thread_cpu=ThreadCpu(broken)).render({}, [])  # the scrape still answers
    assert "inferbox_thread_cpu_seconds_total" not in text and "inferbox_in_flight_requests 0" in text


def test_metrics_show_the_audit_logs_figures_where_it_keeps_them() -> None:
    from api.metrics import Metrics
    from api.protocols import AuditStats

    figures = AuditStats(records=120, commits=20, commit_seconds=0.25, pending=3)
    text = Metrics(audit_stats=lambda: figures).render({}, [])
    for line in (
        "# TYPE inferbox_audit_records_total counter",
        "inferbox_audit_records_total 120",
        "# TYPE inferbox_audit_commit_seconds summary",
        "inferbox_audit_commit_seconds_sum 0.25",
        "inferbox_audit_commit_seconds_count 20",
        "# TYPE inferbox_audit_pending_records gauge",
        "inferbox_audit_pending_records 3",
    ):
        assert line in text.splitlines(), line
    assert "inferbox_audit" not in Metrics().render({}, [])  # audit off: no series

    def broken() -> AuditStats:
        raise RuntimeError("the log is closing")

    text = Metrics(audit_stats=broken).render({}, [])  # the scrape still answers
    assert "inferbox_audit" not in text and "inferbox_in_flight_requests 0" in text
