"""Dynamic batching: one queue per model, batches by size or delay, inference off the loop.

``DynamicBatcher.submit(item)`` queues one item and awaits its result.  A worker
task forms a batch from the oldest waiting item and every later item in the same
*group* (``group(item)``: e.g. a token-length bucket, so padding stays small, or
the non-batch shape of a tensor, so rows concatenate) until the batch holds
``max_batch_size`` rows or the oldest item has waited ``max_delay_s``.  The batch
runs in ``executor`` (by default one dedicated thread per batcher: sessions are
not assumed thread-safe), never on the event loop.

A full queue raises :class:`~runtime.errors.OverloadError` (``retry_after`` from
the measured service rate); an item not finished within ``timeout_s`` raises
:class:`~runtime.errors.RequestTimeoutError` and, if it was still queued, is
dropped and never run.  No Litestar here: plain asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from runtime.errors import OverloadError, RequestTimeoutError

__all__ = ["BatchStats", "DynamicBatcher", "length_bucket"]

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def length_bucket(length: int) -> int:
    """Bucket a token length: exact up to 16, then powers of two (17-32 -> 32, ...)."""
    if length <= 16:
        return 16
    return 1 << math.ceil(math.log2(length))


@dataclass
class BatchStats:
    """Counters for metrics; ``*_seconds`` are sums, ``batches`` counts runs."""

    queue_depth: int = 0
    submitted: int = 0
    completed: int = 0
    rejected: int = 0
    timed_out: int = 0
    failed: int = 0
    batches: int = 0
    rows: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    #: every batch size seen (rows) -> count
    batch_sizes: dict[int, int] = field(default_factory=dict)
    #: recent per-item queue times and per-batch inference times (for histograms); drained by readers
    queue_times: list[float] = field(default_factory=list)
    inference_times: list[float] = field(default_factory=list)

    def drain(self) -> tuple[list[float], list[float]]:
        q, i = self.queue_times, self.inference_times
        self.queue_times, self.inference_times = [], []
        return q, i


@dataclass(eq=False)
class _Entry(Generic[Item, Result]):
    item: Item
    rows: int
    group: Hashable
    enqueued: float
    deadline: float
    future: asyncio.Future[Result]
    started: bool = False


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
        executor: Executor | None = None,
        group: Callable[[Item], Hashable] | None = None,
        rows: Callable[[Item], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        if max_batch_size < 1 or queue_limit < 1 or timeout_s <= 0 or max_delay_s < 0:
            raise ValueError("max_batch_size and queue_limit must be >= 1, timeout_s > 0, max_delay_s >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_limit = queue_limit
        self.timeout_s = timeout_s
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"batcher-{name}" if name else "batcher"
        )
        self._group = group or (lambda _item: None)
        self._rows = rows or (lambda _item: 1)
        self._clock = clock
        self.name = name
        self.stats = BatchStats()
        self._pending: deque[_Entry[Item, Result]] = deque()
        self._running: list[_Entry[Item, Result]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        #: seconds per batch, smoothed; used for Retry-After
        self._batch_seconds = 0.05

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the worker; queued and running items fail with OverloadError (retry later).

        Returns once a batch still running in the session has left it.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for entry in [*self._running, *self._pending]:
            if not entry.future.done():
                entry.future.set_exception(OverloadError(f"model {self.name!r} is being unloaded; retry later", 1.0))
        self._pending.clear()
        self._running = []
        self.stats.queue_depth = 0
        if self._own_executor:
            # wait for a batch still inside the session, so the caller may close the session after us
            await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)

    # -- submitting -----------------------------------------------------------------
    async def submit(self, item: Item, *, timeout_s: float | None = None) -> Result:
        """Queue ``item``; return its result, or raise Overload/RequestTimeout/the batch's error."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if len(self._pending) >= self.queue_limit:
            self.stats.rejected += 1
            raise OverloadError(
                f"the queue of model {self.name!r} is full ({self.queue_limit} requests); retry later",
                retry_after=self._retry_after(),
            )
        timeout = self.timeout_s if timeout_s is None else timeout_s
        now = self._clock()
        loop = asyncio.get_running_loop()
        entry: _Entry[Item, Result] = _Entry(
            item=item,
            rows=max(1, self._rows(item)),
            group=self._group(item),
            enqueued=now,
            deadline=now + timeout,
            future=loop.create_future(),
        )
        self._pending.append(entry)
        self.stats.submitted += 1
        self.stats.queue_depth = len(self._pending)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), timeout)
        except TimeoutError:
            self._drop(entry)
            raise RequestTimeoutError(
                f"the request waited longer than its timeout ({timeout:g} s) for model {self.name!r}; "
                "retry later or raise request_timeout_s"
            ) from None

    def _drop(self, entry: _Entry[Item, Result]) -> None:
        self.stats.timed_out += 1
        with contextlib.suppress(ValueError):
            self._pending.remove(entry)
        self.stats.queue_depth = len(self._pending)
        if not entry.future.done():
            entry.future.cancel()

    def _retry_after(self) -> float:
        batches_ahead = math.ceil(len(self._pending) / self.max_batch_size)
        return float(max(1, math.ceil(batches_ahead * self._batch_seconds)))

    # -- the worker -------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        for entry in [e for e in self._pending if e.deadline <= now or e.future.done()]:
            self._pending.remove(entry)
            if not entry.future.done():
                self.stats.timed_out += 1
                entry.future.set_exception(
                    RequestTimeoutError(f"the request waited longer than its timeout for model {self.name!r}")
                )
        self.stats.queue_depth = len(self._pending)

    def _take(self) -> list[_Entry[Item, Result]] | None:
        """The next batch if one is due now, else None."""
        oldest = self._pending[0]
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
        if not full and self._clock() < oldest.enqueued + self.max_delay_s:
            return None
        for entry in batch:
            self._pending.remove(entry)
        self.stats.queue_depth = len(self._pending)
        return batch

    async def _work(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            self._expire(self._clock())
            if not self._pending:
                continue
            batch = self._take()
            if batch is None:
                self._wakeup.clear()
                wait = self._pending[0].enqueued + self.max_delay_s - self._clock()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), max(wait, 0.0))
                continue
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry[Item, Result]]) -> None:
        start = self._clock()
        rows = sum(e.rows for e in batch)
        for entry in batch:
            entry.started = True
            wait = start - entry.enqueued
            self.stats.queue_seconds += wait
            self.stats.queue_times.append(wait)
        self._running = batch
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, [e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            self.stats.failed += len(batch)
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        else:
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
            self.stats.completed += len(batch)
        self._running = []
        elapsed = self._clock() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * max(elapsed, 0.0)
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.inference_seconds += elapsed
        self.stats.inference_times.append(elapsed)
        self.stats.batch_sizes[rows] = self.stats.batch_sizes.get(rows, 0) + 1
        if len(self.stats.queue_times) > 10_000:  # nobody drains: keep memory bounded
            self.stats.drain()
