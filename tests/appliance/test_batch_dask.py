"""The Dask engine: same outputs as the local worker, one model per worker, survives a killed worker."""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from distributed import Client

from appliance.batch import fake
from appliance.batch.dask_engine import DaskEngine, loaded_models, local_cluster
from appliance.batch.jobs import JobStore
from appliance.batch.spool import submit
from appliance.batch.worker import BatchWorker, WorkerConfig

from .batch_box import Audit

CONFIG = WorkerConfig(chunk_size=5, batch_size=2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with local_cluster(n_workers=2) as c:
        yield c


def _inputs(tmp: Path) -> list[tuple[Path, str]]:
    lines = [
        json.dumps({"id": f"r{i}", "text": f"text {i}"}) if i % 7 else '{"id": 1, "text": null}' for i in range(37)
    ]
    a = tmp / "a.jsonl"
    a.write_text("\n".join(lines) + "\n")
    b = tmp / "b.parquet"
    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(12)], "text": [f"t{i}" if i != 3 else None for i in range(12)]}), b
    )
    return [(a, "fake-embed"), (b, "fake-classify")]


def _run(root: Path, inputs: list[tuple[Path, str]], engine: str, **kw: Any) -> dict[str, dict[str, bytes]]:
    store = JobStore(root / "state.db")
    jobs = [submit(root / "spool", path, model=model) for path, model in inputs]
    worker = BatchWorker(
        spool=root / "spool",
        outbox=root / "outbox",
        store=store,
        loader=fake.loader,
        config=CONFIG,
        progress=kw.pop("progress", None),
    )
    if engine == "local":
        worker.run_once()
    else:
        DaskEngine(worker, kw.pop("factory"), **kw).run_once()
    try:
        assert store.integrity_check() == "ok"
        out = {}
        for i, job_id in enumerate(jobs):
            assert store.require_job(job_id).state == "done"
            folder = root / "outbox" / job_id
            files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "job.json"}
            summary = json.loads((folder / "job.json").read_text())
            files["summary"] = json.dumps({k: v for k, v in summary.items() if k != "job_id"}).encode()
            out[f"job{i}"] = files
        return out
    finally:
        store.close()


def test_dask_engine_gives_the_local_outputs_with_one_model_per_worker(tmp_path: Path, cluster: Any) -> None:
    inputs = _inputs(tmp_path)
    local = _run(tmp_path / "local", inputs, "local")
    factory = functools.partial(functools.partial, fake.loader, delay_s=0.0)
    dask = _run(tmp_path / "dask", inputs, "dask", factory=factory, scheduler=cluster.scheduler_address)
    assert dask == local
    assert sorted(local["job0"]) == [f"part-{i:05d}.jsonl" for i in range(8)] + ["rejects.jsonl", "summary"]
    with Client(cluster.scheduler_address) as client:
        per_worker = client.run(loaded_models)
    loads = [load for info in per_worker.values() for load in info["loads"]]
    # each worker process opened each model at most once, however many chunks it ran
    for info in per_worker.values():
        assert len(info["loads"]) == len(set(info["loads"])) == info["cached"]
    assert {name for name, _ in loads} <= {"fake-embed", "fake-classify"}


def test_dask_engine_survives_a_worker_killed_mid_job(tmp_path: Path, cluster: Any) -> None:
    inputs = _inputs(tmp_path)
    local = _run(tmp_path / "local", inputs, "local")
    with Client(cluster.scheduler_address) as client:
        pids = sorted(client.run(os.getpid).values())
    assert len(pids) == 2
    killed: list[int] = []

    def progress(event: str) -> None:
        if event.startswith("completed") and not killed:
            os.kill(pids[0], signal.SIGKILL)  # the other worker is busy too: chunks are in flight on both
            killed.append(pids[0])

    factory = functools.partial(functools.partial, fake.loader, delay_s=0.05)
    dask = _run(
        tmp_path / "dask", inputs, "dask", factory=factory, scheduler=cluster.scheduler_address, progress=progress
    )
    assert killed == [pids[0]]
    assert dask == local
    with Client(cluster.scheduler_address) as client:
        client.wait_for_workers(2, timeout=60)
        assert pids[0] not in client.run(os.getpid).values()  # the nanny started a new process


def test_cli_batch_run_engine_dask(tmp_path: Path, cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from appliance.cli import main

    for key in list(os.environ):
        if key.startswith("INFERBOX_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(7)))
    runner = CliRunner()
    r = runner.invoke(main, ["batch", "submit", str(src), "--model", "fake-embed", "--home", str(home)])
    job_id = r.stdout.strip()
    args = ["batch", "run", "--once", "--engine", "dask", "--scheduler", cluster.scheduler_address, "--chunk-size", "3"]
    r = runner.invoke(main, [*args, "--home", str(home), "--loader", "appliance.batch.fake:settings_loader"])
    assert r.exit_code == 0, r.output
    assert "ran 3 chunk(s), finished 1" in r.output
    summary = json.loads((home / "outbox" / job_id / "job.json").read_text())
    assert (summary["ok"], summary["rejected"]) == (7, 0)
    r = runner.invoke(main, ["batch", "run", "--scheduler", "tcp://127.0.0.1:1", "--home", str(home)])
    assert r.exit_code == 2 and "--scheduler needs --engine dask" in r.output


def _one_job(root: Path, records: int, chunk_size: int = 2, **config: Any) -> tuple[str, JobStore, BatchWorker]:
    src = root / "in.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(records)))
    job_id = submit(root / "spool", src, model="fake-embed")
    store = JobStore(root / "state.db")
    worker = BatchWorker(
        spool=root / "spool",
        outbox=root / "outbox",
        store=store,
        loader=fake.loader,
        config=WorkerConfig(chunk_size=chunk_size, batch_size=chunk_size, **config),
    )
    return job_id, store, worker


def test_dask_engine_keeps_the_lease_of_a_chunk_queued_on_the_cluster(tmp_path: Path, cluster: Any) -> None:
    # 8 chunks of 3 s each, 6 in flight on 2 workers: most wait on the cluster longer than the
    # 3 s lease; before, the coordinator leased them again while they waited (each ran twice, and
    # a chunk leased 3 times failed its job as if its worker had died).  (A 1 s lease, renewed every
    # 0.33 s, expired whenever one pass of the coordinator stalled 0.67 s on a busy box.)
    job_id, store, worker = _one_job(tmp_path, 16, lease_s=3.0, max_attempts=3)
    submitted: list[int] = []
    factory = functools.partial(functools.partial, fake.loader, delay_s=3.0)
    engine = DaskEngine(
        worker,
        factory,
        scheduler=cluster.scheduler_address,
        in_flight_per_thread=3,
        on_submit=lambda task: submitted.append(task.plan.idx),
    )
    try:
        summary = engine.run_once()
        assert sorted(submitted) == list(range(8))
        assert (summary.chunks, summary.finished, summary.failed) == (8, [job_id], [])
        assert {c["attempts"] for c in store._rows("SELECT attempts FROM batch_chunks")} == {1}
    finally:
        store.close()


def test_dask_engine_that_loses_its_scheduler_says_so_and_gives_the_chunks_back(tmp_path: Path) -> None:
    from runtime.errors import BatchError

    job_id, store, worker = _one_job(tmp_path, 24)
    with local_cluster(n_workers=1) as doomed:
        closed: list[bool] = []

        def progress(event: str) -> None:
            if event.startswith("completed") and not closed:
                closed.append(True)
                doomed.close()  # the scheduler goes away with chunks in flight

        worker.progress = progress
        factory = functools.partial(functools.partial, fake.loader, delay_s=0.2)
        engine = DaskEngine(worker, factory, scheduler=doomed.scheduler_address)
        try:
            with pytest.raises(BatchError, match=r"lost the connection to the Dask scheduler .*run the command again"):
                engine.run_once()
            rows = store._rows("SELECT state FROM batch_chunks")
            assert "leased" not in {r["state"] for r in rows}  # the next run takes them at once
            assert store.require_job(job_id).state == "running"
        finally:
            store.close()


def test_dask_engine_starts_no_cluster_for_nothing_and_one_for_a_whole_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from appliance.batch import dask_engine

    started: list[int] = []
    real = dask_engine.local_cluster

    def counting(n_workers: int = 2) -> Any:
        started.append(n_workers)
        return real(n_workers)

    monkeypatch.setattr(dask_engine, "local_cluster", counting)
    root = tmp_path / "home"
    store = JobStore(root / "state.db")
    worker = BatchWorker(spool=root / "spool", outbox=root / "outbox", store=store, loader=fake.loader, config=CONFIG)
    factory = functools.partial(functools.partial, fake.loader)
    engine = DaskEngine(worker, factory, n_workers=1)
    try:
        assert engine.run_once().chunks == 0
        assert started == []  # an empty spool (the nightly timer) starts no cluster
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(7)))
        first = submit(root / "spool", src, model="fake-embed")
        stop = threading.Event()
        watching = threading.Thread(target=engine.watch, args=(stop, 0.05))
        watching.start()
        second = None
        try:
            deadline = time.monotonic() + 300  # a LocalCluster start and two jobs, on a busy box
            while time.monotonic() < deadline:
                if second is None and (j := store.job(first)) is not None and j.state == "done":
                    second = submit(root / "spool", src, model="fake-embed")  # after some idle rounds
                if second is not None and (k := store.job(second)) is not None and k.state == "done":
                    break
                stop.wait(0.1)
        finally:
            stop.set()
            watching.join(60)
        assert second is not None and store.require_job(second).state == "done"
        assert started == [1]  # one cluster for the whole watch, not one per round
        assert engine.client is None  # and closed when stopped
    finally:
        store.close()


def test_dask_worker_refuses_a_variant_other_than_the_one_the_audit_log_records(tmp_path: Path, cluster: Any) -> None:
    # the coordinator opens the package as "fake" (batch_start / batch_end record that variant);
    # a Dask worker on other hardware opens it as another: before, its outputs went into the job
    job_id, store, worker = _one_job(tmp_path, 4, max_attempts=1)
    worker.audit = audit = Audit()
    factory = functools.partial(functools.partial, fake.loader, variant="int8-elsewhere")
    try:
        summary = DaskEngine(worker, factory, scheduler=cluster.scheduler_address).run_once()
        assert summary.failed == [job_id] and summary.chunks == 0
        error = store.require_job(job_id).error
        assert "opened on this Dask worker as fake int8-elsewhere" in error
        assert "runs on fake fake" in error and "a job never mixes variants" in error
        # both chunks failed in flight: the job failed once, with one batch_end, which names the
        # variant the job runs on (the coordinator's, as batch_start does)
        assert [(e.event, e.outcome, e.variant) for e in audit.events] == [
            ("batch_start", "success", "fake"),
            ("batch_end", "failure", "fake"),
        ]
    finally:
        store.close()


def test_a_chunk_failing_after_another_failed_its_job_does_not_fail_it_again(tmp_path: Path) -> None:
    # on Dask several chunks of a job are in flight: each failing at its last attempt used to
    # fail the job again (a second batch_end failure event, the job twice in the summary)
    job_id, store, worker = _one_job(tmp_path, 4, max_attempts=1)
    try:
        worker.accept_new()
        leases = [worker.lease(), worker.lease()]
        assert all(lease is not None for lease in leases)
        failed = [store.release(job_id, i, error="boom", max_attempts=1) for i in (0, 1)]
        assert failed == [True, False]
        assert store.require_job(job_id).error.startswith("chunk 0 failed 1 times: boom")
    finally:
        store.close()


def test_batch_status_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBOX_")}
    home = tmp_path / "home"
    (home / "spool").mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "batch", "status", "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 141, err
    assert "error:" not in err and "Traceback" not in err
