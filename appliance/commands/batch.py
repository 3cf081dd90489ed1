"""``inferbox batch``: submit files to the spool, work the spool, show job status."""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance.commands.options import build_settings, existing_home, refusal, state_options
from appliance.settings import Settings
from runtime.errors import BatchError
from runtime.logs import configure as configure_logging

if TYPE_CHECKING:
    from appliance.batch.jobs import Activity

__all__ = ["batch", "settings_loader"]

log = logging.getLogger(__name__)

DEFAULT_LOADER = "appliance.server:batch_loader"

#: exit status of a ``batch run --once`` in which a job failed (its ERROR line names the job and the
#: fix): the run itself went on with the other jobs, and a restart cannot mend the job
#: (``RestartPreventExitStatus=``); 2 is a machine error, 78 a refused configuration
EXIT_JOB_FAILED = 3


def settings_loader(target: str, settings: Settings) -> Any:
    """``target`` ("module:attr", a function of the settings) -> a model loader. Picklable via partial."""
    from runtime.offline import stay_offline

    stay_offline()  # also runs on Dask workers, before the loader imports OpenVINO
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise BatchError(f"--loader {target!r} cannot be imported ({exc}); use module:function") from exc
    return factory(settings)


def environment_error(exc: OSError | sqlite3.Error, home: Path | None = None) -> BatchError:
    """A disk, permission or database error as one line that names the fix (no stack trace)."""
    if isinstance(exc, sqlite3.Error):
        return BatchError(
            f"a database under the inferbox home cannot be used ({exc}); check its free space and write "
            "permission (or pass --home / set INFERBOX_HOME), then run the command again"
        )
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        place = "there" if exc.filename else f"in the inferbox home ({home})" if home else "in the inferbox home"
        fix = (
            f"free space {place} (or raise the quota / file size limit), then run the command again (work done is kept)"
        )
    elif exc.errno == errno.EROFS:
        fix = (
            "the inferbox home must be writable by this user: its file system is mounted read-only, remount it "
            "read-write (or pass --home / set INFERBOX_HOME), then run the command again (work done is kept)"
        )
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = (
            "the inferbox home must be writable by this user: fix its permissions (or an immutable flag: "
            "lsattr), or pass --home / set INFERBOX_HOME, then run the command again (work done is kept)"
        )
    else:
        fix = "check that path, its free space and its permissions, then run the command again"
    return BatchError(f"{exc.strerror or exc}{where}; {fix}")


class _BatchGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise  # the reader left (`batch status | head`): the CLI ends quietly, no file is at fault
        except (OSError, sqlite3.Error) as exc:
            log.debug("batch command failed", exc_info=True)
            raise environment_error(exc, ctx.meta.get("inferbox_home")) from exc


@click.group(cls=_BatchGroup)
def batch() -> None:
    """Offline batch jobs: JSONL, CSV or Parquet files in, the same format out (see docs/batch.md)."""


@batch.command()
@state_options
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--model", required=True, help="Model name in the repository.")
@click.option("--version", "model_version", type=int, default=None, help="Model version [default: the latest].")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]), default=None, help="[default: suffix]")
@click.option("--text-field", default="text", show_default=True, help="Field / column holding the text.")
@click.option(
    "--pair-field",
    default="",
    help="Field / column of each pair's second text: a text classifier (a cross-encoder, NLI) scores "
    "(text, pair) pairs, e.g. --text-field query --pair-field document.",
)
def submit(
    home: Path | None,
    repository: Path | None,
    file: Path,
    model: str,
    model_version: int | None,
    fmt: str | None,
    text_field: str,
    pair_field: str,
) -> None:
    """Place FILE in the spool atomically and print the job id (recorded as batch_submit)."""
    import msgspec

    from appliance.audit.log import AuditLog
    from appliance.batch.spool import submit as submit_file
    from appliance.commands.audit import cli_event

    settings = _settings(home, repository)
    started = datetime.now(UTC)
    text_model, missing = _model_hint(settings, model, model_version)
    with contextlib.ExitStack() as stack:
        if settings.audit:
            from appliance.server import ensure_signing_key

            ensure_signing_key(settings)  # as batch run does: the box's first record may be this one
        audit = stack.enter_context(AuditLog.open(settings)) if settings.audit else None
        # the job's input as it was spooled, keyed as every input digest is (`inferbox audit digest`); the
        # key is taken when the copy begins: a submit refused before it makes none (a digest key with no
        # record beside it reads, at the log's first write, as the trace of a lost log)
        mac = _KeyedCopy(audit.keyring.hasher) if audit is not None else None

        def record(job_id: str) -> None:
            """``batch_submit``, committed before the job is in ``spool/new/`` (no worker sees it yet)."""
            if audit is None or mac is None:
                return
            key_id, digest = mac.result()
            details = {"input_file": file.name}
            if model_version is not None:
                details["model_version"] = str(model_version)
            event = cli_event("batch_submit", "inferbox batch submit", started, details)
            audit.append(
                msgspec.structs.replace(
                    event, job_id=job_id, model_name=model, input_digest=digest, digest_key_id=key_id
                )
            )

        job_id = submit_file(
            settings.spool,
            file,
            model=model,
            version=model_version,
            fmt=fmt,
            text_field=text_field,
            pair_field=pair_field,
            text_model=text_model,
            hasher=mac,
            on_staged=record,
        )
    click.echo(job_id)
    if missing:  # after the job id: a script reading stdout gets it either way
        click.echo(f"warning: {missing}", err=True)


class _KeyedCopy:
    """An HMAC of the bytes copied, under the digest key current when the first of them (or the
    result, for an empty file) is asked for: none is made for a submit refused before its copy."""

    def __init__(self, hasher: Callable[[], tuple[str, Any]]) -> None:
        self._hasher = hasher
        self._made: tuple[str, Any] | None = None

    def _mac(self) -> tuple[str, Any]:
        if self._made is None:
            self._made = self._hasher()
        return self._made

    def update(self, data: bytes, /) -> None:
        self._mac()[1].update(data)

    def result(self) -> tuple[str, str]:
        """(the digest key's id, the HMAC's hex digest)."""
        key_id, mac = self._mac()
        return key_id, str(mac.hexdigest())


def _model_hint(settings: Settings, model: str, version: int | None) -> tuple[bool | None, str]:
    """Whether ``model`` (as the repository holds it now) reads text (None: cannot be told), and what
    to warn of when the repository does not hold it: the job is taken (the model may be installed
    before it runs), but a mistyped name was told only when the job ran and failed."""
    from appliance.models.listing import absent
    from runtime.manifest import decode_manifest
    from runtime.repository import Repository

    missing = absent(settings.repository, model, version)
    if missing is not None:
        return None, (
            f"{missing}; the job fails when it runs unless it is installed first (`inferbox models list` shows "
            "what is there)"
        )
    repo = Repository(settings.repository)
    try:
        known = repo.versions(model)
        found = repo.path(model, version if version is not None else known[-1])
        return decode_manifest((found / "manifest.json").read_bytes()).text is not None, ""
    except Exception:  # any reason it cannot be read: no hint, the job's run says what is wrong
        return None, ""


def _activity_line(now: Activity) -> str:
    """What an unfinished job's state does not say: whether a worker is at it (a stopped `batch run`
    left a job "running" that nothing ran)."""
    said = []
    if now.held:
        # a lease not yet expired: a worker of another host killed with kill -9 still holds it until
        # --lease-seconds pass (one of this host is known to be gone: below)
        said.append(
            f"a worker is at it now ({now.held} lease(s) of its chunks or of its start or finish not yet expired)"
        )
    if now.gone:
        said.append(
            f"its worker {', '.join(now.gone_workers)} is gone (no such process on this host): the next "
            f"`inferbox batch run` (or the batch service) takes back its {now.gone} lease(s) at once"
        )
    if said:
        return "; ".join(said)
    if now.retry_at is not None:
        at = datetime.fromtimestamp(now.retry_at, UTC).strftime("%H:%M:%S UTC")
        return f"waiting: a chunk that failed is tried again from {at} by `inferbox batch run` (or the batch service)"
    return "waiting: no worker is at it now; `inferbox batch run` (or the batch service) goes on with it"


def _ago(seconds: float) -> str:
    """A time span as a person reads it: ``45 s``, ``12 min``, ``2 h 5 min``, ``3 d 4 h``."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _settings(home: Path | None, repository: Path | None) -> Settings:
    """The settings, refusing a state folder that does not exist (a mistyped or default home)."""
    settings = build_settings(home=home, repository=repository)
    context = click.get_current_context(silent=True)
    if context is not None:  # a disk error's message names the home (environment_error)
        context.meta["inferbox_home"] = settings.home
    return existing_home(settings, "batch", "batch jobs live in the spool of the state folder the server uses")


def _actor(environ: dict[str, str]) -> str:
    """The systemd unit when run by systemd (``$INVOCATION_ID`` is set), else ``cli:<user>`` (as every
    other command's records name who ran it)."""
    from appliance.commands.keys import cli_user

    return "inferbox-batch.service" if environ.get("INVOCATION_ID") else f"cli:{cli_user()}"


@batch.command()
@state_options
@click.option("--once", is_flag=True, help="Work until nothing is left, then exit [default].")
@click.option("--watch", is_flag=True, help="Keep working the spool until SIGTERM.")
@click.option("--engine", type=click.Choice(["local", "dask"]), default="local", show_default=True)
@click.option("--scheduler", default=None, help="Dask scheduler (tcp://host:8786) [default: a local cluster].")
@click.option(
    "--dask-workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Workers of the local Dask cluster.",
)
@click.option("--chunk-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Records per chunk.")
@click.option("--lease-seconds", type=click.FloatRange(min=1), default=600.0, show_default=True)
@click.option("--poll-seconds", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="--watch pause.")
@click.option("--loader", default=DEFAULT_LOADER, hidden=True, help="module:function(settings) -> model loader.")
def run(
    home: Path | None,
    repository: Path | None,
    once: bool,
    watch: bool,
    engine: str,
    scheduler: str | None,
    dask_workers: int,
    chunk_size: int,
    lease_seconds: float,
    poll_seconds: float,
    loader: str,
) -> None:
    """Work the spool: accept new jobs, run their chunks, write outputs to <home>/outbox/<job>/."""
    from appliance.batch.jobs import JobStore
    from appliance.batch.model import repository_latest
    from appliance.batch.worker import BatchWorker, WorkerConfig

    if once and watch:
        # two flags, not one switch: with both given, the last one would win silently (a --watch
        # that runs until killed where a script meant to finish)
        raise click.UsageError("--once (finish and exit) and --watch (run until SIGTERM) are two ways; give one")
    mode = "watch" if watch else "once"
    with refusal():  # a configuration the service's restarts cannot mend: exit 78, not 2
        settings = _settings(home, repository)
        from appliance.server import public_key_of

        public_key_of(settings)  # the key packages must be signed with: named before anything is made
    configure_logging(settings.log_level)
    if scheduler and engine != "dask":
        raise BatchError("--scheduler needs --engine dask")
    factory = functools.partial(settings_loader, loader, settings)
    actor = _actor(dict(os.environ))
    audit: Any = None
    store: JobStore | None = None
    worker: BatchWorker | None = None
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    failed = False
    try:
        if mode == "once":
            # systemd stops the batch service (systemctl stop, a reboot) with SIGTERM, which ended the
            # run where it was: the chunk in progress stayed leased and its attempt was spent, so three
            # stops failed the job. Now it stops as Ctrl-C does: the chunk is given back, unspent.
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        if settings.audit:
            from appliance.server import ensure_signing_key

            ensure_signing_key(settings)
        if settings.batch_retention_days > 0:  # at each run's start (the batch timer starts one nightly)
            for line in purge_jobs(settings, [], settings.batch_retention_days, sweep=True, actor=actor):
                log.info("batch retention (batch_retention_days = %g): %s", settings.batch_retention_days, line)
        if settings.audit:
            from appliance.audit import AuditLog

            audit = AuditLog.open(settings)
        store = JobStore(settings.state_db)
        with refusal():  # a configuration the loader refuses exits 78 too: restarts cannot mend it
            loader_fn = factory()
        worker = BatchWorker(
            spool=settings.spool,
            outbox=settings.outbox,
            store=store,
            loader=loader_fn,
            audit=audit,
            config=WorkerConfig(
                chunk_size=chunk_size,
                batch_size=settings.max_batch_size,
                lease_s=lease_seconds,
                truncate=settings.truncate,
            ),
            actor=actor,
            # the default loader loads from the repository: its latest version is read there, so a
            # model loaded for it is reused (another loader tells "latest" by loading it)
            latest=repository_latest(settings.repository) if loader == DEFAULT_LOADER else None,
        )
        runner: Any = worker
        if engine == "dask":
            from appliance.batch.dask_engine import DaskEngine

            # Each local worker opens its sessions on every core (threads = 0), so 2 workers run
            # twice the cores' threads: measured 8.4 s against 12.4 s for a 3,000-text job when each
            # took half the cores, since a worker's Python work (reading, tokenizing, writing) then
            # left its core idle (docs/batch.md).
            runner = DaskEngine(worker, factory, scheduler=scheduler, n_workers=dask_workers)
        if mode == "once":
            summary = runner.run_once()
            refused = f", set aside {len(summary.refused)} (see spool/bad/)" if summary.refused else ""
            click.echo(
                f"accepted {len(summary.accepted)} job(s), ran {summary.chunks} chunk(s), "
                f"finished {len(summary.finished)}, failed {len(summary.failed)}{refused}"
            )
            failed = bool(summary.failed)
        else:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            # rounds of run_once(wait_for_retries=False): a later round takes a chunk due for a retry
            # (the Dask engine keeps one cluster for all rounds)
            runner.watch(stop, poll_seconds)
    except BaseException as exc:
        if isinstance(exc, _Terminated):
            # a second SIGTERM (systemd's, or an impatient operator's) must not cut the give-back short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if isinstance(exc, KeyboardInterrupt | SystemExit) and store is not None and worker is not None:
            # stopped from outside (Ctrl-C, SIGTERM), not by its chunk: what it held is given back,
            # attempts unspent, and the next run resumes it
            try:
                if store.expire_worker(worker.worker_id, spent=False):
                    log.warning(
                        "stopped: the chunk in progress is given back; the next `inferbox batch run` resumes it"
                    )
            except Exception as gone:  # its lease runs out instead: the chunk is taken again then
                log.warning(
                    "stopped: the chunk in progress could not be given back (%s); it is taken again "
                    "when its lease runs out",
                    gone,
                )
        # closing must not hide the error that stopped the run (e.g. a full disk)
        for resource in (store, audit):
            if resource is not None:
                with contextlib.suppress(Exception):
                    resource.close()
        if isinstance(exc, _Terminated):
            # end as SIGTERM ends a process: systemd takes that for a clean stop, an exit status of
            # 143 for a failure (the unit would show failed after every `systemctl stop`)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        if previous_sigterm is not None:  # a run inside a longer process (a test, a script) leaves it as found
            signal.signal(signal.SIGTERM, previous_sigterm)
    store.close()
    if audit is not None:
        audit.close()
    if failed:  # each failed job's ERROR line is in the log above
        sys.exit(EXIT_JOB_FAILED)


class _Terminated(SystemExit):
    """SIGTERM, raised where the run was so that it can give back what it held."""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated(128 + signum)


@batch.command()
@state_options
@click.argument("job_id")
def retry(home: Path | None, repository: Path | None, job_id: str) -> None:
    """Queue the failed job JOB_ID again: its chunks not done are retried (attempts reset), done ones kept."""
    from appliance.batch.jobs import JobStore

    settings = _settings(home, repository)
    store = JobStore(settings.state_db)
    try:
        job = store.require_job(job_id)
        if job.state == "failed" and not Path(job.input_path).is_file():
            raise BatchError(
                f"job {job_id}'s input copy is gone (`inferbox batch purge` deleted it?): submit the file again"
            )
        left = store.retry_job(job_id)
    finally:
        store.close()
    click.echo(
        f"job {job_id} queued again: {left} chunk(s) to run; `inferbox batch run` (or the batch service) runs them"
    )


def _job_folders(settings: Settings, job: Any) -> list[Path]:
    """The folders of ``job``'s data, built from the settings and the job id (never taken from the
    state database as they stand there: a row that names another folder is refused, not followed)."""
    if not _JOB_ID.fullmatch(job.job_id):
        raise BatchError(f"job id {job.job_id!r} is not one inferbox makes; its data is not purged")
    folders = [settings.spool / "cur" / job.job_id, settings.outbox / job.job_id]
    recorded = [Path(job.input_path).parent, Path(job.out_dir)]
    for built, stored in zip(folders, recorded, strict=True):
        if os.path.abspath(built) != os.path.abspath(stored):
            raise BatchError(
                f"job {job.job_id}: its data is recorded at {stored}, not {built} where this home keeps it (a home "
                "given as a relative path, or moved?); run the command with the home the job was submitted to"
            )
    return folders


_JOB_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")


@batch.command()
@state_options
@click.argument("job_ids", nargs=-1)
@click.option(
    "--older-than",
    "older_than",
    type=click.FloatRange(min=0),
    default=None,
    help="Days: every finished job that ended longer ago than this.",
)
def purge(home: Path | None, repository: Path | None, job_ids: tuple[str, ...], older_than: float | None) -> None:
    """Delete finished jobs' data: the spooled input copy and the outputs (results, rejects).

    A job's records stay on the box until this is run: its input file and its
    rejects hold the raw texts. Only done and failed jobs are purged (a failed
    one can then not be retried); the job's row (counts, Merkle root) stays. A
    named job no worker has taken yet (spooled) is withdrawn, never run. Each
    purge is recorded as batch_purge before its files go.
    """

    if not job_ids and older_than is None:
        raise click.UsageError("name the jobs to purge (JOB_ID ...), or --older-than DAYS for every finished one")
    settings = _settings(home, repository)
    purged = purge_jobs(settings, list(dict.fromkeys(job_ids)), older_than)  # a job named twice: once
    for line in purged or ["nothing to purge"]:
        click.echo(line)


def purge_jobs(
    settings: Settings, named: list[str], older_than: float | None, *, sweep: bool = False, actor: str | None = None
) -> list[str]:
    """Delete the data of the finished jobs ``named`` (all, when none is) that ended more than
    ``older_than`` days ago; a line for each.  A job that may not be purged (not finished, chunks still
    held, folders not this home's) is a BatchError, or, in a ``sweep`` (``batch run`` applying
    ``batch_retention_days``), skipped with a warning in the log."""
    import shutil

    import msgspec

    from appliance.batch.jobs import JobStore
    from appliance.commands.audit import cli_event

    def refuse(message: str) -> None:
        if not sweep:
            raise BatchError(message)
        log.warning("batch retention: %s; left for now", message)

    from appliance.batch.spool import pending

    # a job submitted and not yet accepted by a worker (spool/new): withdrawn whole, never run
    waiting = {p.name: p for p in pending(settings.spool)} if named and not sweep else {}
    store = JobStore(settings.state_db)
    try:
        spooled = [j for j in named if j in waiting and store.job(j) is None]
        jobs = [store.require_job(j) for j in named if j not in spooled] if named else store.jobs()
        cutoff = None if older_than is None else datetime.now(UTC).timestamp() - older_than * 86400
        targets = []
        for job in jobs:
            if job.state not in ("done", "failed"):
                if named:
                    refuse(f"job {job.job_id} is {job.state}: only a done or failed job is purged")
                continue
            if cutoff is not None and (
                job.ended_at is None or datetime.fromisoformat(job.ended_at).timestamp() > cutoff
            ):
                continue
            if (held := store.held(job.job_id)) > 0:  # a failed job's other chunks run to their end
                refuse(
                    f"job {job.job_id}: a worker still holds {held} of its chunks, which would write its outputs "
                    "again; purge it once they end (`inferbox batch status`)"
                )
                continue
            try:
                folders = [p for p in _job_folders(settings, job) if p.is_dir()]
            except BatchError as exc:
                refuse(str(exc))
                continue
            if folders:
                targets.append((job, folders))
    finally:
        store.close()
    lines: list[str] = []
    with contextlib.ExitStack() as stack:
        audit = None
        if settings.audit and (targets or spooled):
            from appliance.audit.log import AuditLog

            audit = stack.enter_context(AuditLog.open(settings))
        for job_id in spooled:
            lines.append(_withdraw(settings, job_id, waiting[job_id], audit, actor))
        for job, folders in targets:
            size = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())
            if audit is not None:  # before the files go: a purge is never done without its record
                started = datetime.now(UTC)
                details = {"state": job.state, "bytes": str(size), "removed": ",".join(str(f) for f in folders)}
                if sweep:
                    details["batch_retention_days"] = f"{older_than:g}"
                action = "inferbox batch run (batch_retention_days)" if sweep else "inferbox batch purge"
                event = cli_event("batch_purge", action, started, details, actor=actor)
                audit.append(msgspec.structs.replace(event, job_id=job.job_id, model_name=job.model))
            for folder in folders:
                shutil.rmtree(folder)
            lines.append(f"purged job {job.job_id} ({job.state}): {size} bytes in {', '.join(map(str, folders))}")
    return lines


def _withdraw(settings: Settings, job_id: str, folder: Path, audit: Any, actor: str | None) -> str:
    """Delete a job no worker has accepted yet (``spool/new/<job>``), recorded as ``batch_purge`` with
    the state ``spooled``: a file submitted by mistake was always run to its end.  Moved aside first
    (a rename), then recorded, then deleted.  A worker records a job before it moves the folder to
    ``spool/cur``: one that recorded it meanwhile gets the folder back where it looks for it (its next
    accept finishes the move) and the purge is refused."""
    import shutil

    import msgspec

    from appliance.batch.spool import read_request
    from appliance.commands.audit import cli_event

    model = ""
    with contextlib.suppress(BatchError):
        model = read_request(folder).model
    from appliance.batch.jobs import JobStore

    aside = settings.spool / "tmp" / f"{job_id}.withdrawn"
    taken = BatchError(
        f"job {job_id} was taken by a worker as it was being withdrawn; purge it once it has ended "
        "(`inferbox batch status`)"
    )
    try:
        folder.rename(aside)
    except FileNotFoundError:
        raise taken from None
    store = JobStore(settings.state_db)
    try:
        recorded = store.job(job_id) is not None
    finally:
        store.close()
    if recorded:
        aside.rename(folder)
        raise taken
    size = sum(f.stat().st_size for f in aside.rglob("*") if f.is_file())
    if audit is not None:  # before the files go: a purge is never done without its record
        details = {"state": "spooled", "bytes": str(size), "removed": str(folder)}
        event = cli_event("batch_purge", "inferbox batch purge", datetime.now(UTC), details, actor=actor)
        try:
            audit.append(msgspec.structs.replace(event, job_id=job_id, model_name=model))
        except BaseException:
            aside.rename(folder)  # not recorded: not withdrawn
            raise
    shutil.rmtree(aside)
    return f"withdrew job {job_id} (spooled, not yet run): {size} bytes in {folder}"


@batch.command()
@state_options
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(home: Path | None, repository: Path | None, job_id: str | None, as_json: bool) -> None:
    """Show jobs (or one JOB): state, chunks done, records, ok, rejected; queued spool entries too."""
    import msgspec

    from appliance.batch.backlog import age_s, oldest_waiting, spooled
    from appliance.batch.holders import gone_here
    from appliance.batch.jobs import JobStore
    from appliance.batch.spool import pending

    settings = _settings(home, repository)
    queued = [p.name for p in pending(settings.spool)]
    store = JobStore(settings.state_db)
    try:
        if job_id is not None and job_id not in queued:
            jobs = [store.require_job(job_id)]
        else:
            jobs = [] if job_id is not None else store.jobs()
        # a job recorded just before a crash is still in spool/new: show it once, as recorded
        queued = [q for q in queued if store.job(q) is None]
        if job_id is not None and job_id not in queued and not jobs:
            jobs = [store.require_job(job_id)]
        activity = store.activity(gone=gone_here)  # a run killed with kill -9 on this host is not at work
    finally:
        store.close()
    if job_id is not None:
        queued = [q for q in queued if q == job_id]
    now = time.time()
    entries = spooled([settings.spool / "new" / q for q in queued])
    oldest = oldest_waiting(entries, jobs, now)  # the backlog's age, to alert on
    # a finished job whose data is gone (`inferbox batch purge`, or batch_retention_days: its input copy
    # and its outputs; a job that failed before writing any still has its input copy)
    deleted = {
        j.job_id
        for j in jobs
        if j.state in ("done", "failed") and not Path(j.out_dir).exists() and not Path(j.input_path).parent.exists()
    }
    if as_json:
        body = {
            "jobs": [
                {
                    **msgspec.to_builtins(j),
                    **({"outputs_deleted": True} if j.job_id in deleted else {}),
                    **({"activity": msgspec.to_builtins(activity[j.job_id])} if j.job_id in activity else {}),
                }
                for j in jobs
            ],
            "spooled": queued,
            "spooled_entries": [msgspec.to_builtins(e) for e in entries],
            "oldest_waiting": None if oldest is None else msgspec.to_builtins(oldest),
        }
        click.echo(json.dumps(body, indent=2))
        return
    for e in entries:
        waited = age_s(e.submitted_at, now)
        since = "" if waited is None else f", submitted {_ago(waited)} ago"
        click.echo(f"{e.job_id}  spooled (waiting for `inferbox batch run`){since}")
    for j in jobs:
        line = (
            f"{j.job_id}  {j.state:<7} model {j.model}{'' if j.version is None else f' v{j.version}'}  "
            f"chunks {j.chunks_done}/{j.chunks}  records {j.records}  ok {j.ok}  rejected {j.rejected}"
        )
        if j.job_id in deleted:
            line += "  input and outputs deleted (batch purge)"
        elif j.state == "done":
            line += f"  -> {j.out_dir}"
        if j.error:
            line += f"\n    error: {j.error}"
        if j.job_id in activity:
            line += f"\n    {_activity_line(activity[j.job_id])}"
            progressed = age_s(j.last_progress_at, now)
            if progressed is not None:
                line += f"; last chunk done {_ago(progressed)} ago"
        click.echo(line)
    if not queued and not jobs:
        click.echo("no batch jobs")
    elif job_id is None and oldest is not None:
        click.echo(f"oldest job waiting: {oldest.job_id} ({oldest.state}), submitted {_ago(oldest.age_s)} ago")
