"""The Dask engine when the machine fails, not a chunk: an unreachable or lost scheduler, one with
no worker, a local cluster that cannot start, a stop (SIGTERM) mid-job.  Chunks are given back
without spending their attempts; a task that kills its workers still spends one; an input
changed after accept fails the job at once, as the local engine does."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import distributed
import pytest

from appliance.batch import fake
from appliance.batch.dask_engine import DaskEngine, local_cluster
from appliance.batch.jobs import JobStore
from runtime.errors import BatchError
from tests.appliance.test_batch_dask import _one_job

#: nothing listens here (the ports this project's tests may use: 18120-18124 on 127.0.0.1)
NOWHERE = "tcp://127.0.0.1:18120"


def _chunks(store: JobStore) -> list[tuple[str, int]]:
    return [(r["state"], r["attempts"]) for r in store._rows("SELECT state, attempts FROM batch_chunks ORDER BY idx")]


def _factory(delay_s: float = 0.0) -> Any:
    return functools.partial(functools.partial, fake.loader, delay_s=delay_s)


@contextlib.contextmanager
def _bare_scheduler() -> Iterator[Any]:
    """A scheduler without any worker, on a random loopback port, no HTTP route."""
    with (
        dask.config.set({"distributed.scheduler.http.routes": []}),
        distributed.LocalCluster(
            n_workers=0,
            processes=False,
            protocol="tcp://",
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        ) as cluster,
    ):
        yield cluster


def _run_guarded(engine: DaskEngine, cluster: Any) -> BaseException | None:
    """``engine.run_once()`` in a thread; a run that never ends (the defect) is ended by closing
    the cluster under it, and fails the test."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            engine.run_once()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    hung = thread.is_alive()
    if hung:
        cluster.close()
        thread.join(120)
    assert not hung, "the run waited for good on a scheduler without workers"
    return raised[0] if raised else None


def test_an_unreachable_scheduler_spends_no_attempt(tmp_path: Path) -> None:
    # the batch service restarts a run every 20 s: three runs while the scheduler was down used to
    # spend chunk 0's three attempts, and the next run failed the job as if the chunk killed workers
    job_id, store, worker = _one_job(tmp_path, 4)
    engine = DaskEngine(worker, _factory(), scheduler=NOWHERE)
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
            for _ in range(4):
                with pytest.raises(BatchError, match=r"cannot reach the Dask scheduler tcp://127\.0\.0\.1:18120"):
                    engine.run_once()
        assert _chunks(store) == [("pending", 0), ("pending", 0)]
        assert store.require_job(job_id).state == "running"
        # the scheduler is back: the job runs to the end
        assert DaskEngine(worker, _factory(), n_workers=1).run_once().finished == [job_id]
    finally:
        store.close()


def test_a_lost_scheduler_gives_the_chunks_in_flight_back_with_their_attempts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, store, worker = _one_job(tmp_path, 24)
    with local_cluster(n_workers=1) as doomed:
        closed: list[bool] = []

        def progress(event: str) -> None:
            if event.startswith("completed") and not closed:
                closed.append(True)
                doomed.close()  # the scheduler goes away with chunks in flight

        worker.progress = progress
        engine = DaskEngine(worker, _factory(0.2), scheduler=doomed.scheduler_address)
        try:
            with pytest.raises(BatchError, match=r"lost the connection to the Dask scheduler"):
                engine.run_once()
            chunks = _chunks(store)
            assert ("done", 1) in chunks
            assert {c for c in chunks if c[0] != "done"} == {("pending", 0)}  # not spent, not left leased
            # Dask's own reports of the loss come as one line each, without its stack traces
            dask_records = [r for r in caplog.records if r.name.startswith("distributed")]
            assert any(r.levelname == "ERROR" for r in dask_records)
            assert not [r for r in dask_records if r.exc_info or "\n" in r.getMessage()]
        finally:
            store.close()


def test_a_task_that_kills_its_worker_still_spends_an_attempt(tmp_path: Path) -> None:
    # KilledWorker is the chunk's fault (a record that crashes the model): attempts count, the job fails
    job_id, store, worker = _one_job(tmp_path, 2, max_attempts=1)
    killer = functools.partial(os._exit, 3)  # the factory kills the Dask worker process running the task
    try:
        with (
            dask.config.set({"distributed.scheduler.allowed-failures": 0}),
            local_cluster(n_workers=1) as cluster,
        ):
            summary = DaskEngine(worker, killer, scheduler=cluster.scheduler_address).run_once()
        assert summary.failed == [job_id]
        assert _chunks(store) == [("failed", 1)]
        assert "KilledWorker" in store.require_job(job_id).error
    finally:
        store.close()


@contextlib.contextmanager
def _worker_without_nanny(address: str) -> Iterator[subprocess.Popen[bytes]]:
    """A ``dask worker --no-nanny`` process on ``address`` (nothing restarts it when it dies)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny", "--nthreads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_chunk_that_kills_a_worker_without_nanny_spends_an_attempt(tmp_path: Path) -> None:
    # A worker started without a nanny is not restarted, so Dask never says KilledWorker: the run
    # ends with "no worker". Before, that gave the chunk back unspent, and every restart ran the
    # chunk that kills workers again, for good.
    job_id, store, worker = _one_job(tmp_path, 2, max_attempts=1)
    killer = functools.partial(os._exit, 3)  # the factory kills the Dask worker process running the task
    try:
        with _bare_scheduler() as cluster, _worker_without_nanny(cluster.scheduler_address) as proc:
            with distributed.Client(cluster.scheduler_address) as client:
                client.wait_for_workers(1, timeout=60)
            engine = DaskEngine(worker, killer, scheduler=cluster.scheduler_address, worker_wait_s=1.0)
            raised = _run_guarded(engine, cluster)
            assert proc.wait(30) == 3
        assert isinstance(raised, BatchError) and "has had no worker for 1 s" in str(raised)
        job = store.require_job(job_id)
        assert _chunks(store) == [("failed", 1)] and job.state == "failed"
        assert "the Dask worker running it went away mid-chunk (died, or was stopped)" in job.error
    finally:
        store.close()


def test_a_scheduler_without_workers_ends_the_run_with_one_line(tmp_path: Path) -> None:
    _, store, worker = _one_job(tmp_path, 4)
    try:
        with _bare_scheduler() as cluster:
            engine = DaskEngine(worker, _factory(), scheduler=cluster.scheduler_address, worker_wait_s=0.5)
            raised = _run_guarded(engine, cluster)
        assert isinstance(raised, BatchError)
        message = str(raised)
        assert f"the Dask scheduler {cluster.scheduler_address} has no worker for 0.5 s" in message
        assert "start workers on it (dask worker tcp://" in message and "\n" not in message
        assert _chunks(store) == [("pending", 0), ("pending", 0)]
    finally:
        store.close()


def test_workers_that_all_leave_mid_job_end_the_run(tmp_path: Path) -> None:
    job_id, store, worker = _one_job(tmp_path, 16, lease_s=3.0)
    try:
        with local_cluster(n_workers=1) as cluster:
            gone: list[bool] = []

            def progress(event: str) -> None:
                if event.startswith("completed") and not gone:
                    gone.append(True)
                    cluster.scale(0)  # the only worker leaves; its chunks wait on the scheduler

            worker.progress = progress
            engine = DaskEngine(worker, _factory(0.3), scheduler=cluster.scheduler_address, worker_wait_s=1.0)
            raised = _run_guarded(engine, cluster)
        assert isinstance(raised, BatchError)
        assert "has had no worker for 1 s" in str(raised)
        chunks = _chunks(store)
        assert ("done", 1) in chunks and ("leased", 1) not in chunks
        # the chunks that were on the worker spent their attempt (Dask counts a worker that leaves
        # while running a task against the task, as when it dies); those still queued did not
        assert ("pending", 1) in chunks and ("pending", 0) in chunks
        assert {c for c in chunks if c[0] != "done"} == {("pending", 0), ("pending", 1)}
        assert store.require_job(job_id).state == "running"
    finally:
        store.close()


def test_an_input_changed_after_accept_fails_the_job_at_once(tmp_path: Path) -> None:
    # as the local engine: no retry (before: 3 attempts with backoffs, then "batch retry" advised,
    # which can never help)
    job_id, store, worker = _one_job(tmp_path, 20, chunk_size=5, retry_backoff_s=0.0)
    try:
        worker.accept_new()
        path = Path(store.require_job(job_id).input_path)
        lines = path.read_bytes().split(b"\n")
        lines[2] = lines[2][:5] + b"\n" + lines[2][5:]  # one record of chunk 0 split in two
        path.write_bytes(b"\n".join(lines))
        with local_cluster(n_workers=1) as cluster:
            summary = DaskEngine(worker, _factory(), scheduler=cluster.scheduler_address).run_once()
        job = store.require_job(job_id)
        assert summary.failed == [job_id] and job.state == "failed"
        # the byte inserted in chunk 0 moves every later chunk too, and the cluster runs chunks side
        # by side: whichever changed chunk fails first names itself (chunk 1 did once under
        # pytest-xdist); none is tried twice
        assert re.match(r"chunk \d+ of .+ the input file changed after it was accepted", job.error), job.error
        assert "failed 3 times" not in job.error and "batch retry" not in job.error
        chunks = _chunks(store)
        assert ("failed", 1) in chunks and all(attempts <= 1 for _, attempts in chunks), chunks
    finally:
        store.close()


def test_a_stop_mid_job_submits_no_more_chunks(tmp_path: Path) -> None:
    # --watch and SIGTERM: before, the engine ran every chunk of the spool before it stopped
    job_id, store, worker = _one_job(tmp_path, 40)
    stop = threading.Event()

    def progress(event: str) -> None:
        if event.startswith("completed"):
            stop.set()

    worker.progress = progress
    try:
        with local_cluster(n_workers=2) as cluster:
            DaskEngine(worker, _factory(0.1), scheduler=cluster.scheduler_address).watch(stop, 0.05)
        chunks = _chunks(store)
        done = [c for c in chunks if c[0] == "done"]
        assert 1 <= len(done) <= 8  # the first, and those in flight then (2 workers x 2)
        assert {c for c in chunks if c[0] != "done"} == {("pending", 0)}
        assert store.require_job(job_id).state == "running"
    finally:
        store.close()


def test_a_local_cluster_that_cannot_start_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a LocalCluster that cannot start (as in a network namespace whose loopback is down, where the
    # reviewer saw it). Before: a 107-line traceback, exit 1, and an attempt of the chunk spent
    from click.testing import CliRunner

    from appliance.cli import main

    def cannot_start(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Cluster failed to start: Timed out trying to connect to tcp://127.0.0.1:1 after 1 s")

    monkeypatch.setattr(distributed, "LocalCluster", cannot_start)
    for name in [k for k in os.environ if k.startswith("INFERBOX_")]:
        monkeypatch.delenv(name)
    env = {"INFERBOX_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n')
    runner = CliRunner()
    assert runner.invoke(main, ["batch", "submit", str(src), "--model", "fake-embed"], env=env).exit_code == 0
    loader = ["--loader", "appliance.batch.fake:settings_loader"]
    run = runner.invoke(main, ["batch", "run", "--once", "--engine", "dask", *loader], env=env)
    assert run.exit_code == 2, run.output
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot start a local Dask cluster on 127.0.0.1" in errors[0], run.output
    assert "--engine local" in errors[0]
    assert "Traceback" not in run.output
    store = JobStore(tmp_path / "home" / "state.db")
    try:
        assert _chunks(store) == [("pending", 0)]
    finally:
        store.close()
