"""Dynamic batching: one queue per model, batches by size or delay, inference off the loop.

``DynamicBatcher.submit(item)`` queues one item and awaits its result
(``submit_many(items)``: the items of one request, admitted all or none).  One
dedicated inference thread per batcher (sessions are not assumed thread-safe)
forms a batch from the oldest waiting item and later items in the same *group*
(``group(item)``: e.g. the non-batch shape of a tensor, so rows concatenate)
until the batch holds ``max_batch_size`` rows or the oldest item has waited
``max_delay_s``, runs it, hands the results to the event loop and takes the next
batch at once.

Items with a length (``length(item)``: a text's token count; the batch is padded
to its longest) are batched by cost, not arrival order: the waiting items of the
group are sorted by length and cut into the batches of least summed
:func:`padded_cost` (:func:`plan_batches`), and the batch holding the oldest
item runs (so nothing waits behind newer items for long).  Padding short texts
to a long neighbour and running many small batches both cost; the model of that
cost is fitted to measured call times.  Against power-of-two length buckets
(the rule before), on the same texts in alternating 4 s windows in one process:
+3 % at 32 single-text submitters, +5 % at 8, +6 % / +12 % for 1 / 4 clients
of 32 texts each; +8 % over HTTP at c=32 (AVX2 box, 2026-12-03).

With ``workers`` > 1 (a model opened as several streams, :mod:`runtime.streams`) that many
inference threads take batches from the one queue and run them at once; each call
borrows its own session from the pool.

Only a batch started from idle waits up to ``max_delay_s`` to fill; back from a
batch, the thread runs what is waiting at once (it used to wait out the delay
whenever the oldest item's bucket was not full).  And it waits only while most
items have come within ``max_delay_s`` of the one before (a smoothed share of
arrivals): a lone client's request, whose next one comes only after its
answer, runs at once instead of waiting for batch-mates that cannot come.

A full queue raises :class:`~runtime.errors.OverloadError` (``retry_after`` from
the measured service rate), and so does a request that the queue ahead of it
would keep past its timeout (by the seconds an item took in full batches,
measured: without it, a client waited out its whole timeout for a 504 that was
certain when it came); an item not finished within ``timeout_s`` raises
:class:`~runtime.errors.RequestTimeoutError` and, if it was still queued, is
dropped and never run; so are the queued items of a request whose caller is cancelled or
one of whose items failed.  A batch that one client's input makes fail is split in halves
and run again, so that error reaches only the items that cause it (:meth:`DynamicBatcher._run`).
No Litestar here: plain asyncio.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from runtime.errors import InputError, OverloadError, RequestTimeoutError
from runtime.threads import named_thread, os_thread_name

__all__ = ["TIME_BUCKETS", "BatchStats", "DynamicBatcher", "padded_cost", "plan_batches"]

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


#: the cost of one call on ``rows`` sequences padded to ``longest`` tokens, in padded tokens
#: (``rows x longest``), fitted to ORT fp32 MiniLM on 2 AVX2 cores (b = 1..32, 8..256 tokens; within
#: 9 %): small matrices use the cores worse (SMALL_CALL x sqrt(tokens): at 128 tokens in all, a
#: token costs ~1.4x what it costs in a batch of 32 x 32), each row has a fixed part, attention
#: grows with the square of the length
SMALL_CALL = 8.0
ROW_TOKENS = 0.4
ATTENTION = 1.0 / 640.0
#: the cost planner looks at this many of the oldest waiting items of a group (times max_batch_size)
PLAN_WINDOW = 2
#: weight of the newest arrival in the smoothed share of items that came within max_delay_s of
#: the one before; a batch started from idle waits for batch-mates while that share is at least
#: COMPANY_SHARE
ARRIVAL_SMOOTHING = 0.25
COMPANY_SHARE = 0.5
#: seconds the measured full-batch pace counts for admission by time after it was last measured
ESTIMATE_TTL_S = 60.0
#: upper bounds (seconds) of the queue- and inference-time histograms of /metrics (api.metrics),
#: counted into as each batch is answered: a histogram of raw samples kept until the next scrape lost
#: every sample past 10,000 (12,000 texts between two scrapes counted 1,984)
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _time_buckets() -> list[int]:
    return [0] * (len(TIME_BUCKETS) + 1)


def padded_cost(rows: int, longest: int) -> float:
    """Relative cost of one call on ``rows`` sequences padded to ``longest`` tokens."""
    tokens = max(rows, 1) * max(longest, 1)
    return tokens + SMALL_CALL * math.sqrt(tokens) + rows * (ROW_TOKENS + longest * longest * ATTENTION)


def plan_batches(
    lengths: Sequence[int],
    max_rows: int,
    rows: Sequence[int] | None = None,
    cost: Callable[[int, int], float] = padded_cost,
) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length and cut into consecutive batches of at most
    ``max_rows`` rows (``rows[i]`` each, default 1) whose summed ``cost(rows, longest)`` is least."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    weight = [1 if rows is None else max(1, rows[i]) for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        total = 0
        for i in range(j - 1, -1, -1):
            total += weight[i]
            if total > max_rows and i < j - 1:
                break
            value = best[i] + cost(total, longest)
            if value < best[j]:
                best[j], cut[j] = value, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    batches.reverse()
    return batches


@dataclass
class BatchStats:
    """Counters for metrics; ``*_seconds`` are sums, ``batches`` counts runs."""

    queue_depth: int = 0
    #: the items the queue holds at most (the batcher's ``queue_limit``)
    queue_limit: int = 0
    submitted: int = 0
    completed: int = 0
    #: rows of the completed entries (a text is one row; a tensor request its first dimension)
    completed_rows: int = 0
    rejected: int = 0
    timed_out: int = 0
    failed: int = 0
    batches: int = 0
    rows: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    #: requests (``submit`` / ``submit_many`` calls) answered in full, the time each waited before its
    #: first batch began, and the time of the batches that ran its items (each batch once), summed:
    #: Triton's per-request ``queue`` and ``compute_infer``
    requests: int = 0
    request_queue_seconds: float = 0.0
    request_inference_seconds: float = 0.0
    #: wall-clock time (``time.time()``) the last batch was answered; 0.0 before the first
    last_batch_at: float = 0.0
    #: every batch size seen (rows) -> count
    batch_sizes: dict[int, int] = field(default_factory=dict)
    #: every batch size seen (rows) -> the batches' time, summed
    batch_seconds: dict[int, float] = field(default_factory=dict)
    #: per-item queue times and per-batch inference times, counted since the batcher began by
    #: :data:`TIME_BUCKETS`: ``[i]`` those above the bound before ``TIME_BUCKETS[i]`` and at most it,
    #: the last those above every bound (their sums: ``queue_seconds``, ``inference_seconds``)
    queue_buckets: list[int] = field(default_factory=_time_buckets)
    inference_buckets: list[int] = field(default_factory=_time_buckets)


@dataclass(eq=False)
class _Entry(Generic[Item, Result]):
    item: Item
    rows: int
    group: Hashable
    enqueued: float
    deadline: float
    future: asyncio.Future[Result]
    length: int | None = None
    started: bool = False
    #: the batch that answered it: (its start, its time)
    ran: tuple[float, float] | None = None


class DynamicBatcher(Generic[Item, Result]):
    """Per-model batch former. Create and :meth:`start` inside the running event loop."""

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        queue_limit: int,
        timeout_s: float,
        group: Callable[[Item], Hashable] | None = None,
        rows: Callable[[Item], int] | None = None,
        length: Callable[[Item], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
        workers: int = 1,
    ) -> None:
        if max_batch_size < 1 or queue_limit < 1 or timeout_s <= 0 or max_delay_s < 0 or workers < 1:
            raise ValueError("max_batch_size, queue_limit and workers must be >= 1, timeout_s > 0, max_delay_s >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_limit = queue_limit
        self.timeout_s = timeout_s
        self._group = group or (lambda _item: None)
        self._rows = rows or (lambda _item: 1)
        self._length = length
        self._clock = clock
        self.name = name
        #: inference threads: batches that run at once (one per stream of a SessionPool)
        self.workers = workers
        #: written on the event loop (the thread hands its numbers over with the results), except
        #: ``queue_depth``, which whoever changes the queue sets under the lock
        self.stats = BatchStats(queue_limit=queue_limit)
        # shared with the inference thread: guarded by _cond
        self._cond = threading.Condition()
        self._pending: deque[_Entry[Item, Result]] = deque()
        self._running: set[_Entry[Item, Result]] = set()
        self._stopping = False
        #: taking no more items, running what is queued, then stopping (:meth:`stop` ``drain``)
        self._draining = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: seconds per batch, smoothed; used for Retry-After
        self._batch_seconds = 0.05
        #: seconds an item took in batches at least half full (as a deep queue runs), smoothed; None
        #: until one ran: admission by time (:meth:`_wait_estimate`) waits for the measurement
        self._item_seconds: float | None = None
        self._item_measured = 0.0  #: when it was last measured (the batcher's clock)
        #: the share of items that came within max_delay_s of the one before, smoothed (None
        #: before the second item); guarded by _cond
        self._close_arrivals: float | None = None
        self._last_arrival: float | None = None

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> None:
        if not self._threads:
            self._loop = asyncio.get_running_loop()
            with self._cond:
                self._stopping = self._draining = False
            base = f"batcher-{self.name}" if self.name else "batcher"
            self._threads = [
                named_thread(
                    self._work,
                    name=base if self.workers == 1 else f"{base}-{i}",
                    os_name=os_thread_name(f"infer-{self.name}" if self.name else "infer", f"-{i}"),
                    daemon=True,
                )
                for i in range(self.workers)
            ]
            for thread in self._threads:
                thread.start()

    async def stop(self, *, drain: bool = False) -> None:
        """Stop the worker; queued and running items fail with OverloadError (retry later).
        ``drain``: take no more items, but answer every queued and running one first (a model
        version being replaced answers what it accepted).

        Returns once the batches still running in the session have left it.
        """
        threads, self._threads = self._threads, []
        if drain:
            with self._cond:
                self._draining = True
                self._cond.notify_all()
            for thread in threads:
                await asyncio.to_thread(thread.join)
        with self._cond:
            self._stopping = True
            entries = [*self._running, *self._pending]
            self._pending.clear()
            self._cond.notify_all()
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(OverloadError(f"model {self.name!r} is being unloaded; retry later", 1.0))
        self.stats.queue_depth = 0
        for thread in threads:
            # wait for a batch still inside the session, so the caller may close the session after us
            await asyncio.to_thread(thread.join)

    # -- submitting -----------------------------------------------------------------
    async def submit(self, item: Item, *, timeout_s: float | None = None) -> Result:
        """Queue ``item``; return its result, or raise Overload/RequestTimeout/the batch's error."""
        return (await self.submit_many([item], timeout_s=timeout_s))[0]

    async def submit_many(
        self,
        items: Sequence[Item],
        *,
        timeout_s: float | None = None,
        field: str = "input",
        on_queued: Callable[[], None] | None = None,
    ) -> list[Result]:
        """Queue the items of one request, all or none; return their results in order.

        Admission is one check under the lock: when the queue has no room for every item, none
        is queued and :class:`OverloadError` is raised (so a refused request leaves nothing
        behind to compute).  When one item fails (its batch's error, a timeout, a stop), or the
        caller is cancelled (the client went away), the request's items still queued are
        withdrawn and never run; the error (or the cancellation) goes on to the caller.
        ``on_queued`` is called once the items are queued (an error before it: nothing of the request ran).
        """
        if self._loop is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if not items:
            return []
        if len(items) > self.queue_limit:
            raise InputError(
                f"{field}: {len(items)} items in one request can never fit the queue of model {self.name!r} "
                f"({self.queue_limit}, queue_limit); send fewer",
                field=field,
            )
        timeout = self.timeout_s if timeout_s is None else timeout_s
        now = self._clock()
        entries: list[_Entry[Item, Result]] = [
            _Entry(
                item=item,
                rows=max(1, self._rows(item)),
                group=self._group(item),
                enqueued=now,
                deadline=now + timeout,
                future=self._loop.create_future(),
                length=None if self._length is None else self._length(item),
            )
            for item in items
        ]
        with self._cond:
            if self._stopping or self._draining:  # a model being unloaded or replaced: it takes no more
                raise OverloadError(f"model {self.name!r} is being unloaded; retry later", 1.0)
            full = len(self._pending) + len(entries) > self.queue_limit
            late: float | None = None  # the estimated wait, when it is past the request's timeout
            if not full and self._pending:  # items waiting ahead: on an empty queue a request runs first
                wait = self._wait_estimate(len(self._pending) + len(entries), now)
                late = wait if wait is not None and wait > timeout else None
            if not full and late is None:
                for entry in entries:
                    self._arrived(now)
                    self._pending.append(entry)
                self.stats.queue_depth = len(self._pending)
                if len(entries) > 1:
                    self._cond.notify_all()
                else:
                    self._cond.notify()
        if late is not None:
            self.stats.rejected += len(entries)
            raise OverloadError(
                f"model {self.name!r} would answer this request in about {late:.0f} s ({len(self._pending)} items "
                f"waiting ahead of its {len(entries)}), past its timeout of {timeout:g} s (request_timeout_s); "
                "retry later",
                retry_after=self._retry_after(),
            )
        if full:
            self.stats.rejected += len(entries)
            raise OverloadError(
                f"the queue of model {self.name!r} is full ({len(self._pending)} of queue_limit {self.queue_limit} "
                f"waiting; this request brings {len(entries)}); retry later",
                retry_after=self._retry_after(),
            )
        self.stats.submitted += len(entries)
        if on_queued is not None:  # admitted: an error from here on comes from running them (or a stop)
            on_queued()
        futures = [e.future for e in entries]
        try:
            _done, waiting = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:  # cancelled: the caller went away; what is still queued never runs
            self._withdraw(entries)
            for f in futures:  # an error some item already got is read: never logged as "never retrieved"
                if f.done() and not f.cancelled():
                    f.exception()
            raise
        # every error read (none is left "never retrieved"); the first, in item order, is raised
        errors = [f.exception() for f in futures if f.done() and not f.cancelled()]
        error = next((e for e in errors if e is not None), None)
        if waiting:
            self._withdraw(entries, timed_out=error is None)
        if error is not None:
            raise error
        if waiting:
            raise RequestTimeoutError(
                f"the request waited longer than its timeout ({timeout:g} s) for model {self.name!r}; "
                "retry later or raise request_timeout_s"
            )
        batches = {e.ran for e in entries if e.ran is not None}
        if batches:
            stats = self.stats
            stats.requests += 1
            stats.request_queue_seconds += max(0.0, min(start for start, _ in batches) - now)
            stats.request_inference_seconds += sum(elapsed for _, elapsed in batches)
        return [f.result() for f in futures]

    def _arrived(self, now: float) -> None:
        """Fold whether this item came within ``max_delay_s`` of the last into the share (under the lock)."""
        if self._last_arrival is not None:
            close = 1.0 if now - self._last_arrival <= self.max_delay_s else 0.0
            last = self._close_arrivals
            self._close_arrivals = close if last is None else last + ARRIVAL_SMOOTHING * (close - last)
        self._last_arrival = now

    def _company_expected(self) -> bool:
        """Whether another item is likely within ``max_delay_s`` (under the lock): worth waiting for."""
        return self._close_arrivals is None or self._close_arrivals >= COMPANY_SHARE

    def _withdraw(self, entries: list[_Entry[Item, Result]], *, timed_out: bool = False) -> None:
        """Take the entries still queued off the queue, and leave no future of theirs pending
        (one already in a batch runs; its result is dropped).  ``timed_out`` counts them."""
        gone = {id(e) for e in entries if not e.future.done()}
        if not gone:
            return
        if timed_out:
            self.stats.timed_out += len(gone)
        with self._cond:
            kept = [e for e in self._pending if id(e) not in gone]
            if len(kept) != len(self._pending):
                self._pending.clear()
                self._pending.extend(kept)
            self.stats.queue_depth = len(self._pending)
        for entry in entries:
            if not entry.future.done():
                entry.future.cancel()

    def _wait_estimate(self, items: int, now: float) -> float | None:
        """Seconds until the last of ``items`` queued items is answered, at the measured full-batch
        pace (under the lock); None before a batch at least half full ran, or when none has for
        :data:`ESTIMATE_TTL_S` (a slow warm-up batch, say, must not refuse requests for good: the
        large requests that would measure the pace again are the ones refused)."""
        if self._item_seconds is None or now - self._item_measured > ESTIMATE_TTL_S:
            return None
        return items * self._item_seconds / self.workers

    def _retry_after(self) -> float:
        batches_ahead = math.ceil(len(self._pending) / self.max_batch_size)
        return float(max(1, math.ceil(batches_ahead * self._batch_seconds / self.workers)))

    # -- the inference thread -------------------------------------------------------------
    def _expire(self, now: float) -> list[_Entry[Item, Result]]:
        """Remove (under the lock) entries past their deadline or already given up; the expired ones."""
        gone = [e for e in self._pending if e.deadline <= now or e.future.done()]
        for entry in gone:
            self._pending.remove(entry)
        return [e for e in gone if e.deadline <= now]

    def _take(self, now: float, *, patient: bool = True) -> list[_Entry[Item, Result]] | None:
        """The next batch if one is due now, else None (under the lock).

        Only a ``patient`` take (the thread was idle before it) waits up to ``max_delay_s`` for a
        batch to fill, and only while items arrive closer together than that; back from a batch,
        the thread runs what is waiting at once.
        """
        oldest = self._pending[0]
        if not patient or not self._company_expected():
            now = max(now, oldest.enqueued + self.max_delay_s)
        if oldest.length is not None:
            return self._take_by_cost(now, oldest)
        batch: list[_Entry[Item, Result]] = []
        rows = 0
        for entry in self._pending:
            if entry.group != oldest.group:
                continue
            if batch and rows + entry.rows > self.max_batch_size:
                break
            batch.append(entry)
            rows += entry.rows
            if rows >= self.max_batch_size:
                break
        full = rows >= self.max_batch_size or len(batch) < sum(1 for e in self._pending if e.group == oldest.group)
        if not full and now < oldest.enqueued + self.max_delay_s:
            return None
        for entry in batch:
            self._pending.remove(entry)
        return batch

    def _take_by_cost(self, now: float, oldest: _Entry[Item, Result]) -> list[_Entry[Item, Result]] | None:
        """The oldest item's batch in the cheapest plan of the group's oldest waiting items."""
        window: list[_Entry[Item, Result]] = []
        rows = 0
        for entry in self._pending:
            if entry.group == oldest.group:
                window.append(entry)
                rows += entry.rows
                if len(window) >= PLAN_WINDOW * self.max_batch_size:
                    break
        if rows < self.max_batch_size and now < oldest.enqueued + self.max_delay_s:
            return None
        plan = plan_batches([e.length or 0 for e in window], self.max_batch_size, [e.rows for e in window])
        chosen = next(b for b in plan if 0 in b)
        batch = [window[i] for i in sorted(chosen)]
        for entry in batch:
            self._pending.remove(entry)
        return batch

    def _next_batch(self) -> tuple[list[_Entry[Item, Result]] | None, list[_Entry[Item, Result]]]:
        """Block until a batch is due (or stop); (batch, or None when stopping; expired entries)."""
        idle = False
        with self._cond:
            while not self._stopping:
                now = self._clock()
                expired = self._expire(now)
                self.stats.queue_depth = len(self._pending)
                if expired:
                    return [], expired
                if not self._pending:
                    if self._draining:
                        return None, []
                    idle = True
                    self._cond.wait()
                    continue
                batch = self._take(now, patient=idle and not self._draining)
                if batch is not None:
                    self.stats.queue_depth = len(self._pending)
                    for entry in batch:
                        entry.started = True
                    self._running.update(batch)
                    return batch, []
                self._cond.wait(max(self._pending[0].enqueued + self.max_delay_s - now, 0.0))
            return None, []

    def _work(self) -> None:
        while True:
            batch, expired = self._next_batch()
            if batch is None:
                return
            if expired:
                self._post(self._fail_expired, expired)
                continue
            start = self._clock()
            outcomes = self._run(batch)
            elapsed = self._clock() - start
            with self._cond:
                self._running.difference_update(batch)
            self._post(self._deliver, batch, outcomes, start, elapsed)

    def _call(self, items: list[Item]) -> Sequence[Result]:
        results = self._run_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        return results

    def _run(self, batch: list[_Entry[Item, Result]]) -> list[Result | Exception]:
        """Each entry's result or error.  A batch that one client's input makes fail (an
        :class:`InputError`: a token id outside the vocabulary, a value the graph refuses) is split
        in halves, and each half run again (split again while it fails), so only the items that
        cause it fail and the others that shared the batch never see its message.  Halving, not
        one call per item: one bad item among n costs about 2*log2(n) more calls, so a client
        sending bad input on purpose cannot multiply the work by the batch size.  Any other error
        (a backend that fails every call) fails the batch at once."""
        try:
            return list(self._call([e.item for e in batch]))
        except InputError as exc:
            if len(batch) == 1:
                return [exc]
            logger.info("batcher %s: a batch of %d items failed on an input; splitting it", self.name, len(batch))
        except Exception as exc:
            return [exc] * len(batch)
        mid = len(batch) // 2
        return [*self._retry(batch[:mid]), *self._retry(batch[mid:])]

    def _retry(self, part: list[_Entry[Item, Result]]) -> list[Result | Exception]:
        """``part`` of a failed batch, run again without the entries nobody waits for any more: a
        caller gone or timed out (its answer is not read), or all of them when the batcher stops
        (:meth:`stop` has answered them)."""
        now = self._clock()
        alive = [not self._stopping and not e.future.done() and e.deadline > now for e in part]
        expired = self._timed_out()
        if not any(alive):
            return [expired] * len(part)
        ran = iter(self._run([e for e, keep in zip(part, alive, strict=True) if keep]))
        return [next(ran) if keep else expired for keep in alive]

    def _timed_out(self) -> RequestTimeoutError:
        return RequestTimeoutError(f"the request waited longer than its timeout for model {self.name!r}")

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            logger.debug("batcher %s: event loop closed, results dropped", self.name)

    # -- back on the event loop ------------------------------------------------------------
    def _fail_expired(self, expired: list[_Entry[Item, Result]]) -> None:
        for entry in expired:
            if not entry.future.done():
                self.stats.timed_out += 1
                entry.future.set_exception(self._timed_out())

    def _deliver(
        self,
        batch: list[_Entry[Item, Result]],
        outcomes: list[Result | Exception],
        start: float,
        elapsed: float,
    ) -> None:
        stats = self.stats
        rows = sum(e.rows for e in batch)
        queue_buckets, bucket_of = stats.queue_buckets, bisect.bisect_left  # counted here: a bisect an item
        for entry, outcome in zip(batch, outcomes, strict=True):
            entry.ran = (start, elapsed)
            wait = start - entry.enqueued
            stats.queue_seconds += wait
            queue_buckets[bucket_of(TIME_BUCKETS, wait)] += 1
            if isinstance(outcome, Exception):
                stats.failed += 1
                if not entry.future.done():
                    entry.future.set_exception(outcome)
            else:
                stats.completed += 1
                stats.completed_rows += entry.rows
                if not entry.future.done():
                    entry.future.set_result(outcome)
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * max(elapsed, 0.0)
        if 2 * len(batch) >= self.max_batch_size:
            per_item = max(elapsed, 0.0) / len(batch)
            last = self._item_seconds
            self._item_seconds = per_item if last is None else 0.8 * last + 0.2 * per_item
            self._item_measured = start + elapsed
        stats.batches += 1
        stats.rows += rows
        stats.inference_seconds += elapsed
        stats.inference_buckets[bisect.bisect_left(TIME_BUCKETS, elapsed)] += 1
        stats.last_batch_at = time.time()
        stats.batch_sizes[rows] = stats.batch_sizes.get(rows, 0) + 1
        stats.batch_seconds[rows] = stats.batch_seconds.get(rows, 0.0) + elapsed
