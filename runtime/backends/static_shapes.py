"""Static-shape copies of a dynamic model, compiled for the input shapes that repeat.

OpenVINO's CPU plugin runs a model with dynamic dimensions through a slower path:
every call infers shapes and prepares each node again (~0.35 ms of a 1.2 ms call on
MiniLM), and the kernels it picks for dynamic shapes are slower (32 x 128 tokens:
102 ms against 84 ms with the same model reshaped to that static shape; AMX box,
bf16, 2 threads, 2026-12-04).  A 1 x 9-token query took 1.48 ms dynamic and 1.22 ms
through a model compiled for 1 x 16 (padded), 0.82x.

:class:`StaticShapes` counts the shapes a session is called with; once a shape has
been seen :data:`STATIC_AFTER` times it compiles a copy of the model reshaped to it
on a background thread (0.17-0.4 s for MiniLM; calls keep running on the dynamic
model meanwhile) and later calls of that shape run on the copy.  At most
``capacity`` copies are kept and none is ever evicted: each costs a compiled
model's memory (MiniLM in bf16: 33-70 MB), and a fixed set cannot thrash
compiling.  The text path pads a batch's length to a multiple of
:data:`PAD_MULTIPLE` tokens when its session has static shapes, so the shapes of
real traffic repeat (1 x 16, 1 x 24, ...).

Nothing here knows OpenVINO: ``compile(key)`` is given by the backend.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["DEFAULT_STATIC_SHAPES", "PAD_MULTIPLE", "STATIC_AFTER", "ShapeKey", "StaticShapes"]

logger = logging.getLogger(__name__)

#: static-shape copies a served OpenVINO session keeps by default (its all-core session only)
DEFAULT_STATIC_SHAPES = 4
#: a shape is compiled once it has been called this many times
STATIC_AFTER = 2
#: the text path pads a batch to a multiple of this many tokens when its session has static shapes
PAD_MULTIPLE = 8
#: distinct shapes counted before the counts start over (bounds memory on traffic of many shapes)
MAX_COUNTED = 1024

ShapeKey = tuple[tuple[int, ...], ...]
Compiled = TypeVar("Compiled")


class StaticShapes(Generic[Compiled]):
    """Up to ``capacity`` compiled copies, by input shapes; compiled in the background.

    ``compile(key)`` returns the copy for ``key`` (the shapes of the inputs, in the
    session's input order) or raises; a key that failed is never tried again.
    """

    def __init__(
        self, compile: Callable[[ShapeKey], Compiled], capacity: int, *, after: int = STATIC_AFTER, name: str = ""
    ) -> None:
        if capacity < 0 or after < 1:
            raise ValueError("capacity must be >= 0 and after >= 1")
        self._compile = compile
        self.capacity = capacity
        self.after = after
        self.name = name
        self._lock = threading.Lock()
        self._ready: dict[ShapeKey, Compiled] = {}
        self._seen: dict[ShapeKey, int] = {}
        self._failed: set[ShapeKey] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def shapes(self) -> list[ShapeKey]:
        """The shapes that have a compiled copy, in the order they were compiled."""
        with self._lock:
            return list(self._ready)

    def get(self, key: ShapeKey) -> Compiled | None:
        """The copy for ``key`` if compiled; else counts the call and may start compiling it."""
        with self._lock:
            found = self._ready.get(key)
            if found is not None or self.capacity == 0:
                return found
            if self._closed or len(self._ready) >= self.capacity or key in self._failed:
                return None
            if len(self._seen) >= MAX_COUNTED and key not in self._seen:
                self._seen.clear()
            count = self._seen.get(key, 0) + 1
            self._seen[key] = count
            if count < self.after or self._thread is not None:
                return None
            # not a daemon: a process leaving while OpenVINO compiles in native code would abort
            self._thread = threading.Thread(target=self._build, args=(key,), name="static-shape", daemon=False)
            thread = self._thread
        thread.start()
        return None

    def _build(self, key: ShapeKey) -> None:
        try:
            compiled = self._compile(key)
        except Exception as exc:
            logger.warning("%s: no static-shape copy for %s (%s); that shape stays dynamic", self.name, key, exc)
            with self._lock:
                self._failed.add(key)
                self._thread = None
            return
        with self._lock:
            if not self._closed:
                self._ready[key] = compiled
                self._seen.pop(key, None)
            self._thread = None
        logger.debug("%s: static-shape copy for %s ready", self.name, key)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a compile in progress; False when it is still running after ``timeout``."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def close(self) -> None:
        """Stop compiling new copies, wait for one in progress, drop them all."""
        with self._lock:
            self._closed = True
        self.wait()
        with self._lock:
            self._ready.clear()
            self._seen.clear()
