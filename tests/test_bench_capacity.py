"""The capacity search (:mod:`bench.capacity`) on servers whose answer to each rate the test
decides, and its words (:func:`bench.remote.capacity_line`, :func:`bench.remote.start_rate`).
The search against a real server: ``test_e2e_bench_remote``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bench.capacity import MAX_WINDOWS, MIN_RATE, RESOLUTION, miss, search
from bench.remote import capacity_line, start_rate


def window(rate: float, p99_ms: float, **extra: Any) -> dict[str, Any]:
    """An open-loop row as :func:`bench.openloop.open_loop` gives it."""
    return {"rate": rate, "rps": rate, "p50_ms": p99_ms / 2, "p99_ms": p99_ms, "errors": {}, "dropped": 0, **extra}


def knee(capacity: float, tried: list[float] | None = None) -> Callable[[float], dict[str, Any]]:
    """A server whose p99 is 20 ms up to ``capacity`` requests/s and 400 ms past it."""

    def measure(rate: float) -> dict[str, Any]:
        if tried is not None:
            tried.append(rate)
        return window(rate, 20.0 if rate <= capacity else 400.0)

    return measure


@pytest.mark.parametrize(("capacity", "start"), [(437.0, 150.0), (437.0, 5000.0), (30.0, 300.0), (2.5, 40.0)])
def test_the_search_brackets_the_knee_to_its_resolution(capacity: float, start: float) -> None:
    tried: list[float] = []
    found = search(knee(capacity, tried), 100.0, start, max_rate=10_000)
    assert found["rate"] is not None and found["next_rate"] is not None
    # the answer met the target and the rate above it missed it, within the resolution
    assert found["rate"] <= capacity < found["next_rate"] <= found["rate"] * RESOLUTION
    assert found["p99_ms"] == 20.0 and found["next_missed"] == "p99 400.0 ms > 100 ms"
    assert not found["at_max_rate"] and not found["windows_spent"]
    assert found["confirmed"] and found["confirm_p99_ms"] == 20.0
    rows = found["rows"]
    assert [r["rate"] for r in rows] == tried
    assert len(rows) <= MAX_WINDOWS + 1  # and the confirmation
    assert rows[-1]["confirming"] and rows[-1]["rate"] == found["rate"]
    for row in rows:
        assert row["meets"] == (row["rate"] <= capacity)
        assert ("missed" in row) == (not row["meets"])
    # rates a table can show: three significant figures
    assert all(float(f"{r:.3g}") == r for r in tried)


def test_a_server_that_meets_every_rate_is_searched_up_to_the_ceiling_only() -> None:
    tried: list[float] = []
    found = search(knee(1e9, tried), 100.0, 100.0, max_rate=1234.0)
    assert tried == [100.0, 200.0, 400.0, 800.0, 1234.0, 1234.0]  # the ceiling given, never over it
    assert found["rate"] == 1234.0 and found["at_max_rate"] and found["next_rate"] is None
    assert not found["windows_spent"]
    assert "that is the search's ceiling, so the server may take more" in capacity_line(found)


def test_a_target_no_rate_meets_goes_down_to_the_floor_and_says_so() -> None:
    tried: list[float] = []
    found = search(knee(0.0, tried), 100.0, 8.0, max_rate=100.0)
    assert tried == [8.0, 4.0, 2.0, MIN_RATE]  # no confirmation of nothing
    assert found["rate"] is None and found["next_rate"] == MIN_RATE and not found["confirmed"]
    assert capacity_line(found) == "no rate from 1/s up met p99 <= 100 ms twice (at 1/s: p99 400.0 ms > 100 ms)"
    # a budget spent on the way down says where it stopped, not that 1/s was tried
    found = search(knee(0.0), 100.0, 9000.0, max_rate=10_000, max_windows=4)
    assert [r["rate"] for r in found["rows"]] == [9000.0, 4500.0, 2250.0, 1120.0] and found["windows_spent"]
    assert capacity_line(found) == (
        "no rate from 1120/s up met p99 <= 100 ms twice (at 1120/s: p99 400.0 ms > 100 ms); "
        "the search stopped after 4 windows, still going down"
    )


def test_failed_requests_and_drops_miss_the_target_whatever_the_latency() -> None:
    def measure(rate: float) -> dict[str, Any]:
        if rate > 300:
            return window(rate, 5.0, errors={"503": 7})
        if rate > 150:
            return window(rate, 5.0, dropped=3)
        return window(rate, 5.0)

    found = search(measure, 100.0, 400.0, max_rate=10_000)
    assert 136 <= found["rate"] <= 150 < found["next_rate"]
    reasons = {r["missed"] for r in found["rows"] if "missed" in r}
    assert "3 requests dropped (512 were in flight)" in reasons
    assert "7 failed requests {'503': 7}" in reasons


def noisy(capacity: float, unlucky: set[float]) -> Callable[[float], dict[str, Any]]:
    """The knee of :func:`knee`, but a rate in ``unlucky`` misses the target in its second window."""
    calls: dict[float, int] = {}

    def measure(rate: float) -> dict[str, Any]:
        calls[rate] = calls.get(rate, 0) + 1
        lucky = rate <= capacity and (calls[rate] == 1 or rate not in unlucky)
        return window(rate, 20.0 if lucky else 130.0)

    return measure


def test_a_rate_that_does_not_hold_a_second_time_counts_as_missed_and_the_search_bisects_below_it() -> None:
    # the knee at 437 from 150/s: 150, 300, 600, 424, 504, 462; 424 met once and then missed, so
    # the next rate that met it (300) is 1.41x below: bisect again (357, 389), then confirm 389
    found = search(noisy(437.0, {424.0}), 100.0, 150.0, max_rate=10_000)
    assert [(r["rate"], r["meets"], r.get("confirming", False)) for r in found["rows"][-4:]] == [
        (424.0, False, True),
        (357.0, True, False),
        (389.0, True, False),
        (389.0, True, True),
    ]
    assert (found["rate"], found["confirmed"], found["confirm_p99_ms"], found["descended"]) == (
        389.0,
        True,
        20.0,
        [357.0, 389.0],
    )
    assert (found["next_rate"], found["not_held"], found["confirm_failed"]) == (424.0, [424.0], False)
    assert capacity_line(found) == (
        "389 requests/s with p99 <= 100 ms (p99 20.0 ms, again 20.0 ms); 424/s met it once, then missed it "
        "(p99 130.0 ms > 100 ms): the box's spread is near the target"
    )
    # the next rate that met it within the resolution: it is confirmed at once, no window spent
    found = search(noisy(437.0, {424.0}), 100.0, 150.0, max_rate=10_000, resolution=1.5)
    assert (found["rate"], found["confirmed"], found["descended"], found["not_held"]) == (300.0, True, [], [424.0])
    # two that do not hold: the answer is the next one down, met in one window only
    found = search(noisy(437.0, {424.0, 389.0}), 100.0, 150.0, max_rate=10_000)
    assert (found["rate"], found["confirmed"], found["not_held"]) == (357.0, False, [424.0, 389.0])
    assert capacity_line(found) == (
        "357 requests/s with p99 <= 100 ms (p99 20.0 ms); 389/s met it once, then missed it (p99 130.0 ms > 100 ms)"
        "; 424/s also met it once, then missed it: the box's spread is near the target; met in one window only "
        "(no second window was left to confirm it)"
    )
    # the only rate that met it did not hold: the search goes on down, two resolution steps, then
    # bisects between what met it there and the rate that did not hold
    found = search(noisy(10.0, {10.0}), 100.0, 10.0, max_rate=10_000)
    assert (found["rate"], found["confirmed"], found["descended"]) == (9.09, True, [8.26, 9.09])
    assert (found["not_held"], found["next_rate"], found["lowest_rate"]) == ([10.0], 10.0, 8.26)
    assert [(r["rate"], r["meets"], r.get("confirming", False)) for r in found["rows"][-4:]] == [
        (10.0, False, True),
        (8.26, True, False),
        (9.09, True, False),
        (9.09, True, True),
    ]
    assert capacity_line(found) == (
        "9.09 requests/s with p99 <= 100 ms (p99 20.0 ms, again 20.0 ms); 10/s met it once, then missed it "
        "(p99 130.0 ms > 100 ms): the box's spread is near the target"
    )
    # the rate found there does not hold either: no second window is left, and the answer is the
    # rate below it, met once
    found = search(noisy(10.0, {10.0, 9.09}), 100.0, 10.0, max_rate=10_000)
    assert (found["rate"], found["confirmed"], found["not_held"], found["next_rate"]) == (
        8.26,
        False,
        [10.0, 9.09],
        9.09,
    )
    assert capacity_line(found).endswith("met in one window only (no second window was left to confirm it)")
    # a client that batches: the line gives the texts a second too
    batched = {**search(noisy(437.0, {424.0}), 100.0, 150.0, max_rate=10_000), "per_request": 32, "unit": "texts"}
    assert capacity_line(batched).startswith("389 requests/s of 32 texts (12,400 texts/s) with p99 <= 100 ms")
    poisson = {**batched, "arrivals": "poisson"}
    assert capacity_line(poisson).startswith(
        "389 requests/s of 32 texts (12,400 texts/s) arriving at random (Poisson) with p99 <= 100 ms"
    )
    # without confirmation the answer is the highest rate met once, and says so
    found = search(noisy(437.0, {424.0}), 100.0, 150.0, max_rate=10_000, confirmations=0)
    assert (found["rate"], found["confirmed"], found["not_held"]) == (424.0, False, [])
    assert "met in one window only" in capacity_line(found)


def lucky_once(capacity: float, lucky: float, calls: list[float]) -> Callable[[float], dict[str, Any]]:
    """The knee of :func:`knee` at ``capacity``, but ``lucky`` (above it) meets the target in its first window."""

    def measure(rate: float) -> dict[str, Any]:
        calls.append(rate)
        met = rate <= capacity or (rate == lucky and calls.count(rate) == 1)
        return window(rate, 20.0 if met else 130.0)

    return measure


def test_below_a_rate_that_did_not_hold_a_miss_halves_the_rate_within_the_budget() -> None:
    # 10/s met once by luck (the knee is at 5), 8.26 misses, 4.13 meets twice
    calls: list[float] = []
    found = search(lucky_once(5.0, 10.0, calls), 100.0, 10.0, max_rate=10_000)
    assert (found["rate"], found["confirmed"], found["descended"]) == (4.13, True, [8.26, 4.13])
    assert (found["next_rate"], found["not_held"]) == (8.26, [10.0])
    assert calls[-4:] == [10.0, 8.26, 4.13, 4.13]
    assert not found["descent_spent"]
    # every window down misses: the descent stops after ``confirmations`` windows, and says so
    found = search(lucky_once(1.0, 10.0, []), 100.0, 10.0, max_rate=10_000)
    assert found["rate"] is None and found["descended"] == [8.26, 4.13] and found["descent_spent"]
    assert capacity_line(found).endswith(
        "; the search stopped 2 windows down from the rates that did not hold, above its floor of 1/s, "
        "so a lower rate may meet it"
    )
    # three confirmations: three windows down at most, and three second windows at most
    calls.clear()
    found = search(lucky_once(0.5, 10.0, calls), 100.0, 10.0, max_rate=10_000, min_rate=0.1, confirmations=3)
    assert found["descended"] == [8.26, 4.13, 2.06] and found["rate"] is None
    assert sum(1 for r in found["rows"] if r.get("confirming")) == 1  # only 10/s ever met it
    # never below the floor: from 1.1/s one window down is the floor itself
    found = search(lucky_once(0.5, 1.1, []), 100.0, 1.1, max_rate=10_000)
    assert found["descended"] == [1.0] and not found["descent_spent"]  # it reached the floor
    found = search(noisy(1.0, {1.0}), 100.0, 1.0, max_rate=10_000)
    assert found["rate"] is None and found["descended"] == [] and found["not_held"] == [1.0]


def test_a_window_down_that_failed_stops_the_search_and_blames_the_server() -> None:
    calls: list[float] = []
    lucky = lucky_once(5.0, 10.0, calls)

    def measure(rate: float) -> dict[str, Any]:
        if rate < 10.0 and calls.count(10.0) == 2:  # the server went away after 10/s's second window
            return {"rate": rate, "skipped": "no successful request: ConnectionRefusedError"}
        return lucky(rate)

    found = search(measure, 100.0, 10.0, max_rate=10_000)
    assert (
        found["descended"] == [8.26]
        and found["confirm_failed"]
        and found["failed_in"] == "the window at 8.26/s, below 10/s"
    )
    assert found["rate"] is None and not found["descent_spent"]
    assert capacity_line(found).endswith(
        "; the window at 8.26/s, below 10/s failed (no successful request: ConnectionRefusedError): "
        "the server, not the box's spread"
    )


def test_a_capacity_whose_second_window_failed_blames_the_server_not_the_spread() -> None:
    seen: set[float] = set()

    def measure(rate: float) -> dict[str, Any]:
        if rate <= 400 and rate in seen:  # the server went away after the search
            return {"rate": rate, "skipped": "no successful request: ConnectionRefusedError"}
        seen.add(rate)
        return window(rate, 20.0 if rate <= 400 else 400.0)

    found = search(measure, 100.0, 100.0, max_rate=10_000)
    assert found["confirm_failed"] is True and not found["confirmed"] and found["not_held"] == []
    assert found["rate"] == found["rows"][-1]["rate"]  # the search stopped at the failed window
    assert capacity_line(found).endswith(
        "; its second window failed (no successful request: ConnectionRefusedError): the server, not the box's spread"
    )


def test_the_search_doubles_then_bisects_geometrically() -> None:
    tried: list[float] = []
    found = search(knee(437.0, tried), 100.0, 150.0, max_rate=10_000)
    # up by doubling until a miss, then geometric means: 424 = sqrt(300 x 600), 504, 462; 462 / 424 < 1.1
    assert tried == [150.0, 300.0, 600.0, 424.0, 504.0, 462.0, 424.0]
    assert (found["rate"], found["next_rate"]) == (424.0, 462.0)
    assert capacity_line(found) == (
        "424 requests/s with p99 <= 100 ms (p99 20.0 ms, again 20.0 ms); 462/s missed it (p99 400.0 ms > 100 ms)"
    )


def test_the_window_budget_ends_a_search_and_the_report_says_so() -> None:
    found = search(knee(437.0), 100.0, 1.0, max_rate=1e6, max_windows=5)
    assert len(found["rows"]) == 6  # five windows and the confirmation
    assert found["rate"] == 16.0 and found["next_rate"] is None and found["windows_spent"]  # still doubling
    assert capacity_line(found) == (
        "16 requests/s with p99 <= 100 ms (p99 20.0 ms, again 20.0 ms); the search stopped after 5 windows, "
        "still going up, so the server may take more"
    )
    found = search(knee(437.0), 100.0, 100.0, max_rate=1e6, max_windows=5)
    assert found["windows_spent"] and found["next_rate"] / found["rate"] > RESOLUTION
    assert "; the search stopped after 5 windows, wider apart than 1.1x" in capacity_line(found)


def test_a_late_client_is_named_as_the_possible_bound() -> None:
    def measure(rate: float) -> dict[str, Any]:
        return window(rate, 20.0) if rate <= 400 else window(rate, 300.0, late_ms_p99=180.0)

    line = capacity_line(search(measure, 100.0, 100.0, max_rate=10_000))
    assert "the client itself fell 180 ms behind its schedule there" in line


@pytest.mark.parametrize(
    ("row", "why"),
    [
        (window(10, 99.9), None),
        (window(10, 100.0), None),
        (window(10, 100.1), "p99 100.1 ms > 100 ms"),
        ({"rate": 10, "skipped": "no request was answered: ConnectError"}, "no request was answered: ConnectError"),
        ({"rate": 10, "errors": {}, "dropped": 0}, "no request was answered"),
    ],
)
def test_miss_names_why_a_window_missed(row: dict[str, Any], why: str | None) -> None:
    assert miss(row, 100.0) == why


def test_a_search_starts_at_one_warm_clients_rate() -> None:
    # the first probe met a cold server; the median of the rest is one client's pace
    assert start_rate([2.0, 0.005, 0.004, 0.006, 0.005], 10_000) == 200.0
    assert start_rate([2.0, 0.004, 0.004, 0.006, 0.006], 10_000) == 200.0  # between the middle two
    assert start_rate([2.0, 0.00003, 0.00003], 10_000) == 10_000  # within the ceiling
    assert start_rate([30.0, 20.0, 25.0], 10_000) == MIN_RATE  # and the floor
    with pytest.raises(ValueError, match="0 < 5 <= 2"):
        search(knee(1.0), 100.0, 1.0, min_rate=5, max_rate=2)
    with pytest.raises(ValueError, match="< inf"):
        search(knee(1.0), 100.0, 1.0, max_rate=float("nan"))
    for windows, resolution, p99_ms in ((0, 1.1, 100.0), (12, 1.0, 100.0), (12, 1.1, float("nan"))):
        with pytest.raises(ValueError, match="a search needs a window"):
            search(knee(1.0), p99_ms, 1.0, max_rate=10.0, max_windows=windows, resolution=resolution)


def test_a_judged_rate_that_failed_is_named_with_every_other_miss() -> None:
    """``--rate`` with ``--p99-ms``: one exit naming each rate that missed, a failed one included."""
    import click

    from appliance.commands.bench import _fail_unless_loaded

    rows = [
        window(100.0, 130.0, endpoint="/v1/embeddings", meets=False, missed="p99 130.0 ms > 100 ms"),
        window(200.0, 5.0, endpoint="/v1/embeddings", errors={"503": 4}, first_error="503: busy"),
        window(50.0, 20.0, endpoint="/v1/embeddings", meets=True),
    ]
    rows[1] |= {"meets": False, "missed": miss(rows[1], 100.0)}
    with pytest.raises(click.ClickException) as caught:
        _fail_unless_loaded({"rows": rows, "p99_target_ms": 100.0})
    assert caught.value.message == (
        "the p99 target of 100 ms was missed: /v1/embeddings 100/s: p99 130.0 ms > 100 ms; "
        "/v1/embeddings 200/s: 4 failed requests {'503': 4} (first error: 503: busy)"
    )
    with pytest.raises(click.ClickException, match="requests failed under load: /v1/embeddings 200/s: 4 failed"):
        _fail_unless_loaded({"rows": [{k: v for k, v in rows[1].items() if k not in ("meets", "missed")}]})
    _fail_unless_loaded({"rows": rows[2:], "p99_target_ms": 100.0})  # all met: no exit


def scripted(script: dict[float, list[bool | str]]) -> Callable[[float], dict[str, Any]]:
    """A server that answers each rate's windows in turn as ``script`` says: met, missed, or "err"."""
    seen: dict[float, int] = {}

    def measure(rate: float) -> dict[str, Any]:
        k = seen[rate] = seen.get(rate, 0) + 1
        out = script[rate][k - 1]
        if out == "err":
            return window(rate, 10.0, errors={"503": 3})
        return window(rate, 50.0 if out else 150.0)

    return measure


def test_what_the_windows_below_a_rate_that_did_not_hold_report() -> None:
    # a window between the rates failed: the answer below it was never confirmed, and the line says so
    found = search(
        scripted({50: [1], 100: [1, 0], 200: [0], 141: [0], 119: [0], 109: [0], 70.7: ["err"]}),
        100.0, 50.0, max_rate=10_000,
    )  # fmt: skip
    assert (found["rate"], found["confirmed"], found["confirm_failed"]) == (50.0, False, True)
    assert found["failed_in"] == "the window at 70.7/s, between 50/s and 100/s"
    assert capacity_line(found).endswith(
        "; the window at 70.7/s, between 50/s and 100/s failed (3 failed requests {'503': 3}): the server, "
        "not the box's spread; 50/s met it in one window only"
    )
    # both windows went between the rates, none below the lowest: nothing says it stopped going down
    found = search(
        scripted({50: [1, 0], 100: [1, 0], 200: [0], 141: [0], 119: [0], 109: [0], 70.7: [0], 59.5: [0]}),
        100.0, 50.0, max_rate=10_000,
    )  # fmt: skip
    assert (found["rate"], found["descended"], found["down"], found["descent_spent"]) == (None, [70.7, 59.5], [], False)
    assert "windows down" not in capacity_line(found)
    # the main search spent its windows wide apart, and bisecting again below the rate that did not
    # hold closed the gap: the line does not say they are wider apart than the resolution
    script: dict[float, list[bool | str]] = {52.2: [1], 104: [1], 208: [1], 416: [1], 832: [1], 1660: [0], 1180: [1]}
    found = search(scripted({**script, 1400: [1, 0], 1290: [1, 1]}), 100.0, 52.2, max_rate=10_000, max_windows=8)
    assert (found["rate"], found["confirmed"], found["next_rate"], found["windows_spent"]) == (
        1290.0,
        True,
        1400.0,
        True,
    )
    assert "wider apart" not in capacity_line(found)
    found = search(scripted({**script, 1400: [1, 1]}), 100.0, 52.2, max_rate=10_000, max_windows=8)
    assert (found["rate"], found["next_rate"]) == (1400.0, 1660.0)
    assert capacity_line(found).endswith("the search stopped after 8 windows, wider apart than 1.1x")
