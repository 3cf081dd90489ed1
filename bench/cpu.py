"""Where a server's CPU goes: seconds per thread kind, read from ``/proc/<pid>/task`` (Linux).

The server names its threads in the kernel (:mod:`runtime.threads`): the event
loop is the process's main thread, ``infer-*`` run the model, ``audit-writer``
appends the audit log; everything else (OpenVINO's and uvicorn's helpers, a
static-shape compile) is ``other``.  Elsewhere than Linux every reading is empty.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["KINDS", "kind_of", "mean_per_request", "per_request", "thread_cpu"]

KINDS = ("loop", "inference", "audit", "other")


def kind_of(tid: int, pid: int, comm: str) -> str:
    """The kind of thread ``tid`` of process ``pid``, named ``comm`` in the kernel."""
    if tid == pid:
        return "loop"
    if comm.startswith("infer-") or comm == "infer":
        return "inference"
    if comm == "audit-writer":
        return "audit"
    return "other"


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of each live thread of ``pid``: tid -> (kind, seconds)."""
    tasks = Path(f"/proc/{pid}/task")
    try:
        tids = [int(t) for t in os.listdir(tasks)]
    except (FileNotFoundError, PermissionError, NotADirectoryError):
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
        out[tid] = (kind_of(tid, pid, comm), (int(fields[11]) + int(fields[12])) / tick)
    return out


def per_request(
    before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]], requests: int
) -> dict[str, float]:
    """Microseconds of CPU per request by kind between two readings (threads born between count whole);
    ``{}`` without readings or requests."""
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
