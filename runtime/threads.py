"""Threads that carry their name into the kernel, so ``top -H``, ``ps -L`` and the bench see it.

Python (before 3.14) names a thread only for itself; the kernel shows every
thread of ``inferbox serve`` as ``inferbox``.  :func:`named_thread` starts a
thread that first sets its kernel name (Linux ``prctl(PR_SET_NAME)``, at most
15 bytes; elsewhere nothing happens): ``infer-<model>-<i>`` for the inference
threads, ``audit-writer``, ``static-shape``, ``open-streams``.  The bench reads
them from ``/proc/<pid>/task/*/comm`` to show which thread spends the CPU of a
request (``bench/audit_onoff.py``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading
from collections.abc import Callable

__all__ = ["OS_NAME_BYTES", "named_thread", "os_thread_name", "set_os_thread_name"]

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
