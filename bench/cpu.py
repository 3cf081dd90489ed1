"""Where a server's CPU goes: microseconds per request by thread kind.

The readings come from :func:`runtime.threads.thread_cpu` (``/proc/<pid>/task``,
Linux; the server names its threads in the kernel): ``loop`` is the process's
main thread (the event loop), ``inference`` the ``infer-*`` threads,
``audit`` the ``audit-writer``, ``other`` the rest.  Elsewhere every reading is empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from runtime.threads import THREAD_KINDS as KINDS
from runtime.threads import thread_cpu

__all__ = ["KINDS", "mean_per_request", "per_request", "thread_cpu"]


def per_request(
    before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]], requests: int
) -> dict[str, float]:
    """Microseconds of CPU per request by kind between two readings (threads born between count
    whole; a thread that ended between loses its share, a reused thread id counts from the old
    thread's time); ``{}`` without readings or requests."""
    if not after or requests <= 0:
        return {}
    spent = dict.fromkeys(KINDS, 0.0)
    for tid, (kind, seconds) in after.items():
        spent[kind] += max(seconds - before.get(tid, (kind, 0.0))[1], 0.0)
    out = {kind: round(seconds / requests * 1e6, 1) for kind, seconds in spent.items()}
    out["total"] = round(sum(spent.values()) / requests * 1e6, 1)
    return out


def mean_per_request(readings: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of :func:`per_request` readings, kind by kind (``{}`` when there are none)."""
    present = [r for r in readings if r]
    if not present:
        return {}
    keys = [*KINDS, "total"]
    return {k: round(sum(r.get(k, 0.0) for r in present) / len(present), 1) for k in keys}
