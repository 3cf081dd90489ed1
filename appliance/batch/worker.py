"""The batch worker: accept spooled jobs, lease chunks, run them, finish jobs.

``run_once`` works until no chunk can be leased (what ``inferbox-batch.service``
runs when the spool path unit fires); ``watch`` repeats it until stopped.
Several workers may run at once on one state database.

Exactly once: a record's result exists iff its chunk's part file was renamed
into place; the chunk is marked ``done`` with that file name in one
transaction.  A worker that dies leaves a lease; it is taken again when it
expires, or at once when its process is gone (same host), and the chunk is
redone from scratch (temp files discarded; the final rename is idempotent).

One job cannot stop the queue: a spool entry that cannot be accepted is set
aside in ``spool/bad/``, a chunk that failed or whose worker died
``max_attempts`` times fails its job, and an error while finishing a job fails
that job; the other jobs go on.  A chunk that failed is retried after a backoff
(``retry_backoff_s``, x4 each time), not at once.

A job runs on one model version and package: the first chunk leased resolves
"latest" and pins the version and the package sha256 in the job's row; every
chunk, in every process, loads that version and refuses another package.
"Latest" is read from the repository on disk (``latest``, no model load), and a
model already loaded here for that version and package is reused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

import msgspec

from api.protocols import AuditEvent, Digest
from appliance.batch.holders import gone_here
from appliance.batch.jobs import Job, JobStore, Lease
from appliance.batch.model import BatchModel, LatestVersion, ModelLoader
from appliance.batch.readers import InputChangedError, plan_chunks
from appliance.batch.spool import JobRequest, accept, pending, read_request, remove_stale_staging, strays
from appliance.batch.unit import ChunkOutcome, ChunkTask, check_model_fits, run_chunk, verify_chunk
from appliance.batch.writers import atomic_write, rejects_name, remove_temp_files
from runtime.errors import BatchError, InferboxError

__all__ = [
    "AuditAppender",
    "BatchWorker",
    "RunSummary",
    "WorkerConfig",
    "finish_outputs",
    "keyed_digests",
    "machine_error",
    "merkle_root_of",
    "retry_delay",
]

log = logging.getLogger(__name__)

_RETRY = "fix the cause, then `inferbox batch retry {job_id}`"

#: errors of the machine, not of a job: a chunk or a finish that meets one stops the run (the
#: next run resumes) instead of spending the job's attempts
_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


#: of those, the ones a model load may meet inside a package error of its own and still be the
#: machine's (its verified copy, its compiled-model cache): a package file it may not read is the
#: package's, and fails its job
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def machine_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine's fault (disk full, read-only or not writable, the state
    database unusable), which no attempt of a chunk can fix."""
    if isinstance(exc, sqlite3.Error):
        return True
    return isinstance(exc, OSError) and exc.errno in _MACHINE_ERRNOS


def load_machine_error(exc: BaseException) -> bool:
    """Whether a model load's ``exc`` is the machine's fault: :func:`machine_error`, or a full or
    read-only disk behind an error the load raised for it (its cause, or the error it was handling
    unless it said ``from None``)."""
    if machine_error(exc):
        return True
    seen: set[int] = set()
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, sqlite3.Error) or (isinstance(cause, OSError) and cause.errno in _FULL_ERRNOS):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return False


class _TakenError(Exception):
    """A spool entry vanished while it was being accepted: another worker took it."""


class AuditAppender(Protocol):
    """What the worker needs of the audit log (``appliance.audit`` ``AuditLog``)."""

    def digest(self, data: bytes) -> Digest: ...

    def append(self, event: AuditEvent) -> int: ...


@dataclass(frozen=True)
class WorkerConfig:
    # records per chunk: texts are sorted by token count within a chunk, so larger chunks pad less
    # (3000 mixed texts, padded tokens over a global sort: +7.4 % at 1024, +2.9 % at 2048, 0 at 4096);
    # a crash redoes one chunk (4096 MiniLM texts: ~10 s here)
    chunk_size: int = 4096
    batch_size: int = 32  # records per model call
    lease_s: float = 600.0  # a chunk not done by then is taken again
    max_attempts: int = 3  # failures of one chunk (or deaths of its worker) before its job fails
    truncate: bool = True
    retry_backoff_s: float = 5.0  # a failed chunk waits this long before its 2nd attempt, x4 before each next


def retry_delay(config: WorkerConfig, attempts: int) -> float:
    """Seconds a chunk that failed its ``attempts``-th attempt waits before the next (at most 5 min)."""
    return float(min(config.retry_backoff_s * 4.0 ** max(0, attempts - 1), 300.0))


@dataclass
class RunSummary:
    accepted: list[str] = field(default_factory=list)
    chunks: int = 0
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # spool entries set aside in spool/bad/


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def keyed_digests(digests: list[str], audit: AuditAppender | None) -> list[str]:
    """``key_id:hmac`` of each record's SHA-256 under the audit digest key; nothing without an audit log.

    A plain SHA-256 of a short record can be reversed by guessing, so it is never stored.
    """
    if audit is None:
        return []
    keyed = (audit.digest(bytes.fromhex(d)) for d in digests)
    return [f"{k.key_id}:{k.hexdigest}" for k in keyed]


def merkle_root_of(keyed: list[str]) -> tuple[str, str]:
    """(root, digest key ids): RFC 6962 root over the records' keyed digests, in record order ("" when none)."""
    from appliance.audit.merkle import merkle_root

    if not keyed:
        return "", ""
    pairs = [k.split(":", 1) for k in keyed]
    key_ids = ",".join(sorted({key_id for key_id, _ in pairs}))
    return merkle_root([bytes.fromhex(hexdigest) for _, hexdigest in pairs]), key_ids


def finish_outputs(out_dir: Path, chunks: int) -> None:
    """Merge the per-chunk rejects into ``rejects.jsonl`` and drop temp files (idempotent)."""
    final = out_dir / "rejects.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        parts = [out_dir / rejects_name(i) for i in range(chunks)]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise BatchError(f"{out_dir}: chunk rejects {missing[:3]} are missing although the chunks are done")

        def write(f: IO[bytes]) -> None:
            for p in parts:
                f.write(p.read_bytes())

        atomic_write(final, write)
    for i in range(chunks):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / rejects_name(i)).unlink()
    remove_temp_files(out_dir)


class BatchWorker:
    """Works the spool and the chunk table. Build one per process."""

    def __init__(
        self,
        *,
        spool: Path,
        outbox: Path,
        store: JobStore,
        loader: ModelLoader,
        audit: AuditAppender | None = None,
        config: WorkerConfig | None = None,
        actor: str = "cli",
        worker_id: str | None = None,
        progress: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        latest: LatestVersion | None = None,
    ) -> None:
        self.spool = spool
        self.outbox = outbox
        self.store = store
        self.loader = loader
        self.latest = latest
        self.audit = audit
        self.config = config or WorkerConfig()
        self.host = socket.gethostname()
        self.worker_id = worker_id or f"{self.host}:{os.getpid()}"
        self.actor = actor
        # the unit's name only when the unit runs it (a run from a shell said inferbox-batch.service too)
        unit = actor == "inferbox-batch.service"
        self.origin = f"inferbox-batch.service@{self.host}" if unit else f"{self.host} pid {os.getpid()}"
        self.progress = progress or (lambda _event: None)
        self.clock = clock
        self.sleep = sleep
        self._models: dict[tuple[str, int | None], BatchModel] = {}

    # -- models --------------------------------------------------------------------------
    def model(self, name: str, version: int | None) -> BatchModel:
        key = (name, version)
        if key not in self._models:
            self._models[key] = self.loader(name, version)
        return self._models[key]

    def model_for(self, job: Job) -> tuple[BatchModel, Job]:
        """The job's model, and the job with its version and package pinned.

        A job without a version resolves "latest" here, as the repository holds it now (a
        long-running ``--watch`` serves new jobs the version installed now), and pins it: with
        ``latest`` the version and package sha256 are read from disk and a model loaded here
        for that package is reused (a load only for a new version or package); without, a fresh
        load of "latest" tells.  A job that has a version gets exactly that version and package.
        """
        if job.version is None:
            model = self._latest_model(job.model)
            version, sha = self.store.pin_model(job.job_id, model.version, model.package_sha256)
            if version == model.version and sha == model.package_sha256:
                self._models[(job.model, version)] = model
        else:
            version, sha = self.store.pin_model(
                job.job_id, job.version, self.model(job.model, job.version).package_sha256
            )
        job = msgspec.structs.replace(job, version=version, model_sha256=sha)
        model = self.model(job.model, version)
        if sha and model.package_sha256 != sha:
            self._models.pop((job.model, version), None)  # reinstalled under the same version? load it again
            model = self.model(job.model, version)
        if sha and model.package_sha256 != sha:
            raise BatchError(
                f"model {job.model!r} version {version} is not the package job {job.job_id} started with "
                f"(sha256 {sha[:12]}..., now {model.package_sha256[:12]}...); a job never mixes packages: "
                "reinstall that package, or submit the input again as a new job"
            )
        return model, job

    def _latest_model(self, name: str) -> BatchModel:
        """The latest version of ``name``: the model loaded here when it is that package, else a load."""
        resolved = None
        if self.latest is not None:
            try:
                resolved = self.latest(name)
            except Exception as exc:  # the load below says what is wrong (no such model, a bad package)
                log.debug("latest version of %s not read from the repository: %s", name, exc)
        if resolved is None:
            return self.loader(name, None)
        version, sha = resolved
        cached = self._models.get((name, version))
        if cached is not None and cached.package_sha256 == sha:
            return cached
        return self.loader(name, version)

    def forget_model(self, name: str, version: int | None) -> None:
        """Drop a loaded model (a chunk failed on it: the next attempt loads it again, so that a
        session left broken, e.g. by a lost device, is not reused)."""
        self._models.pop((name, version), None)

    # -- spool ---------------------------------------------------------------------------
    def accept_new(self, summary: RunSummary | None = None) -> list[str]:
        """Record every job waiting in ``spool/new`` and move it to ``spool/cur``.

        An entry that cannot be accepted is set aside in ``spool/bad/`` (logged, with a
        ``REASON`` file) and the others are still accepted; so is a plain file there (no job
        folder: ``submit`` renames whole folders into ``new/``).  An entry that vanishes meanwhile
        was taken by another worker: it is skipped.  State database and file system errors (disk
        full, read-only) stop the run: nothing is set aside for them.
        """
        accepted = []
        remove_stale_staging(self.spool, time.time())  # file times are the wall clock's, not self.clock's
        for stray in strays(self.spool):
            with contextlib.suppress(_TakenError):
                self._set_aside(
                    stray,
                    f"{stray.name} in {stray.parent} is {'a link' if stray.is_symlink() else 'a file'}, not a "
                    "job folder; submit input files with `inferbox batch submit FILE --model NAME`",
                )
                if summary is not None:
                    summary.refused.append(stray.name)
        for job_dir in pending(self.spool):
            try:
                job_id = self._accept_one(job_dir, summary)
            except _TakenError:
                log.debug("spool entry %s was taken by another worker", job_dir.name)
                continue
            except (OSError, sqlite3.Error) as exc:
                if isinstance(exc, FileNotFoundError) and not job_dir.exists():
                    log.debug("spool entry %s was taken by another worker", job_dir.name)
                    continue
                raise
            except Exception as exc:
                job_id = None
                self._set_aside(
                    job_dir, f"spool entry {job_dir.name} could not be accepted: {type(exc).__name__}: {exc}"
                )
            if job_id is None:
                if summary is not None:
                    summary.refused.append(job_dir.name)
                continue
            accepted.append(job_id)
            self.progress(f"accepted {job_id}")
            log.info("accepted batch job %s", job_id)
        return accepted

    def _accept_one(self, job_dir: Path, summary: RunSummary | None) -> str | None:
        """Accept one spool entry; None when it was set aside."""
        job_id = job_dir.name
        try:
            request = read_request(job_dir)
        except BatchError as exc:
            if not job_dir.exists():
                raise _TakenError(job_id) from exc
            self._set_aside(job_dir, str(exc))
            return None
        if request.job_id != job_id:
            self._set_aside(
                job_dir,
                f"spool entry {job_id}: its job.json is for job {request.job_id}, not {job_id} (a copied job "
                f"folder?); to run an input again, submit it: inferbox batch submit FILE --model {request.model}",
            )
            return None
        cur = self.spool / "cur" / job_id
        if self.store.job(job_id) is None:
            input_name = f"input.{request.format}"
            error = ""
            try:
                plans = plan_chunks(job_dir / input_name, request.format, self.config.chunk_size)
            except (BatchError, OSError) as exc:
                # named where the input will be: the folder moves to cur/ below (the error named a
                # path in new/ that no longer existed when an operator read it)
                plans, error = [], str(exc).replace(str(job_dir / input_name), str(cur / input_name))
            except Exception as exc:  # anything else about this input fails this job only
                plans, error = [], f"{cur / input_name} cannot be read: {type(exc).__name__}: {exc}"
            if error and not job_dir.exists():
                raise _TakenError(job_id)  # moved to cur/ by the worker that recorded it: its input is fine
            if error:
                log.error("batch job %s failed: %s", job_id, error)
                self._audit_failure(request, error)  # before the state: at least once, like every event
            self.store.add_job(request, cur / input_name, self.outbox / job_id, plans, error=error)
            if error and summary is not None:
                summary.failed.append(job_id)
        elif cur.exists():
            self._set_aside(job_dir, f"spool entry {job_id}: a job {job_id} was accepted before (in {cur})")
            return None
        if not job_dir.exists():
            raise _TakenError(job_id)  # recorded by this worker or another, moved to cur/ by the other
        accept(self.spool, job_id)
        return job_id

    def _set_aside(self, entry: Path, reason: str) -> None:
        """Move a spool entry to ``spool/bad/`` (a unique name there), with its reason; a plain
        file or a link goes into a folder of its name there, beside the ``REASON`` (written through a
        link, it overwrote a file where the link pointed).  Raises ``_TakenError`` when
        the entry vanished first (another worker accepted or set it aside)."""
        bad = self.spool / "bad"
        bad.mkdir(exist_ok=True)
        target = bad / entry.name
        if target.exists():
            target = bad / f"{entry.name}.{int(self.clock())}-{secrets.token_hex(3)}"
        try:
            if entry.is_dir() and not entry.is_symlink():
                entry.rename(target)
            else:
                target.mkdir()
                entry.rename(target / entry.name)
        except FileNotFoundError as exc:
            if entry.exists() or entry.is_symlink():
                raise
            with contextlib.suppress(OSError):
                target.rmdir()  # the folder made for a file that another worker took
            raise _TakenError(entry.name) from exc
        log.error("%s; set aside in %s", reason, bad)
        with contextlib.suppress(OSError):
            (target / "REASON").write_text(reason + "\n", encoding="utf-8")

    def reclaim_dead(self) -> int:
        """Expire at once the leases of dead worker processes on this host."""
        reclaimed = 0
        for worker in self.store.leased_workers():
            if gone_here(worker, self.host):
                reclaimed += self.store.expire_worker(worker)
        return reclaimed

    # -- chunks --------------------------------------------------------------------------
    def task_for(self, lease: Lease) -> ChunkTask:
        job = lease.job
        return ChunkTask(
            job_id=job.job_id,
            input_path=job.input_path,
            format=job.format,
            text_field=job.text_field,
            pair_field=job.pair_field,
            model=job.model,
            version=job.version,
            out_dir=job.out_dir,
            plan=lease.plan,
            batch_size=self.config.batch_size,
            truncate=self.config.truncate,
            model_sha256=job.model_sha256,
            canary=self.store.canary_chunk(job.job_id, lease.plan.idx),
        )

    def start_job(self, job: Job, model: BatchModel, until: float | None = None) -> None:
        """Write ``batch_start`` once (at least once if the worker dies right after).

        The worker that claims the job's start (compare-and-set, until ``until``: its chunk's
        lease) writes it; another worker starting a chunk of the job then goes on without.  A
        claim whose worker died is freed with its chunk's lease, and that chunk's next run writes it.
        """
        if job.audit_started:
            return
        until = self.clock() + self.config.lease_s if until is None else until
        if not self.store.claim_job(job.job_id, self.worker_id, until, step="start"):
            return
        if self.audit is not None:
            now = _utc(self.clock())
            details = {"pair_field": job.pair_field} if job.pair_field else {}
            self.audit.append(self._event("batch_start", job, model, "success", now, now, details))
        self.store.mark_audit_started(job.job_id)

    def record(self, outcome: ChunkOutcome) -> None:
        """Mark a chunk done; finish its job when it was the last."""
        self.store.complete(
            outcome.job_id,
            outcome.idx,
            part=outcome.part,
            ok=outcome.ok,
            rejected=outcome.rejected,
            digests=keyed_digests(outcome.digests, self.audit),
        )
        self.progress(f"completed {outcome.job_id} {outcome.idx}")

    def fail_chunk(self, lease: Lease, exc: BaseException, summary: RunSummary | None = None) -> None:
        job = lease.job
        message = f"{type(exc).__name__}: {exc}"
        log.error("job %s chunk %d failed (attempt %d): %s", job.job_id, lease.plan.idx, lease.attempts, message)
        failed = self.store.release(
            job.job_id,
            lease.plan.idx,
            error=message,
            max_attempts=self.config.max_attempts,
            retry_after_s=retry_delay(self.config, lease.attempts),
        )
        if failed:
            self._job_failed(job, message, summary, marked=True)

    def _job_failed(self, job: Job, message: str, summary: RunSummary | None, *, marked: bool = False) -> None:
        """The job failed (``marked``: the state says so already): one ERROR line, ``batch_end``."""
        if not marked and not self.store.fail_job(job.job_id, message):
            return  # failed (or done) before, by another worker or an earlier chunk: recorded then
        # the job as it is now: its error as recorded (with the fix), and a version pinned after the lease
        with contextlib.suppress(BatchError, sqlite3.Error):
            job = self.store.require_job(job.job_id)
        # the one line a job's failure leaves in the journal, above INFO: what an alert can match
        log.error("batch job %s failed: %s", job.job_id, job.error or message)
        if self.audit is not None:
            now = _utc(self.clock())
            model = self._loaded(job)
            self.audit.append(self._event("batch_end", job, model, "failure", now, now, {"error": message[:500]}))
        if summary is not None:
            summary.failed.append(job.job_id)

    def _loaded(self, job: Job) -> BatchModel | None:
        """The model loaded here for the job's pinned version and package, if any (no load)."""
        if job.version is None:
            return None
        model = self._models.get((job.model, job.version))
        if model is None or (job.model_sha256 and model.package_sha256 != job.model_sha256):
            return None
        return model

    def _audit_failure(self, request: JobRequest, message: str) -> None:
        if self.audit is not None:
            now = _utc(self.clock())
            self.audit.append(self._event("batch_end", request, None, "failure", now, now, {"error": message[:500]}))

    def fail_exhausted(self, summary: RunSummary | None = None) -> None:
        """Fail the jobs whose chunk's worker died ``max_attempts`` times (see :meth:`JobStore.fail_exhausted`)."""
        for job_id, error in self.store.fail_exhausted(self.config.max_attempts):
            self._job_failed(self.store.require_job(job_id), error, summary, marked=True)

    def prepare(self, lease: Lease, summary: RunSummary | None = None) -> tuple[BatchModel, ChunkTask] | None:
        """The model and the task for a leased chunk; None when it cannot run now (its job failed,
        or the model load failed and the chunk was given back)."""
        job = lease.job
        self.progress(f"leased {job.job_id} {lease.plan.idx}")
        try:
            model, job = self.model_for(job)
            check_model_fits(model, job.format, job.pair_field)
        except Exception as exc:
            if not load_machine_error(exc):
                self._not_prepared(lease, job, exc, summary)
                return None
            # a full disk (the verified copy, the compiled-model cache) fails no chunk and no job: the
            # chunk is given back unspent and the run stops, as at any other step
            self.give_back(lease)
            raise
        self.start_job(job, model, lease.lease_until)
        task = self.task_for(msgspec.structs.replace(lease, job=job))
        return model, msgspec.structs.replace(task, backend=model.backend, variant=model.variant)

    def _not_prepared(self, lease: Lease, job: Job, exc: Exception, summary: RunSummary | None) -> None:
        """A model that is not there or does not fit fails the job; a load that failed some other way
        counts as an attempt of the chunk."""
        if isinstance(exc, InferboxError):
            # the package or the model is the operator's to mend (the error says how); a retry then runs it
            self._job_failed(job, f"{exc}; then `inferbox batch retry {job.job_id}` runs the job", summary)
            # the chunk did not run: it is held no longer (a retry runs it, a purge may go on)
            self.store.give_back(job.job_id, lease.plan.idx, self.worker_id)
        else:
            self.fail_chunk(lease, exc, summary)

    def process(self, lease: Lease, summary: RunSummary | None = None) -> bool:
        """Run one leased chunk here; False when it did not complete (given back, or its job failed)."""
        prepared = self.prepare(lease, summary)
        if prepared is None:
            return False
        model, task = prepared
        job_id = task.job_id
        try:
            outcome = verify_chunk(task) or run_chunk(task, model, on_step=lambda s: self.progress(f"{s} {job_id}"))
        except Exception as exc:
            if self.chunk_failed(lease, exc, summary):  # first: a batch_end failure names the model it ran on
                self.forget_model(task.model, task.version)
            return False
        self.record(outcome)
        return True

    def chunk_failed(self, lease: Lease, exc: Exception, summary: RunSummary | None) -> bool:
        """A chunk's run raised ``exc`` (here, or on a Dask worker): True when it spent an attempt.

        An input changed since it was accepted fails the job at once (no attempt or retry can
        help); an error of the machine gives the chunk back unspent and is raised again; any
        other error spends an attempt of the chunk."""
        if isinstance(exc, InputChangedError):
            job_id = lease.job.job_id
            if self.store.fail_job(job_id, str(exc), chunk=lease.plan.idx):  # one worker fails it, and says so
                self._job_failed(self.store.require_job(job_id), str(exc), summary, marked=True)
            return False
        if machine_error(exc):
            self.give_back(lease)
            raise exc
        self.fail_chunk(lease, exc, summary)
        return True

    def give_back(self, lease: Lease) -> None:
        """Give a chunk back without spending its attempt (the machine failed, not the chunk): the
        next run takes it at once.  Quiet about a second error (the state database may be the
        failing part): the first one is what stops the run."""
        with contextlib.suppress(OSError, sqlite3.Error):
            self.store.give_back(lease.job.job_id, lease.plan.idx, self.worker_id)

    def lease(self) -> Lease | None:
        return self.store.lease(self.worker_id, self.config.lease_s, self.config.max_attempts)

    def wait_for_retry(self) -> bool:
        """Sleep until the next chunk given back after a failure may be retried; False if none is waiting."""
        at = self.store.next_retry_at(self.config.max_attempts)
        if at is None:
            return False
        delay = max(0.0, at - self.store.clock())
        log.info("waiting %.1f s before retrying a chunk that failed", delay)
        self.sleep(delay)
        return True

    # -- jobs ----------------------------------------------------------------------------
    def finish(self, job_id: str) -> bool:
        """Merge rejects, write ``job.json``, write ``batch_end``, mark the job done (idempotent);
        False when another worker took the job's finish meanwhile (this one's claim ran out)."""
        job = self.store.require_job(job_id)
        chunks = self.store.chunk_results(job_id)
        out_dir = Path(job.out_dir)
        finish_outputs(out_dir, job.chunks)
        digests = [d for c in chunks for d in c["digests"]]
        ok = sum(c["ok"] for c in chunks)
        rejected = sum(c["rejected"] for c in chunks)
        root, key_id = merkle_root_of(digests)
        submitted = ""  # the file the operator named (the spooled copy's request says it)
        with contextlib.suppress(BatchError):
            submitted = read_request(Path(job.input_path).parent).source
        summary = {
            "job_id": job_id,
            "submitted_file": submitted,
            "model": job.model,
            "version": job.version,
            "format": job.format,
            "text_field": job.text_field,
            "pair_field": job.pair_field,
            "records": job.records,
            "ok": ok,
            "rejected": rejected,
            "parts": [c["part"] for c in chunks],
            "rejects": "rejects.jsonl",
            "merkle_root": root,
            "digest_key_id": key_id,
        }
        body = msgspec.json.format(msgspec.json.encode(summary)) + b"\n"
        atomic_write(out_dir / "job.json", lambda f: f.write(body))
        self.progress(f"summarized {job_id}")
        model: BatchModel | None = None
        if self.audit is not None:
            try:
                # a job no chunk pinned (an empty file) resolves "latest" as a chunk does: cached under
                # (name, None) it was a second copy of the model in a --watch worker
                model = self.model(job.model, job.version) if job.version is not None else self.model_for(job)[0]
            except Exception:  # the event still records the job; the model fields stay empty
                model = None
        # the claim again, for lease_s more: the one taken before (a model load for the event can be
        # slow) may have run out and another worker be finishing the job; then it writes batch_end
        if not self.store.claim_job(job_id, self.worker_id, self.clock() + self.config.lease_s, step="finish"):
            log.info("batch job %s: another worker is finishing it", job_id)
            return False
        if self.audit is not None:
            details = {"records": str(job.records), "ok": str(ok), "rejected": str(rejected), "merkle_root": root}
            started = job.started_at or job.accepted_at
            event = self._event("batch_end", job, model, "success", started, _utc(self.clock()), details)
            self.audit.append(msgspec.structs.replace(event, digest_key_id=key_id))
        self.store.finish(job_id, ok=ok, rejected=rejected, merkle_root=root)
        self.progress(f"finished {job_id}")
        log.info("batch job %s done: %d ok, %d rejected", job_id, ok, rejected)
        return True

    def finish_ready(self, summary: RunSummary) -> None:
        """Finish every job whose chunks are all done; one that cannot be finished is failed.

        A worker finishes a job only once it holds the job's claim (compare-and-set): a job that
        another worker is finishing is left to it.  An error of the machine frees the claim and
        stops the run (the next run finishes the job)."""
        for job_id in self.store.finishable():
            until = self.clock() + self.config.lease_s
            if not self.store.claim_job(job_id, self.worker_id, until, step="finish"):
                continue
            try:
                finished = self.finish(job_id)
            except Exception as exc:
                if not machine_error(exc):
                    self._finish_failed(job_id, exc, summary)
                    continue
                with contextlib.suppress(OSError, sqlite3.Error):
                    self.store.release_claim(job_id, self.worker_id)
                raise
            if finished:
                summary.finished.append(job_id)

    def _finish_failed(self, job_id: str, exc: Exception, summary: RunSummary) -> None:
        job = self.store.require_job(job_id)
        message = f"finishing the job failed: {type(exc).__name__}: {exc}; {_RETRY.format(job_id=job_id)}"
        self._job_failed(job, message, summary)

    def _event(
        self,
        event: str,
        job: Job | JobRequest,
        model: BatchModel | None,
        outcome: str,
        started: str,
        ended: str,
        details: dict[str, str],
    ) -> AuditEvent:
        sha256 = job.model_sha256 if isinstance(job, Job) else ""  # the pinned package, when no model is at hand
        return AuditEvent(
            event=event,
            action=f"inferbox batch run ({event.removeprefix('batch_')})",
            actor=self.actor,
            origin=self.origin,
            outcome="success" if outcome == "success" else "failure",
            status=0 if outcome == "success" else 1,
            started_at=started,
            ended_at=ended,
            job_id=job.job_id,
            model_name=job.model,
            model_version=str(model.version if model is not None else job.version or ""),
            model_sha256=model.package_sha256 if model is not None else sha256,
            backend=model.backend if model is not None else "",
            variant=model.variant if model is not None else "",
            details=details,
        )

    # -- loops ---------------------------------------------------------------------------
    def run_once(self, *, wait_for_retries: bool = True, stop: threading.Event | None = None) -> RunSummary:
        """Accept new jobs, then run chunks until none can be leased; finish the jobs that are complete.

        With ``wait_for_retries`` a chunk given back after a failure is waited for (its backoff)
        and retried in this run; without (``--watch``), a later round takes it.  Each round takes
        back the leases of workers of this host that died meanwhile (one query), so a worker
        killed beside this one does not leave its chunk until the lease expires.  Once ``stop``
        is set the run ends after the chunk in progress.
        """
        summary = RunSummary()
        summary.accepted = self.accept_new(summary)
        while stop is None or not stop.is_set():
            self.reclaim_dead()
            self.fail_exhausted(summary)
            self.finish_ready(summary)
            lease = self.lease()
            if lease is None:
                if wait_for_retries and self.wait_for_retry():
                    continue
                break
            if self.process(lease, summary):
                summary.chunks += 1
        return summary

    def watch(self, stop: threading.Event, poll_s: float = 2.0) -> None:
        """``run_once`` until ``stop`` is set, waiting ``poll_s`` between empty rounds."""
        while not stop.is_set():
            summary = self.run_once(wait_for_retries=False, stop=stop)
            if not (summary.accepted or summary.chunks):
                stop.wait(poll_s)
