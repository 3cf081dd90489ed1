"""Job and chunk state in SQLite (``settings.state_db``, tables ``batch_jobs`` / ``batch_chunks``).

Every write is one ``BEGIN IMMEDIATE`` transaction on a WAL database with a busy
timeout, so any number of worker processes (and ``inferbox batch status``) can
share the file.  A chunk moves ``pending -> leased(lease_until, worker) -> done``;
``done`` is written in the same transaction that records the chunk's final file
name and counts.  A lease whose ``lease_until`` has passed belongs to a dead or
stuck worker: the next ``lease()`` takes the chunk again, unless the chunk was
already leased ``max_attempts`` times (:meth:`JobStore.fail_exhausted` fails its
job then).  A chunk given back after a failure stays ``pending`` with
``lease_until`` set to when it may be retried (a backoff).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import sqlite_utils

from appliance.batch.holders import gone_here
from appliance.batch.readers import ChunkPlan
from appliance.batch.spool import JobRequest
from appliance.sqlite import enable_wal
from runtime.errors import BatchError
from runtime.times import utc_iso

__all__ = ["Activity", "Job", "JobStore", "Lease"]

JOBS = "batch_jobs"
CHUNKS = "batch_chunks"


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """A job as ``inferbox batch status`` shows it. ``state``: queued | running | done | failed."""

    job_id: str
    model: str
    version: int | None  # pinned when the job first loads its model (the latest version, unless given)
    format: str
    text_field: str
    input_path: str
    out_dir: str
    state: str
    submitted_at: str
    accepted_at: str
    started_at: str | None
    ended_at: str | None
    chunks: int
    chunks_done: int
    records: int
    ok: int
    rejected: int
    merkle_root: str
    audit_started: bool
    error: str
    model_sha256: str = ""  # the pinned package's sha256
    pair_field: str = ""  # each record's second text: the job scores pairs ("" = single texts)
    last_progress_at: str | None = None  # when a chunk of it was last done (None: none yet)


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    job: Job
    plan: ChunkPlan
    worker: str
    lease_until: float
    attempts: int


class Activity(msgspec.Struct, frozen=True, kw_only=True):
    """An unfinished job's chunks (and claims) held by a worker now, and its next retry's time.

    ``gone``: leases not yet expired whose worker is known to be gone (``gone_workers``: a process
    of this host that no longer runs); the next run takes them back at once.  ``held`` counts the others.
    """

    held: int
    retry_at: float | None
    gone: int = 0
    gone_workers: list[str] = msgspec.field(default_factory=list)


_JOB_SELECT = (
    "SELECT j.*, (SELECT COUNT(*) FROM batch_chunks c WHERE c.job_id = j.job_id AND c.state = 'done') "
    "AS chunks_done, (SELECT COALESCE(SUM(c.ok), 0) FROM batch_chunks c WHERE c.job_id = j.job_id "
    "AND c.state = 'done') AS ok_done, (SELECT COALESCE(SUM(c.rejected), 0) FROM batch_chunks c "
    "WHERE c.job_id = j.job_id AND c.state = 'done') AS rejected_done, (SELECT MAX(c.done_at) FROM batch_chunks c "
    "WHERE c.job_id = j.job_id AND c.state = 'done') AS last_progress_at FROM batch_jobs j "
)


# a claim is taken when no other worker holds one that has not expired (``?`` = worker, now)
_CLAIM_SQL = {
    "start": "UPDATE batch_jobs SET claim_worker = ?, claim_until = ? WHERE job_id = ? AND audit_started = 0 "
    "AND (claim_worker IS NULL OR claim_worker = ? OR claim_until < ?)",
    "finish": "UPDATE batch_jobs SET claim_worker = ?, claim_until = ? WHERE job_id = ? "
    "AND state IN ('queued', 'running') AND NOT EXISTS (SELECT 1 FROM batch_chunks c "
    "WHERE c.job_id = batch_jobs.job_id AND c.state != 'done') "
    "AND (claim_worker IS NULL OR claim_worker = ? OR claim_until < ?)",
}


def _retry_hint(job_id: str) -> str:
    return f"fix the cause, then `inferbox batch retry {job_id}` runs the chunks not done"


class JobStore:
    """The batch tables of the state database. One instance per process (not thread-safe)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, busy_timeout_s: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        try:
            self._conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA synchronous = FULL")
            self.db = sqlite_utils.Database(self._conn)
            enable_wal(self._conn, timeout_s=busy_timeout_s)
            with self._tx():
                self._create()
        except sqlite3.Error as exc:
            raise BatchError(
                f"the state database {path} cannot be opened ({exc}); check that {path.parent} is writable "
                "and has free space (or pass --home / set INFERBOX_HOME)"
            ) from exc

    def _create(self) -> None:
        self.db.table(JOBS).create(
            {
                "job_id": str,
                "model": str,
                "version": int,
                "format": str,
                "text_field": str,
                "input_path": str,
                "out_dir": str,
                "state": str,
                "submitted_at": str,
                "accepted_at": str,
                "started_at": str,
                "ended_at": str,
                "chunks": int,
                "records": int,
                "ok": int,
                "rejected": int,
                "merkle_root": str,
                "audit_started": int,
                "error": str,
                "model_sha256": str,
                "pair_field": str,
                "claim_worker": str,
                "claim_until": float,
            },
            pk="job_id",
            not_null=["model", "format", "state", "input_path", "out_dir"],
            defaults={
                "ok": 0,
                "rejected": 0,
                "records": 0,
                "merkle_root": "",
                "audit_started": 0,
                "error": "",
                "model_sha256": "",
                "pair_field": "",
            },
            if_not_exists=True,
        )
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(batch_jobs)")}
        if "model_sha256" not in columns:  # a state database from before versions were pinned
            self._conn.execute("ALTER TABLE batch_jobs ADD COLUMN model_sha256 TEXT DEFAULT ''")
        if "pair_field" not in columns:  # from before pair jobs
            self._conn.execute("ALTER TABLE batch_jobs ADD COLUMN pair_field TEXT DEFAULT ''")
        if "claim_worker" not in columns:  # from before jobs were claimed for their start and finish
            self._conn.execute("ALTER TABLE batch_jobs ADD COLUMN claim_worker TEXT")
            self._conn.execute("ALTER TABLE batch_jobs ADD COLUMN claim_until FLOAT")
        self.db.table(CHUNKS).create(
            {
                "job_id": str,
                "idx": int,
                "rec_start": int,
                "rec_count": int,
                "byte_start": int,
                "byte_end": int,
                "state": str,
                "worker": str,
                "lease_until": float,
                "attempts": int,
                "part": str,
                "ok": int,
                "rejected": int,
                "digests": str,
                "error": str,
                "done_at": str,
            },
            pk=("job_id", "idx"),
            not_null=["state"],
            defaults={"attempts": 0, "ok": 0, "rejected": 0, "error": ""},
            if_not_exists=True,
        )
        chunk_columns = {row[1] for row in self._conn.execute("PRAGMA table_info(batch_chunks)")}
        if "done_at" not in chunk_columns:  # from before chunks recorded when they were done
            self._conn.execute("ALTER TABLE batch_chunks ADD COLUMN done_at TEXT")
        self._conn.execute("CREATE INDEX IF NOT EXISTS batch_chunks_state ON batch_chunks (state, job_id, idx)")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            # inside the try: a signal handled as BEGIN returns (SIGTERM to `batch run --once`, Ctrl-C)
            # left the transaction open, and the give-back after it could not start its own
            self._conn.execute("BEGIN IMMEDIATE")
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (disk full): keep the original error visible
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            raise

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cur = self._conn.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def close(self) -> None:
        self._conn.close()

    # -- jobs -----------------------------------------------------------------------------
    def add_job(
        self, request: JobRequest, input_path: Path, out_dir: Path, plans: list[ChunkPlan], *, error: str = ""
    ) -> bool:
        """Record an accepted job and its chunks; False when it was recorded before.

        With ``error`` (its input could not be planned) the job is recorded ``failed`` in the same
        transaction: a crash can never leave it queued with no chunks (which would "finish" it).
        """
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM batch_jobs WHERE job_id = ?", (request.job_id,)).fetchone():
                return False
            now = utc_iso(self.clock())
            conn.execute(
                "INSERT INTO batch_jobs (job_id, model, version, format, text_field, pair_field, input_path, "
                "out_dir, state, submitted_at, accepted_at, chunks, records, error, ended_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request.job_id,
                    request.model,
                    request.version,
                    request.format,
                    request.text_field,
                    request.pair_field,
                    str(input_path),
                    str(out_dir),
                    "failed" if error else "queued",
                    request.submitted_at,
                    now,
                    len(plans),
                    sum(p.rec_count for p in plans),
                    error,
                    now if error else None,
                ),
            )
            conn.executemany(
                "INSERT INTO batch_chunks (job_id, idx, rec_start, rec_count, byte_start, byte_end, state) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                [(request.job_id, p.idx, p.rec_start, p.rec_count, p.byte_start, p.byte_end) for p in plans],
            )
        return True

    def job(self, job_id: str) -> Job | None:
        rows = self._job_rows(_JOB_SELECT + "WHERE j.job_id = ?", (job_id,))
        return rows[0] if rows else None

    def jobs(self) -> list[Job]:
        return self._job_rows(_JOB_SELECT + "ORDER BY j.job_id", ())

    def _job_rows(self, sql: str, params: tuple[Any, ...]) -> list[Job]:
        rows = self._rows(sql, params)
        out = []
        for r in rows:
            r["audit_started"] = bool(r["audit_started"])
            r["text_field"] = r["text_field"] or ""
            r["error"] = r["error"] or ""
            r["merkle_root"] = r["merkle_root"] or ""
            r["model_sha256"] = r.get("model_sha256") or ""
            r["pair_field"] = r.get("pair_field") or ""
            r.pop("claim_worker", None)
            r.pop("claim_until", None)
            ok_done, rejected_done = r.pop("ok_done"), r.pop("rejected_done")
            if r["state"] != "done":  # the counts so far: the row's are written when the job finishes
                r["ok"], r["rejected"] = ok_done, rejected_done
            out.append(msgspec.convert(r, Job))
        return out

    def pin_model(self, job_id: str, version: int, sha256: str) -> tuple[int, str]:
        """Pin the job to a model version and package (the first caller wins); the pinned pair."""
        with self._tx() as conn:
            conn.execute("UPDATE batch_jobs SET version = ? WHERE job_id = ? AND version IS NULL", (version, job_id))
            conn.execute(
                "UPDATE batch_jobs SET model_sha256 = ? WHERE job_id = ? AND version = ? "
                "AND (model_sha256 IS NULL OR model_sha256 = '')",
                (sha256, job_id, version),
            )
            row = conn.execute("SELECT version, model_sha256 FROM batch_jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise BatchError(f"no batch job {job_id!r}; `inferbox batch status` lists the jobs")
        return int(row[0]), str(row[1] or "")

    def retry_job(self, job_id: str) -> int:
        """Queue a failed job again: its chunks not done get their attempts back; how many to run."""
        with self._tx() as conn:
            row = conn.execute("SELECT state, chunks, error FROM batch_jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise BatchError(f"no batch job {job_id!r}; `inferbox batch status` lists the jobs")
            state, chunks, error = row
            if state != "failed":
                raise BatchError(f"job {job_id} is {state}; only a failed job can be retried")
            if not chunks:
                raise BatchError(
                    f"job {job_id} failed before its input was split into chunks ({error}); "
                    "fix the input and submit it again"
                )
            # a chunk still leased when its job failed is given back too: should its worker still
            # run it, the two write identical files and the second ``done`` is a no-op
            conn.execute(
                "UPDATE batch_chunks SET state = 'pending', attempts = 0, error = '', lease_until = NULL "
                "WHERE job_id = ? AND state != 'done'",
                (job_id,),
            )
            conn.execute(
                "UPDATE batch_jobs SET state = CASE WHEN started_at IS NULL THEN 'queued' ELSE 'running' END, "
                "error = '', ended_at = NULL, claim_worker = NULL, claim_until = NULL WHERE job_id = ?",
                (job_id,),
            )
            left = conn.execute(
                "SELECT COUNT(*) FROM batch_chunks WHERE job_id = ? AND state != 'done'", (job_id,)
            ).fetchone()
        return int(left[0])

    def claim_job(self, job_id: str, worker: str, until: float, *, step: str) -> bool:
        """Claim a job's one-off ``step`` for ``worker`` until ``until`` (compare-and-set); whether it got it.

        ``step`` "start": the job has no ``batch_start`` yet; "finish": it is queued or running and
        every chunk is done.  A claim held by another worker that has not expired refuses it;
        ``worker``'s own claim is taken again.
        """
        with self._tx() as conn:
            cur = conn.execute(_CLAIM_SQL[step], (worker, until, job_id, worker, self.clock()))
            return cur.rowcount == 1

    def release_claim(self, job_id: str, worker: str) -> None:
        """Free ``worker``'s claim of a job (a step it could not complete)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE batch_jobs SET claim_worker = NULL, claim_until = NULL WHERE job_id = ? AND claim_worker = ?",
                (job_id, worker),
            )

    def mark_audit_started(self, job_id: str) -> None:
        """``batch_start`` is written: no worker writes it again (and the claim for it is freed)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE batch_jobs SET audit_started = 1, claim_worker = NULL, claim_until = NULL WHERE job_id = ?",
                (job_id,),
            )

    def fail_job(self, job_id: str, error: str, *, chunk: int | None = None) -> bool:
        """Fail a job with ``error`` as it is (and its ``chunk``, when one failed it for good); whether
        this call failed it (False: it had failed, or was done, before)."""
        with self._tx() as conn:
            if chunk is not None:
                conn.execute(
                    "UPDATE batch_chunks SET state = 'failed', error = ?, lease_until = NULL "
                    "WHERE job_id = ? AND idx = ? AND state != 'done'",
                    (error, job_id, chunk),
                )
            cur = conn.execute(
                "UPDATE batch_jobs SET state = 'failed', error = ?, ended_at = ?, claim_worker = NULL, "
                "claim_until = NULL WHERE job_id = ? AND state IN ('queued', 'running')",
                (error, utc_iso(self.clock()), job_id),
            )
            return cur.rowcount == 1

    def finishable(self) -> list[str]:
        """Jobs not yet done or failed whose every chunk is done."""
        rows = self._rows(
            "SELECT job_id FROM batch_jobs j WHERE state IN ('queued', 'running') AND NOT EXISTS "
            "(SELECT 1 FROM batch_chunks c WHERE c.job_id = j.job_id AND c.state != 'done') ORDER BY job_id"
        )
        return [r["job_id"] for r in rows]

    def chunk_results(self, job_id: str) -> list[dict[str, Any]]:
        """Done chunks in order: idx, part, ok, rejected, digests (list of hex)."""
        rows = self._rows(
            "SELECT idx, part, ok, rejected, digests, state FROM batch_chunks WHERE job_id = ? ORDER BY idx", (job_id,)
        )
        for r in rows:
            r["digests"] = json.loads(r["digests"]) if r["digests"] else []
        return rows

    def canary_chunk(self, job_id: str, idx: int) -> ChunkPlan | None:
        """A done chunk of the job other than ``idx`` that the model gave results on (the first), or None."""
        rows = self._rows(
            "SELECT idx, rec_start, rec_count, byte_start, byte_end FROM batch_chunks "
            "WHERE job_id = ? AND state = 'done' AND ok > 0 AND idx != ? ORDER BY idx LIMIT 1",
            (job_id, idx),
        )
        return msgspec.convert(rows[0], ChunkPlan) if rows else None

    def finish(self, job_id: str, *, ok: int, rejected: int, merkle_root: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE batch_jobs SET state = 'done', ok = ?, rejected = ?, merkle_root = ?, ended_at = ?, "
                "error = '', claim_worker = NULL, claim_until = NULL WHERE job_id = ?",
                (ok, rejected, merkle_root, utc_iso(self.clock()), job_id),
            )

    # -- chunks ---------------------------------------------------------------------------
    def lease(self, worker: str, lease_s: float, max_attempts: int = 3) -> Lease | None:
        """Take the oldest pending chunk whose retry time has come, or one whose lease expired;
        None when there is none.  A chunk leased ``max_attempts`` times already is not taken
        (:meth:`fail_exhausted`)."""
        now = self.clock()
        with self._tx() as conn:
            rows = self._rows(
                "SELECT c.* FROM batch_chunks c JOIN batch_jobs j ON j.job_id = c.job_id "
                "WHERE j.state IN ('queued', 'running') AND c.attempts < ? AND "
                "((c.state = 'pending' AND (c.lease_until IS NULL OR c.lease_until <= ?)) OR "
                "(c.state = 'leased' AND c.lease_until < ?)) ORDER BY c.job_id, c.idx LIMIT 1",
                (max_attempts, now, now),
            )
            if not rows:
                return None
            row = rows[0]
            until = now + lease_s
            conn.execute(
                "UPDATE batch_chunks SET state = 'leased', worker = ?, lease_until = ?, attempts = attempts + 1 "
                "WHERE job_id = ? AND idx = ?",
                (worker, until, row["job_id"], row["idx"]),
            )
            conn.execute(
                "UPDATE batch_jobs SET state = 'running', started_at = COALESCE(started_at, ?) "
                "WHERE job_id = ? AND state = 'queued'",
                (utc_iso(now), row["job_id"]),
            )
        job = self.job(row["job_id"])
        assert job is not None
        plan = ChunkPlan(
            idx=row["idx"],
            rec_start=row["rec_start"],
            rec_count=row["rec_count"],
            byte_start=row["byte_start"],
            byte_end=row["byte_end"],
        )
        return Lease(job=job, plan=plan, worker=worker, lease_until=until, attempts=row["attempts"] + 1)

    def complete(self, job_id: str, idx: int, *, part: str, ok: int, rejected: int, digests: list[str]) -> bool:
        """Mark a chunk done with its final file name, counts and time; False if it already was."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE batch_chunks SET state = 'done', part = ?, ok = ?, rejected = ?, digests = ?, "
                "lease_until = NULL, done_at = ? WHERE job_id = ? AND idx = ? AND state != 'done'",
                (part, ok, rejected, json.dumps(digests, separators=(",", ":")), utc_iso(self.clock()), job_id, idx),
            )
            return cur.rowcount == 1

    def release(self, job_id: str, idx: int, *, error: str, max_attempts: int, retry_after_s: float = 0.0) -> bool:
        """Give a chunk back after a failure, to be retried ``retry_after_s`` from now; after
        ``max_attempts`` fail the job. True if the job failed here (not when it had failed before,
        e.g. through another of its chunks running at the same time on Dask)."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT c.attempts, j.state FROM batch_chunks c JOIN batch_jobs j ON j.job_id = c.job_id "
                "WHERE c.job_id = ? AND c.idx = ? AND c.state = 'leased'",
                (job_id, idx),
            ).fetchone()
            if row is None:
                return False
            if row[0] >= max_attempts or row[1] not in ("queued", "running"):
                conn.execute(
                    "UPDATE batch_chunks SET state = 'failed', error = ? WHERE job_id = ? AND idx = ?",
                    (error, job_id, idx),
                )
                if row[1] not in ("queued", "running"):
                    return False  # another chunk in flight failed the job first: one batch_end
                conn.execute(
                    "UPDATE batch_jobs SET state = 'failed', error = ?, ended_at = ? WHERE job_id = ?",
                    (
                        f"chunk {idx} failed {row[0]} times: {error}; {_retry_hint(job_id)}",
                        utc_iso(self.clock()),
                        job_id,
                    ),
                )
                return True
            conn.execute(
                "UPDATE batch_chunks SET state = 'pending', error = ?, lease_until = ? WHERE job_id = ? AND idx = ?",
                (error, self.clock() + retry_after_s if retry_after_s > 0 else None, job_id, idx),
            )
            return False

    def fail_exhausted(self, max_attempts: int) -> list[tuple[str, str]]:
        """Fail the jobs of chunks taken ``max_attempts`` times whose worker never reported back
        (killed, out of memory, or stuck past its lease): ``(job_id, error)`` of each job failed."""
        now = self.clock()
        failed: list[tuple[str, str]] = []
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT c.job_id, c.idx, c.attempts FROM batch_chunks c JOIN batch_jobs j ON j.job_id = c.job_id "
                "WHERE j.state IN ('queued', 'running') AND c.attempts >= ? AND "
                "(c.state = 'pending' OR (c.state = 'leased' AND c.lease_until < ?)) ORDER BY c.job_id, c.idx",
                (max_attempts, now),
            ).fetchall()
            for job_id, idx, attempts in rows:
                if any(job_id == j for j, _ in failed):
                    continue
                chunk_error = (
                    f"the worker running chunk {idx} stopped {attempts} times before finishing it (killed? "
                    "out of memory? or --lease-seconds shorter than one chunk); see the batch service's log"
                )
                conn.execute(
                    "UPDATE batch_chunks SET state = 'failed', error = ?, lease_until = NULL "
                    "WHERE job_id = ? AND idx = ?",
                    (chunk_error, job_id, idx),
                )
                error = f"{chunk_error}; {_retry_hint(job_id)}"
                conn.execute(
                    "UPDATE batch_jobs SET state = 'failed', error = ?, ended_at = ? WHERE job_id = ?",
                    (error, utc_iso(now), job_id),
                )
                failed.append((job_id, error))
        return failed

    def next_retry_at(self, max_attempts: int) -> float | None:
        """When the earliest chunk given back after a failure may be taken again (None: no such chunk)."""
        row = self._conn.execute(
            "SELECT MIN(c.lease_until) FROM batch_chunks c JOIN batch_jobs j ON j.job_id = c.job_id "
            "WHERE j.state IN ('queued', 'running') AND c.state = 'pending' AND c.lease_until IS NOT NULL "
            "AND c.attempts < ?",
            (max_attempts,),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def activity(self, gone: Callable[[str], bool] | None = None) -> dict[str, Activity]:
        """What is happening to each unfinished job now: how many of its chunks (and claims) a worker
        holds, and when its earliest chunk given back after a failure may run again.  A job none holds
        is waiting for a run: its state stays ``running`` once started (``batch status`` says so).

        ``gone`` tells a worker id known to be gone (:func:`appliance.batch.holders.gone_here`): its
        leases are counted apart, not as a worker at the job (a run killed with ``kill -9``)."""
        now = self.clock()
        rows = self._rows(
            "SELECT j.job_id, (SELECT MIN(c.lease_until) FROM batch_chunks c WHERE c.job_id = j.job_id "
            "AND c.state = 'pending' AND c.lease_until > ?) AS retry_at FROM batch_jobs j "
            "WHERE j.state IN ('queued', 'running')",
            (now,),
        )
        holders = self._lease_holders(now)
        verdicts: dict[str, bool] = {}  # one question a worker
        held: dict[str, int] = {}
        lost: dict[str, list[str]] = {}
        for h in holders:
            worker = str(h["worker"] or "")
            if worker not in verdicts:
                verdicts[worker] = gone is not None and bool(worker) and gone(worker)
            if verdicts[worker]:
                lost.setdefault(h["job_id"], []).append(worker)
            else:
                held[h["job_id"]] = held.get(h["job_id"], 0) + 1
        return {
            r["job_id"]: Activity(
                held=held.get(r["job_id"], 0),
                retry_at=None if r["retry_at"] is None else float(r["retry_at"]),
                gone=len(lost.get(r["job_id"], [])),
                gone_workers=sorted(set(lost.get(r["job_id"], []))),
            )
            for r in rows
        }

    def held(self, job_id: str, gone: Callable[[str], bool] = gone_here) -> int:
        """How many of the job's chunks (and its claim) a worker holds now, whatever the job's state (a
        failed job's other chunks run to their end); a lease of a worker gone from this host is held by
        nobody (after a ``kill -9`` purge was refused until the lease ran out, 10 minutes, while
        ``batch status`` said the worker was gone)."""
        return sum(1 for r in self._lease_holders(self.clock(), job_id) if not gone(str(r["worker"] or "")))

    def _lease_holders(self, now: float, job_id: str | None = None) -> list[dict[str, Any]]:
        """``job_id`` and ``worker`` of every lease held at ``now`` (a chunk's, or a job's claim): of the
        job ``job_id`` whatever its state, else of every unfinished job."""
        params: tuple[object, ...]
        if job_id is None:
            jobs, params = "j.state IN ('queued', 'running')", (now, now)
        else:
            jobs, params = "j.job_id = ?", (job_id, now, job_id, now)
        return self._rows(
            "SELECT c.job_id, c.worker FROM batch_chunks c JOIN batch_jobs j ON j.job_id = c.job_id "  # noqa: S608
            f"WHERE {jobs} AND c.state = 'leased' AND c.lease_until >= ? UNION ALL "
            f"SELECT j.job_id, j.claim_worker FROM batch_jobs j WHERE {jobs} "
            "AND j.claim_worker IS NOT NULL AND j.claim_until >= ?",
            params,
        )

    def leased_workers(self) -> list[str]:
        """Workers holding a lease (of a chunk, or a claim of a job) now."""
        rows = self._rows(
            "SELECT worker FROM batch_chunks WHERE state = 'leased' UNION "
            "SELECT claim_worker FROM batch_jobs WHERE claim_worker IS NOT NULL ORDER BY 1"
        )
        return [r["worker"] for r in rows]

    def renew(self, worker: str, chunks: list[tuple[str, int]], lease_s: float) -> int:
        """Extend ``worker``'s leases of ``chunks`` (job id, idx) to ``lease_s`` from now: chunks
        handed to a Dask cluster stay leased while they wait there; how many were extended."""
        until = self.clock() + lease_s
        with self._tx() as conn:
            cur = conn.executemany(
                "UPDATE batch_chunks SET lease_until = ? "
                "WHERE job_id = ? AND idx = ? AND state = 'leased' AND worker = ?",
                [(until, job_id, idx, worker) for job_id, idx in chunks],
            )
            return cur.rowcount

    def expire_worker(self, worker: str, *, spent: bool = True) -> int:
        """Give every chunk leased by ``worker`` (known dead) back, and free its claims; return how many chunks.

        With ``spent=False`` each chunk's attempt is taken back too (as :meth:`give_back` does): the
        worker stopped for its machine (a Dask scheduler lost or unreachable, SIGINT), not the chunks."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE batch_chunks SET state = 'pending', lease_until = NULL, "
                "attempts = CASE WHEN ? THEN attempts ELSE MAX(attempts - 1, 0) END "
                "WHERE state = 'leased' AND worker = ?",
                (spent, worker),
            )
            conn.execute(
                "UPDATE batch_jobs SET claim_worker = NULL, claim_until = NULL WHERE claim_worker = ?", (worker,)
            )
            return cur.rowcount

    def give_back(self, job_id: str, idx: int, worker: str) -> None:
        """Give a chunk back at once without counting the attempt: it did not fail, the machine did
        (a read-only outbox, a full disk); the next run takes it."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE batch_chunks SET state = 'pending', lease_until = NULL, attempts = MAX(attempts - 1, 0) "
                "WHERE job_id = ? AND idx = ? AND state = 'leased' AND worker = ?",
                (job_id, idx, worker),
            )

    def integrity_check(self) -> str:
        row = self._conn.execute("PRAGMA integrity_check").fetchone()
        return str(row[0])

    def require_job(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job is None:
            raise BatchError(f"no batch job {job_id!r}; `inferbox batch status` lists the jobs")
        return job
