"""``/metrics`` of several workers: their series added up (api.metrics_share), a dead worker's kept."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from api.metrics import Metrics, ModelInfo
from api.metrics_share import MetricsShare, merge


def _worker(requests: int, in_flight: int, seconds: float) -> str:
    """A worker's real exposition text: ``requests`` answered (each ``seconds`` long), ``in_flight`` open."""
    m = Metrics()
    for _ in range(requests + in_flight):
        m.request_started()
    for _ in range(requests):
        m.request_finished(model="minilm", route="/v1/embeddings", status=200, seconds=seconds)
    info = ModelInfo("minilm", "1", "ov-cpu", "ov-int8", "bf16", streams=2, static_shapes=3)
    return m.render({}, [info])


def _value(text: str, series: str) -> float:
    found = [line.rpartition(" ")[2] for line in text.splitlines() if line.rpartition(" ")[0] == series]
    assert len(found) == 1, (series, text)
    return float(found[0])


REQUESTS = 'inferbox_requests_total{model="minilm",route="/v1/embeddings",status="200"}'
COUNT = 'inferbox_request_duration_seconds_count{route="/v1/embeddings"}'
BUCKET = 'inferbox_request_duration_seconds_bucket{route="/v1/embeddings",le="0.01"}'
SUM = 'inferbox_request_duration_seconds_sum{route="/v1/embeddings"}'


def test_counters_and_histograms_add_up_and_gauges_count_the_live_workers_only() -> None:
    a, b = _worker(5, 1, 0.003), _worker(7, 2, 0.5)
    merged = merge([a, b], [])
    assert _value(merged, REQUESTS) == 12
    assert _value(merged, COUNT) == 12 and _value(merged, BUCKET) == 5  # only a's were under 10 ms
    assert abs(_value(merged, SUM) - (5 * 0.003 + 7 * 0.5)) < 1e-9
    assert _value(merged, "inferbox_in_flight_requests") == 3
    # the same in every worker: not doubled
    assert _value(merged, 'inferbox_static_shapes{model="minilm"}') == 3
    assert [line for line in merged.splitlines() if line.startswith("inferbox_model_info")] == [
        line for line in a.splitlines() if line.startswith("inferbox_model_info")
    ]
    assert _value(merged, "inferbox_workers") == 2
    # each family is declared once, before its samples
    assert merged.count("# TYPE inferbox_requests_total counter") == 1
    assert merged.index("# TYPE inferbox_requests_total") < merged.index(REQUESTS)

    with_dead = merge([a], [b])  # b died: its counts stay, its open requests do not
    assert _value(with_dead, REQUESTS) == 12 and _value(with_dead, "inferbox_in_flight_requests") == 1
    assert _value(with_dead, "inferbox_workers") == 1


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_workers_file_is_folded_into_the_retired_counters(tmp_path: Path) -> None:
    first = MetricsShare(tmp_path)  # this process: alive
    second = MetricsShare(tmp_path, pid=os.getpid())  # alive too, and a child of the same parent
    second.write(_worker(7, 2, 0.5))
    answer = first.collect(_worker(5, 1, 0.003))
    assert _value(answer, REQUESTS) == 12 and _value(answer, "inferbox_workers") == 2

    # a live worker's file that looks old (a clock stepped forward, a stalled loop) is still live:
    # judged by its age, its counters were folded into the retired ones and counted twice for good
    old = time.time() - 3600
    os.utime(second.path, (old, old))
    answer = first.collect(_worker(5, 1, 0.003))
    assert _value(answer, REQUESTS) == 12 and _value(answer, "inferbox_workers") == 2
    assert not (tmp_path / "retired.prom").exists()

    gone = MetricsShare(tmp_path, pid=_dead_pid())
    gone.write(_worker(3, 2, 0.5))
    answer = first.collect(_worker(6, 0, 0.003))
    assert _value(answer, REQUESTS) == 16 and _value(answer, "inferbox_in_flight_requests") == 2  # gone's 2 not
    assert _value(answer, "inferbox_workers") == 2
    assert not gone.path.exists() and (tmp_path / "retired.prom").exists()
    # a new worker given the dead one's pid writes its own file, not over the dead one's counts
    again = MetricsShare(tmp_path, pid=gone.pid)
    assert again.path != gone.path
    again.write(_worker(1, 0, 0.003))
    answer = first.collect(_worker(6, 0, 0.003))
    assert _value(answer, REQUESTS) == 17  # (its pid is really gone here, so it is folded in turn)
    # an unrelated process that was given a worker's pid (not a child of the workers' parent): gone
    stranger = MetricsShare(tmp_path, pid=os.getppid())
    stranger.write(_worker(0, 5, 0.003))
    answer = first.collect(_worker(6, 0, 0.003))
    assert _value(answer, "inferbox_in_flight_requests") == 2 and not stranger.path.exists()  # its 5 are not
    # a second dead worker adds to the retired counters, not in place of them
    dead2 = MetricsShare(tmp_path, pid=_dead_pid())
    dead2.write(_worker(4, 0, 0.003))
    answer = first.collect(_worker(6, 0, 0.003))
    assert _value(answer, REQUESTS) == 21 and _value(answer, COUNT) == 21
    assert "inferbox_in_flight_requests" in answer and "inferbox_static_shapes" in answer


def test_a_folder_that_went_away_is_made_again_and_a_scrape_never_fails(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "metrics"
    share = MetricsShare(folder)
    share.write(_worker(2, 0, 0.003))
    shutil.rmtree(folder)  # a tmp cleaner
    assert _value(share.collect(_worker(3, 0, 0.003)), REQUESTS) == 3  # before: FileNotFoundError, a 500
    share.write(_worker(3, 0, 0.003))
    assert share.path.exists()
    folder.chmod(0o500)  # cannot be written: the scrape answers this worker's own series
    try:
        if os.geteuid() != 0:
            other = MetricsShare(folder, pid=os.getpid())
            with contextlib.suppress(OSError):
                other.write(_worker(1, 0, 0.003))
            assert _value(share.collect(_worker(4, 0, 0.003)), REQUESTS) >= 4
    finally:
        folder.chmod(0o700)


def test_a_publisher_that_cannot_write_says_so_once(tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    import asyncio
    import logging

    import api.app as app_module
    from api.config import ApiConfig
    from api.server import Server
    from tests.api.conftest import make_registry

    blocker = tmp_path / "metrics"
    blocker.write_text("a file where the folder should be")
    share = MetricsShare(blocker)
    server = Server(make_registry([]), ApiConfig(), Metrics(), time.monotonic)
    monkeypatch.setattr(app_module, "WRITE_EVERY_S", 0.01)
    caplog.set_level(logging.WARNING)

    async def run() -> None:
        task = asyncio.create_task(app_module._publish_metrics(server, share))
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(run())
    said = [r for r in caplog.records if "could not write this worker's metrics" in r.getMessage()]
    assert len(said) == 1 and not said[0].exc_info
