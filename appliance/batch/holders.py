"""Who holds a lease: a worker id is ``host:pid`` (a ``batch run``, or the Dask engine's coordinator).

A process of this host can be asked whether it still runs; one of another host cannot, and its
lease is only known to be abandoned once it expires.  The batch worker takes back the leases of
the processes gone from this host at once (``BatchWorker.reclaim_dead``), and ``batch status``
says so instead of counting them as a worker at work.
"""

from __future__ import annotations

import os
import socket

__all__ = ["gone_here", "pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (one of another user's counts: it cannot be signalled, but is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gone_here(worker: str, host: str | None = None) -> bool:
    """Whether ``worker`` names a process of ``host`` (this host by default) that no longer runs;
    never this process."""
    prefix = f"{socket.gethostname() if host is None else host}:"
    if not worker.startswith(prefix):
        return False
    pid_text = worker[len(prefix) :].partition(":")[0]
    return pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text))
