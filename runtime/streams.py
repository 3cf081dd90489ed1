"""Streams: several sessions of one model, each with a share of the cores, run side by side.

A served model is one :class:`SessionPool` of ``streams`` sessions; the dynamic
batcher runs one inference thread per stream, so ``streams`` batches compute at
once, each on ``cores / streams`` threads.  A call takes a free session of the
pool (and waits for one when all are busy), so the pool is a
:class:`~runtime.backends.base.Session` like any other.

Why: one session with every core splits each operator across the cores and
meets at a barrier after it.  Small batches (what an online server forms from
single-text requests) give each core little work between barriers, and any
other work on a core (the event loop, the client, a neighbour on a VM) holds the
barrier up.  Two single-thread sessions on 2 AVX2 cores ran the server's own
batch shapes (1-16 texts, median 14 tokens) at 156-159 texts/s where one
two-thread session ran them at 115-149/s (ORT fp32 MiniLM, interleaved, 2026-12-03);
on length-sorted batches of 32 they were even to 10 % slower.  One request alone
gets half the cores: batch-1 latency went from 3.1-4.1 ms to 5.2 ms there.  So
``auto`` gives 2 streams on a CPU with >= 2 physical cores, 1 on an accelerator
(whose queue already overlaps calls), and ``objective = latency`` keeps 1.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from runtime.backends.base import Probe, Session
from runtime.threads import named_thread

__all__ = [
    "SessionPool",
    "auto_streams",
    "describe_plan",
    "open_pool",
    "plan_for",
    "plan_streams",
    "stream_threads",
]

logger = logging.getLogger(__name__)

#: streams ``auto`` gives a CPU device with at least this many physical cores
CPU_STREAMS = 2


def auto_streams(device: str, cores: int, *, objective: str = "throughput") -> int:
    """Streams for a session on ``device`` ("cpu", "CPU", "cuda:0", "GPU", ...) with ``cores``
    physical cores for the process: 2 on a CPU with >= 2 cores when throughput is the objective,
    else 1."""
    if objective == "latency" or device.lower() != "cpu":
        return 1
    return CPU_STREAMS if cores >= CPU_STREAMS else 1


def stream_threads(threads: int, streams: int, cores: int) -> int:
    """Intra-op threads per stream: ``threads`` when set (> 0), else the cores split evenly."""
    if threads > 0:
        return threads
    return max(1, cores // max(1, streams))


def plan_streams(
    setting: int, device: str, cores: int, *, threads: int = 0, objective: str = "throughput"
) -> tuple[int, int]:
    """(streams, intra-op threads per stream) for the ``streams`` setting (0 = auto) and the
    ``threads`` setting (0 = the cores, split among the streams); one stream is one session."""
    streams = setting or auto_streams(device, cores, objective=objective)
    return streams, (stream_threads(threads, streams, cores) if streams > 1 else (threads or cores))


def plan_for(
    backend: str,
    probes: Sequence[Probe],
    setting: int,
    cores: int,
    *,
    threads: int = 0,
    objective: str = "throughput",
) -> tuple[int, int]:
    """:func:`plan_streams` for ``backend`` on the device its probe reports (the loader and
    ``inferbox doctor`` both ask this).  OpenVINO's ``AUTO`` where the CPU is the only device it
    can pick is the CPU (:func:`runtime.selection.runs_on_cpu`), and gets the CPU's streams."""
    from runtime.selection import runs_on_cpu

    probe = next((p for p in probes if p.name == backend), None)
    device = "cpu" if probe is None or runs_on_cpu(probe) else probe.device
    return plan_streams(setting, device, cores, threads=threads, objective=objective)


def describe_plan(streams: int, threads: int, wide: int) -> str:
    """``2 streams x 1 thread + 1 session x 2 threads`` (what the server opens: ``streams`` of
    ``threads`` each and the all-core session of ``wide`` threads), for people."""

    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    if streams <= 1:
        return f"1 session x {n(threads, 'thread')}"
    return f"{n(streams, 'stream')} x {n(threads, 'thread')} + 1 session x {n(wide, 'thread')}"


class SessionPool:
    """Sessions of one model as one :class:`Session`: ``narrow`` ones (a share of the cores each)
    run side by side; an optional ``wide`` one (every core) serves a call that finds nothing else
    computing or waiting.

    A call arriving while the wide session runs waits for it and then takes a narrow one: a
    second call in flight is the sign of load, and two narrow sessions beside each other beat
    one wide session after the other on small batches.  A lone caller (one client, the batch
    worker) always gets the wide session and its latency.  Narrow sessions may join later
    (:meth:`attach`, :func:`open_pool` opens them after the wide one is serving); until one has,
    every call takes the wide session in turn.
    """

    def __init__(self, narrow: Sequence[Session], wide: Session | None = None) -> None:
        if not narrow and wide is None:
            raise ValueError("a SessionPool needs a session")
        self.narrow: list[Session] = list(narrow)
        self.wide = wide
        first = wide or self.narrow[0]
        self.backend = first.backend
        self.active = first.active
        self.fallback = first.fallback
        self.input_names = first.input_names
        self.output_names = first.output_names
        self._cond = threading.Condition()
        self._free = list(self.narrow)
        self._busy = 0
        self._waiting = 0
        self._wide_running = False
        self._closed = False
        #: narrow sessions still being opened (:func:`open_pool`)
        self._expected = 0
        #: calls served by the wide / narrow sessions (what tests check)
        self.calls = {"wide": 0, "narrow": 0}

    @property
    def streams(self) -> int:
        return len(self.narrow)

    @property
    def pad_multiple(self) -> int:
        """A lone caller runs on the wide session: the text path pads for it."""
        return int(getattr(self.wide or self.narrow[0], "pad_multiple", 1))

    @property
    def static_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        """The wide session's static-shape copies (the only session that keeps any)."""
        return list(getattr(self.wide or self.narrow[0], "static_shapes", ()))

    # -- sessions joining --------------------------------------------------------------------
    def expect(self, count: int) -> None:
        with self._cond:
            self._expected += count

    def attach(self, session: Session) -> None:
        """Add a narrow session (opened after the pool started serving); closed at once if the
        pool already is."""
        with self._cond:
            self._expected = max(0, self._expected - 1)
            if not self._closed:
                self.narrow.append(session)
                self._free.append(session)
                self._cond.notify_all()
                return
            self._cond.notify_all()
        session.close()

    def give_up(self) -> None:
        """The narrow sessions still expected will not come (one failed to open)."""
        with self._cond:
            self._expected = 0
            self._cond.notify_all()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until no narrow session is still being opened; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._expected == 0, timeout)

    # -- running -----------------------------------------------------------------------------
    def _borrow(self) -> Session:
        with self._cond:
            wide_free = self.wide is not None and not self._wide_running and self._busy == 0
            if wide_free and self._waiting == 0:
                return self._take_wide()
            self._waiting += 1
            try:
                while True:
                    if self._free and not self._wide_running:
                        session = self._free.pop()
                        self.calls["narrow"] += 1
                        self._busy += 1
                        return session
                    if not self.narrow and self.wide is not None and not self._wide_running and self._busy == 0:
                        return self._take_wide()  # no narrow session (yet): the wide one in turn
                    self._cond.wait()
            finally:
                self._waiting -= 1

    def _take_wide(self) -> Session:
        assert self.wide is not None
        self._wide_running = True
        self._busy += 1
        self.calls["wide"] += 1
        return self.wide

    def _give_back(self, session: Session) -> None:
        with self._cond:
            self._busy -= 1
            if session is self.wide:
                self._wide_running = False
            else:
                self._free.append(session)
            self._cond.notify_all()

    def run(
        self, inputs: dict[str, npt.NDArray[np.generic]], outputs: list[str] | None = None
    ) -> dict[str, npt.NDArray[np.generic]]:
        session = self._borrow()
        try:
            return session.run(inputs, outputs)
        finally:
            self._give_back(session)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            sessions = [*self.narrow, *((self.wide,) if self.wide is not None else ())]
        for session in sessions:
            session.close()


def open_pool(open_narrow: Callable[[], Session], streams: int, open_wide: Callable[[], Session]) -> Session:
    """One session from ``open_wide()`` when ``streams`` <= 1.  Else a pool serving on the wide
    session at once, while a background thread opens the ``streams`` narrow sessions and attaches
    each: the model is ready as soon as one session is (three sessions opened in turn added
    ~0.3 s to the server's start here, more for a bigger model).  A narrow session failing to
    open is logged and the pool keeps serving on what it has."""
    wide = open_wide()
    if streams <= 1:
        return wide
    pool = SessionPool([], wide)
    pool.expect(streams)

    def open_rest() -> None:
        for i in range(streams):
            try:
                session = open_narrow()
            except Exception as exc:
                logger.warning(
                    "%s: stream %d of %d did not open (%s); serving on %d stream(s) and the all-core session",
                    pool.backend,
                    i + 1,
                    streams,
                    exc,
                    pool.streams,
                )
                pool.give_up()
                return
            pool.attach(session)

    # not a daemon: a process leaving while a session is being opened in native code would abort
    # ("terminate called without an active exception"); the interpreter waits for the thread instead
    named_thread(open_rest, name="open-streams", daemon=False).start()
    return pool
