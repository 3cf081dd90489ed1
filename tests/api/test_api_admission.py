"""A request's texts are admitted all or none, and a request of more texts than the queue holds is
a 400 (not a 429 forever); empty texts and truncation on /v1/embeddings."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from api.answer_headers import TRUNCATED_HEADER
from api.config import ApiConfig
from api.metrics import Metrics
from api.server import Server
from appliance.settings import load_settings
from runtime.errors import OverloadError

from .conftest import MAX_LENGTH, BlockingSession, make_registry, text_model


async def _queued(batcher: Any, depth: int) -> None:
    """Wait (on the loop) until ``depth`` texts are queued behind the blocked batch."""
    for _ in range(1000):
        if batcher.stats.queue_depth == depth:
            break
        await asyncio.sleep(0)
    assert batcher.stats.queue_depth == depth


def test_a_multi_text_request_refused_for_a_full_queue_computes_nothing(tmp_path: Path) -> None:
    inner = text_model(tmp_path, name="ref").session
    session = BlockingSession(inner)
    model = text_model(tmp_path, session=session)
    config = ApiConfig(auth=False, queue_limit=4, max_inputs=4, max_batch_size=1, max_queue_delay_s=0.0)
    server = Server(make_registry([model]), config, Metrics(), time.monotonic)

    async def main() -> None:
        first = asyncio.ensure_future(server.embed(model, ["one"]))
        await asyncio.to_thread(session.entered.wait, 10)
        queued = asyncio.ensure_future(server.embed(model, ["a", "b", "c"]))
        batcher = await server.text_batcher(model)
        await _queued(batcher, 3)
        with pytest.raises(OverloadError, match="full"):
            await server.embed(model, ["x", "y"])  # 3 + 2 > 4: none of the two is queued
        assert batcher.stats.queue_depth == 3
        session.release.set()
        vectors, counts = await first
        assert vectors.shape[0] == 1 and counts == [3]
        vectors, _ = await queued
        assert vectors.shape[0] == 3
        assert sum(session.calls) == 4  # "one", then a, b, c: nothing of the refused request
        await server.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_queue_shorter_than_max_inputs_starts_and_refuses_only_a_request_it_cannot_hold(
    tmp_path: Path, client_factory: Any
) -> None:
    """max_inputs over queue_limit is not refused at start (review 2: that broke tensor-only boxes
    and configs with a short queue on upgrade, though a tensor request is one queue entry); a text
    request of more texts than the queue holds gets a 400 naming input and queue_limit."""
    Server(make_registry([]), ApiConfig(queue_limit=4), Metrics(), time.monotonic)  # max_inputs 2048
    load_settings({"queue_limit": 4}, environ={"HOME": str(tmp_path)})
    c = client_factory(queue_limit=4)
    r = c.post("/v1/embeddings", json={"input": ["a", "b", "c", "d", "e"], "model": "minilm"})
    assert r.status_code == 400 and "queue_limit" in r.text and "input" in r.text
    r = c.post("/v1/embeddings", json={"input": ["a", "b", "c", "d"], "model": "minilm"})
    assert r.status_code == 200 and len(r.json()["data"]) == 4


def test_truncated_texts_are_named_in_a_header(client_factory: Any) -> None:
    long = " ".join(["word"] * (MAX_LENGTH * 2))
    c = client_factory(truncate=True)
    r = c.post("/v1/embeddings", json={"input": ["short", long, "fine", long], "model": "minilm"})
    assert r.status_code == 200
    assert r.headers[TRUNCATED_HEADER] == "1,3"
    assert r.headers["X-Truncated-Count"] == "2"
    r = c.post("/v1/embeddings", json={"input": ["short", ""], "model": "minilm"})
    assert r.status_code == 200
    assert TRUNCATED_HEADER not in r.headers
    # KServe's text route cuts them too, and said nothing
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": [long, "short"]}]}
    r = c.post("/v2/models/minilm/infer", json=body)
    assert r.status_code == 200 and r.headers[TRUNCATED_HEADER] == "0" and r.headers["X-Truncated-Count"] == "1"


def test_the_truncated_list_stays_within_a_proxys_header_buffer() -> None:
    """2,048 indices made a 9 KB header: nginx (4 KiB buffers by default) answered 502 for a 1,000-text
    LangChain chunk of long documents that the server had answered and recorded."""
    from api.answer_headers import TRUNCATED_LIST_MAX, truncation_headers

    assert truncation_headers([1, 3]) == {TRUNCATED_HEADER: "1,3", "X-Truncated-Count": "2"}
    every = truncation_headers(list(range(2048)))
    assert every == {TRUNCATED_HEADER: "0-2047", "X-Truncated-Count": "2048"}  # ranges over 1 KiB
    alternate = truncation_headers(list(range(0, 4096, 2)))
    assert len(alternate[TRUNCATED_HEADER]) <= TRUNCATED_LIST_MAX and alternate[TRUNCATED_HEADER].endswith(",...")
    assert alternate["X-Truncated-Count"] == "2048"
    assert truncation_headers([]) == {}


@pytest.mark.parametrize(("multiple", "calls"), [(1, [1, 1, 1]), (16, [1, 2])])
def test_the_planner_batches_texts_by_the_width_they_are_padded_to(
    tmp_path: Path, multiple: int, calls: list[int]
) -> None:
    """Texts of 17 and 31 tokens cost about as much apart as together at their exact widths,
    but both are padded to 32 when the session pads to 16: then they run as one batch."""
    inner = text_model(tmp_path, name="ref").session
    session = BlockingSession(inner)
    session.pad_multiple = multiple  # type: ignore[attr-defined]
    model = text_model(tmp_path, session=session, max_length=64)
    assert model.pad_multiple == multiple
    texts = [" ".join(["word"] * k) for k in (15, 29)]
    assert [len(t) for t in model.tokenize(texts, truncate=False)] == [17, 31]
    config = ApiConfig(auth=False, max_batch_size=8, max_queue_delay_s=0.0)
    server = Server(make_registry([model]), config, Metrics(), time.monotonic)

    async def main() -> None:
        first = asyncio.ensure_future(server.embed(model, ["one"]))
        await asyncio.to_thread(session.entered.wait, 10)
        queued = [asyncio.ensure_future(server.embed(model, [t])) for t in texts]
        batcher = await server.text_batcher(model)
        await _queued(batcher, 2)
        session.release.set()
        await first
        for q in queued:
            vectors, _ = await q
            assert vectors.shape[0] == 1
        assert session.calls == calls
        await server.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
