"""The capacity at a latency target: the highest open-loop rate whose p99 stays within it.

"How many requests a second does this box take with p99 <= 100 ms?" is the
sizing question an operator signs off.  :func:`search` answers it with open-loop
windows (:mod:`bench.openloop`: latency counted from when each request was due,
so a server that falls behind cannot hide it): from a first rate it doubles
while the target is met and halves while it is missed, until one rate met it
and another missed it; then it bisects (geometric means) until the two are
within ``resolution`` of each other, or the window budget is spent.  A window
meets the target when every request was answered 200, none was dropped and
its p99 is within the target (:func:`miss`).

The answer is the highest rate that met it twice, next to the lowest rate
above it that missed it (the resolution the search reached).  The highest of
many noisy windows is the luckiest one, so the rate found runs once more
(a second window): missed the second time, it counts as missed and the next rate
down that met the target runs again in its place, up to ``confirmations``
second windows.  Below a rate that did not hold, the search goes on as long
as a second window is left to confirm what it finds (``confirmations`` more
windows at most): it bisects again between the next rate that met it and the
rate that did not hold when they are wider apart than ``resolution``, and goes
on down below the lowest miss (two resolution steps, then halving) when no
rate that met it is left.  The report names the rates that did
not hold, and says when the answer could not be confirmed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from bench.openloop import MAX_OUTSTANDING

__all__ = ["CONFIRMATIONS", "MAX_WINDOWS", "MIN_RATE", "RESOLUTION", "figures", "judge", "miss", "search"]

#: the search stops bisecting when the missed rate is within this factor of the met one
RESOLUTION = 1.1
#: windows a search may run (the confirmation not counted)
MAX_WINDOWS = 12
#: the lowest rate tried (requests/s): below it, nothing met the target
MIN_RATE = 1.0
#: second windows a search may run to confirm its answer (each miss moves the answer down)
CONFIRMATIONS = 2


def miss(row: Mapping[str, Any], p99_ms: float) -> str | None:
    """Why an open-loop window missed a p99 target of ``p99_ms``, or None when it met it."""
    if "skipped" in row:
        return str(row["skipped"])
    errors = row.get("errors") or {}
    if errors:
        return f"{sum(errors.values())} failed requests {dict(errors)}"
    if row.get("dropped"):
        return f"{row['dropped']} requests dropped ({MAX_OUTSTANDING} were in flight)"
    p99 = row.get("p99_ms")
    if p99 is None:
        return "no request was answered"
    if p99 > p99_ms:
        return f"p99 {p99:.1f} ms > {p99_ms:g} ms"
    return None


def judge(row: dict[str, Any], p99_ms: float) -> str | None:
    """Mark ``row`` with ``meets`` (and ``missed``, why, when it did not) against ``p99_ms``;
    returns the reason it missed, or None."""
    why = miss(row, p99_ms)
    row["meets"] = why is None
    if why is not None:
        row["missed"] = why
    return why


def figures(rate: float) -> float:
    """``rate`` to three significant figures (the search's steps are 5 % or more apart)."""
    return float(f"{rate:.3g}")


def search(
    measure: Callable[[float], dict[str, Any]],
    p99_ms: float,
    start: float,
    *,
    max_rate: float,
    min_rate: float = MIN_RATE,
    resolution: float = RESOLUTION,
    max_windows: int = MAX_WINDOWS,
    confirmations: int = CONFIRMATIONS,
) -> dict[str, Any]:
    """Search the highest rate in ``[min_rate, max_rate]`` whose window meets ``p99_ms``.

    ``measure(rate)`` runs one open-loop window and returns its row (:func:`bench.openloop.open_loop`
    with anything else the caller adds).  Returns ``rows`` (every window in the order run, each
    with ``meets`` and, when missed, ``missed``), ``rate`` (the capacity, None when no rate met it),
    its ``p99_ms``, ``next_rate`` / ``next_missed`` (the lowest rate above it that missed, if any),
    ``lowest_rate`` tried, ``at_max_rate`` (it met ``max_rate``, so the capacity may be higher),
    ``windows_spent`` (it stopped on ``max_windows``: before the resolution, or still rising or
    falling), ``confirmed`` / ``confirm_p99_ms`` (the answer's second window met the target, and
    its p99), ``not_held`` (rates that met it once and missed it in their second window, which
    then count as missed), ``descended`` (first windows run below them: bisecting again, or going
    down when none that met it was left),
    ``down`` (those run while none that met it was left), ``descent_spent`` (they were spent
    above ``min_rate`` with no answer),
    ``confirm_missed`` (the last miss after the search) and ``confirm_failed`` / ``failed_in``
    (a window after the search got no answer or errors, and which: the search stopped there).
    """
    if not 0 < min_rate <= max_rate < math.inf:
        raise ValueError(f"the rates to search must satisfy 0 < {min_rate:g} <= {max_rate:g} < inf")
    if max_windows < 1 or not resolution > 1 or not 0 < p99_ms < math.inf:
        raise ValueError("a search needs a window, a resolution over 1 and a finite p99 target over 0 ms")
    rows: list[dict[str, Any]] = []
    met: dict[float, dict[str, Any]] = {}
    missed: dict[float, dict[str, Any]] = {}

    tried: list[float] = []

    def window(rate: float) -> None:
        tried.append(rate)
        row = dict(measure(rate))
        (met if judge(row, p99_ms) is None else missed)[rate] = row
        rows.append(row)

    def bounds() -> tuple[float | None, float | None]:
        lo = max(met, default=None)
        above = [r for r in missed if lo is None or r > lo]
        return lo, min(above, default=None)

    floor, ceiling = figures(min_rate), max_rate
    rate = min(max(figures(start), floor), ceiling)
    done = False  # the search reached its resolution, the ceiling or the floor (else: its window budget)
    while not done and len(rows) < max_windows:
        window(rate)
        lo, hi = bounds()
        if lo is not None and hi is not None:
            done = hi / lo <= resolution
            rate = figures(math.sqrt(lo * hi))
        elif lo is not None:  # everything tried met it: go up, up to the ceiling
            done = lo >= ceiling
            rate = min(figures(lo * 2), ceiling)
        else:  # everything tried missed it: go down, down to the floor
            assert hi is not None
            done = hi <= floor
            rate = max(figures(hi / 2), floor)
    # The answer must meet the target twice: the highest of many noisy windows is the luckiest,
    # so a rate that met it once and misses it again counts as missed, and the next one down is
    # tried again in its place (up to ``confirmations`` second windows).
    # Below a rate that did not hold, the search goes on while second windows are left to confirm
    # what it finds, with at most ``confirmations`` more first windows: when the rate that met it
    # next is more than ``resolution`` below, it bisects between the two again (a lone unlucky
    # window must not halve the answer); when none met it, it goes on down below the lowest miss
    # (two resolution steps, then halving).
    again: dict[float, dict[str, Any]] = {}
    not_held: list[float] = []  # met once, missed the second time
    descended: list[float] = []  # first windows run after the search, below a rate that did not hold
    down: list[float] = []  # those of them run while no rate that met it was left
    failed_in: str | None = None  # a window after the search that got no answer or errors (the server)
    last_miss: str | None = None  # the last miss after the search
    while len(again) < confirmations:
        lo, hi = bounds()
        if not_held and len(descended) < confirmations and (lo is None or (hi is not None and hi / lo > resolution)):
            # a first window below a rate that did not hold: a miss there counts as missed, nothing more
            if lo is not None and hi is not None:
                rate = figures(math.sqrt(lo * hi))
                where = f"the window at {rate:g}/s, between {lo:g}/s and {hi:g}/s"
            elif hi is not None and hi > floor:
                rate = max(figures(hi / (2.0 if down else resolution**2)), floor)
                down.append(rate)
                where = f"the window at {rate:g}/s, below {hi:g}/s"
            else:
                break
            descended.append(rate)
            window(rate)
            row = rows[-1]
        elif lo is not None:
            row = dict(measure(lo), confirming=True)
            rows.append(row)
            again[lo] = row
            if judge(row, p99_ms) is None:
                break
            where = "its second window"
        else:
            break
        last_miss = row.get("missed", last_miss)
        if "skipped" in row or row.get("errors"):  # a failed second window leaves its rate as met once
            failed_in = where
            break
        if row.get("confirming"):  # met once, missed the second time: it counts as missed
            assert lo is not None
            not_held.append(lo)
            del met[lo]
            missed[lo] = row
    lo, hi = bounds()
    # it stopped on its budget going down: nothing held, and the last rate down was above the floor
    stopped_down = lo is None and bool(down) and failed_in is None and min(down) > floor
    second = again.get(lo) if lo is not None else None
    out: dict[str, Any] = {
        "p99_target_ms": p99_ms,
        "rate": lo,
        "p99_ms": met[lo]["p99_ms"] if lo is not None else None,
        "next_rate": hi,
        "next_missed": missed[hi]["missed"] if hi is not None else None,
        # the client's own lag behind the schedule there: large, and the miss may be the client's
        "next_late_ms_p99": missed[hi].get("late_ms_p99") if hi is not None else None,
        "lowest_rate": min(tried),
        "min_rate": floor,
        "at_max_rate": lo is not None and lo >= ceiling,
        "max_windows": max_windows,
        "resolution": resolution,
        # it stopped on its window budget: not bracketed to the resolution, or still rising or falling
        "windows_spent": not done,
        # the answer's second window met the target too (False: it was not run, or it failed)
        "confirmed": second is not None and bool(second["meets"]),
        "confirm_p99_ms": second.get("p99_ms") if second is not None else None,
        "not_held": not_held,
        "descended": descended,
        "down": down,
        "descent_spent": stopped_down,
        "confirm_failed": failed_in is not None,
        "failed_in": failed_in,
        "confirm_missed": last_miss,
        "rows": rows,
    }
    return out
