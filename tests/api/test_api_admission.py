"""A request's texts are admitted all or none, and a configuration that could never admit a
full request is refused at start; empty texts and truncation on /v1/embeddings."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from api.config import ApiConfig
from api.metrics import Metrics
from api.openai import TRUNCATED_HEADER
from api.server import Server
from appliance.settings import load_settings
from runtime.errors import ConfigError, OverloadError

from .conftest import MAX_LENGTH, BlockingSession, make_registry, text_model


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
        for _ in range(1000):
            if batcher.stats.queue_depth == 3:
                break
            await asyncio.sleep(0)
        assert batcher.stats.queue_depth == 3
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


def test_a_server_whose_queue_is_shorter_than_a_request_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_inputs \(256\) is over queue_limit \(100\)"):
        Server(make_registry([]), ApiConfig(queue_limit=100), Metrics(), time.monotonic)
    Server(make_registry([]), ApiConfig(queue_limit=100, max_inputs=100), Metrics(), time.monotonic)


def test_settings_refuse_max_inputs_over_queue_limit(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    with pytest.raises(ConfigError) as err:
        load_settings({"queue_limit": 100}, environ=env)
    (problem,) = err.value.problems
    assert "max_inputs = 256 (default) is over queue_limit = 100 (cli)" in problem
    assert "lower max_inputs or raise queue_limit" in problem
    settings = load_settings({"queue_limit": 100}, environ={**env, "INFERBOX_MAX_INPUTS": "100"})
    assert (settings.max_inputs, settings.queue_limit) == (100, 100)


def test_truncated_texts_are_named_in_a_header(client_factory: Any) -> None:
    long = " ".join(["word"] * (MAX_LENGTH * 2))
    c = client_factory(truncate=True)
    r = c.post("/v1/embeddings", json={"input": ["short", long, "fine", long], "model": "minilm"})
    assert r.status_code == 200
    assert r.headers[TRUNCATED_HEADER] == "1,3"
    r = c.post("/v1/embeddings", json={"input": ["short", ""], "model": "minilm"})
    assert r.status_code == 200
    assert TRUNCATED_HEADER not in r.headers
