"""Threads that carry their name into the kernel, so ``top -H``, ``ps -L`` and the bench see it.

Python (before 3.14) names a thread only for itself; the kernel shows every
thread of ``inferbox serve`` as ``inferbox``.  :func:`named_thread` starts a
thread that first sets its kernel name (Linux ``prctl(PR_SET_NAME)``, at most
15 bytes; elsewhere nothing happens): ``infer-<model>-<i>`` for the inference
threads, ``audit-writer``, ``static-shape``, ``open-streams``.

:func:`thread_cpu` reads each thread's CPU seconds and kind from
``/proc/<pid>/task`` (``loop``: the process's main thread, which runs the event
loop in ``inferbox serve``; ``inference``: ``infer-*``; ``audit``:
``audit-writer``; ``other``: everything else).  A thread starts with its
creator's name, so a runtime's own worker pool counts where it was created:
OpenVINO's threads for the all-core session (which runs a lone request) are
created while the model opens, from the main thread or ``open-streams``, and
count as ``other``; a single-thread stream session runs on its ``infer-*``
thread.  ``/metrics`` sums it by kind (:class:`ThreadCpu`) and the bench divides it by
requests (``bench/audit_onoff.py``).
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
    "thread_ticks",
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
    zero = ctypes.c_ulong(0)
    ok = prctl(_PR_SET_NAME, ctypes.c_char_p(data), zero, zero, zero) == 0
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


def thread_ticks(pid: int | None = None) -> dict[int, tuple[str, int]]:
    """CPU time (user + system, in clock ticks) so far of each live thread of ``pid`` (default:
    this process): tid -> (kind, ticks); ``{}`` where ``/proc`` cannot say (not Linux, no such
    process, no file descriptor left).  A thread whose file cannot be read or parsed is left out."""
    pid = os.getpid() if pid is None else pid
    tasks = Path(f"/proc/{pid}/task")
    try:
        tids = [int(t) for t in os.listdir(tasks)]
    except (OSError, ValueError):
        return {}
    out: dict[int, tuple[str, int]] = {}
    for tid in tids:
        try:
            # "tid (comm) state ppid ...": comm may hold spaces, parentheses, any bytes
            stat = (tasks / str(tid) / "stat").read_bytes().decode("utf-8", "replace")
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[tid] = (thread_kind(tid, pid, comm), int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue  # ended between the listing and the read, or unreadable
    return out


def thread_cpu(pid: int | None = None) -> dict[int, tuple[str, float]]:
    """:func:`thread_ticks` in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    return {tid: (kind, ticks / tick) for tid, (kind, ticks) in thread_ticks(pid).items()}


class ThreadCpu:
    """This process's CPU seconds by thread kind, never decreasing, for a Prometheus counter.

    Kept in whole clock ticks (sums of floats added in a different order could go down by
    1e-16, which Prometheus reads as a restart).  A thread that ended keeps counting what it had
    at the last reading (what it spent after that is lost); a thread renamed since (a new thread
    carries its creator's name until it names itself) keeps what it spent under the old name
    there and counts only what came after under the new one.  Thread-safe.
    """

    def __init__(self, read: Callable[[], dict[int, tuple[str, int]]] = thread_ticks, tick: int | None = None) -> None:
        self._read = read
        self._tick = tick or os.sysconf("SC_CLK_TCK")
        self._lock = threading.Lock()
        #: tid -> (kind, ticks at the last reading, ticks counted under earlier kinds)
        self._seen: dict[int, tuple[str, int, int]] = {}
        self._retired = dict.fromkeys(THREAD_KINDS, 0)

    def totals(self) -> dict[str, float]:
        """Seconds per kind (every kind of :data:`THREAD_KINDS`), or ``{}`` where nothing can be read."""
        with self._lock:
            now = self._read()
            if not now:
                return {}
            seen: dict[int, tuple[str, int, int]] = {}
            for tid, (kind, ticks) in now.items():
                before = self._seen.get(tid)
                offset = 0
                if before is not None:
                    old_kind, old_ticks, old_offset = before
                    if ticks < old_ticks:  # the id was reused by a new thread: the old one ended
                        self._retired[old_kind] += old_ticks - old_offset
                    elif kind != old_kind:  # renamed: what it spent so far stays with the old kind
                        self._retired[old_kind] += old_ticks - old_offset
                        offset = old_ticks
                    else:
                        offset = old_offset
                seen[tid] = (kind, ticks, offset)
            for tid, (kind, ticks, offset) in self._seen.items():
                if tid not in now:  # ended
                    self._retired[kind] += ticks - offset
            self._seen = seen
            out = dict(self._retired)
            for kind, ticks, offset in seen.values():
                out[kind] = out.get(kind, 0) + ticks - offset
            return {kind: ticks / self._tick for kind, ticks in out.items()}
