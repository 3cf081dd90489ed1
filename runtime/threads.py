"""Threads that carry their name into the kernel, so ``top -H``, ``ps -L`` and the bench see it.

Python (before 3.14) names a thread only for itself; the kernel shows every
thread of ``inferbox serve`` as ``inferbox``.  :func:`named_thread` starts a
thread that first sets its kernel name (Linux ``prctl(PR_SET_NAME)``, at most
15 bytes; elsewhere nothing happens): ``infer-<model>-<i>`` for the inference
threads, ``audit-writer``, ``static-shape``, ``open-streams``.

:func:`thread_cpu` reads each thread's CPU seconds and kind from
``/proc/<pid>/task`` (``loop``: the process's main thread, which runs the event
loop in ``inferbox serve``; ``inference``: ``infer-*``; ``audit``:
``audit-writer``; ``other``: OpenVINO's and uvicorn's helpers, a static-shape
compile).  ``/metrics`` sums it by kind (:class:`ThreadCpu`) and the bench
divides it by requests (``bench/audit_onoff.py``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "OS_NAME_BYTES",
    "THREAD_KINDS",
    "ThreadCpu",
    "named_thread",
    "os_thread_name",
    "set_os_thread_name",
    "thread_cpu",
    "thread_kind",
]

logger = logging.getLogger(__name__)

#: the kernel keeps this many bytes of a thread's name (16 with the terminating NUL)
OS_NAME_BYTES = 15
_PR_SET_NAME = 15


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def os_thread_name(prefix: str, suffix: str = "") -> str:
    """``prefix + suffix`` cut to :data:`OS_NAME_BYTES`, shortening the prefix (the suffix is kept)."""
    room = max(OS_NAME_BYTES - len(suffix.encode("utf-8")), 0)
    head = prefix.encode("utf-8")[:room].decode("utf-8", "ignore")
    return (head + suffix).encode("utf-8")[:OS_NAME_BYTES].decode("utf-8", "ignore")


def set_os_thread_name(name: str) -> bool:
    """Name the calling thread ``name`` in the kernel (cut to 15 bytes); False where it cannot."""
    prctl = _prctl()
    if prctl is None:
        return False
    data = os_thread_name(name).encode("utf-8")
    ok = prctl(_PR_SET_NAME, ctypes.c_char_p(data), 0, 0, 0) == 0
    if not ok:
        logger.debug("could not name thread %r: errno %d", name, ctypes.get_errno())
    return ok


def named_thread(
    target: Callable[..., object],
    *,
    name: str,
    daemon: bool,
    args: tuple[object, ...] = (),
    os_name: str | None = None,
) -> threading.Thread:
    """A thread (not started) called ``name`` in Python and ``os_name`` (default ``name``) in the kernel."""
    label = os_name or name

    def run(*run_args: object) -> None:
        set_os_thread_name(label)
        target(*run_args)

    return threading.Thread(target=run, args=args, name=name, daemon=daemon)


#: what :func:`thread_kind` calls a thread
THREAD_KINDS = ("loop", "inference", "audit", "other")


def thread_kind(tid: int, pid: int, comm: str) -> str:
    """The kind of thread ``tid`` of process ``pid``, named ``comm`` in the kernel."""
    if tid == pid:
        return "loop"
    if comm == "infer" or comm.startswith("infer-"):
        return "inference"
    if comm == "audit-writer":
        return "audit"
    return "other"


def thread_cpu(pid: int | None = None) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of each live thread of ``pid`` (default: this process):
    tid -> (kind, seconds); ``{}`` where ``/proc`` cannot say (not Linux, no such process)."""
    pid = os.getpid() if pid is None else pid
    tasks = Path(f"/proc/{pid}/task")
    try:
        tids = [int(t) for t in os.listdir(tasks)]
    except (FileNotFoundError, PermissionError, NotADirectoryError, ProcessLookupError):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for tid in tids:
        try:
            stat = (tasks / str(tid) / "stat").read_text()
            comm = (tasks / str(tid) / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the thread ended between the listing and the read
        fields = stat[stat.rindex(")") + 2 :].split()
        out[tid] = (thread_kind(tid, pid, comm), (int(fields[11]) + int(fields[12])) / tick)
    return out


class ThreadCpu:
    """This process's CPU seconds by thread kind, never decreasing: a thread that ended keeps
    counting what it had at the last reading (what it spent after that is lost), so the sums
    make a Prometheus counter.  Thread-safe."""

    def __init__(self, read: Callable[[], dict[int, tuple[str, float]]] = thread_cpu) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[str, float]] = {}
        self._retired = dict.fromkeys(THREAD_KINDS, 0.0)

    def totals(self) -> dict[str, float]:
        """Seconds per kind (every kind of :data:`THREAD_KINDS`), or ``{}`` where nothing can be read."""
        with self._lock:
            now = self._read()
            if not now:
                return {}
            for tid, (kind, seconds) in self._seen.items():
                later = now.get(tid)
                if later is None or later[0] != kind or later[1] < seconds:  # ended (its id maybe reused)
                    self._retired[kind] += seconds
            self._seen = dict(now)
            out = dict(self._retired)
            for kind, seconds in now.values():
                out[kind] = out.get(kind, 0.0) + seconds
            return out
