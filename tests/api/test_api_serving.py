"""Serving under pressure: 429, 504, concurrent batching, 500 without traces, body limits, metrics, ids."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from api.app import create_app
from api.config import ApiConfig

from .conftest import BlockingSession, ExplodingSession, MemoryAudit, infer_json, make_registry, tensor_model

X = np.ones((1, 4), dtype=np.float32)
IDS = np.ones((1, 3), dtype=np.int64)
BODY = infer_json({"x": X, "ids": IDS})


def _blocked_app(tmp_path: Path, **config: Any) -> tuple[Any, BlockingSession]:
    inner = tensor_model(tmp_path, name="ref").session
    session = BlockingSession(inner)
    model = tensor_model(tmp_path, session=session)
    app = create_app(registry=make_registry([model]), config=ApiConfig(auth=False, **config), audit=None, keys=None)
    return app, session


async def _until(predicate: Any, what: str) -> None:
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def _stats(app: Any) -> Any:
    return app.state["server"]._tensor["tabular"][1].stats


def test_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    app, session = _blocked_app(tmp_path, queue_limit=2, max_batch_size=1)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/v2/models/tabular/infer", json=BODY))
            await asyncio.to_thread(session.entered.wait, 10)
            queued = [asyncio.ensure_future(c.post("/v2/models/tabular/infer", json=BODY)) for _ in range(2)]
            await _until(lambda: _stats(app).queue_depth == 2, "two requests queued")
            r = await c.post("/v2/models/tabular/infer", json=BODY)
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert "full" in r.json()["error"]
            session.release.set()
            assert (await first).status_code == 200
            assert [(await q).status_code for q in queued] == [200, 200]
            assert session.calls == [1, 1, 1]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_timeout_answers_504_and_the_request_is_not_run(tmp_path: Path) -> None:
    app, session = _blocked_app(tmp_path, request_timeout_s=0.05, max_batch_size=1)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/v2/models/tabular/infer", json=infer_json({"x": X * 2, "ids": IDS})))
            await asyncio.to_thread(session.entered.wait, 10)
            r = await c.post("/v2/models/tabular/infer", json=BODY)
            assert r.status_code == 504
            assert "timeout" in r.json()["error"]
            session.release.set()
            assert (await first).status_code == 504  # it ran, but past its own timeout too
            assert session.calls == [1]
            assert _stats(app).queue_depth == 0

    asyncio.run(asyncio.wait_for(main(), 30))


def test_concurrent_requests_equal_unbatched(tmp_path: Path) -> None:
    app, session = _blocked_app(tmp_path, max_batch_size=8, max_queue_delay_s=0.0)
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(16)]
    ids = [rng.integers(0, 9, (r.shape[0], 3)).astype(np.int64) for r in rows]
    reference = tensor_model(tmp_path, name="ref2").session

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            warm = asyncio.ensure_future(c.post("/v2/models/tabular/infer", json=BODY))
            await asyncio.to_thread(session.entered.wait, 10)
            tasks = [
                asyncio.ensure_future(c.post("/v2/models/tabular/infer", json=infer_json({"x": x, "ids": i})))
                for x, i in zip(rows, ids, strict=True)
            ]
            await _until(lambda: _stats(app).queue_depth == 16, "all queued")
            session.release.set()
            assert (await warm).status_code == 200
            for r, x, i in zip(await asyncio.gather(*tasks), rows, ids, strict=True):
                assert r.status_code == 200
                out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
                expected = reference.run({"x": x, "ids": i})
                np.testing.assert_array_equal(out["y"].astype(np.float32), expected["y"])
                np.testing.assert_array_equal(out["z"].astype(np.int32), expected["z"])
        assert max(session.calls[1:]) > 1  # they really were batched
        assert sum(session.calls[1:]) == sum(r.shape[0] for r in rows)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_500_has_no_trace_but_a_request_id(client_factory: Any, tmp_path: Path, audit: MemoryAudit) -> None:
    inner = tensor_model(tmp_path, name="ref").session
    c = client_factory([tensor_model(tmp_path, session=ExplodingSession(inner))])
    r = c.post("/v2/models/tabular/infer", json=BODY)
    assert r.status_code == 500
    rid = r.headers["x-request-id"]
    assert r.json() == {"error": f"internal error; the server log has the details under request id {rid}"}
    assert "secret" not in r.text and "Traceback" not in r.text
    assert audit.events[-1].outcome == "failure" and audit.events[-1].status == 500


def test_body_limits_including_a_gzip_bomb(client_factory: Any) -> None:
    c = client_factory(max_body_bytes=100_000)
    raw = msgspec.json.encode(BODY)
    r = c.post("/v2/models/tabular/infer", content=gzip.compress(raw), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    r = c.post("/v2/models/tabular/infer", content=zlib.compress(raw), headers={"Content-Encoding": "deflate"})
    assert r.status_code == 200, r.text
    big = raw[:-1] + b" " * 100_000 + b"}"
    r = c.post("/v2/models/tabular/infer", content=big)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"] and "smaller batches" in r.json()["error"]
    bomb = gzip.compress(b"[" + b" " * 50_000_000 + b"]")
    assert len(bomb) < 100_000  # 50 MB inflated
    r = c.post("/v2/models/tabular/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "after decompression" in r.json()["error"]
    r = c.post("/v1/embeddings", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = c.post("/v2/models/tabular/infer", content=b"junk", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400
    r = c.post("/v2/models/tabular/infer", content=raw, headers={"Content-Encoding": "br"})
    assert r.status_code == 400 and "Content-Encoding" in r.json()["error"]


def test_a_cut_or_padded_gzip_body_is_refused_naming_content_encoding(client_factory: Any) -> None:
    """Bytes after the gzip stream's end (a second member, or junk) were dropped unread and a cut stream
    inflated to a cut body: each was answered as if the body were whole (200, or "not valid JSON")."""
    c = client_factory()
    packed = gzip.compress(msgspec.json.encode(BODY))
    for body, says in [
        (packed + b"GARBAGE" * 100, "700 bytes follow the end"),
        (packed + gzip.compress(b"{}"), "follow the end of the gzip data"),
        (packed[: len(packed) // 2], "ends before its end marker"),
    ]:
        r = c.post("/v2/models/tabular/infer", content=body, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and says in r.json()["error"], r.text
        assert "Content-Encoding" in r.json()["error"] or "gzip" in r.json()["error"]
    r = c.post("/v1/embeddings", content=packed + b"x", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Content-Encoding", r.text


def test_metrics_series(client_factory: Any) -> None:
    c = client_factory()
    assert c.post("/v2/models/tabular/infer", json=BODY).status_code == 200
    assert c.post("/v1/embeddings", json={"input": ["a", "b"], "model": "minilm"}).status_code == 200
    assert c.post("/v2/models/tabular/infer", json={"inputs": []}).status_code == 400
    r = c.get("/metrics")
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"  # one charset (it was sent twice)
    text = r.text
    for series in [
        'inferbox_requests_total{model="tabular",route="/v2/models/{name}/infer",status="200"} 1',
        'inferbox_requests_total{model="tabular",route="/v2/models/{name}/infer",status="400"} 1',
        'inferbox_requests_total{model="minilm",route="/v1/embeddings",status="200"} 1',
        'inferbox_request_duration_seconds_count{route="/v1/embeddings"} 1',
        'inferbox_batch_size_bucket{model="tabular",le="1"} 1',
        'inferbox_queue_seconds_count{model="tabular"} 1',
        'inferbox_inference_seconds_count{model="tabular"} 1',
        'inferbox_queue_depth{model="tabular"} 0',
        "inferbox_in_flight_requests 1",  # the /metrics request itself
        'inferbox_model_info{model="tabular",version="1",backend="fake",variant="onnx-fp32",exec_precision="fp32",streams="1",fallback=""} 1',
        'inferbox_static_shapes{model="tabular"} 0',  # a fake session compiles no copies
        "# TYPE inferbox_request_duration_seconds histogram",
    ]:
        assert series in text, series
    assert 'inferbox_queue_seconds_count{model="minilm"} 2' in text  # two texts, one item each


def test_request_id_header(client_factory: Any) -> None:
    c = client_factory()
    assert c.get("/v2", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = c.get("/v2", headers={"X-Request-ID": "bad id\twith<junk>"}).headers["x-request-id"]
    assert generated != "bad id\twith<junk>" and len(generated) == 32
    assert c.get("/nowhere").headers["x-request-id"]
    assert c.delete("/v2").headers["x-request-id"]


def test_every_request_is_audited_once(client_factory: Any, audit: MemoryAudit) -> None:
    c = client_factory()
    c.get("/v2/health/live")  # a probe: not recorded (see UNAUDITED_PATHS)
    c.get("/nowhere")
    c.post("/v2/models/tabular/infer", json=BODY)
    assert [(e.action, e.status) for e in audit.events] == [
        ("GET /nowhere", 404),
        ("POST /v2/models/tabular/infer", 200),
    ]


def test_audit_failure_means_no_answer(client_factory: Any, audit: MemoryAudit) -> None:
    c = client_factory()
    audit.fail = True
    r = c.post("/v2/models/tabular/infer", json=BODY)
    assert r.status_code == 503
    assert "outputs" not in r.text and "audit" in r.json()["error"]


def test_audit_off(client_factory: Any) -> None:
    c = client_factory(audit_sink=None)
    assert c.post("/v2/models/tabular/infer", json=BODY).status_code == 200


def test_docs_switch(client_factory: Any) -> None:
    assert client_factory(docs=True).get("/docs/openapi.json").status_code == 200
    assert client_factory(docs=False).get("/docs/openapi.json").status_code == 404


def test_extra_lifespan_hooks_wrap_serving(tmp_path: Path) -> None:
    from contextlib import asynccontextmanager

    from litestar.testing import TestClient

    seen: list[str] = []

    @asynccontextmanager
    async def hook(app: Any) -> Any:
        seen.append("start")
        yield
        seen.append("stop")

    app = create_app(
        registry=make_registry([tensor_model(tmp_path)]),
        config=ApiConfig(auth=False),
        audit=None,
        keys=None,
        lifespan=[hook],
    )
    with TestClient(app) as c:
        assert seen == ["start"]
        assert c.post("/v2/models/tabular/infer", json=BODY).status_code == 200
    assert seen == ["start", "stop"]
    assert app.state["server"]._tensor == {}  # batchers stopped at shutdown


def test_docs_page_works_offline_from_local_assets(client_factory: Any) -> None:
    from api.docs import ASSETS_PATH

    c = client_factory(docs=True)
    page = c.get("/docs")
    assert page.status_code == 200
    assert f"{ASSETS_PATH}/swagger-ui-bundle.js" in page.text
    assert "cdn." not in page.text and "unpkg" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"):
        assert c.get(f"{ASSETS_PATH}/{asset}").status_code == 200, asset
    assert client_factory(docs=False).get(f"{ASSETS_PATH}/swagger-ui.css").status_code == 404


def test_probes_and_scrapes_are_not_audited_but_metadata_is(client_factory: Any, audit: Any) -> None:
    c = client_factory()
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/docs/openapi.json"):
        assert c.get(path).status_code == 200, path
    assert audit.events == []
    assert c.get("/v2").status_code == 200
    assert [e.action for e in audit.events] == ["GET /v2"]


def test_head_answers_as_get_without_a_body(client_factory: Any, audit: Any) -> None:
    """A load balancer's HEAD probe was a 405 (RFC 9110: HEAD is GET without the content)."""
    c = client_factory()
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        r = c.head(path)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)
        assert int(r.headers["content-length"]) == len(c.get(path).content) or path == "/metrics"
    assert audit.events == []
    r = c.head("/v2")
    assert r.status_code == 200 and r.content == b""
    assert [e.action for e in audit.events] == ["HEAD /v2"]
    assert c.head("/v1/embeddings").status_code == 405  # a POST route


def test_a_method_a_probe_path_does_not_take_is_audited(client_factory: Any, audit: Any) -> None:
    """PUT /metrics (a 405) left no record: probe paths were skipped whatever was asked of them."""
    c = client_factory()
    for path in ("/metrics", "/v2/health/live"):
        assert c.put(path).status_code == 405
    assert [(e.action, e.status) for e in audit.events] == [("PUT /metrics", 405), ("PUT /v2/health/live", 405)]


def test_a_large_request_is_tokenized_off_the_event_loop(tmp_path: Path) -> None:
    """One request of a long text once held the event loop while it was tokenized (a 15 MB text: 55 s in
    which no other client and no health probe was answered).  A request over INLINE_CHARS characters is
    tokenized in a worker thread; while it is, a small request is answered (on the loop, as before)."""
    import dataclasses
    import threading

    from api.server import INLINE_CHARS
    from runtime.text import TextEncoder

    from .conftest import TOKENIZER_DIR, text_model

    class Gated(TextEncoder):
        release = threading.Event()
        entered = threading.Event()
        threads: list[int] = []

        def tokenize(self, texts: Any, *, truncate: bool = True, field: str = "input") -> Any:
            self.threads.append(threading.get_ident())
            if sum(len(t) for t in texts) > INLINE_CHARS:
                self.entered.set()
                assert self.release.wait(10), "the large request's tokenizing was never released"
            return super().tokenize(texts, truncate=truncate, field=field)

    base = text_model(tmp_path)
    assert base.manifest.text is not None
    gated = Gated.from_dir(TOKENIZER_DIR, base.manifest.text)
    model = dataclasses.replace(base, text=gated)
    app = create_app(registry=make_registry([model]), config=ApiConfig(auth=False), audit=None, keys=None)
    large = {"model": "minilm", "input": ["the patient was discharged " * 1_000]}  # 27,000 characters

    async def main() -> None:
        loop_thread = threading.get_ident()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/v1/embeddings", json=large))
            await asyncio.to_thread(gated.entered.wait, 10)
            small = await c.post("/v1/embeddings", json={"model": "minilm", "input": ["hello"]})
            assert small.status_code == 200  # answered while the large one is still being tokenized
            gated.release.set()
            answer = await first
            assert answer.status_code == 200 and answer.headers["x-truncated-inputs"] == "0"
        assert gated.threads[0] != loop_thread and gated.threads[1] == loop_thread

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_large_body_is_decoded_off_the_event_loop(client_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16 MB infer body took 1.2-2.1 s to decode into arrays on the event loop, and a health probe
    waited that long.  A body over INLINE_BODY_BYTES is decoded in a worker thread; a small one is not."""
    import api.server
    from api.server import INLINE_BODY_BYTES

    handed: list[str] = []
    to_thread = asyncio.to_thread

    async def recording(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        handed.append(getattr(fn, "__name__", repr(fn)))
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(api.server.asyncio, "to_thread", recording)
    c = client_factory()
    assert c.post("/v2/models/tabular/infer", json=BODY).status_code == 200
    assert c.post("/v1/embeddings", json={"model": "minilm", "input": ["hello"]}).status_code == 200
    assert handed == []
    zeros = [0.0] * (INLINE_BODY_BYTES // 4)
    large = {"inputs": [{"name": "x", "shape": [1, len(zeros)], "datatype": "FP32", "data": zeros}]}
    r = c.post("/v2/models/tabular/infer", json=large)
    assert r.status_code == 400 and "x" in r.json()["error"], r.text  # the wrong shape, named after the decode
    assert handed == ["decode_infer_request"]
    r = c.post("/v1/embeddings", json={"model": "minilm", "input": 5, "pad": "p" * INLINE_BODY_BYTES})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    # the depth scan too (as long as the decode for 16 MB of brackets): it ran on the loop before
    pad = b"p" * INLINE_BODY_BYTES
    deep = b'{"model": "minilm", "input": "x", "a": ' + b"[" * 40 + b"]" * 40 + b', "b": "' + pad + b'"}'
    r = c.post("/v1/embeddings", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nesting depth 41" in r.json()["error"]["message"], r.text
    assert handed == ["decode_infer_request", "decode_json", "decode_json"]
    # a compressed body is inflated off the loop past 1 KiB (a 16 KB gzip of zeros is 16 MB)
    small = gzip.compress(msgspec.json.encode(BODY))
    assert len(small) <= 1024
    assert c.post("/v2/models/tabular/infer", content=small, headers={"content-encoding": "gzip"}).status_code == 200
    assert handed[3:] == []
    bomb = gzip.compress(b" " * (17 << 20))  # over max_body_bytes once inflated
    assert len(bomb) > 1024
    r = c.post("/v2/models/tabular/infer", content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "after decompression" in r.json()["error"], r.text
    assert handed[3:] == ["inflate"]


def _asgi_call(
    app: Any,
    path: str,
    messages: list[dict[str, Any]],
    hangup: asyncio.Event,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> Any:
    """One request straight through ASGI: ``messages`` as the body, then (once ``hangup`` is set) the
    client's disconnect; what the app sent is returned."""
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await hangup.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"t"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }

    async def run() -> list[dict[str, Any]]:
        await app(scope, receive, send)
        return sent

    return run()


def test_a_request_whose_client_hung_up_is_withdrawn_not_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listened for the client leaving while its request waited: four abandoned requests of 256
    texts were computed for nobody and held a live client's request for 28 s.  Now the request is
    cancelled: its rows still queued are withdrawn (never run), it is recorded as 499, nothing is sent."""
    import api.envelope

    monkeypatch.setattr(api.envelope, "DISCONNECT_AFTER_S", 0.0)  # listen at once (0.25 s in service)
    inner = tensor_model(tmp_path, name="ref").session
    session = BlockingSession(inner)
    audit = MemoryAudit()
    app = create_app(
        registry=make_registry([tensor_model(tmp_path, session=session)]),
        config=ApiConfig(auth=False, max_batch_size=1),
        audit=audit,
        keys=None,
    )

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/v2/models/tabular/infer", json=BODY))
            await asyncio.to_thread(session.entered.wait, 10)  # the first holds the session
            hangup = asyncio.Event()
            body = msgspec.json.encode(infer_json({"x": X * 3, "ids": IDS}))
            abandoned = asyncio.ensure_future(
                _asgi_call(app, "/v2/models/tabular/infer", [{"type": "http.request", "body": body}], hangup)
            )
            await _until(lambda: _stats(app).queue_depth == 1, "the second request queued")
            hangup.set()  # its client goes away
            sent = await asyncio.wait_for(abandoned, 10)
            assert sent == []  # nobody to answer
            await _until(lambda: _stats(app).queue_depth == 0, "its row withdrawn")
            session.release.set()
            assert (await first).status_code == 200
        assert session.calls == [1]  # the abandoned row never ran
        gone = [e for e in audit.events if e.status == 499]
        assert len(gone) == 1 and gone[0].outcome == "failure" and gone[0].event == "inference"
        assert "closed the connection" in gone[0].details["error"]

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_client_gone_mid_body_is_recorded_as_gone_not_as_a_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closed the connection halfway through its body was a 500 with a traceback in the
    log, counted by any 5xx alert."""
    import logging

    audit = MemoryAudit()
    app = create_app(
        registry=make_registry([tensor_model(tmp_path)]), config=ApiConfig(auth=False), audit=audit, keys=None
    )
    raw = msgspec.json.encode(BODY)
    half = [{"type": "http.request", "body": raw[: len(raw) // 2], "more_body": True}]
    hangup = asyncio.Event()
    hangup.set()
    with caplog.at_level(logging.INFO):
        asyncio.run(asyncio.wait_for(_asgi_call(app, "/v2/models/tabular/infer", half, hangup), 30))
    assert [(e.status, e.outcome) for e in audit.events] == [(499, "failure")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("path", ["/v2/models/tabular/infer", "/v1/embeddings"])
def test_a_body_that_stalls_is_answered_408_naming_body_timeout_s(tmp_path: Path, path: str) -> None:
    """A client that sent part of its body and then nothing held its request open as long as it liked
    (140 s for 1 of 100 bytes, until it left); nothing answered it."""
    audit = MemoryAudit()
    config = ApiConfig(auth=False, body_timeout_s=0.3)
    app = create_app(registry=make_registry([tensor_model(tmp_path)]), config=config, audit=audit, keys=None)
    part = [{"type": "http.request", "body": b'{"inputs": [', "more_body": True}]
    never = asyncio.Event()  # the client neither sends the rest nor leaves
    sent = asyncio.run(asyncio.wait_for(_asgi_call(app, path, part, never), 30))
    start, body = sent[0], msgspec.json.decode(sent[-1]["body"])
    assert start["status"] == 408, sent
    assert (b"connection", b"close") in [(bytes(k).lower(), bytes(v)) for k, v in start["headers"]]  # no trickle on
    message = body["error"]["message"] if path.startswith("/v1") else body["error"]
    assert "12 bytes arrived in 0.3 s" in message and "body_timeout_s" in message, message
    assert [(e.status, e.outcome) for e in audit.events] == [(408, "failure")]


def test_two_authorization_headers_are_no_reason_to_refuse_with_auth_off(tmp_path: Path) -> None:
    """With auth off every request is anonymous; two Authorization lines (a proxy adding its own)
    were refused 401 there too.  (The test client joins two headers into one: raw ASGI here.)"""
    app = create_app(
        registry=make_registry([tensor_model(tmp_path)]), config=ApiConfig(auth=False), audit=None, keys=None
    )
    body = [{"type": "http.request", "body": msgspec.json.encode(BODY)}]
    two = [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")]
    sent = asyncio.run(asyncio.wait_for(_asgi_call(app, "/v2/models/tabular/infer", body, asyncio.Event(), two), 30))
    assert sent[0]["status"] == 200, sent


def test_a_listener_left_waiting_when_the_client_goes_leaves_no_pending_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A streamed answer's disconnect listener waits on the read after the body and on the answer's end;
    cancelled when the client left, its waiter on the answer's end was left pending ("Task was destroyed
    but it is pending!" in the log)."""
    import gc
    import logging

    from api.envelope import envelope
    from api.metrics import Metrics

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await receive()  # a streaming answer's listener: cancelled when the client goes
        await send({"type": "http.response.body", "body": b"never", "more_body": False})

    handle = envelope(app, audit=None, metrics=Metrics(), clock=lambda: 0.0)
    hangup = asyncio.Event()
    hangup.set()
    loop = asyncio.new_event_loop()  # as a server's: it goes on, nothing cancels what is left pending
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.run_until_complete(_asgi_call(handle, "/x", [{"type": "http.request", "body": b""}], hangup))
            loop.run_until_complete(asyncio.sleep(0))
            gc.collect()
    finally:
        loop.close()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
