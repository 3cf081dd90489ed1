"""The dynamic batcher, driven deterministically: a blocked first batch lets the queue fill."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable
from typing import Any

import pytest

from runtime.batcher import DynamicBatcher, padded_cost, plan_batches
from runtime.errors import InputError, OverloadError, RequestTimeoutError


class Gate:
    """run_batch that records batches and blocks the first one until released."""

    def __init__(self, block_first: bool = True) -> None:
        self.batches: list[list[object]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not block_first:
            self.release.set()

    def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.release.wait(10)
        return [("done", i) for i in items]


def make(gate: Gate, **kw: object) -> DynamicBatcher[object, object]:
    args: dict[str, object] = {"max_batch_size": 4, "max_delay_s": 0.0, "queue_limit": 16, "timeout_s": 10.0}
    args.update(kw)
    return DynamicBatcher(gate, **args)  # type: ignore[arg-type]


async def _entered(gate: Gate) -> None:
    assert await asyncio.to_thread(gate.entered.wait, 10)


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_full_batch_forms_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        gate = Gate(block_first=False)
        b = make(gate, max_delay_s=60.0)  # only a full batch can run before a minute passes
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(4)))
        assert results == [("done", i) for i in range(4)]
        assert gate.batches == [[0, 1, 2, 3]]
        assert b.stats.batch_sizes == {4: 1}
        await b.stop()

    run(main())


def test_a_lone_clients_request_does_not_wait_for_batch_mates() -> None:
    """Items that come further apart than the delay (one client waiting for each answer) run at
    once; waiting the delay out (a minute here) would time the test out."""

    async def main() -> None:
        now = [0.0]
        gate = Gate(block_first=False)
        b = make(gate, max_batch_size=2, max_delay_s=60.0, timeout_s=1000.0, clock=lambda: now[0])
        b.start()
        first = asyncio.ensure_future(b.submit(1))  # no history yet: may wait for company
        await asyncio.sleep(0.05)
        now[0] = 100.0
        assert await b.submit(2) == ("done", 2)  # past the delay either way: 1 and 2 run
        assert await first == ("done", 1)
        for i, t in ((3, 200.0), (4, 300.0)):  # 100 s apart, over the 60 s delay
            await asyncio.sleep(0.05)  # the thread is idle again: its take may wait
            now[0] = t
            assert await b.submit(i) == ("done", i)  # at once, not after a minute
        assert gate.batches[-2:] == [[3], [4]]
        await b.stop()

    run(main())


def test_items_that_come_close_together_still_wait_for_batch_mates() -> None:
    async def main() -> None:
        gate = Gate(block_first=False)
        b = make(gate, max_batch_size=2, max_delay_s=60.0, clock=lambda: 0.0)  # every gap 0
        b.start()
        await asyncio.gather(b.submit(1), b.submit(2))
        await asyncio.sleep(0.05)  # the thread is idle again: its next take may wait
        third = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0.1)  # the idle thread waits for a batch-mate instead of running [3]
        assert await b.submit(4) == ("done", 4)
        await third
        assert gate.batches == [[1, 2], [3, 4]]
        await b.stop()

    run(main())


def test_queued_requests_are_batched_together_and_results_routed() -> None:
    async def main() -> None:
        gate = Gate()
        b = make(gate)
        b.start()
        first = asyncio.ensure_future(b.submit("a"))
        await _entered(gate)
        rest = [asyncio.ensure_future(b.submit(x)) for x in "bcdef"]
        await asyncio.sleep(0)  # let the submits enqueue (not an assertion)
        assert b.stats.queue_depth == 5
        gate.release.set()
        assert await first == ("done", "a")
        assert [await r for r in rest] == [("done", x) for x in "bcdef"]
        assert gate.batches == [["a"], ["b", "c", "d", "e"], ["f"]]
        await b.stop()

    run(main())


def test_groups_are_never_mixed() -> None:
    def group(item: object) -> Hashable:
        return str(item)[0]

    async def main() -> None:
        gate = Gate()
        b = make(gate, group=group)
        b.start()
        first = asyncio.ensure_future(b.submit("x0"))
        await _entered(gate)
        rest = [asyncio.ensure_future(b.submit(x)) for x in ("a1", "b1", "a2", "b2", "a3")]
        await asyncio.sleep(0)
        gate.release.set()
        await asyncio.gather(first, *rest)
        assert gate.batches == [["x0"], ["a1", "a2", "a3"], ["b1", "b2"]]
        await b.stop()

    run(main())


def test_rows_count_towards_the_batch_size() -> None:
    async def main() -> None:
        gate = Gate()
        b = make(gate, rows=lambda item: int(item))  # type: ignore[arg-type]
        b.start()
        first = asyncio.ensure_future(b.submit(1))
        await _entered(gate)
        rest = [asyncio.ensure_future(b.submit(n)) for n in (3, 2, 2, 5)]
        await asyncio.sleep(0)
        gate.release.set()
        await asyncio.gather(first, *rest)
        # 3 fits, 3+2 > 4 -> next batch [2, 2], then 5 alone (over the max, runs alone)
        assert gate.batches == [[1], [3], [2, 2], [5]]
        await b.stop()

    run(main())


def test_full_queue_is_overload_with_retry_after() -> None:
    async def main() -> None:
        gate = Gate()
        b = make(gate, queue_limit=1)
        b.start()
        first = asyncio.ensure_future(b.submit("running"))
        await _entered(gate)
        queued = asyncio.ensure_future(b.submit("queued"))
        await asyncio.sleep(0)
        with pytest.raises(OverloadError) as err:
            await b.submit("rejected")
        assert err.value.retry_after >= 1
        assert b.stats.rejected == 1
        gate.release.set()
        assert await first == ("done", "running")
        assert await queued == ("done", "queued")
        await b.stop()

    run(main())


def test_timed_out_request_is_dropped_and_never_run() -> None:
    async def main() -> None:
        gate = Gate()
        b = make(gate)
        b.start()
        first = asyncio.ensure_future(b.submit("running"))
        await _entered(gate)
        with pytest.raises(RequestTimeoutError, match="timeout"):
            await b.submit("late", timeout_s=0.01)
        assert b.stats.queue_depth == 0
        gate.release.set()
        await first
        later = await b.submit("next")
        assert later == ("done", "next")
        assert ["late"] not in gate.batches and all("late" not in batch for batch in gate.batches)
        assert b.stats.timed_out == 1
        await b.stop()

    run(main())


def test_expired_entries_are_dropped_by_the_clock() -> None:
    now = [100.0]

    async def main() -> None:
        gate = Gate()
        b = make(gate, clock=lambda: now[0])
        b.start()
        first = asyncio.ensure_future(b.submit("running"))
        await _entered(gate)
        stale = asyncio.ensure_future(b.submit("stale", timeout_s=5.0))
        await asyncio.sleep(0)
        now[0] += 6.0  # the injected clock passes the deadline while the worker is busy
        gate.release.set()
        await first
        with pytest.raises(RequestTimeoutError):
            await stale
        assert all("stale" not in batch for batch in gate.batches)
        await b.stop()

    run(main())


def test_batch_errors_reach_every_caller() -> None:
    def boom(items: list[object]) -> list[object]:
        raise ValueError("bad batch")

    async def main() -> None:
        b: DynamicBatcher[object, object] = DynamicBatcher(
            boom, max_batch_size=4, max_delay_s=0.0, queue_limit=4, timeout_s=5.0
        )
        b.start()
        with pytest.raises(ValueError, match="bad batch"):
            await b.submit(1)
        assert b.stats.failed == 1
        await b.stop()

    run(main())


def test_a_bad_item_fails_only_its_own_caller_not_its_batch_mates() -> None:
    """One client's bad input (a token id outside the vocabulary) failed the whole batch: every
    request in it got that client's 400, quoting its input, and a failure record (review 14)."""

    class Picky(Gate):
        def __call__(self, items: list[object]) -> list[object]:
            out = super().__call__(items)
            if "BAD" in items:
                raise InputError("the model rejected the input: idx=999999", field="inputs")
            return out

    async def main() -> None:
        gate = Picky()
        b = make(gate)
        b.start()
        first = asyncio.ensure_future(b.submit("a"))
        await _entered(gate)  # the thread is busy: the next three queue and form one batch
        rest = [asyncio.ensure_future(b.submit(x)) for x in ("b", "BAD", "d")]
        await asyncio.sleep(0)  # let the submits enqueue (not an assertion)
        gate.release.set()
        assert await first == ("done", "a")
        assert await rest[0] == ("done", "b") and await rest[2] == ("done", "d")
        with pytest.raises(InputError, match="999999"):
            await rest[1]
        # the batch of three failed, then its halves ran, the failing half split again
        assert gate.batches == [["a"], ["b", "BAD", "d"], ["b"], ["BAD", "d"], ["BAD"], ["d"]]
        assert (b.stats.completed, b.stats.failed, b.stats.batches) == (3, 1, 2)
        await b.stop()

    run(main())


def _failing_on(bad: set[object], error: Exception) -> tuple[list[list[object]], object]:
    calls: list[list[object]] = []

    def run_batch(items: list[object]) -> list[object]:
        calls.append(list(items))
        if bad & set(items):
            raise error
        return items

    return calls, run_batch


def test_one_bad_item_costs_a_logarithmic_number_of_extra_calls_not_one_per_item() -> None:
    """Retrying item by item let one client multiply the work by the batch size (own review 14):
    a batch of 32 with one bad item cost 33 calls; halving costs 1 + 2 * log2(32) = 11."""
    calls, run_batch = _failing_on({"bad"}, InputError("bad input", field="inputs"))
    b = make(run_batch, max_batch_size=32, queue_limit=64)  # type: ignore[arg-type]
    entries = [_entry(b, x) for x in [*range(20), "bad", *range(20, 31)]]
    outcomes = b._run(entries)
    assert len(calls) == 11
    assert [isinstance(o, InputError) for o in outcomes] == [x.item == "bad" for x in entries]
    assert [o for o, e in zip(outcomes, entries, strict=True) if e.item != "bad"] == [
        e.item for e in entries if e.item != "bad"
    ]


def test_an_error_not_of_the_input_fails_the_batch_without_a_retry() -> None:
    """A backend that fails every call (a lost device) is not called again for each half."""
    calls, run_batch = _failing_on({1}, RuntimeError("device lost"))
    b = make(run_batch, max_batch_size=8)  # type: ignore[arg-type]
    outcomes = b._run([_entry(b, x) for x in range(8)])
    assert len(calls) == 1 and all(isinstance(o, RuntimeError) for o in outcomes)


def test_a_retry_skips_the_items_nobody_waits_for() -> None:
    """Items whose caller timed out or left were still run one by one after the batch failed."""
    now = [0.0]
    calls, run_batch = _failing_on({"bad"}, InputError("bad input", field="inputs"))
    b = make(run_batch, max_batch_size=8, clock=lambda: now[0])  # type: ignore[arg-type]
    late, gone, bad, alive = (_entry(b, x) for x in ("late", "gone", "bad", "alive"))
    late.deadline = 1.0
    gone.future.cancel()
    now[0] = 2.0  # the first call took so long that "late" is past its deadline
    outcomes = b._run([late, gone, bad, alive])
    assert calls[0] == ["late", "gone", "bad", "alive"]
    assert all("late" not in c and "gone" not in c for c in calls[1:])
    assert isinstance(outcomes[0], RequestTimeoutError) and isinstance(outcomes[2], InputError)
    assert outcomes[3] == "alive"


def _entry(b: DynamicBatcher[object, object], item: object) -> Any:
    from runtime.batcher import _Entry

    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
    finally:
        loop.close()
    return _Entry(item=item, rows=1, group=None, enqueued=0.0, deadline=float("inf"), future=future)


def test_stop_fails_queued_items() -> None:
    async def main() -> None:
        gate = Gate()
        b = make(gate)
        b.start()
        first = asyncio.ensure_future(b.submit("running"))
        await _entered(gate)
        queued = asyncio.ensure_future(b.submit("queued"))
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(b.stop())
        with pytest.raises(OverloadError, match="unloaded"):
            await queued
        with pytest.raises(OverloadError, match="unloaded"):
            await first  # its batch was in the session: the caller is told to retry, not left hanging
        assert not stopping.done()  # stop() waits for the session to be left
        gate.release.set()
        await stopping
        assert gate.batches == [["running"]]

    run(main())


def test_workers_run_batches_side_by_side_and_stop_waits_for_every_one() -> None:
    """Two workers: a second batch runs while the first is still in its session (they meet at a
    barrier that one worker alone could never pass); stop() fails both and waits for both."""

    async def main() -> None:
        together = threading.Barrier(2)
        release = threading.Event()
        seen: list[list[object]] = []

        def run_batch(items: list[object]) -> list[object]:
            seen.append(list(items))
            together.wait(10)
            assert release.wait(10)
            return [("done", i) for i in items]

        b: DynamicBatcher[object, object] = DynamicBatcher(
            run_batch, max_batch_size=1, max_delay_s=0.0, queue_limit=16, timeout_s=10.0, workers=2
        )
        b.start()
        first, second = (asyncio.ensure_future(b.submit(x)) for x in "ab")
        queued = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both batches inside run_batch at once
            await asyncio.sleep(0.01)
            if len(seen) == 2:
                queued = asyncio.ensure_future(b.submit("c"))
                break
        assert sorted(map(str, seen)) == ["['a']", "['b']"]
        assert queued is not None
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(b.stop())
        for fut in (first, second, queued):
            with pytest.raises(OverloadError, match="unloaded"):
                await fut
        assert not stopping.done()
        release.set()
        await stopping
        assert len(seen) == 2  # "c" never ran

    run(main())


def test_workers_deliver_every_result_to_its_caller() -> None:
    async def main() -> None:
        def run_batch(items: list[object]) -> list[object]:
            return [("done", i) for i in items]

        b: DynamicBatcher[object, object] = DynamicBatcher(
            run_batch, max_batch_size=3, max_delay_s=0.0, queue_limit=256, timeout_s=10.0, workers=3
        )
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(100)))
        assert results == [("done", i) for i in range(100)]
        assert b.stats.completed == 100 and b.stats.rows == 100
        await b.stop()

    run(main())


def test_workers_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="workers"):
        DynamicBatcher(lambda items: items, max_batch_size=1, max_delay_s=0.0, queue_limit=1, timeout_s=1.0, workers=0)


def test_next_batch_starts_while_the_event_loop_is_busy() -> None:
    """The inference thread takes the next batch itself: a busy loop cannot leave the session idle."""

    async def main() -> None:
        gate = Gate()
        second = threading.Event()

        def run_batch(items: list[object]) -> list[object]:
            if gate.batches:
                second.set()
            return gate(items)

        b: DynamicBatcher[object, object] = DynamicBatcher(
            run_batch, max_batch_size=4, max_delay_s=0.0, queue_limit=8, timeout_s=10.0
        )
        b.start()
        first = asyncio.ensure_future(b.submit("a"))
        await _entered(gate)
        rest = [asyncio.ensure_future(b.submit(x)) for x in "bc"]
        await asyncio.sleep(0)
        gate.release.set()
        # block the event loop (as 32 clients' parsing and encoding do): the second batch still starts
        assert second.wait(5), "the second batch waited for the event loop"
        assert await first == ("done", "a")
        assert [await r for r in rest] == [("done", "b"), ("done", "c")]
        assert gate.batches == [["a"], ["b", "c"]]
        await b.stop()

    run(main())


def test_plan_batches_keeps_short_texts_away_from_long_ones() -> None:
    lengths = [8, 250, 9, 10, 240, 8]
    plan = plan_batches(lengths, max_rows=32)
    assert plan == [[0, 5, 2, 3], [4, 1]]  # sorted by length; never a short text padded to 250


def test_plan_batches_joins_similar_lengths_and_respects_the_row_limit() -> None:
    lengths = [30, 31, 32, 29, 33, 30, 31, 32]
    assert plan_batches(lengths, max_rows=32) == [[3, 0, 5, 1, 6, 2, 7, 4]]  # one call beats eight
    plan = plan_batches(lengths, max_rows=3)
    assert sorted(i for b in plan for i in b) == list(range(8))
    assert all(len(b) <= 3 for b in plan)
    # rows: an item of 3 rows with max_rows=4 leaves room for one more
    assert plan_batches([10, 10, 10], max_rows=4, rows=[3, 1, 1]) in ([[0, 1], [2]], [[0], [1, 2]])


def test_plan_batches_minimises_the_summed_cost() -> None:
    """Brute force over every cut of the sorted order agrees with the planner."""
    import itertools
    import random

    rng = random.Random(3)
    for _ in range(30):
        lengths = [rng.choice([5, 12, 40, 64, 128, 256]) for _ in range(rng.randint(1, 9))]
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        best = min(
            sum(padded_cost(b - a, lengths[order[b - 1]]) for a, b in itertools.pairwise((0, *cuts, len(order))))
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
            if all(b - a <= 4 for a, b in itertools.pairwise((0, *cuts, len(order))))
        )
        plan = plan_batches(lengths, max_rows=4)
        got = sum(padded_cost(len(b), max(lengths[i] for i in b)) for b in plan)
        assert got == pytest.approx(best)
        assert all(len(b) <= 4 for b in plan)


def test_items_with_a_length_are_batched_by_cost_and_the_oldest_goes_first() -> None:
    async def main() -> None:
        gate = Gate()
        b = make(gate, length=lambda item: int(str(item)[1:]), max_batch_size=8)
        b.start()
        first = asyncio.ensure_future(b.submit("x1"))
        await _entered(gate)
        # waiting, oldest first: a long one, short ones, another long one
        rest = [asyncio.ensure_future(b.submit(x)) for x in ("L250", "s8", "s9", "L240", "s10", "s8")]
        await asyncio.sleep(0)
        gate.release.set()
        await asyncio.gather(first, *rest)
        # the oldest (L250) runs first, with the other long one; the short ones together after
        assert gate.batches == [["x1"], ["L250", "L240"], ["s8", "s9", "s10", "s8"]]
        await b.stop()

    run(main())


def test_submit_before_start_is_an_error() -> None:
    b = make(Gate())
    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(b.submit(1))


def test_a_request_is_admitted_all_or_none() -> None:
    """The items of one request are queued together or not at all: a request the queue has no
    room for leaves nothing behind to compute (it used to queue the items that fitted)."""

    async def main() -> None:
        gate = Gate()
        b = make(gate, queue_limit=4, max_batch_size=1)
        b.start()
        first = asyncio.ensure_future(b.submit("running"))
        await _entered(gate)
        queued = asyncio.ensure_future(b.submit_many(["q0", "q1"]))
        await asyncio.sleep(0)
        assert b.stats.queue_depth == 2
        with pytest.raises(OverloadError, match="full"):
            await b.submit_many(["r0", "r1", "r2"])  # 2 + 3 > 4: none of the three
        assert b.stats.queue_depth == 2
        assert b.stats.rejected == 3
        fits = asyncio.ensure_future(b.submit_many(["f0", "f1"]))  # 2 + 2 = 4: both
        await asyncio.sleep(0)
        assert b.stats.queue_depth == 4
        gate.release.set()
        assert await first == ("done", "running")
        assert await queued == [("done", "q0"), ("done", "q1")]
        assert await fits == [("done", "f0"), ("done", "f1")]
        assert [i for batch in gate.batches for i in batch] == ["running", "q0", "q1", "f0", "f1"]
        await b.stop()

    run(main())


def test_a_request_of_more_items_than_the_queue_holds_is_a_clear_error() -> None:
    async def main() -> None:
        b = make(Gate(block_first=False), queue_limit=2)
        b.start()
        with pytest.raises(InputError, match=r"3 items .* queue_limit") as err:
            await b.submit_many(["a", "b", "c"])
        assert err.value.field == "input"
        assert b.stats.queue_depth == 0
        await b.stop()

    run(main())


def test_a_cancelled_caller_withdraws_its_queued_items() -> None:
    """A client gone while its items wait: they leave the queue (room for others) and never run."""

    async def main() -> None:
        gate = Gate()
        b = make(gate, queue_limit=4, max_batch_size=1)
        b.start()
        first = asyncio.ensure_future(b.submit("first"))
        await _entered(gate)
        waiting = [asyncio.ensure_future(b.submit(f"w{i}")) for i in range(3)]
        many = asyncio.ensure_future(b.submit_many(["m0"]))
        await asyncio.sleep(0)
        assert b.stats.queue_depth == 4
        for task in (*waiting, many):
            task.cancel()
        await asyncio.gather(*waiting, many, return_exceptions=True)
        assert b.stats.queue_depth == 0
        new = [asyncio.ensure_future(b.submit(f"new{i}")) for i in range(4)]  # the room is back
        await asyncio.sleep(0)
        gate.release.set()
        assert await first == ("done", "first")
        assert await asyncio.gather(*new) == [("done", f"new{i}") for i in range(4)]
        assert [i for batch in gate.batches for i in batch] == ["first", "new0", "new1", "new2", "new3"]
        assert b.stats.timed_out == 0
        await b.stop()

    run(main())


def test_a_failed_item_withdraws_the_rest_of_its_request() -> None:
    """One text of a request fails: its caller gets the error, and its items still queued never run."""
    ran: list[str] = []
    release = threading.Event()

    def run_batch(items: list[str]) -> list[str]:
        ran.extend(items)
        if items == ["bad"]:
            raise RuntimeError("boom")
        assert release.wait(10)  # "a" holds the thread while the request fails
        return items

    async def main() -> None:
        b: DynamicBatcher[str, str] = DynamicBatcher(
            run_batch, max_batch_size=1, max_delay_s=0.0, queue_limit=8, timeout_s=10.0
        )
        b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit_many(["bad", "a", "b", "c"])
        assert b.stats.queue_depth == 0  # the rest withdrawn ("a" may have started already)
        release.set()
        assert await b.submit("next") == "next"
        assert ran in (["bad", "a", "next"], ["bad", "next"])  # b and c never ran
        await b.stop()

    run(main())


def test_a_caller_cancelled_after_its_batch_failed_leaves_no_unread_error() -> None:
    """The batch's error lands on the request's futures, then the caller is cancelled before it
    reads them (review 2: the loop logged "Future exception was never retrieved" at ERROR)."""
    import gc

    def run_batch(items: list[str]) -> list[str]:
        raise RuntimeError("boom")

    async def main() -> list[dict[str, object]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        b: DynamicBatcher[str, str] = DynamicBatcher(
            run_batch, max_batch_size=2, max_delay_s=0.05, queue_limit=8, timeout_s=10.0
        )
        b.start()
        tasks = [asyncio.ensure_future(b.submit_many(["bad", "worse"]))]
        deliver = b._deliver

        def deliver_then_cancel(*args: object) -> None:
            deliver(*args)  # type: ignore[arg-type]
            tasks[0].cancel()  # the client goes away before its task reads the errors

        b._deliver = deliver_then_cancel  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        await b.stop()
        tasks.clear()
        gc.collect()
        await asyncio.sleep(0)
        return reported

    reported = run(main())
    assert not [c for c in reported if "never retrieved" in str(c.get("message", ""))]


def test_a_request_the_queue_would_keep_past_its_timeout_is_refused_at_once() -> None:
    """It was queued, waited out its whole timeout and got a 504 that was certain when it came;
    now it gets a 429 with Retry-After at once, and nothing of it runs."""
    now = [0.0]
    batches: list[list[object]] = []

    def one_second_an_item(items: list[object]) -> list[object]:
        batches.append(list(items))
        now[0] += 1.0 * len(items)  # the clock the batcher times its batches with
        return [("done", i) for i in items]

    async def main() -> None:
        b = DynamicBatcher(
            one_second_an_item, max_batch_size=4, max_delay_s=0.0, queue_limit=64, timeout_s=10.0, clock=lambda: now[0]
        )
        b.start()
        # before any full batch was timed nothing is refused by time: 11 items, 11 s, run
        assert len(await b.submit_many(list(range(11)))) == 11  # and the pace is measured: 1 s an item
        # on an empty queue a request runs first, whatever the estimate says (a slow warm-up batch
        # refused every large request on an idle server)
        assert len(await b.submit_many(list(range(12)))) == 12
        gate = threading.Event()
        original = b._run_batch

        def held(items: list[object]) -> list[object]:
            assert gate.wait(10)
            return original(items)

        b._run_batch = held  # type: ignore[method-assign]
        running = asyncio.ensure_future(b.submit("running"))  # taken, held: the queue empties
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit("queued"))  # one item waiting ahead
        await asyncio.sleep(0.05)
        ran = len(batches)
        with pytest.raises(
            OverloadError, match=r"about 11 s \(1 items waiting ahead of its 10\), past its timeout of 10 s"
        ) as refused:
            await b.submit_many([f"late{i}" for i in range(10)])
        assert refused.value.code == "server_busy" and refused.value.retry_after >= 1
        assert len(batches) == ran and b.stats.queue_depth == 1 and b.stats.rejected == 10
        fits = asyncio.ensure_future(b.submit_many(list(range(6))))  # 1 + 6 items: 7 s, within
        longer = asyncio.ensure_future(b.submit_many(list(range(11)), timeout_s=20.0))  # 1 + 6 + 11: its own 20 s
        await asyncio.sleep(0.05)
        assert b.stats.queue_depth == 18
        gate.set()
        assert [len(r) for r in await asyncio.gather(fits, longer)] == [6, 11]
        await asyncio.gather(running, queued)
        # a pace measured over a minute ago counts no more
        gate.clear()
        running = asyncio.ensure_future(b.submit("running", timeout_s=1000.0))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit("queued", timeout_s=1000.0))
        await asyncio.sleep(0.05)
        now[0] += 61.0
        stale = asyncio.ensure_future(b.submit_many([f"x{i}" for i in range(30)], timeout_s=1000.0))
        await asyncio.sleep(0.05)
        assert b.stats.rejected == 10 and b.stats.queue_depth == 31
        gate.set()
        await asyncio.gather(running, queued, stale)
        await b.stop()

    run(main())
