"""Spool, job/chunk state, leases and recovery, and the ``inferbox batch`` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.batch import fake
from appliance.batch.jobs import Activity, JobStore
from appliance.batch.readers import plan_chunks
from appliance.batch.spool import accept, pending, read_request, submit
from appliance.batch.unit import run_chunk
from appliance.batch.worker import BatchWorker, WorkerConfig
from appliance.cli import main
from runtime.errors import BatchError


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def _input(tmp: Path, n: int = 10) -> Path:
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "text": f"t{i}"}) + "\n" for i in range(n)))
    return src


def _worker(root: Path, store: JobStore, clock: Clock, worker_id: str, loads: list[str] | None = None) -> BatchWorker:
    def load(name: str, version: int | None) -> fake.FakeModel:
        if loads is not None:
            loads.append(name)
        return fake.loader(name, version)

    return BatchWorker(
        spool=root / "spool",
        outbox=root / "outbox",
        store=store,
        loader=load,
        config=WorkerConfig(chunk_size=4, batch_size=2, lease_s=60),
        worker_id=worker_id,
        clock=clock,
    )


def test_submit_is_atomic_and_accept_is_idempotent(tmp_path: Path) -> None:
    src = _input(tmp_path)
    job_id = submit(
        tmp_path / "spool", src, model="fake-embed", version=2, text_field="body", now=lambda: 1_796_673_633.0
    )
    assert [p.name for p in pending(tmp_path / "spool")] == [job_id]
    assert list((tmp_path / "spool/tmp").iterdir()) == []
    req = read_request(tmp_path / "spool/new" / job_id)
    assert (req.model, req.version, req.format, req.text_field) == ("fake-embed", 2, "jsonl", "body")
    assert req.submitted_at == "2026-12-07T20:00:33.000000Z"  # the width of every other time of the job
    cur = accept(tmp_path / "spool", job_id)
    assert accept(tmp_path / "spool", job_id) == cur  # a second accept after a crash is fine
    assert pending(tmp_path / "spool") == []
    with pytest.raises(BatchError, match="submit it again"):
        accept(tmp_path / "spool", "no-such-job")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": ""}, "pass --model"),
        ({"model": "m", "version": 0}, "versions are integers from 1"),
        ({"model": "m", "fmt": "xml"}, "not one of jsonl, csv, parquet"),
    ],
)
def test_submit_refuses_bad_requests_with_the_fix(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BatchError, match=message):
        submit(tmp_path / "spool", _input(tmp_path), **kwargs)  # type: ignore[arg-type]


def test_submit_needs_a_known_suffix_or_format(tmp_path: Path) -> None:
    src = tmp_path / "data.txt"
    src.write_text("x\n")
    with pytest.raises(BatchError, match="--format jsonl"):
        submit(tmp_path / "spool", src, model="m")
    assert submit(tmp_path / "spool", src, model="m", fmt="jsonl")


def test_an_expired_lease_is_taken_again_and_done_once(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "state.db", clock=clock)
    job_id = submit(tmp_path / "spool", _input(tmp_path), model="fake-embed")
    a = _worker(tmp_path, store, clock, "otherhost:1")
    a.accept_new()
    lease = store.lease("otherhost:1", 60)
    assert lease is not None and lease.plan.idx == 0 and lease.attempts == 1
    # worker a "hangs"; b runs the rest but cannot take chunk 0 while a's lease is live
    b = _worker(tmp_path, store, clock, "otherhost:2")
    summary = b.run_once()
    assert summary.chunks == 2 and summary.finished == []
    assert store.require_job(job_id).state == "running"
    clock.t += 61  # a's lease expires
    summary = b.run_once()
    assert summary.chunks == 1 and summary.finished == [job_id]
    rows = {r["idx"]: r for r in store._rows("SELECT idx, attempts, worker, state FROM batch_chunks")}
    assert rows[0]["attempts"] == 2 and rows[0]["worker"] == "otherhost:2"
    assert all(r["state"] == "done" for r in rows.values())
    # a wakes up and reports its chunk: it is already done, nothing changes
    assert store.complete(job_id, 0, part="part-00000.jsonl", ok=4, rejected=0, digests=[]) is False
    assert store.require_job(job_id).ok == 10
    store.close()


def test_activity_says_whether_a_worker_is_at_a_job_now(tmp_path: Path) -> None:
    """A job stays "running" once started; what `batch status` adds is whether anything runs it."""
    clock = Clock()
    store = JobStore(tmp_path / "state.db", clock=clock)
    job_id = submit(tmp_path / "spool", _input(tmp_path), model="fake-embed")
    _worker(tmp_path, store, clock, "otherhost:1").accept_new()
    assert store.activity() == {job_id: Activity(held=0, retry_at=None)}  # queued, nothing at it
    lease = store.lease("otherhost:1", 60)
    assert lease is not None
    assert store.activity()[job_id].held == 1
    clock.t += 61  # the worker died: its lease ran out
    assert store.activity()[job_id].held == 0
    assert not store.release(job_id, 0, error="boom", max_attempts=3, retry_after_s=25)  # not failed: retried
    assert store.activity() == {job_id: Activity(held=0, retry_at=clock.t + 25)}
    clock.t += 26  # its time has come: nothing waits on a clock any more
    assert store.activity() == {job_id: Activity(held=0, retry_at=None)}
    _worker(tmp_path, store, clock, "otherhost:2").run_once()
    assert store.require_job(job_id).state == "done" and store.activity() == {}  # only unfinished jobs
    store.close()


def test_a_signal_as_a_transaction_begins_leaves_none_open(tmp_path: Path) -> None:
    """Ctrl-C (or `batch run --once`'s SIGTERM) handled just as BEGIN IMMEDIATE returned left the
    transaction open, and the give-back after it could not start its own."""
    clock = Clock()
    store = JobStore(tmp_path / "state.db", clock=clock)
    job_id = submit(tmp_path / "spool", _input(tmp_path), model="fake-embed")
    _worker(tmp_path, store, clock, "otherhost:1").accept_new()
    assert store.lease("otherhost:1", 60) is not None
    real = store._conn

    class Interrupted:
        """The connection, with a KeyboardInterrupt raised as its BEGIN returns."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def execute(self, sql: str, *args: Any) -> Any:
            cursor = real.execute(sql, *args)
            if sql.startswith("BEGIN"):
                raise KeyboardInterrupt
            return cursor

    store._conn = Interrupted()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        store.give_back(job_id, 0, "otherhost:1")
    store._conn = real
    assert not real.in_transaction
    assert store.expire_worker("otherhost:1", spent=False) == 1  # the give-back that follows a stop
    store.close()


def test_an_input_gone_from_the_spool_fails_its_job_but_a_missing_mount_does_not(tmp_path: Path) -> None:
    """A removed input fails its job at once (InputChangedError); a Dask worker that lacks the spool
    mount altogether (no cur/ there) is not told so: its attempt fails and another worker may run it."""
    from appliance.batch.readers import InputChangedError, read_chunk

    src = _input(tmp_path, 4)
    plan = plan_chunks(src, "jsonl", 4)[0]
    job = tmp_path / "spool" / "cur" / "job-1"
    job.mkdir(parents=True)
    with pytest.raises(InputChangedError, match="is gone"):
        list(read_chunk(job / "input.jsonl", "jsonl", plan))
    with pytest.raises(FileNotFoundError):
        list(read_chunk(tmp_path / "not-mounted" / "cur" / "job-1" / "input.jsonl", "jsonl", plan))
    assert [r for r in read_chunk(src, "jsonl", plan)]  # the file itself reads


def test_a_dead_local_workers_lease_is_reclaimed_at_once(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "state.db", clock=clock)
    job_id = submit(tmp_path / "spool", _input(tmp_path), model="fake-embed")
    w = _worker(tmp_path, store, clock, "x")
    w.accept_new()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    assert store.lease(f"{w.host}:{dead_pid}", 3600) is not None
    assert store.lease(f"{w.host}:{os.getpid()}", 3600) is not None  # alive (this process): kept
    fresh = _worker(tmp_path, store, clock, f"{w.host}:{os.getpid()}")
    assert fresh.reclaim_dead() == 1
    summary = fresh.run_once()
    assert summary.chunks == 2  # the reclaimed chunk 0 and chunk 2; chunk 1 is leased by a live worker
    clock.t += 3601
    assert fresh.run_once().finished == [job_id]
    store.close()


def test_a_chunk_renamed_before_a_crash_is_verified_not_recomputed(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "state.db", clock=clock)
    job_id = submit(tmp_path / "spool", _input(tmp_path), model="fake-embed")
    loads: list[str] = []
    w = _worker(tmp_path, store, clock, "otherhost:9", loads)
    w.accept_new()
    lease = store.lease("otherhost:9", 60)
    assert lease is not None
    model = fake.loader("fake-embed")
    run_chunk(w.task_for(lease), model)  # files renamed into place, then "crash" before complete()
    assert model.calls == 2
    clock.t += 61
    other = fake.FakeModel()
    w2 = BatchWorker(
        spool=tmp_path / "spool",
        outbox=tmp_path / "outbox",
        store=store,
        loader=lambda n, v: other,
        config=WorkerConfig(chunk_size=4, batch_size=2),
        worker_id="otherhost:10",
        clock=clock,
    )
    w2.run_once()
    assert other.calls == 3  # chunk 1 (2 calls) and chunk 2 (1 call); chunk 0 was verified from its files
    job = store.require_job(job_id)
    assert (job.state, job.ok) == ("done", 10)
    store.close()


def test_a_failing_chunk_fails_its_job_after_max_attempts(tmp_path: Path) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "state.db", clock=clock)
    job_id = submit(tmp_path / "spool", _input(tmp_path, 3), model="fake-embed")

    class Broken(fake.FakeModel):
        def embed_tokens(self, tokens):  # type: ignore[no-untyped-def]
            raise RuntimeError("device lost")

    w = BatchWorker(
        spool=tmp_path / "spool",
        outbox=tmp_path / "outbox",
        store=store,
        loader=lambda n, v: Broken(),
        config=WorkerConfig(max_attempts=3),
        worker_id="h:1",
        clock=clock,
        sleep=lambda s: setattr(clock, "t", clock.t + s),  # the retry backoff passes on the test clock
    )
    summary = w.run_once()
    assert summary.failed == [job_id]
    job = store.require_job(job_id)
    assert job.state == "failed" and "failed 3 times: RuntimeError: device lost" in job.error
    store.close()


def test_plan_refuses_chunk_size_zero(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match="chunk size"):
        plan_chunks(_input(tmp_path), "jsonl", 0)


def test_cli_submit_run_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("INFERBOX_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    runner = CliRunner()
    src = tmp_path / "in.csv"
    src.write_text("id,body\n1,hello\n2,\n3,world\n")
    r = runner.invoke(
        main, ["batch", "submit", str(src), "--model", "fake-embed", "--text-field", "body", "--home", str(home)]
    )
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip()  # the job id alone on stdout; the warning on stderr, after it
    assert r.stderr.startswith("warning: model 'fake-embed' is not in the repository"), r.stderr
    assert "(models: none); the job fails when it runs unless it is installed first" in r.stderr, r.stderr
    r = runner.invoke(main, ["batch", "status", "--home", str(home)])
    assert f"{job_id}  spooled" in r.output
    sigterm = signal.getsignal(signal.SIGTERM)
    r = runner.invoke(
        main, ["batch", "run", "--once", "--home", str(home), "--loader", "appliance.batch.fake:settings_loader"]
    )
    assert r.exit_code == 0, r.output
    assert "accepted 1 job(s), ran 1 chunk(s), finished 1, failed 0" in r.output
    assert signal.getsignal(signal.SIGTERM) is sigterm  # a run in this process left its handler behind
    r = runner.invoke(main, ["batch", "status", job_id, "--json", "--home", str(home)])
    body = json.loads(r.output)
    assert body["spooled"] == []
    assert body["jobs"][0]["state"] == "done" and body["jobs"][0]["ok"] == 3
    r = runner.invoke(main, ["batch", "status", "nope", "--home", str(home)])
    assert r.exit_code == 2 and "no batch job 'nope'" in r.output
    # the audit log got the job's start and end
    from appliance.audit.log import AuditLog
    from appliance.settings import load_settings

    with AuditLog.open(load_settings({"home": home}, environ={})) as log:
        events = [(e.event, e.job_id, e.actor) for e in log.tail(10) if e.job_id]
        submitted = next(e for e in log.tail(10) if e.event == "batch_submit")
    # who put which file in the spool for which model: the input's HMAC, as `audit digest` checks it
    assert (submitted.model_name, submitted.details["input_file"]) == ("fake-embed", "in.csv")
    checked = runner.invoke(main, ["audit", "digest", "--seq", str(submitted.seq), str(src), "--home", str(home)])
    assert checked.exit_code == 0 and checked.output.startswith("match"), checked.output
    from appliance.commands.keys import cli_user

    who = f"cli:{cli_user()}"  # who ran it, as every other command's records say (it said "cli")
    assert events == [("batch_submit", job_id, who), ("batch_start", job_id, who), ("batch_end", job_id, who)]


def test_watch_works_jobs_until_stopped(tmp_path: Path) -> None:
    import threading

    store = JobStore(tmp_path / "state.db")
    stop = threading.Event()
    finished: list[str] = []

    def progress(event: str) -> None:
        if event.startswith("finished"):
            finished.append(event.split()[1])
            if len(finished) == 2:
                stop.set()

    w = BatchWorker(
        spool=tmp_path / "spool", outbox=tmp_path / "outbox", store=store, loader=fake.loader, progress=progress
    )
    jobs = [submit(tmp_path / "spool", _input(tmp_path), model="fake-embed")]
    thread = threading.Thread(target=w.watch, args=(stop,), kwargs={"poll_s": 0.01})
    thread.start()
    jobs.append(submit(tmp_path / "spool", _input(tmp_path, 3), model="fake-embed"))
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert sorted(finished) == sorted(jobs)
    store.close()


def test_submit_checks_the_csv_text_column(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("id,body\n1,hello\n")
    with pytest.raises(BatchError, match=r"has no column 'text' \(its header is \['id', 'body'\]\); pass --text-field"):
        submit(tmp_path / "spool", src, model="fake-embed")
    assert submit(tmp_path / "spool", src, model="fake-embed", text_field="body")


def test_submit_refuses_a_csv_with_two_columns_of_a_name_it_reads(tmp_path: Path) -> None:
    """id,text,text was taken, and the last 'text' column embedded without a word."""
    src = tmp_path / "in.csv"
    for header, name in (("id,text,text", "text"), ("id,id,text", "id"), ("q,d,q", "q")):
        src.write_text(f"{header}\n1,a,b\n")
        with pytest.raises(BatchError, match=rf"has 2 columns named '{name}' .*rename all but one"):
            submit(tmp_path / "spool", src, model="fake-embed", text_field="q" if name == "q" else "text")
    src.write_text("id,text,note,note\n1,a,b,c\n")  # a column it does not read may repeat
    assert submit(tmp_path / "spool", src, model="fake-embed")


def test_submit_refuses_a_parquet_file_without_the_text_column(tmp_path: Path) -> None:
    """A Parquet file without the column was taken, and each of its rows rejected (a 'done' job);
    only with --pair-field were the columns checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["a", "b"]}), src)
    with pytest.raises(BatchError, match=r"has no column 'text' \(its columns are \['id', 'body'\]\)"):
        submit(tmp_path / "spool", src, model="fake-embed", text_model=True)
    assert submit(tmp_path / "spool", src, model="fake-embed", text_field="body", text_model=True)
    # a tensor model's columns are its inputs, and a model not in the repository is not judged here
    tensor = tmp_path / "tensor.parquet"
    pq.write_table(pa.table({"id": [1], "x": [[1.0, 2.0, 3.0, 4.0]]}), tensor)
    assert submit(tmp_path / "spool", tensor, model="fake-tabular", text_model=False)
    assert submit(tmp_path / "spool", tensor, model="fake-tabular", text_model=None)


def test_submit_refuses_a_jsonl_file_whose_records_lack_the_text_field(tmp_path: Path) -> None:
    """CSV and Parquet files without the column were refused; a JSONL file whose records had no
    ``text`` was taken, every record rejected, and the job read "done"."""
    src = tmp_path / "notes.jsonl"
    src.write_text("not json\n" + "".join(f'{{"id": {i}, "note": "n"}}\n' for i in range(150)))
    with pytest.raises(BatchError, match=r"none of the first 99 records .* field 'text' .*\['id', 'note'\]"):
        submit(tmp_path / "spool", src, model="fake-embed", text_model=True)
    assert submit(tmp_path / "spool", src, model="fake-embed", text_field="note", text_model=True)
    assert submit(tmp_path / "spool", src, model="fake-tabular", text_model=None)  # a model not known here
    src.write_text('{"id": 1, "note": "n"}\n{"id": 2, "text": "t"}\n')  # some records have it: judged per record
    assert submit(tmp_path / "spool", src, model="fake-embed", text_model=True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"\x1f\x8b\x08\x00" + b"\x00" * 40,
            r"is a gzip file, not text; unpack it first \(`gzip -dc in.csv > unpacked.csv`\)",
        ),
        (b"PK\x03\x04" + b"\x00" * 40, r"is a zip \(or an Excel workbook\) file.*save it as CSV"),
        (b"ID;Text\r\n1;Schmerz\r\n", r"separated by ';', not by commas .* 'ID;Text'"),
        (b"id\ttext\n1\ta\n", "separated by a tab"),
    ],
)
def test_submit_names_a_compressed_or_semicolon_file_with_its_fix(tmp_path: Path, content: bytes, message: str) -> None:
    """A gzip file named .jsonl was told `pass --format jsonl`, then every record was rejected as
    garbage; a German Excel CSV (``;``) was told to pass --text-field 'ID;Text'."""
    src = tmp_path / "in.csv"
    src.write_bytes(content)
    with pytest.raises(BatchError, match=message):
        submit(tmp_path / "spool", src, model="fake-embed", text_model=True)


def test_what_a_killed_submit_left_in_spool_tmp_is_removed_after_a_day(tmp_path: Path) -> None:
    """A submit killed mid-copy left spool/tmp/<job>/input.jsonl (300 MB in a probe) for good."""
    import time

    from appliance.batch.spool import STALE_STAGING_S

    spool = tmp_path / "spool"
    dead, live = spool / "tmp/20260101T000000Z-dead0000", spool / "tmp/20260101T000000Z-live0000"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "input.jsonl").write_text('{"text": "half a cop')
    old = time.time() - STALE_STAGING_S - 60
    for path in (dead, dead / "input.jsonl", live):
        os.utime(path, (old, old))  # live's file is still being written: its time is now
    store = JobStore(tmp_path / "state.db")
    w = BatchWorker(spool=spool, outbox=tmp_path / "outbox", store=store, loader=fake.loader)
    try:
        w.accept_new()
    finally:
        store.close()
    assert sorted(p.name for p in (spool / "tmp").iterdir()) == [live.name]


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("in.jsonl", b"", "no JSON lines"),
        ("in.jsonl", b"\n  \n", "no JSON lines"),
        ("in.csv", b"id,text\n", "a header, no rows"),
        ("in.parquet", None, "0 rows"),
    ],
)
def test_submit_takes_a_file_without_records_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, content: bytes | None, said: str
) -> None:
    """An empty input's job ended "done" with 0 records, and nothing said the file was empty."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), src)
    else:
        src.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="appliance.batch.spool"):
        assert submit(tmp_path / "spool", src, model="fake-embed")
    said_so = [r.getMessage() for r in caplog.records if "holds no records" in r.getMessage()]
    assert len(said_so) == 1, said_so
    # the file the operator named (the spool's copy is gone once the job is in new/)
    assert said_so == [f"{src} holds no records ({said}): the job will finish with nothing to do"]
    caplog.clear()
    if content is None:
        pq.write_table(pa.table({"id": [1], "text": ["a"]}), src)
    else:
        src.write_bytes(content + (b"1,a\n" if name.endswith(".csv") else b'{"text": "a"}\n'))
    with caplog.at_level(logging.WARNING, logger="appliance.batch.spool"):
        assert submit(tmp_path / "spool", src, model="fake-embed")
    assert not [r for r in caplog.records if "holds no records" in r.getMessage()]


def test_submit_refuses_a_file_written_while_it_is_copied_and_warns_of_a_cut_last_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file still being written was taken as it stood (129 of 400 records, the last one cut) and
    its job said done, without a word."""
    import logging

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "text": "a"}\n')

    class WriterGoesOn:
        """Sees each chunk copied (as the audit's HMAC does); the writer appends once meanwhile."""

        wrote = False

        def update(self, data: bytes) -> None:
            if not self.wrote:
                self.wrote = True
                with src.open("a") as more:
                    more.write('{"id": 2, "text": "b"}\n')

    with pytest.raises(BatchError, match="changed while it was copied into the spool"):
        submit(tmp_path / "spool", src, model="fake-embed", hasher=WriterGoesOn())
    assert pending(tmp_path / "spool") == [] and list((tmp_path / "spool/tmp").iterdir()) == []
    src.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "gr')
    with caplog.at_level(logging.WARNING, logger="appliance.batch.spool"):
        assert submit(tmp_path / "spool", src, model="fake-embed")
    assert any(r.getMessage().startswith(f"{src} does not end with a newline") for r in caplog.records)
    caplog.clear()
    src.write_text('{"id": 1, "text": "a"}\n')
    with caplog.at_level(logging.WARNING, logger="appliance.batch.spool"):
        assert submit(tmp_path / "spool", src, model="fake-embed")
    assert caplog.records == []


def test_a_spool_entry_without_job_json_is_set_aside(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.db")
    broken = tmp_path / "spool/new/20260101T000000Z-deadbeef"
    broken.mkdir(parents=True)
    (broken / "job.json").write_text("{not json")
    good = submit(tmp_path / "spool", _input(tmp_path, 2), model="fake-embed")
    w = BatchWorker(spool=tmp_path / "spool", outbox=tmp_path / "outbox", store=store, loader=fake.loader)
    summary = w.run_once()
    assert summary.accepted == [good] and summary.finished == [good]
    assert (tmp_path / "spool/bad/20260101T000000Z-deadbeef/job.json").is_file()
    assert pending(tmp_path / "spool") == []
    store.close()


def test_a_text_the_model_refuses_is_rejected_and_its_batch_mates_still_run(tmp_path: Path) -> None:
    from runtime.errors import InputError

    class Picky(fake.FakeModel):
        def tokenize(self, texts, *, truncate=True):  # type: ignore[no-untyped-def]
            if any("BAD" in t for t in texts):
                raise InputError("input[0]: 600 tokens is over the model's maximum of 512", field="input[0]")
            return super().tokenize(texts, truncate=truncate)

    job_dir = _run_texts(tmp_path, ["a", "b BAD", "c", "d"], Picky(), batch_size=4)
    rejects = [json.loads(x) for x in (job_dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [
        # named by the record's field, not the tokenizer's place in its sub-batch (input[0])
        (1, "the model refused the input: 'text': 600 tokens is over the model's maximum of 512")
    ]
    rows = [json.loads(x) for x in (job_dir / "part-00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 2, 3]


def _run_texts(tmp_path: Path, texts: list[str], model: fake.FakeModel, *, batch_size: int) -> Path:
    """Submit ``texts`` as one JSONL job, work it with ``model``; the job's outbox folder."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    store = JobStore(tmp_path / "state.db")
    w = BatchWorker(
        spool=tmp_path / "spool",
        outbox=tmp_path / "outbox",
        store=store,
        loader=lambda n, v: model,
        config=WorkerConfig(batch_size=batch_size),
    )
    job_id = submit(tmp_path / "spool", src, model=model.name)
    w.run_once()
    store.close()
    return tmp_path / "outbox" / job_id


def test_texts_are_batched_by_token_count_not_characters(tmp_path: Path) -> None:
    seen: list[list[int]] = []

    class Recording(fake.FakeModel):
        def embed_tokens(self, tokens):  # type: ignore[no-untyped-def]
            seen.append(sorted(len(t) for t in tokens))
            return super().embed_tokens(tokens)

    # the fake has one token per word: long one-word texts are short in tokens
    job_dir = _run_texts(tmp_path, ["x" * 30, "a b c d e f", "yy", "g h i j k l m n"], Recording(), batch_size=2)
    assert seen == [[1, 1], [6, 8]]  # by characters it would have been [1, 6] and [1, 8]
    rows = [json.loads(x) for x in (job_dir / "part-00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]  # results keep the input order


def test_a_model_opened_as_streams_runs_a_chunks_batches_side_by_side_in_order(tmp_path: Path) -> None:
    """Two batches meet at a barrier (only possible when they run at once); the files are
    byte-identical to one stream's."""
    import threading

    barrier = threading.Barrier(2, timeout=30)
    met: list[bool] = []

    class TwoStreams(fake.FakeModel):
        streams = 2

        def embed_tokens(self, tokens):  # type: ignore[no-untyped-def]
            if not met:
                barrier.wait()  # BrokenBarrierError after 30 s if the batches ran one after another
                met.append(True)
            return super().embed_tokens(tokens)

    texts = [" ".join(["w"] * (1 + i % 7)) + f" {i}" for i in range(40)]
    for d in ("two", "one"):
        (tmp_path / d).mkdir()
    two = _run_texts(tmp_path / "two", texts, TwoStreams(), batch_size=4)
    one = _run_texts(tmp_path / "one", texts, fake.FakeModel(), batch_size=4)
    assert met
    assert (two / "part-00000.jsonl").read_bytes() == (one / "part-00000.jsonl").read_bytes()
    rows = [json.loads(x) for x in (two / "part-00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(40))


def test_the_batch_worker_loads_streams_ranked_for_batches() -> None:
    from appliance.batch.unit import streams_of
    from appliance.commands.batch import DEFAULT_LOADER
    from runtime.loader import LoaderOptions, preference_for

    assert DEFAULT_LOADER == "appliance.server:batch_loader"
    batch = preference_for(LoaderOptions(streams=0, workload="batch"))
    assert batch.objective == "throughput" and not batch.streams  # ranked by the b32 timings
    assert streams_of(fake.FakeModel()) == 1


class _Cli:
    """A home of its own, driven through the CLI in process (the fixture drops the shell's INFERBOX_*)."""

    def __init__(self, tmp_path: Path, text: str) -> None:
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.src = tmp_path / "in.jsonl"
        self.src.write_text(text)
        self.runner = CliRunner()

    def __call__(self, *args: str, **env: str) -> Any:
        return self.runner.invoke(main, [*args, "--home", str(self.home)], env=env or None)

    def submit(self) -> str:
        return str(self("batch", "submit", str(self.src), "--model", "fake-embed").stdout.strip())

    def run(self, **env: str) -> Any:
        return self("batch", "run", "--once", "--loader", "appliance.batch.fake:settings_loader", **env)

    def events(self, kind: str) -> list[Any]:
        from appliance.audit.log import AuditLog
        from appliance.settings import load_settings

        with AuditLog.open(load_settings({"home": self.home}, environ={})) as log:
            return [e for e in log.tail(30) if e.event == kind]

    def sql(self, statement: str, *params: object) -> None:
        import sqlite3

        with sqlite3.connect(self.home / "state.db") as conn:
            conn.execute(statement, params)


@pytest.mark.usefixtures("clean_env")
def test_purge_deletes_a_finished_jobs_input_and_outputs_and_records_it(tmp_path: Path) -> None:
    """A job's input copy and its rejects (raw texts) stayed on the box for ever; the report said
    inputs were held in memory only."""
    cli = _Cli(tmp_path, '{"id": 1, "text": "Jane Roe"}\n{"id": 2, "text": 5}\n')
    home = cli.home
    done = cli.submit()
    assert cli.run().exit_code == 0
    queued = cli.submit()
    assert b"Jane Roe" in (home / "spool" / "cur" / done / "input.jsonl").read_bytes()
    assert (home / "outbox" / done / "rejects.jsonl").is_file()
    r = cli("batch", "purge")
    assert r.exit_code == 2 and "--older-than" in r.output
    r = cli("batch", "purge", "--older-than", "1")
    assert r.exit_code == 0 and r.output.strip() == "nothing to purge", r.output  # it ended just now
    r = cli("batch", "purge", "--older-than", "0")
    assert r.exit_code == 0 and r.output.startswith(f"purged job {done} (done): "), r.output
    assert not (home / "spool" / "cur" / done).exists() and not (home / "outbox" / done).exists()
    assert (home / "spool" / "new" / queued).is_dir()  # not accepted yet: not a finished job
    status = json.loads(cli("batch", "status", done, "--json").output)
    assert status["jobs"][0]["state"] == "done" and status["jobs"][0]["ok"] == 1  # the job's row stays
    assert status["jobs"][0]["outputs_deleted"] is True
    shown = cli("batch", "status", done).output
    assert "input and outputs deleted (batch purge)" in shown and f"-> {home / 'outbox'}" not in shown, shown
    assert [(e.job_id, e.details["state"]) for e in cli.events("batch_purge")] == [(done, "done")]
    r = cli("batch", "purge", done)
    assert r.exit_code == 0 and r.output.strip() == "nothing to purge"


@pytest.mark.usefixtures("clean_env")
def test_purge_never_follows_a_row_elsewhere_and_waits_for_held_chunks(tmp_path: Path) -> None:
    """purge removed the folders the state database named: a row naming the home removed the home;
    and a failed job's other chunks, still running, wrote its outputs again after the purge."""
    cli = _Cli(tmp_path, '{"id": 1, "text": "a"}\n')
    home = cli.home
    job = cli.submit()
    assert cli.run().exit_code == 0
    cli.sql("UPDATE batch_jobs SET out_dir = ? WHERE job_id = ?", str(home), job)
    r = cli("batch", "purge", job)
    assert r.exit_code == 2 and f"its data is recorded at {home}, not {home / 'outbox' / job}" in r.output, r.output
    assert (home / "state.db").is_file() and (home / "outbox" / job).is_dir()
    cli.sql("UPDATE batch_jobs SET out_dir = ? WHERE job_id = ?", str(home / "outbox" / job), job)
    cli.sql("UPDATE batch_chunks SET state = 'leased', lease_until = 9e12 WHERE job_id = ?", job)
    r = cli("batch", "purge", job, job)
    assert r.exit_code == 2 and "a worker still holds 1 of its chunks" in r.output, r.output
    cli.sql("UPDATE batch_chunks SET state = 'failed', lease_until = NULL WHERE job_id = ?", job)
    cli.sql("UPDATE batch_jobs SET state = 'failed' WHERE job_id = ?", job)
    r = cli("batch", "purge", job, job)
    assert r.exit_code == 0 and r.output.count("purged job") == 1, r.output  # named twice, purged once
    r = cli("batch", "retry", job)
    assert (
        r.exit_code == 2
        and r.output.startswith("error: ")
        and "input copy is gone" in r.output
        and "submit the file again" in r.output
    )


@pytest.mark.usefixtures("clean_env")
def test_a_submit_whose_record_fails_spools_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job was spooled (and its id printed) before its batch_submit record: a record that failed
    left a job a script would submit again, run twice."""
    from appliance.audit import log as audit_log

    cli = _Cli(tmp_path, '{"id": 1, "text": "a"}\n')

    def disk_full(self: object, event: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit_log.AuditLog, "append", disk_full)
    r = cli("batch", "submit", str(cli.src), "--model", "fake-embed")
    assert r.exit_code != 0 and r.stdout == "", r.output
    assert list((cli.home / "spool" / "new").iterdir()) == [] and list((cli.home / "spool" / "tmp").iterdir()) == []


@pytest.mark.usefixtures("clean_env")
def test_batch_retention_days_purges_old_finished_jobs_at_each_run(tmp_path: Path) -> None:
    """Nothing deleted a job's data by itself: batch_retention_days makes each `batch run` (the batch
    timer starts one nightly) purge the finished jobs that ended longer ago, recorded as such."""
    cli = _Cli(tmp_path, '{"id": 1, "text": "a"}\n')
    home = cli.home
    old = cli.submit()
    assert cli.run().exit_code == 0
    # it ended long ago
    cli.sql("UPDATE batch_jobs SET ended_at = '2000-01-01T00:00:00.000000Z' WHERE job_id = ?", old)
    new = cli.submit()
    assert cli.run().exit_code == 0  # retention off (0): nothing goes
    assert (home / "outbox" / old).is_dir()
    r = cli.run(INFERBOX_BATCH_RETENTION_DAYS="7")
    assert r.exit_code == 0, r.output
    assert not (home / "outbox" / old).exists() and not (home / "spool" / "cur" / old).exists()
    assert (home / "outbox" / new).is_dir() and (home / "spool" / "cur" / new).is_dir()  # ended just now
    [purge] = cli.events("batch_purge")
    assert purge.job_id == old and purge.action == "inferbox batch run (batch_retention_days)"
    assert purge.details["batch_retention_days"] == "7"


@pytest.mark.usefixtures("clean_env")
def test_a_failed_job_that_wrote_no_outputs_is_not_shown_as_purged(tmp_path: Path) -> None:
    """``batch status`` said "outputs deleted" for a job that failed before it wrote any (a model
    the repository lacks): its input copy is still there, nothing was purged."""
    cli = _Cli(tmp_path, '{"id": 1, "text": "a"}\n')
    job = str(cli("batch", "submit", str(cli.src), "--model", "nomodel").stdout.strip())
    assert cli("batch", "run", "--once").exit_code == 3  # a job failed
    shown = cli("batch", "status", job).output
    assert " failed " in shown and "deleted" not in shown, shown
    assert "outputs_deleted" not in json.loads(cli("batch", "status", job, "--json").output)["jobs"][0]
    assert cli("batch", "purge", job).exit_code == 0  # not held: the chunk its failed run leased is given back
    assert "input and outputs deleted (batch purge)" in cli("batch", "status", job).output


@pytest.mark.usefixtures("clean_env")
def test_a_refused_submit_makes_no_digest_key_and_the_next_one_no_lost_log_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A submit refused before its copy (a CSV without the text column) made a digest key and wrote no
    record; the next submit's first write then warned that an old audit log had been lost."""
    import logging

    cli = _Cli(tmp_path, '{"id": 1, "text": "a"}\n')
    bad = tmp_path / "wrong.csv"
    bad.write_text("id,note\n1,x\n")
    refused = cli("batch", "submit", str(bad), "--model", "fake-embed")
    assert refused.exit_code == 2 and "note" in refused.output, refused.output
    assert not list((cli.home / "keys" / "digest").glob("*"))
    with caplog.at_level(logging.WARNING, logger="appliance.audit.log"):
        job = cli.submit()
    assert not [r for r in caplog.records if "a new log" in r.getMessage()]
    (submitted,) = cli.events("batch_submit")
    assert submitted.job_id == job and submitted.digest_key_id and len(submitted.input_digest) == 64


@pytest.mark.usefixtures("clean_env")
def test_a_job_no_worker_took_yet_can_be_withdrawn_and_it_is_recorded(tmp_path: Path) -> None:
    """`batch purge` of a spooled job said "no batch job", while `batch status` listed it: a file of
    patient data submitted by mistake was always run to its end."""
    cli = _Cli(tmp_path, '{"id": 1, "text": "Jane Roe"}\n')
    job = cli.submit()
    assert f"{job}  spooled" in cli("batch", "status").output
    r = cli("batch", "purge", job)
    assert r.exit_code == 0 and r.output.startswith(f"withdrew job {job} (spooled, not yet run): "), r.output
    assert not (cli.home / "spool" / "new" / job).exists() and not list((cli.home / "spool" / "tmp").iterdir())
    (record,) = cli.events("batch_purge")
    assert (record.job_id, record.model_name, record.details["state"]) == (job, "fake-embed", "spooled")
    assert cli("batch", "status").output.strip() == "no batch jobs"
    assert "accepted 0 job(s)" in cli.run().output


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("in.csv", "ID,Text\n1,chest pain\n2,broken arm\n", "'ID' is not read as the id"),
        ("in.jsonl", '{"patient_id": "p1", "text": "a"}\n', "'patient_id' is not read as the id"),
        ("in.jsonl", '{"text": "a"}\n', "add an 'id' column"),
    ],
)
def test_submit_says_when_the_records_have_no_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, content: str, said: str
) -> None:
    """Only a column named exactly ``id`` names a record: with ``ID,Text`` the outputs said id 1 for the
    second row (patient 2's "broken arm"), and nothing warned."""
    import logging

    src = tmp_path / name
    src.write_text(content)
    with caplog.at_level(logging.WARNING, logger="appliance.batch.spool"):
        submit(tmp_path / "spool", src, model="fake-embed", text_field="Text" if name.endswith("csv") else "text")
    (warned,) = [r.getMessage() for r in caplog.records if "no " in r.getMessage() and "'id'" in r.getMessage()]
    assert "named by their index from 0" in warned and said in warned, warned
    caplog.clear()
    named = tmp_path / "named.jsonl"
    named.write_text('{"id": "p1", "text": "a"}\n')
    submit(tmp_path / "spool", named, model="fake-embed")
    assert not [r for r in caplog.records if "'id'" in r.getMessage()]


@pytest.mark.usefixtures("clean_env")
def test_a_job_a_worker_records_while_it_is_withdrawn_is_left_to_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker records a job, then moves its folder to spool/cur: a withdrawal between the two left a
    queued job whose input never arrived (three attempts spent), beside a record saying it was purged."""
    from appliance.audit.log import AuditLog
    from appliance.batch.jobs import JobStore
    from appliance.batch.spool import read_request

    cli = _Cli(tmp_path, '{"id": 1, "text": "a"}\n')
    job = cli.submit()
    folder = cli.home / "spool" / "new" / job
    real_open = AuditLog.open

    def open_as_a_worker_records_the_job(*args: Any, **kwargs: Any) -> AuditLog:
        store = JobStore(cli.home / "state.db")  # the worker's add_job, at that moment
        store.add_job(
            read_request(folder), cli.home / "spool" / "cur" / job / "input.jsonl", cli.home / "outbox" / job, []
        )
        store.close()
        return real_open(*args, **kwargs)

    monkeypatch.setattr(AuditLog, "open", open_as_a_worker_records_the_job)
    r = cli("batch", "purge", job)
    assert r.exit_code == 2 and "was taken by a worker as it was being withdrawn" in r.output, r.output
    assert folder.is_dir()  # back where the worker's next accept finishes the move
    monkeypatch.setattr(AuditLog, "open", real_open)
    assert cli.events("batch_purge") == []


def test_submit_warns_of_a_windows_1252_file_with_the_iconv_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each record with an accented letter was rejected "not valid UTF-8 at byte N", and nothing said
    the file was Windows-1252 or how to convert it."""
    import logging

    src = tmp_path / "notes.csv"
    src.write_bytes("id,text\n1,Schmerz im Rücken\n".encode("cp1252"))
    with caplog.at_level(logging.WARNING, logger="appliance.batch.spool"):
        submit(tmp_path / "spool", src, model="fake-embed")
    (warned,) = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert "iconv -f WINDOWS-1252 -t UTF-8 notes.csv > notes.utf8.csv" in warned, warned
    caplog.clear()
    src.write_bytes("id,text\n1,Schmerz im Rücken\n".encode())
    submit(tmp_path / "spool", src, model="fake-embed")
    assert not [r for r in caplog.records if "not UTF-8" in r.getMessage()]
