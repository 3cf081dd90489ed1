"""Timing a session on this box: batch-1 latency and batch-32 throughput (p50 / p99 / items per second)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from export.sources import Feeds
from runtime.backends.base import Session

__all__ = ["Measured", "time_session"]


@dataclass(frozen=True)
class Measured:
    p50_ms: float
    p99_ms: float
    items_per_s: float
    batch: int


def time_session(
    session: Session,
    feeds: Feeds,
    *,
    warmup: int,
    runs: int,
    budget_s: float | None = None,
    min_runs: int = 3,
    min_s: float = 0.0,
    windows: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> Measured:
    """Run ``warmup`` untimed then ``runs`` timed calls; items/s is batch / mean latency (of the
    fastest of ``windows`` consecutive windows of the timed calls; p50 / p99 are of all).

    ``min_s`` keeps timing past ``runs`` calls until the timed calls took that long (only with
    a budget, which bounds it): 20 calls of a fast scenario are a 0.1 s window, and one slow
    spell of the VM in it decides the ranking (a stream timing read 490 items/s in one build
    and 714-717 in two others, and serve's choice flipped).

    With ``budget_s``, a slow box times fewer calls instead of taking minutes: warm-up stops
    after the first call once half the budget is spent, timing once the whole budget is
    (never below ``min(runs, min_runs)`` timed calls).  On all-MiniLM-L6-v2, batch 32 x 256
    tokens takes ~0.4 s on an AVX-512 box and ~2.5 s on an AVX2 one: 23 calls each were
    ~1 minute per variant there.
    """
    if runs < 1:
        raise ValueError("runs must be at least 1")
    wanted = set(session.input_names)
    feed = {k: v for k, v in feeds.items() if not wanted or k in wanted}
    spent = 0.0
    for _ in range(warmup):
        if budget_s is None:
            session.run(feed)
            continue
        start = clock()
        session.run(feed)
        spent += clock() - start
        if spent >= budget_s / 2:
            break
    times: list[float] = []
    timed = 0.0
    while len(times) < runs or (budget_s is not None and timed < min_s):
        start = clock()
        session.run(feed)
        times.append(clock() - start)
        spent += times[-1]
        timed += times[-1]
        if budget_s is not None and spent >= budget_s and len(times) >= min(runs, min_runs):
            break
    batch = len(next(iter(feed.values())))
    arr = np.asarray(times, dtype=np.float64)
    # the best of ``windows`` consecutive windows of calls: a slow spell of a VM in one window
    # must not decide the ranking (one build timed bf16 at 490 items/s, the others at 714-720)
    parts = [w for w in np.array_split(arr, max(1, min(windows, len(arr)))) if len(w)]
    mean = min(float(w.mean()) for w in parts)
    return Measured(
        p50_ms=float(np.percentile(arr, 50)) * 1e3,
        p99_ms=float(np.percentile(arr, 99)) * 1e3,
        items_per_s=batch / mean if mean > 0 else float("inf"),
        batch=batch,
    )
