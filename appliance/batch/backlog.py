"""The batch backlog as an alert reads it (``inferbox batch status``): when each spooled entry was
submitted, and the oldest job not yet done or failed (spooled, queued or running) with its age.

A job's progress, when a chunk of it was last done, is the job's ``last_progress_at``
(:class:`appliance.batch.jobs.Job`): a backlog whose oldest job is old and whose progress stands
still is stuck; one whose progress moves is only long.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec

from appliance.batch.jobs import Job
from appliance.batch.spool import read_request
from runtime.errors import BatchError
from runtime.times import parse_utc_iso

__all__ = ["Spooled", "Waiting", "age_s", "oldest_waiting", "spooled"]


class Spooled(msgspec.Struct, frozen=True, kw_only=True):
    """A job in ``spool/new``, submitted and not yet accepted by a worker."""

    job_id: str
    model: str
    submitted_at: str | None  # None: its job.json cannot be read (the next run sets the entry aside)


class Waiting(msgspec.Struct, frozen=True, kw_only=True):
    """The oldest job not yet done or failed."""

    job_id: str
    state: str  # spooled | queued | running
    submitted_at: str
    age_s: float  # seconds since it was submitted


def spooled(folders: list[Path]) -> list[Spooled]:
    """The entries of these ``spool/new`` folders, as their ``job.json`` says."""
    entries = []
    for folder in folders:
        model, submitted = "", None
        with contextlib.suppress(BatchError):  # unreadable, or taken by a worker meanwhile
            request = read_request(folder)
            model, submitted = request.model, request.submitted_at
        entries.append(Spooled(job_id=folder.name, model=model, submitted_at=submitted))
    return entries


def age_s(at: str | None, now: float) -> float | None:
    """Seconds from ``at`` (a time inferbox wrote) to ``now``; None when ``at`` is not such a time."""
    if not at:
        return None
    try:
        return max(0.0, now - parse_utc_iso(at).timestamp())
    except ValueError:
        return None


def oldest_waiting(entries: list[Spooled], jobs: list[Job], now: float) -> Waiting | None:
    """The job submitted first of those spooled, queued or running; None when there is none."""
    waiting = [(e.submitted_at, e.job_id, "spooled") for e in entries if e.submitted_at]
    waiting += [(j.submitted_at, j.job_id, j.state) for j in jobs if j.state in ("queued", "running")]
    for at, job_id, state in sorted(waiting):  # the one time format orders as the times do
        age = age_s(at, now)
        if age is not None:
            return Waiting(job_id=job_id, state=state, submitted_at=at, age_s=round(age, 1))
    return None
