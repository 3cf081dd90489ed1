"""``/metrics`` series of the batchers, the audit log and the registry (the SRE review's findings)."""

from __future__ import annotations

import asyncio

from api.metrics import Metrics
from api.metrics_share import merge
from runtime.batcher import BatchStats, DynamicBatcher


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
