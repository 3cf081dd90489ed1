"""Timing a session: counts of warm-up and timed calls, and the time budget of a slow box."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from export.timing import time_session


class _Session:
    """Each run advances a fake clock by ``seconds`` and counts itself."""

    input_names = ("x",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.now = 0.0
        self.calls = 0

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        self.now += self.seconds
        return {"y": feeds["x"]}

    def clock(self) -> float:
        return self.now


FEEDS = {"x": np.zeros((32, 4), dtype=np.float32), "unused": np.zeros(1)}


def test_all_runs_without_a_budget() -> None:
    s = _Session(0.5)
    m = time_session(s, FEEDS, warmup=3, runs=20, clock=s.clock)  # type: ignore[arg-type]
    assert s.calls == 23
    assert m.batch == 32 and m.items_per_s == pytest.approx(64.0) and m.p50_ms == pytest.approx(500.0)


def test_a_fast_session_stays_inside_the_budget_and_runs_everything() -> None:
    s = _Session(0.01)
    time_session(s, FEEDS, warmup=3, runs=20, budget_s=5.0, clock=s.clock)  # type: ignore[arg-type]
    assert s.calls == 23


def test_a_slow_session_stops_at_the_budget() -> None:
    s = _Session(2.5)  # batch 32 x 256 tokens on the AVX2 box
    m = time_session(s, FEEDS, warmup=3, runs=20, budget_s=5.0, clock=s.clock)  # type: ignore[arg-type]
    # one warm-up (it already spent half the budget), then the minimum of three timed calls
    assert s.calls == 1 + 3
    assert m.items_per_s == pytest.approx(32 / 2.5)
    s = _Session(0.5)
    time_session(s, FEEDS, warmup=3, runs=20, budget_s=5.0, clock=s.clock)  # type: ignore[arg-type]
    assert s.calls == 3 + 7  # three warm-ups (1.5 s), then timed calls until 5 s are spent
    s = _Session(9.0)
    time_session(s, FEEDS, warmup=3, runs=2, budget_s=5.0, clock=s.clock)  # type: ignore[arg-type]
    assert s.calls == 1 + 2  # never fewer timed calls than asked when that is below the minimum


def test_runs_must_be_positive() -> None:
    s = _Session(0.1)
    with pytest.raises(ValueError, match="at least 1"):
        time_session(s, FEEDS, warmup=0, runs=0, clock=s.clock)  # type: ignore[arg-type]
