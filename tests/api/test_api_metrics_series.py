"""``/metrics`` series of the batchers, the audit log and the registry (the SRE review's findings)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from api.metrics import Metrics
from api.metrics_share import merge
from runtime.batcher import BatchStats, DynamicBatcher
from runtime.errors import InputError


def _value(text: str, series: str) -> float:
    found = [line.rpartition(" ")[2] for line in text.splitlines() if line.rpartition(" ")[0] == series]
    assert len(found) == 1, (series, text[-3000:])
    return float(found[0])


def test_queue_and_inference_histograms_count_every_item_however_rarely_scraped() -> None:
    """12,000 texts between two scrapes: the raw samples kept for the histograms were thrown away past
    10,000, and queue_seconds_count grew by 1,984 (the SRE review's histdrop.py)."""

    async def main() -> tuple[str, str, int]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(
            lambda items: items, max_batch_size=256, max_delay_s=0.0, queue_limit=4096, timeout_s=30.0, name="m"
        )
        batcher.start()
        metrics = Metrics()
        first = metrics.render({"m": [batcher.stats]}, [])
        for _ in range(6):
            await asyncio.gather(*(batcher.submit_many(list(range(1000))) for _ in range(2)))
        second = metrics.render({"m": [batcher.stats]}, [])
        await batcher.stop()
        return first, second, batcher.stats.batches

    first, second, batches = asyncio.run(asyncio.wait_for(main(), 60))
    queued = 'inferbox_queue_seconds_count{model="m"}'
    assert _value(second, queued) - _value(first, queued) == 12_000
    assert _value(second, 'inferbox_queue_seconds_bucket{model="m",le="+Inf"}') == 12_000
    assert _value(second, 'inferbox_inference_seconds_count{model="m"}') == batches
    assert _value(second, 'inferbox_batch_size_sum{model="m"}') == 12_000
    # several workers: each one's buckets add up (api.metrics_share)
    both = merge([second, second], [])
    assert (
        _value(both, queued) == 24_000 and _value(both, 'inferbox_queue_seconds_bucket{model="m",le="+Inf"}') == 24_000
    )


def test_a_retired_batchers_times_stay_in_the_histograms() -> None:
    """A replaced version's batcher goes (Metrics.absorb): its counts stay, the next one's add to them."""
    old, new = BatchStats(), BatchStats()
    old.queue_buckets[0], old.queue_buckets[-1], old.queue_seconds = 3, 1, 40.003
    old.inference_buckets[5], old.inference_seconds = 2, 0.08
    new.queue_buckets[2], new.queue_seconds = 5, 0.02
    metrics = Metrics()
    before = metrics.render({"m": [new, old]}, [])
    metrics.absorb("m", old)
    after = metrics.render({"m": [new]}, [])
    for text in (before, after):
        assert _value(text, 'inferbox_queue_seconds_count{model="m"}') == 9
        assert _value(text, 'inferbox_queue_seconds_bucket{model="m",le="0.001"}') == 3
        assert _value(text, 'inferbox_queue_seconds_bucket{model="m",le="0.005"}') == 8
        assert _value(text, 'inferbox_queue_seconds_bucket{model="m",le="30"}') == 8  # one waited 40 s
        assert abs(_value(text, 'inferbox_queue_seconds_sum{model="m"}') - 40.023) < 1e-9
        assert _value(text, 'inferbox_inference_seconds_bucket{model="m",le="0.05"}') == 2
        assert _value(text, 'inferbox_inference_seconds_count{model="m"}') == 2
    metrics.absorb("m", new)
    gone = metrics.render({}, [])  # the name unloaded: its counts are still there
    assert _value(gone, 'inferbox_queue_seconds_count{model="m"}') == 9


def test_the_queue_series_say_items_and_the_batchers_outcomes_and_limit_are_exported() -> None:
    """queue_depth counts items (a 2,000-text request showed 1584 "requests"); queue_limit and the
    items the batcher refused, timed out or failed were counted but not exported."""
    stats = BatchStats(queue_depth=7, queue_limit=64, completed=10, failed=2, rejected=30, timed_out=4)
    text = Metrics().render({"m": [stats]}, [])
    lines = text.splitlines()
    for line in (
        "# TYPE inferbox_queue_limit gauge",
        'inferbox_queue_limit{model="m"} 64',
        'inferbox_queue_depth{model="m"} 7',
        "# TYPE inferbox_batcher_items_total counter",
        'inferbox_batcher_items_total{model="m",outcome="completed"} 10',
        'inferbox_batcher_items_total{model="m",outcome="failed"} 2',
        'inferbox_batcher_items_total{model="m",outcome="rejected"} 30',
        'inferbox_batcher_items_total{model="m",outcome="timed_out"} 4',
    ):
        assert line in lines, line
    helps = {line.split(" ")[2]: line for line in lines if line.startswith("# HELP ")}
    assert helps["inferbox_queue_depth"].startswith("# HELP inferbox_queue_depth Items waiting"), helps
    assert helps["inferbox_queue_seconds"].startswith("# HELP inferbox_queue_seconds Time each item waited"), helps

    # a replaced version's batcher retires: its counts stay (counters never go down)
    metrics = Metrics()
    metrics.absorb("m", stats)
    after = metrics.render({"m": [BatchStats(queue_limit=64, rejected=1)]}, [])
    assert 'inferbox_batcher_items_total{model="m",outcome="rejected"} 31' in after.splitlines()
    assert 'inferbox_batcher_items_total{model="m",outcome="completed"} 10' in after.splitlines()
    assert 'inferbox_queue_depth{model="m"} 0' in after.splitlines()


def test_a_real_batcher_counts_its_limit_and_outcomes() -> None:
    async def main() -> BatchStats:
        def run(items: list[int]) -> list[int]:
            if 0 in items:
                raise ValueError("no zeros")
            return items

        batcher: DynamicBatcher[int, int] = DynamicBatcher(
            run, max_batch_size=4, max_delay_s=0.0, queue_limit=3, timeout_s=5.0, name="m"
        )
        batcher.start()
        assert await batcher.submit_many([1, 2]) == [1, 2]
        with pytest.raises(ValueError, match="no zeros"):
            await batcher.submit(0)
        with pytest.raises(InputError):  # more than the queue can ever hold: a 400, not refused for load
            await batcher.submit_many([1, 2, 3, 4])
        await batcher.stop()
        return batcher.stats

    stats = asyncio.run(asyncio.wait_for(main(), 20))
    assert (stats.queue_limit, stats.completed, stats.failed, stats.rejected) == (3, 2, 1, 0)


def _every_family() -> dict[str, bool]:
    """The families of a /metrics answer with every source on (audit, TLS, HTTP closes, threads,
    a batcher, a loaded model), several workers' merged: whether each has labels."""
    from api.metrics import ModelInfo
    from api.protocols import AuditStats
    from runtime.threads import ThreadCpu

    metrics = Metrics(
        thread_cpu=ThreadCpu(lambda: {1: ("loop", 100)}, tick=100),
        audit_stats=lambda: AuditStats(records=1, commits=1, commit_seconds=0.1, pending=0),
        certificate_expiry=lambda: 2e9,
        connection_closes=lambda: {"header_timeout": 1},
    )
    metrics.request_started()
    metrics.request_finished(model="m", route="/v1/embeddings", status=200, seconds=0.01)
    info = [ModelInfo("m", "1", "fake", "onnx-fp32", "fp32")]
    text = metrics.render({"m": [BatchStats(queue_limit=4)]}, info, [("m", 1, True)])
    lines = merge([text], []).splitlines()
    families = [line.split(" ")[2] for line in lines if line.startswith("# TYPE ")]
    samples = [line.partition(" ")[0] for line in lines if not line.startswith("#")]
    return {
        f: any(s.startswith((f"{f}{{", f"{f}_sum{{")) for s in samples)
        for f in families  # a histogram's le alone is no label of the family
    }


def test_docs_api_md_names_every_metric() -> None:
    """Each family as docs/api.md writes it: ``name{labels...}`` where it has labels, else ``name``."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
    families = _every_family()
    assert len(families) > 10
    missing = []
    for family, labelled in sorted(families.items()):
        short = family.removeprefix("inferbox_")
        if not any(f"`{name}{'{' if labelled else '`'}" in doc for name in (short, family)):
            missing.append(family)
    assert not missing, f"docs/api.md (Request ids, audit, metrics) does not name {missing}"


def test_the_audit_logs_trouble_shows_in_metrics() -> None:
    """A failing audit log refuses every request with 503 and said so only in the server log and
    /v2/health/ready; /metrics showed nothing."""
    from api.protocols import AuditStats

    failing = AuditStats(records=9, commits=3, commit_seconds=0.1, pending=2, failing=True, refused=40)
    lines = Metrics(audit_stats=lambda: failing).render({}, []).splitlines()
    for line in (
        "# TYPE inferbox_audit_up gauge",
        "inferbox_audit_up 0",
        "# TYPE inferbox_audit_refused_records_total counter",
        "inferbox_audit_refused_records_total 40",
    ):
        assert line in lines, line
    # a sink that says nothing of either (the fields' defaults): up, none refused
    plain = AuditStats(records=9, commits=3, commit_seconds=0.1, pending=0)
    lines = Metrics(audit_stats=lambda: plain).render({}, []).splitlines()
    assert "inferbox_audit_up 1" in lines and "inferbox_audit_refused_records_total 0" in lines
    # several workers, each with its own writer: the service is down when one of them is
    down, up = (Metrics(audit_stats=lambda s=s: s).render({}, []) for s in (failing, plain))
    merged = merge([up, down], []).splitlines()
    assert "inferbox_audit_up 0" in merged and "inferbox_audit_refused_records_total 40" in merged
    assert "inferbox_audit_up 1" in merge([up, up], []).splitlines()


def test_a_model_that_failed_to_load_shows_in_metrics(tmp_path: Path) -> None:
    """A broken package (here at start) left no trace in /metrics: model_info lists only what loaded."""
    from litestar.testing import TestClient

    from api.app import create_app
    from api.config import ApiConfig
    from runtime.errors import ManifestError
    from runtime.serving import IndexEntry

    from .conftest import make_registry, tensor_model

    def broken() -> Any:
        raise ManifestError("broken/2/manifest.json: not valid JSON")

    disk = [IndexEntry("tabular", 1, "UNAVAILABLE"), IndexEntry("broken", 2, "UNAVAILABLE")]
    registry = make_registry([tensor_model(tmp_path)], on_disk=disk, extra={"broken": broken})
    with pytest.raises(ManifestError):
        registry.load("broken")  # as serve loads every model of the repository at start
    app = create_app(registry=registry, config=ApiConfig(auth=False), audit=None, keys=None)
    with TestClient(app) as c:
        lines = c.get("/metrics").text.splitlines()
        assert "# TYPE inferbox_model_ready gauge" in lines
        assert 'inferbox_model_ready{model="tabular",version="1"} 1' in lines
        assert 'inferbox_model_ready{model="broken",version="2"} 0' in lines
        assert c.post("/v2/repository/models/tabular/unload").status_code == 200
        lines = c.get("/metrics").text.splitlines()
        assert 'inferbox_model_ready{model="tabular",version="1"} 0' in lines  # known, not loaded
        assert c.post("/v2/models/nosuch/infer", json={"inputs": []}).status_code == 404
        assert c.post("/v2/repository/models/nosuch/load").status_code == 404
        ready = [line for line in c.get("/metrics").text.splitlines() if line.startswith("inferbox_model_ready{")]
        assert len(ready) == 2 and not any("nosuch" in line for line in ready)  # never a client's name


def test_model_ready_follows_the_repositorys_folders(tmp_path: Path) -> None:
    """A failed version whose folder was removed since (``inferbox models remove``) is no longer reported."""
    from runtime.errors import ManifestError
    from runtime.serving import IndexEntry, ModelRegistry

    def loader(name: str, version: int | None) -> Any:
        raise ManifestError(f"{name}: broken")

    (tmp_path / "broken" / "3").mkdir(parents=True)
    registry = ModelRegistry(loader, lambda: [IndexEntry("broken", 3, "UNAVAILABLE")], tmp_path)
    with pytest.raises(ManifestError):
        registry.load("broken")
    assert registry.readiness() == [("broken", 3, False)]
    (tmp_path / "broken" / "3").rmdir()
    assert registry.readiness() == []


def test_model_ready_of_several_workers_is_the_least() -> None:
    """Each worker loads the models itself: one that failed makes the version not ready (not 1 + 0)."""
    up, down = (Metrics().render({}, [], [("m", 1, ok)]) for ok in (True, False))
    assert 'inferbox_model_ready{model="m",version="1"} 0' in merge([up, down], []).splitlines()
    assert 'inferbox_model_ready{model="m",version="1"} 1' in merge([up, up], []).splitlines()


def test_the_process_series_an_sre_alerts_on_are_there_and_merge_sensibly() -> None:
    """No memory, open-files, start-time or build series: the usual alerts (memory growth, the file limit
    near, a restart) could not be written."""
    import os
    import resource
    import time

    import psutil

    text = Metrics().render({}, [])
    values = {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")
    }
    me = psutil.Process()
    assert abs(values["process_resident_memory_bytes"] - me.memory_info().rss) < 256 << 20
    assert values["process_open_fds"] >= 3 and values["process_start_time_seconds"] == pytest.approx(me.create_time())
    assert 0 < values["process_cpu_seconds_total"] <= time.process_time() + 1
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert values.get("process_max_fds") == (None if soft == resource.RLIM_INFINITY else soft)
    assert any(k.startswith('inferbox_build_info{version="') for k in values)
    assert "# TYPE process_cpu_seconds_total counter" in text and os.getpid() == me.pid
    # two workers: memory adds up; open files are each worker's against its own limit: the most; the
    # start is the first one's, the build the same
    other = re.sub(r"(?m)^process_start_time_seconds .*$", "process_start_time_seconds 1", text)
    other = re.sub(r"(?m)^process_open_fds .*$", "process_open_fds 4000", other)
    merged = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in merge([text, other], []).splitlines()}
    assert float(merged["process_open_fds"]) == 4000  # not the sum: open over max stays one worker's share
    assert float(merged["process_resident_memory_bytes"]) == 2 * values["process_resident_memory_bytes"]
    assert merged["process_start_time_seconds"] == "1"
    assert [k for k in merged if k.startswith("inferbox_build_info")] and all(
        v == "1" for k, v in merged.items() if k.startswith("inferbox_build_info")
    )


def test_the_shipped_alert_rules_use_only_series_the_server_writes() -> None:
    """docs/prometheus-alerts.yml (an SRE's rules, checked against a real Prometheus in review): a series
    renamed or dropped would leave an alert that never fires, silently."""
    from pathlib import Path

    import yaml

    rules = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "prometheus-alerts.yml").read_text())
    families = set(_every_family()) | {"process_max_fds"}  # written when the process has a file limit
    used: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"].startswith("Inferbox") and rule["expr"].strip()
            for name in re.findall(r"\b((?:inferbox|process)_[a-z_]+)", rule["expr"]):
                used.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert used and used <= families, sorted(used - families)
