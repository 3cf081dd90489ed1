"""Static-shape copies of a dynamic model, compiled for the input shapes that repeat.

OpenVINO's CPU plugin runs a model with dynamic dimensions through a slower path:
every call infers shapes and prepares each node again (~0.35 ms of a 1.2 ms call on
MiniLM), and the kernels it picks for dynamic shapes are slower (32 x 128 tokens:
102 ms against 84 ms with the same model reshaped to that static shape; AMX box,
bf16, 2 threads, 2026-12-04).  A 1 x 9-token query took 1.48 ms dynamic and 1.22 ms
through a model compiled for 1 x 16 (padded), 0.82x.

:class:`StaticShapes` adds up the time a session's calls of each input shape
take; once a shape's calls have taken :data:`STATIC_AFTER_S` seconds (and it was
called at least :data:`STATIC_AFTER` times) it compiles a copy of the model
reshaped to it on a background thread (0.17-0.4 s of one core for MiniLM; calls
keep running on the dynamic model meanwhile) and later calls of that shape run
on the copy.  The time rule keeps the compile for shapes that pay it back: a lone
client's query shape (1.5 ms a call: after ~700 calls) or a batch shape a client
sends again and again (100 ms: after ~10), not the widths of one pass over a
length-sorted corpus, each seen a few times (compiling those cost one all-core
session 15 % of its throughput over a 4 s pass).  At most ``capacity`` copies
are kept and none is ever evicted: each costs a compiled model's memory (MiniLM
in bf16: 33-70 MB), and a fixed set cannot thrash compiling.

The text path (:meth:`runtime.serving.LoadedModel.embed_tokens`) pads every
call's width to a multiple of a few tokens (:data:`runtime.backends.openvino.PAD_MULTIPLES`),
where padding changes no answer, so the shapes of real queries repeat (1 x 16,
1 x 32, ...).

A copy must answer as the dynamic model does: the session runs a copy's first call on
both and drops the copy (:meth:`StaticShapes.reject`) when an output differs by more
than :data:`COPY_TOLERANCE` of its largest value (an INT8 model's copy for a static
shape can pick other INT8 kernels than the dynamic model the export validated: MiniLM's
OpenVINO INT8 variant moved by 2.4 % of its largest value on the AMX box).

Nothing here knows OpenVINO: ``compile(key)`` is given by the backend.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from runtime.threads import named_thread

__all__ = [
    "COPY_TOLERANCE",
    "DEFAULT_STATIC_SHAPES",
    "STATIC_AFTER",
    "STATIC_AFTER_S",
    "ShapeKey",
    "StaticShapes",
]

logger = logging.getLogger(__name__)

#: static-shape copies a served OpenVINO session keeps by default (its all-core session only)
DEFAULT_STATIC_SHAPES = 4
#: a shape is compiled once its calls on the dynamic model took this many seconds in all ...
STATIC_AFTER_S = 1.0
#: ... and it was called at least this many times
STATIC_AFTER = 2
#: the most a copy's answer may differ from the dynamic model's, relative to the largest value of each
#: output (the export's batch gate, ``max_batch_rel_diff``: what batching may change in an answer)
COPY_TOLERANCE = 0.01
#: distinct shapes counted before the counts start over (bounds memory on traffic of many shapes)
MAX_COUNTED = 1024

ShapeKey = tuple[tuple[int, ...], ...]
Compiled = TypeVar("Compiled")


class StaticShapes(Generic[Compiled]):
    """Up to ``capacity`` compiled copies, by input shapes; compiled in the background.

    ``compile(key)`` returns the copy for ``key`` (the shapes of the inputs, in the
    session's input order) or raises; a key that failed is never tried again and takes
    a place of the capacity (at most ``capacity`` compiles in all).  The
    session asks :meth:`get` before a call and reports a call that ran on the dynamic
    model with :meth:`observe`.
    """

    def __init__(
        self,
        compile: Callable[[ShapeKey], Compiled],
        capacity: int,
        *,
        after: int = STATIC_AFTER,
        after_s: float | None = None,
        name: str = "",
    ) -> None:
        if capacity < 0 or after < 1 or (after_s is not None and after_s < 0):
            raise ValueError("capacity must be >= 0, after >= 1 and after_s >= 0")
        self._compile: Callable[[ShapeKey], Compiled] | None = compile
        self.capacity = capacity
        self.after = after
        self.after_s = STATIC_AFTER_S if after_s is None else after_s
        self.name = name
        self._lock = threading.Lock()
        self._ready: dict[ShapeKey, Compiled] = {}
        #: shape -> (calls, seconds) on the dynamic model
        self._seen: dict[ShapeKey, tuple[int, float]] = {}
        self._failed: set[ShapeKey] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def shapes(self) -> list[ShapeKey]:
        """The shapes that have a compiled copy, in the order they were compiled."""
        with self._lock:
            return list(self._ready)

    def get(self, key: ShapeKey) -> Compiled | None:
        """The copy for ``key``, if one is compiled."""
        return self._ready.get(key)

    @property
    def full(self) -> bool:
        """No more copies will be compiled (capacity reached by copies and failed shapes, or closed)."""
        with self._lock:
            return self._done()

    def _done(self) -> bool:
        """(Under the lock.) Closed, or the capacity taken by copies and failed shapes."""
        return self._closed or len(self._ready) + len(self._failed) >= self.capacity

    def observe(self, key: ShapeKey, seconds: float) -> None:
        """A call of ``key`` ran on the dynamic model in ``seconds``; may start compiling it."""
        with self._lock:
            if self._done():
                return
            if key in self._failed or key in self._ready:
                return
            if len(self._seen) >= MAX_COUNTED and key not in self._seen:
                self._seen.clear()
            calls, spent = self._seen.get(key, (0, 0.0))
            calls, spent = calls + 1, spent + max(seconds, 0.0)
            self._seen[key] = (calls, spent)
            if calls < self.after or spent < self.after_s or self._thread is not None:
                return
            # not a daemon: a process leaving while OpenVINO compiles in native code would abort
            # (the interpreter joins it at exit); started under the lock so that wait() never
            # joins a thread not yet started
            self._thread = named_thread(self._build, args=(key,), name="static-shape", daemon=False)
            self._thread.start()

    def _build(self, key: ShapeKey) -> None:
        compile_copy = self._compile
        if compile_copy is None:  # closed before this thread began: nothing to compile, nothing failed
            with self._lock:
                self._thread = None
            return
        try:
            compiled = compile_copy(key)
        except Exception as exc:
            # a failed shape takes a place of the capacity: at most ``capacity`` compiles in all
            logger.warning("%s: no static-shape copy for %s (%s); that shape stays dynamic", self.name, key, exc)
            with self._lock:
                self._failed.add(key)
                self._thread = None
                self._release()
            return
        with self._lock:
            if not self._closed:
                self._ready[key] = compiled
                self._seen.pop(key, None)
            self._thread = None
            self._release()
        logger.debug("%s: static-shape copy for %s ready", self.name, key)

    def _release(self) -> None:
        """(Under the lock.) Drop the compiler once nothing more will be compiled: it holds the
        source model."""
        if self._done():
            self._compile = None
            self._seen.clear()

    def reject(self, key: ShapeKey, why: str) -> None:
        """Drop the copy for ``key`` for good (it answered otherwise than the dynamic model): the
        shape stays dynamic and keeps its place of the capacity, like a shape that failed to compile."""
        with self._lock:
            self._ready.pop(key, None)
            self._failed.add(key)
            self._release()
        logger.warning("%s: static-shape copy for %s dropped: %s; that shape stays dynamic", self.name, key, why)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a compile in progress; False when it is still running after ``timeout``."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def close(self) -> None:
        """Drop every copy and compile no more, without waiting: a compile in progress finishes
        on its thread and its copy is thrown away (the interpreter waits for it at exit)."""
        with self._lock:
            self._closed = True
            self._ready.clear()
            self._release()
