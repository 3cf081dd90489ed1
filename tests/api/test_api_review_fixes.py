"""Client mistakes that were 500s or leaks, and a model unloaded or replaced while requests use
it (found by a review of the API against its docs)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api.app import create_app
from api.config import ApiConfig
from runtime.errors import OverloadError

from .conftest import BlockingSession, audit_api_app, infer_json, make_registry, tensor_model

X = np.ones((1, 4), dtype=np.float32)
IDS = np.ones((1, 3), dtype=np.int64)
BODY = infer_json({"x": X, "ids": IDS})


def test_a_body_that_is_not_utf8_is_a_400_naming_it(client_factory: Any) -> None:
    c = client_factory()
    latin = '{"input": "caf\u00e9", "model": "minilm"}'.encode("cp1252")
    r = c.post("/v1/embeddings", content=latin, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not UTF-8" in r.json()["error"]["message"], r.text
    body = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a\xffb"]}]}'
    r = c.post("/v2/models/minilm/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not UTF-8" in r.json()["error"], r.text
    r = c.post("/v2/repository/index", content=b'{"ready": "\xff"}')
    assert r.status_code == 400, r.text


def test_made_up_model_names_never_become_metric_series_and_are_cut_in_the_audit(
    client_factory: Any, audit: Any
) -> None:
    c = client_factory()
    for i in range(5):
        r = c.post("/v1/embeddings", json={"input": "hi", "model": f"ghost-{i}-" + "x" * 5000})
        assert r.status_code == 404
    assert c.post("/v2/models/ghost/infer", json=BODY).status_code == 404
    series = [line for line in c.get("/metrics").text.splitlines() if line.startswith("inferbox_requests_total")]
    assert series and not any("ghost" in line for line in series), series
    assert all('model=""' in line for line in series if "404" in line), series
    asked = [e.model_name for e in audit.events if e.model_name.startswith("ghost")]
    assert len(asked) == 6 and all(len(n) <= 200 for n in asked) and asked[0].endswith("\u2026")
    assert c.post("/v1/embeddings", json={"input": "hi", "model": "minilm"}).status_code == 200
    assert 'model="minilm"' in c.get("/metrics").text


def test_an_inference_header_length_in_other_digits_is_a_400(client_factory: Any) -> None:
    c = client_factory()
    r = c.post(
        "/v2/models/tabular/infer", json=BODY, headers={"Inference-Header-Content-Length": b"\xb9"}
    )  # latin-1 "¹"
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.text


def test_empty_outputs_means_every_output_and_a_repeated_one_is_refused(client_factory: Any) -> None:
    c = client_factory()
    r = c.post("/v2/models/tabular/infer", json={**BODY, "outputs": []})
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["y", "z"]
    r = c.post("/v2/models/tabular/infer", json={**BODY, "outputs": [{"name": "y"}, {"name": "y"}]})
    assert r.status_code == 400 and "outputs[1].name" in r.json()["error"]
    texts = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}], "outputs": []}
    r = c.post("/v2/models/minilm/infer", json=texts)
    assert r.status_code == 200 and len(r.json()["outputs"]) == 1


def test_audit_paging_and_times_are_checked(tmp_path: Path) -> None:
    from litestar.testing import TestClient

    app, reader = audit_api_app(tmp_path)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/audit", params={"after_seq": "99999999999999999999"})
        assert r.status_code == 400 and "after_seq" in r.text
        r = c.get("/v1/audit", params={"since": "garbage"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "since"
        r = c.get("/v1/audit", params={"since": "2026-05-01T14:00:00+02:00", "until": "2026-05-02"})
        assert r.status_code == 200, r.text
    assert reader.calls[-1]["since"] == "2026-05-01T12:00:00.000000Z"
    assert reader.calls[-1]["until"] == "2026-05-02T00:00:00.000000Z"


def _swap_setup(tmp_path: Path) -> tuple[BlockingSession, Any, Any, Any, Any]:
    """Version 1 of ``tabular`` on a session that blocks until released, version 2 ready to replace
    it, and an app that runs one row a batch."""
    old_session = BlockingSession(tensor_model(tmp_path, name="ref").session)
    old = tensor_model(tmp_path, session=old_session)
    new = tensor_model(tmp_path, version=2)
    registry = make_registry([old], extra={"tabular": lambda: new})
    app = create_app(registry=registry, config=ApiConfig(auth=False, max_batch_size=1), audit=None, keys=None)
    return old_session, old, new, registry, app


def _end_grace(server: Any) -> None:
    """End a replaced version's grace now, as the server's stop does: the tests give a grace far
    longer than they need (a short one ran out while a busy box stalled the test) and end it here."""
    server._no_grace.set()


def _replace_model_while_a_batch_runs(tmp_path: Path, unload: bool) -> None:
    """A request is inside the old version's session when the model is replaced (a new version
    loads) or unloaded: it is answered from the old version, which is closed only afterwards;
    the next request runs the new version (or gets a 404)."""
    old_session, old, new, registry, app = _swap_setup(tmp_path)
    server = app.state["server"]
    server.replaced_grace_s = 60.0  # ended by _end_grace below

    async def main() -> None:
        server.attach()  # what the app's lifespan does (ASGITransport runs none)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/v2/models/tabular/infer", json=BODY))
            await asyncio.to_thread(old_session.entered.wait, 10)
            if unload:
                change = asyncio.ensure_future(c.post("/v2/repository/models/tabular/unload"))
            else:
                change = asyncio.ensure_future(asyncio.to_thread(registry.add, new))
            for _ in range(50):
                await asyncio.sleep(0.01)
            assert not change.done() if unload else True
            assert not old_session.inner._closed, "closed while a batch ran in it"
            with_old = None
            if not unload:
                await change
                r = await c.post("/v2/models/tabular/infer", json=BODY)  # the new version, at once
                assert r.status_code == 200 and r.json()["model_version"] == "2", r.text
                # a request that found the old version before the swap is still answered by it (its
                # grace), off the table: the new version keeps its batcher
                graced = await server.tensor_batcher(old)
                assert graced is not server._tensor["tabular"][1] and server._tensor["tabular"][0] is new
            else:
                assert (await c.post("/v2/models/tabular/infer", json=BODY)).status_code == 404
            old_session.release.set()
            r = await first
            assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
            if unload:
                assert (await change).status_code == 200
            _end_grace(server)
            await server.retired(old)
            assert old_session.inner._closed
            assert server._stale == []
            if not unload:  # retired: a request still holding it is asked to retry, and gets no batcher
                try:
                    await server.tensor_batcher(old)
                except OverloadError as exc:
                    with_old = str(exc)
                assert with_old is not None and "replaced" in with_old
            assert "tabular" not in server._tensor or server._tensor["tabular"][0] is new
        await server.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_new_version_replaces_the_old_only_after_its_batches(tmp_path: Path) -> None:
    _replace_model_while_a_batch_runs(tmp_path, unload=False)


def test_unload_waits_for_the_batch_in_the_session_and_refuses_new_requests(tmp_path: Path) -> None:
    _replace_model_while_a_batch_runs(tmp_path, unload=True)


def test_a_text_model_names_its_one_input(client_factory: Any) -> None:
    c = client_factory()
    body = {"inputs": [{"name": "zzz", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    r = c.post("/v2/models/minilm/infer", json=body)
    assert r.status_code == 400 and "inputs[0].name" in r.json()["error"] and "'text'" in r.json()["error"]


def test_refused_tensor_data_is_named_in_words() -> None:
    import pytest

    from api.codec import tensor_from_data
    from runtime.errors import InputError

    for data, datatype, said in (
        (["a"], "FP32", "got text"),
        ([1.5], "INT64", "got fractional numbers"),
        ([True], "FP32", "got booleans"),
    ):
        with pytest.raises(InputError, match=said):
            tensor_from_data(data, datatype, (1,), "inputs[0]")


def test_audit_times_out_of_range_are_a_400(tmp_path: Path) -> None:
    from litestar.testing import TestClient

    app, _ = audit_api_app(tmp_path)
    with TestClient(app, raise_server_exceptions=False) as c:
        for value in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
            r = c.get("/v1/audit", params={"since": value})
            assert r.status_code == 400 and r.json()["error"]["param"] == "since", r.text


def test_a_request_that_found_the_old_version_just_before_a_swap_is_answered_by_it(tmp_path: Path) -> None:
    """The e2e swap test once saw a 429: a request resolved version 1, the swap happened while it read its
    body, and it reached the batchers after the old version's were gone.  Now it is answered by version 1
    (within the replaced version's grace), and the new version keeps its batcher."""
    old = tensor_model(tmp_path, name="tabular")
    new = tensor_model(tmp_path, version=2)
    registry = make_registry([old], extra={"tabular": lambda: new})
    app = create_app(registry=registry, config=ApiConfig(auth=False), audit=None, keys=None)
    server = app.state["server"]

    async def main() -> None:
        server.attach()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v2/models/tabular/infer", json=BODY)  # version 1 has a batcher
            assert r.json()["model_version"] == "1"
            found = registry.get("tabular")  # what a request resolved before the swap
            feeds = {"x": np.array(X, dtype=np.float32), "ids": np.array(IDS)}
            await asyncio.to_thread(registry.add, new)
            assert set(await server.infer(found, feeds, None)) == {"y", "z"}  # before its retirement started
            r = await c.post("/v2/models/tabular/infer", json=BODY)
            assert r.status_code == 200 and r.json()["model_version"] == "2"
            # after the new version took the name's batcher: the old one still answers what found it
            assert set(await server.infer(found, feeds, None)) == {"y", "z"}
            assert server._tensor["tabular"][0] is new
            _end_grace(server)
            await server.retired(found)
            with pytest.raises(OverloadError, match="replaced"):
                await server.infer(found, feeds, None)
            assert server._stale == []
        await server.stop()

    server.replaced_grace_s = 60.0  # ended by _end_grace
    asyncio.run(asyncio.wait_for(main(), 30))


def test_no_grace_for_a_version_closed_at_once_or_whose_name_was_unloaded(tmp_path: Path) -> None:
    """Without the app's lifespan (or once stopped) a replaced version is closed at once: a request still
    holding it is asked to retry, never run on the closed session; and once the name is unloaded, a
    request holding a version replaced before is refused at once too."""
    feeds = {"x": np.array(X, dtype=np.float32), "ids": np.array(IDS)}

    async def closed_at_once() -> None:
        old, new = tensor_model(tmp_path, name="tabular"), tensor_model(tmp_path, version=2)
        registry = make_registry([old], extra={"tabular": lambda: new})
        server = create_app(registry=registry, config=ApiConfig(auth=False), audit=None, keys=None).state["server"]
        registry.add(new)  # not attached: the registry closes the old version itself
        with pytest.raises(OverloadError, match="replaced"):
            await server.infer(old, feeds, None)
        assert server._stale == []
        await server.stop()

    async def name_unloaded() -> None:
        old, new = tensor_model(tmp_path, name="tabular"), tensor_model(tmp_path, version=2)
        registry = make_registry([old], extra={"tabular": lambda: new})
        server = create_app(registry=registry, config=ApiConfig(auth=False), audit=None, keys=None).state["server"]
        server.attach()
        await asyncio.to_thread(registry.add, new)
        assert set(await server.infer(old, feeds, None)) == {"y", "z"}  # in its grace
        registry.unload("tabular")
        with pytest.raises(OverloadError):
            await server.infer(old, feeds, None)
        await server.stop()

    asyncio.run(asyncio.wait_for(closed_at_once(), 30))
    asyncio.run(asyncio.wait_for(name_unloaded(), 30))


def _series(text: str, name: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ") or x.startswith(name + "{")]
    return float(line.rsplit(" ", 1)[1])


def test_a_replaced_versions_queue_and_batches_stay_in_the_metrics(tmp_path: Path) -> None:
    """/metrics read only the batchers on the table: during a swap the old version's queue (its
    grace, then its drain) was invisible, and once it was retired its batches left the batch-size
    histogram, a counter that then went backwards."""
    old_session, old, new, registry, app = _swap_setup(tmp_path)
    server = app.state["server"]
    server.replaced_grace_s = 60.0  # ended by _end_grace
    feeds = {"x": np.array(X, dtype=np.float32), "ids": np.array(IDS)}

    async def main() -> None:
        server.attach()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/v2/models/tabular/infer", json=BODY))
            await asyncio.to_thread(old_session.entered.wait, 10)
            await asyncio.to_thread(registry.add, new)
            queued = asyncio.ensure_future(server.infer(old, feeds, None))  # found version 1 before the swap
            r = await c.post("/v2/models/tabular/infer", json=BODY)
            assert r.status_code == 200 and r.json()["model_version"] == "2", r.text
            graced = server._graced(old, "tensor")
            assert graced is not None and server._graced(old, "text") is None
            while graced.stats.queue_depth < 1:
                await asyncio.sleep(0.005)
            text = (await c.get("/metrics")).text
            assert _series(text, "inferbox_queue_depth") == 1, text
            assert _series(text, "inferbox_batch_size_count") == 1  # version 2's; version 1's is running
            _end_grace(server)
            while not server._draining:  # the grace is over: version 1 answers what it holds, then stops
                await asyncio.sleep(0.01)
            assert _series((await c.get("/metrics")).text, "inferbox_queue_depth") == 1
            old_session.release.set()
            assert (await first).json()["model_version"] == "1"
            assert set(await queued) == {"y", "z"}
            await server.retired(old)
            assert server._stale == [] and server._draining == []
            text = (await c.get("/metrics")).text
            assert _series(text, "inferbox_batch_size_count") == 3, text  # both versions' batches
            assert _series(text, "inferbox_queue_depth") == 0
            assert (await c.post("/v2/models/tabular/infer", json=BODY)).status_code == 200
            assert _series((await c.get("/metrics")).text, "inferbox_batch_size_count") == 4
        await server.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_batchers_metric_label_depends_on_the_model_alone(tmp_path: Path) -> None:
    """A text batcher was ``<name>:text`` only while a tensor batcher of the name ran, so its history
    moved between series; now the model's main kind keeps the name and the other kind is suffixed."""
    from api.server import metric_label

    from .conftest import text_model

    text, tensor = text_model(tmp_path), tensor_model(tmp_path)
    assert metric_label(text, "text") == text.name and metric_label(text, "tensor") == f"{text.name}:tensor"
    assert metric_label(tensor, "tensor") == tensor.name and metric_label(tensor, "text") == f"{tensor.name}:text"


def test_a_lone_surrogate_escape_is_named_not_called_a_truncated_body(client_factory: Any) -> None:
    """msgspec calls `"abc\\ud800"` "Input data was truncated": the client went looking for a cut body."""
    c = client_factory()
    lone = b'{"model": "minilm", "input": ["abc\\ud800"]}'
    for route, body in (
        ("/v1/embeddings", lone),
        (
            "/v2/models/minilm/infer",
            b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',
        ),
        ("/v2/repository/models/minilm/unload", b'{"parameters": {"a": "\\ud800"}}'),
    ):
        r = c.post(route, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "lone surrogate" in r.text and "truncated" not in r.text, (route, r.text)
    paired = b'{"model": "minilm", "input": ["\\ud83d\\ude00'  # a whole pair, then really cut
    r = c.post("/v1/embeddings", content=paired, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "truncated" in r.text and "surrogate" not in r.text, r.text
    ok = b'{"model": "minilm", "input": ["\\ud83d\\ude00"]}'
    assert c.post("/v1/embeddings", content=ok, headers={"content-type": "application/json"}).status_code == 200


def test_a_read_of_the_audit_log_records_what_was_asked_and_how_many_records_it_got(tmp_path: Path) -> None:
    """`GET /v1/audit` was recorded as an audit_read with no details: which records a key looked at could
    not be told (`inferbox audit tail` records its count)."""
    from litestar.testing import TestClient

    from .conftest import MemoryAudit, RecordingReader

    sink = MemoryAudit()
    app = create_app(
        registry=make_registry([tensor_model(tmp_path)]),
        config=ApiConfig(auth=False),
        audit=sink,
        keys=None,
        audit_reader=RecordingReader(),
    )
    with TestClient(app) as c:
        r = c.get("/v1/audit", params={"event": "inference", "actor": "k" * 500, "limit": 5})
        assert r.status_code == 200, r.text
    read = sink.events[-1]
    assert read.event == "audit_read"
    assert read.details["event"] == "inference" and read.details["limit"] == "5" and read.details["records"] == "0"
    assert read.details["actor"] == "k" * 200 and "after_seq" not in read.details


def test_an_unknown_audit_filter_is_a_400_not_the_whole_log(tmp_path: Path) -> None:
    """`?model_name=doesnotexist` (the record's own field name) answered every record, as did a
    misspelt `?evnt=`: an auditor would read the answer as filtered (review 14)."""
    from litestar.testing import TestClient

    app, reader = audit_api_app(tmp_path)
    with TestClient(app, raise_server_exceptions=False) as c:
        calls = len(reader.calls)
        r = c.get("/v1/audit", params={"model_name": "doesnotexist"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model_name"
        assert "use model" in r.json()["error"]["message"]
        r = c.get("/v1/audit", params={"evnt": "x", "limit": "5"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "evnt"
        assert "event" in r.json()["error"]["message"]
        r = c.get("/v1/audit?event=metadata&event=audit_read")  # answered only audit_read (own review 14)
        assert r.status_code == 400 and r.json()["error"]["param"] == "event"
        assert "more than once" in r.json()["error"]["message"]
        assert c.get("/v1/audit?limit=2&limit=1000").status_code == 400
        assert len(reader.calls) == calls  # nothing was read
        assert c.get("/v1/audit", params={"model": "m", "event": "inference"}).status_code == 200
