"""``inferbox batch``: submit files to the spool, work the spool, show job status."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import click

from appliance.commands.options import build_settings, state_options
from appliance.settings import Settings
from runtime.errors import BatchError

__all__ = ["batch", "settings_loader"]

log = logging.getLogger(__name__)

DEFAULT_LOADER = "appliance.server:batch_loader"


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


@click.group()
def batch() -> None:
    """Offline batch jobs: JSONL, CSV or Parquet files in, the same format out (see docs/batch.md)."""


@batch.command()
@state_options
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--model", required=True, help="Model name in the repository.")
@click.option("--version", "model_version", type=int, default=None, help="Model version [default: the latest].")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]), default=None, help="[default: suffix]")
@click.option("--text-field", default="text", show_default=True, help="Field / column holding the text.")
def submit(
    home: Path | None,
    repository: Path | None,
    file: Path,
    model: str,
    model_version: int | None,
    fmt: str | None,
    text_field: str,
) -> None:
    """Place FILE in the spool atomically and print the job id."""
    from appliance.batch.spool import submit as submit_file

    settings = build_settings(home=home, repository=repository)
    job_id = submit_file(settings.spool, file, model=model, version=model_version, fmt=fmt, text_field=text_field)
    click.echo(job_id)


def _actor(environ: dict[str, str]) -> str:
    """The systemd unit when run by systemd (``$INVOCATION_ID`` is set), else ``cli``."""
    return "inferbox-batch.service" if environ.get("INVOCATION_ID") else "cli"


@batch.command()
@state_options
@click.option("--once", "mode", flag_value="once", default=True, help="Work until nothing is left, then exit.")
@click.option("--watch", "mode", flag_value="watch", help="Keep working the spool until SIGTERM.")
@click.option("--engine", type=click.Choice(["local", "dask"]), default="local", show_default=True)
@click.option("--scheduler", default=None, help="Dask scheduler (tcp://host:8786) [default: a local cluster].")
@click.option("--dask-workers", type=int, default=2, show_default=True, help="Workers of the local Dask cluster.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Records per chunk.")
@click.option("--lease-seconds", type=click.FloatRange(min=1), default=600.0, show_default=True)
@click.option("--poll-seconds", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="--watch pause.")
@click.option("--loader", default=DEFAULT_LOADER, hidden=True, help="module:function(settings) -> model loader.")
def run(
    home: Path | None,
    repository: Path | None,
    mode: str,
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
    from appliance.batch.worker import BatchWorker, WorkerConfig

    settings = build_settings(home=home, repository=repository)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if scheduler and engine != "dask":
        raise BatchError("--scheduler needs --engine dask")
    factory = functools.partial(settings_loader, loader, settings)
    audit = None
    if settings.audit:
        from appliance.audit import AuditLog
        from appliance.server import ensure_signing_key

        ensure_signing_key(settings)
        audit = AuditLog.open(settings)
    store = JobStore(settings.state_db)
    worker = BatchWorker(
        spool=settings.spool,
        outbox=settings.outbox,
        store=store,
        loader=factory(),
        audit=audit,
        config=WorkerConfig(
            chunk_size=chunk_size,
            batch_size=settings.max_batch_size,
            lease_s=lease_seconds,
            truncate=settings.truncate,
        ),
        actor=_actor(dict(os.environ)),
    )
    runner: Any = worker
    if engine == "dask":
        from appliance.batch.dask_engine import DaskEngine

        runner = DaskEngine(
            worker,
            factory,
            scheduler=scheduler,
            n_workers=dask_workers,
        )
    try:
        if mode == "once":
            summary = runner.run_once()
            click.echo(
                f"accepted {len(summary.accepted)} job(s), ran {summary.chunks} chunk(s), "
                f"finished {len(summary.finished)}, failed {len(summary.failed)}"
            )
        else:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            while not stop.is_set():
                summary = runner.run_once()
                if not (summary.accepted or summary.chunks):
                    stop.wait(poll_seconds)
    finally:
        store.close()
        if audit is not None:
            audit.close()


@batch.command()
@state_options
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(home: Path | None, repository: Path | None, job_id: str | None, as_json: bool) -> None:
    """Show jobs (or one JOB): state, chunks done, records, ok, rejected; queued spool entries too."""
    import msgspec

    from appliance.batch.jobs import JobStore
    from appliance.batch.spool import pending

    settings = build_settings(home=home, repository=repository)
    queued = [p.name for p in pending(settings.spool)]
    store = JobStore(settings.state_db)
    try:
        if job_id is not None and job_id not in queued:
            jobs = [store.require_job(job_id)]
        else:
            jobs = [] if job_id is not None else store.jobs()
    finally:
        store.close()
    if job_id is not None:
        queued = [q for q in queued if q == job_id]
    if as_json:
        body = {"jobs": [msgspec.to_builtins(j) for j in jobs], "spooled": queued}
        click.echo(json.dumps(body, indent=2))
        return
    for q in queued:
        click.echo(f"{q}  spooled (waiting for `inferbox batch run`)")
    for j in jobs:
        line = (
            f"{j.job_id}  {j.state:<7} model {j.model}{'' if j.version is None else f' v{j.version}'}  "
            f"chunks {j.chunks_done}/{j.chunks}  records {j.records}  ok {j.ok}  rejected {j.rejected}"
        )
        if j.state == "done":
            line += f"  -> {j.out_dir}"
        if j.error:
            line += f"\n    error: {j.error}"
        click.echo(line)
    if not queued and not jobs:
        click.echo("no batch jobs")
