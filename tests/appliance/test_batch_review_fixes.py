"""Regression tests for the offline batch review (/tmp/review/batch/REPORT.md): bad records, poison
chunks and spool entries, crash at accept, pinned model versions, environment errors, CSV quoting
and encodings, spool entries under another name, retries with a backoff.

Real SQLite, real files, the fake model; time is a test clock (the retry backoff sleeps on it).
"""

from __future__ import annotations

import base64
import csv
import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.batch import fake, readers
from appliance.batch import worker as worker_module
from appliance.batch.jobs import JobStore
from appliance.batch.readers import plan_chunks, read_chunk
from appliance.batch.spool import pending, submit
from appliance.batch.unit import ChunkTask
from appliance.batch.worker import BatchWorker
from appliance.cli import main
from runtime.errors import BatchError, InputError

from .batch_box import Audit, Box, Clock

FAKE = "appliance.batch.fake:settings_loader"


def _jsonl(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = [json.dumps({"id": i, "text": f"good {i}"}) for i in range(5)]


# -- 1. one bad record is a reject, never a failed job -------------------------------------------


def test_records_that_break_the_json_parser_are_rejects_and_the_others_run(tmp_path: Path) -> None:
    box = Box(tmp_path)
    deep = '{"text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    digits = '{"id": ' + "1" * 5000 + ', "text": "x"}'
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", [GOOD[0], deep, GOOD[1], digits, GOOD[2]]))
    summary = box.worker.run_once()
    assert summary.finished == [job_id] and summary.failed == []
    assert [r["id"] for r in box.rows(job_id)] == [0, 1, 2]
    reasons = {r["index"]: r["reason"] for r in box.rejects(job_id)}
    assert reasons == {
        1: "not valid JSON: nested too deeply",
        3: f"not valid JSON: a number of more than {sys.get_int_max_str_digits()} digits",
    }


def test_a_tensor_value_too_large_for_its_dtype_is_a_reject(tmp_path: Path) -> None:
    box = Box(tmp_path)
    lines = [json.dumps({"id": i, "x": [1, 2, 3, i]}) for i in range(3)]
    lines.insert(1, f'{{"id": 9, "x": [{2**1100}, 1, 2, 3]}}')
    job_id = box.submit(_jsonl(tmp_path / "t.jsonl", lines), "fake-tensor")
    assert box.worker.run_once().finished == [job_id]
    assert [r["id"] for r in box.rows(job_id)] == [0, 1, 2]
    [reject] = box.rejects(job_id)
    assert reject["id"] == 9
    assert reject["reason"] == "tensor field 'x' is not a float32 array: int too large to convert to float"


def test_a_text_with_a_lone_surrogate_is_a_reject_and_a_surrogate_id_falls_back_to_the_index(
    tmp_path: Path,
) -> None:
    class Strict(fake.FakeModel):
        """Like the real tokenizer: a text that is not valid Unicode raises TypeError."""

        def tokenize(self, texts: Sequence[str], *, truncate: bool = True) -> list[fake.FakeTokens]:
            for t in texts:
                t.encode("utf-8")
            return super().tokenize(texts, truncate=truncate)

    box = Box(tmp_path, lambda n, v: Strict())
    lines = [
        '{"id": "a", "text": "hello"}',
        '{"id": "b", "text": "bad \\ud800 text"}',
        '{"id": "c\\udfff", "text": "fine text, odd id"}',
        '{"id": "d", "text": "world"}',
    ]
    job_id = box.submit(_jsonl(tmp_path / "s.jsonl", lines))
    assert box.worker.run_once().finished == [job_id]
    assert [r["id"] for r in box.rows(job_id)] == ["a", 2, "d"]
    [reject] = box.rejects(job_id)
    assert reject["id"] == "b"
    assert reject["reason"] == (
        "text field 'text' is not valid Unicode text: it holds a lone surrogate ('\\ud800') at character 4"
    )


def test_a_record_that_is_not_utf8_is_rejected_with_its_bytes_kept_whole(tmp_path: Path) -> None:
    """``record`` is readable text (U+FFFD for the bad bytes); ``record_base64`` keeps the original,
    so the rejects lose nothing.  A record that is UTF-8 has no ``record_base64``."""
    box = Box(tmp_path)
    bad_line = b'{"id": "b", "text": "caf\xe9 in latin-1"}'
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "text": "hello"}\n' + bad_line + b'\n{"id": "c", "text": "x"}\n[1\n')
    job_id = box.submit(path)
    assert box.worker.run_once().finished == [job_id]
    assert [r["id"] for r in box.rows(job_id)] == ["a", "c"]
    bad, not_json = box.rejects(job_id)
    assert bad["reason"] == "not valid UTF-8 at byte 24"
    assert bad["record"] == bad_line.decode("utf-8", errors="replace")
    assert base64.b64decode(bad["record_base64"]) == bad_line
    assert not_json["record"] == "[1" and "record_base64" not in not_json


def test_a_batch_the_model_fails_on_is_split_and_only_the_culprit_is_rejected(tmp_path: Path) -> None:
    calls: list[int] = []

    class Fragile(fake.FakeModel):
        def embed_tokens(self, tokens: Sequence[fake.FakeTokens]) -> Any:
            calls.append(len(tokens))
            if any("BOOM" in t.text for t in tokens):
                raise RuntimeError("kernel failed on this input")
            return super().embed_tokens(tokens)

    box = Box(tmp_path, lambda n, v: Fragile(), batch_size=8)
    texts = [f"w{i}" for i in range(7)]
    texts.insert(3, "BOOM")
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]))
    summary = box.worker.run_once()
    assert summary.finished == [job_id] and summary.failed == []
    assert [r["id"] for r in box.rows(job_id)] == [0, 1, 2, 4, 5, 6, 7]
    [reject] = box.rejects(job_id)
    assert (reject["id"], reject["reason"]) == (
        3,
        "the model failed on this record: RuntimeError: kernel failed on this input",
    )
    # the batch of 8, then halves down to the culprit, which is tried twice (blamed only if it fails again)
    assert calls == [8, 4, 2, 2, 1, 1, 1, 4]
    # the results equal a run without the culprit
    want = fake.FakeModel().embed([t for t in texts if t != "BOOM"])[0]
    assert [r["embedding"] for r in box.rows(job_id)] == [list(map(float, v)) for v in want]


def test_a_tokenizer_error_other_than_input_error_rejects_that_text_only(tmp_path: Path) -> None:
    class Picky(fake.FakeModel):
        def tokenize(self, texts: Sequence[str], *, truncate: bool = True) -> list[fake.FakeTokens]:
            if any("\x00" in t for t in texts):
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
            if any("LONG" in t for t in texts):
                raise InputError("600 tokens is over the maximum of 512")
            return super().tokenize(texts, truncate=truncate)

    box = Box(tmp_path, lambda n, v: Picky())
    texts = ["a", "nul \x00 here", "b", "LONG", "c"]
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]))
    assert box.worker.run_once().finished == [job_id]
    assert [r["id"] for r in box.rows(job_id)] == [0, 2, 4]
    assert [(r["id"], r["reason"]) for r in box.rejects(job_id)] == [
        (1, "the model failed on this record: TypeError: TextEncodeInput must be Union[TextInputSequence, "
         "Tuple[InputSequence, InputSequence]]"),
        (3, "the model refused the input: 600 tokens is over the maximum of 512"),
    ]  # fmt: skip


def test_a_model_that_fails_on_every_record_still_fails_the_chunk(tmp_path: Path) -> None:
    calls: list[int] = []

    class Broken(fake.FakeModel):
        def embed_tokens(self, tokens: Sequence[fake.FakeTokens]) -> Any:
            calls.append(len(tokens))
            raise RuntimeError("device lost")

    box = Box(tmp_path, lambda n, v: Broken(), batch_size=2)
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", GOOD * 2))  # 10 records, 5 batches
    summary = box.worker.run_once()
    assert summary.failed == [job_id]
    # per attempt: 2 batches, each split to its records, each record tried twice; the 3 other
    # batches are called once each, unsplit (one of them might have worked); then the chunk fails
    assert calls == ([2, 1, 1, 1, 1] * 2 + [2, 2, 2]) * 3
    job = box.store.require_job(job_id)
    assert job.state == "failed" and "chunk 0 failed 3 times: RuntimeError: device lost" in job.error
    assert f"inferbox batch retry {job_id}" in job.error


# -- 2. a poison chunk or spool entry does not stop the queue ------------------------------------

POISON_WORKER = r"""
import sys
from pathlib import Path
from appliance.batch import fake
from appliance.batch.jobs import JobStore
from appliance.batch.worker import BatchWorker, WorkerConfig

class Oom(fake.FakeModel):
    def embed_tokens(self, tokens):
        if any("BOOM" in t.text for t in tokens):
            import os
            os._exit(137)  # what the kernel's OOM killer does to the worker
        return super().embed_tokens(tokens)

root = Path(sys.argv[1])
worker = BatchWorker(
    spool=root / "spool", outbox=root / "outbox", store=JobStore(root / "state.db"),
    loader=lambda name, version: Oom(name=name), config=WorkerConfig(max_attempts=3),
)
s = worker.run_once()
print(f"finished={s.finished} failed={s.failed}")
"""


def test_a_chunk_that_kills_its_worker_fails_its_job_after_max_attempts_and_the_queue_goes_on(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    poison_input = _jsonl(tmp_path / "p.jsonl", ['{"text": "ok"}', '{"text": "BOOM"}'])
    poison = submit(spool, poison_input, model="fake-embed", now=lambda: 1_800_000_000.0)
    good = submit(spool, _jsonl(tmp_path / "g.jsonl", GOOD), model="fake-embed", now=lambda: 1_800_000_001.0)
    codes = []
    for _ in range(4):
        proc = subprocess.run(
            [sys.executable, "-c", POISON_WORKER, str(tmp_path)], capture_output=True, text=True, timeout=120
        )
        codes.append(proc.returncode)
    assert codes[:3] == [137, 137, 137]  # each run dies on the poison chunk (its dead pid is reclaimed at once)
    assert codes[3] == 0, proc.stderr
    assert f"finished=['{good}'] failed=['{poison}']" in proc.stdout
    store = JobStore(tmp_path / "state.db")
    try:
        job = store.require_job(poison)
        assert job.state == "failed"
        assert "the worker running chunk 0 stopped 3 times before finishing it (killed? out of memory?" in job.error
        assert store.require_job(good).state == "done"
        assert store._rows("SELECT attempts, state FROM batch_chunks WHERE job_id = ?", (poison,)) == [
            {"attempts": 3, "state": "failed"}
        ]
    finally:
        store.close()


def test_an_expired_lease_is_not_taken_again_after_max_attempts(tmp_path: Path) -> None:
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", GOOD))
    box.worker.accept_new()
    for n in range(3):  # three workers on other hosts take the chunk and vanish
        lease = box.store.lease(f"gone-{n}:1", 60)
        assert lease is not None and lease.attempts == n + 1
        box.clock.t += 61
    assert box.store.lease("someone:1", 60) is None  # not leased a 4th time
    summary = box.worker.run_once()
    assert summary.failed == [job_id] and summary.chunks == 0
    assert "stopped 3 times" in box.store.require_job(job_id).error
    [end] = [e for e in audit.events if e.event == "batch_end"]
    assert end.outcome == "failure" and "stopped 3 times" in end.details["error"]


def test_a_model_load_that_raises_fails_that_job_after_its_attempts_and_the_next_job_runs(tmp_path: Path) -> None:
    def load(name: str, version: int | None) -> fake.FakeModel:
        if name == "fake-classify":
            raise RuntimeError("CUDA driver crashed")
        return fake.loader(name, version)

    box = Box(tmp_path, load)
    bad = box.submit(_jsonl(tmp_path / "a.jsonl", GOOD), "fake-classify")
    good = box.submit(_jsonl(tmp_path / "b.jsonl", GOOD))
    summary = box.worker.run_once()  # old code: the RuntimeError escaped run_once, every time
    assert summary.failed == [bad] and summary.finished == [good]
    assert "chunk 0 failed 3 times: RuntimeError: CUDA driver crashed" in box.store.require_job(bad).error
    assert box.clock.slept == [5.0, 20.0]  # retried after a backoff, not at once


def test_a_spool_entry_dropped_again_under_a_name_already_in_bad_is_set_aside_too(tmp_path: Path) -> None:
    box = Box(tmp_path)
    for text in ("{broken", "{still broken"):
        entry = tmp_path / "spool/new/job-x"
        entry.mkdir(parents=True)
        (entry / "job.json").write_text(text)
        good = box.submit(_jsonl(tmp_path / "in.jsonl", GOOD))
        summary = box.worker.run_once()  # old code: OSError (Directory not empty) on the second round
        assert summary.finished == [good] and summary.refused == ["job-x"]
    bad = sorted(p.name for p in (tmp_path / "spool/bad").iterdir())
    assert len(bad) == 2 and bad[0] == "job-x" and bad[1].startswith("job-x.")
    assert "has no valid job.json" in (tmp_path / "spool/bad/job-x/REASON").read_text()
    assert pending(tmp_path / "spool") == []


def test_a_job_that_cannot_be_finished_fails_alone(tmp_path: Path) -> None:
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    first = box.submit(_jsonl(tmp_path / "a.jsonl", GOOD))
    box.worker.accept_new()
    lease = box.store.lease(box.worker.worker_id, 60)
    assert lease is not None and box.worker.process(lease)
    (tmp_path / "outbox" / first / "rejects-00000.jsonl").unlink()  # lost before finishing
    second = box.submit(_jsonl(tmp_path / "b.jsonl", GOOD))
    summary = box.worker.run_once()  # old code: BatchError out of run_once, on every run
    assert summary.failed == [first] and summary.finished == [second]
    job = box.store.require_job(first)
    assert job.state == "failed" and job.error.startswith("finishing the job failed: BatchError:")
    assert f"inferbox batch retry {first}" in job.error
    assert [(e.event, e.outcome) for e in audit.events if e.job_id == first] == [
        ("batch_start", "success"),
        ("batch_end", "failure"),
    ]


# -- 3. a crash at accept never turns an unreadable input into a "done" job ---------------------


class Crash(BaseException):
    """kill -9 at this point."""


def _crash(*_args: Any, **_kw: Any) -> Any:
    raise Crash


def test_a_crash_right_after_recording_an_unreadable_input_leaves_the_job_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    src = tmp_path / "bad.parquet"
    src.write_text("this is not parquet")
    job_id = box.submit(src)
    with monkeypatch.context() as m:
        m.setattr(JobStore, "fail_job", _crash)  # old code: the job row is written, then the failure
        m.setattr(worker_module, "accept", _crash)  # new code: the crash lands after the one transaction
        with pytest.raises(Crash):
            box.worker.run_once()
    job = box.store.require_job(job_id)
    assert job.state == "failed" and "is not a readable Parquet file" in job.error
    summary = box.worker.run_once()
    assert summary.finished == [] and summary.accepted == [job_id]
    assert box.store.require_job(job_id).state == "failed"
    assert not (tmp_path / "outbox" / job_id / "job.json").exists()
    ends = [e for e in audit.events if e.job_id == job_id]
    assert [(e.event, e.outcome) for e in ends] == [("batch_end", "failure")]
    assert "is not a readable Parquet file" in ends[0].details["error"]


def test_an_unreadable_input_is_named_where_it_lies_once_accepted(tmp_path: Path) -> None:
    """The failed job's error named spool/new/<job>/input.parquet, which had moved to cur/ by then."""
    box = Box(tmp_path)
    src = tmp_path / "bad.parquet"
    src.write_text("this is not parquet")
    job_id = box.submit(src)
    assert box.worker.run_once().failed == [job_id]
    error = box.store.require_job(job_id).error
    where = tmp_path / "spool" / "cur" / job_id / "input.parquet"
    assert f"{where} is not a readable Parquet file" in error and where.is_file(), error
    assert "/new/" not in error


def test_status_shows_a_job_recorded_before_a_crash_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _clean_home(tmp_path, monkeypatch)
    src = _jsonl(tmp_path / "in.jsonl", GOOD)
    job_id = CliRunner().invoke(main, ["batch", "submit", str(src), "--model", "fake-embed", "--home", str(home)])
    job_id = job_id.stdout.strip()
    store = JobStore(home / "state.db")
    worker = BatchWorker(spool=home / "spool", outbox=home / "outbox", store=store, loader=fake.loader)
    monkeypatch.setattr(worker_module, "accept", _crash)
    with pytest.raises(Crash):
        worker.accept_new()
    store.close()
    r = CliRunner().invoke(main, ["batch", "status", "--home", str(home)])
    assert r.exit_code == 0, r.output
    shown = [line for line in r.output.splitlines() if line.startswith(job_id)]  # the last line names it too
    assert len(shown) == 1 and "queued" in shown[0], r.output


# -- 4. a job runs on one model version and package ----------------------------------------------


class Repo:
    """A model repository whose "latest" version can change; the embedding depends on the version."""

    def __init__(self) -> None:
        self.latest = 1
        self.sha: dict[int, str] = {}
        self.loads: list[tuple[str, int | None]] = []

    def load(self, name: str, version: int | None) -> fake.FakeModel:
        self.loads.append((name, version))
        v = self.latest if version is None else version
        model = fake.FakeModel(name=name, version=v, dim=2 + v)
        model.package_sha256 = self.sha.get(v, f"{v}" * 64)
        return model


def test_a_job_without_version_is_pinned_to_the_version_of_its_first_chunk(tmp_path: Path) -> None:
    repo = Repo()
    audit = Audit()
    box = Box(tmp_path, repo.load, chunk_size=2, audit=audit)
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", GOOD[:4]))
    box.worker.accept_new()
    lease = box.store.lease(box.worker.worker_id, 60)
    assert lease is not None and box.worker.process(lease)  # chunk 0 on version 1, then the worker "dies"
    repo.latest = 2  # a new version is installed
    restarted = Box(tmp_path, repo.load, chunk_size=2, audit=audit, worker_id="otherhost:2")
    restarted.clock.t = box.clock.t
    assert restarted.worker.run_once().finished == [job_id]
    dims = {len(r["embedding"]) for r in restarted.rows(job_id)}
    assert dims == {3}  # every chunk on version 1 (old code: chunk 1 on version 2)
    job = restarted.store.require_job(job_id)
    assert (job.version, job.model_sha256) == (1, "1" * 64)
    assert json.loads((tmp_path / "outbox" / job_id / "job.json").read_text())["version"] == 1
    assert {(e.event, e.model_version, e.model_sha256) for e in audit.events} == {
        ("batch_start", "1", "1" * 64),
        ("batch_end", "1", "1" * 64),
    }
    assert repo.loads == [("fake-embed", None), ("fake-embed", 1)]  # the restarted worker asked for v1


def test_a_long_running_worker_serves_a_new_job_the_version_installed_now(tmp_path: Path) -> None:
    repo = Repo()
    box = Box(tmp_path, repo.load)
    first = box.submit(_jsonl(tmp_path / "a.jsonl", GOOD))
    box.worker.run_once(wait_for_retries=False)
    repo.latest = 2
    second = box.submit(_jsonl(tmp_path / "b.jsonl", GOOD))
    box.worker.run_once(wait_for_retries=False)  # the same process (--watch)
    assert [box.store.require_job(j).version for j in (first, second)] == [1, 2]
    assert {len(r["embedding"]) for r in box.rows(second)} == {4}


def test_a_job_refuses_a_package_that_changed_under_its_pinned_version(tmp_path: Path) -> None:
    repo = Repo()
    box = Box(tmp_path, repo.load, chunk_size=2)
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", GOOD[:4]))
    box.worker.accept_new()
    lease = box.store.lease(box.worker.worker_id, 60)
    assert lease is not None and box.worker.process(lease)
    repo.sha[1] = "e" * 64  # version 1 re-exported with other weights
    restarted = Box(tmp_path, repo.load, chunk_size=2, worker_id="otherhost:2")
    summary = restarted.worker.run_once()
    assert summary.failed == [job_id]
    assert "a job never mixes packages" in restarted.store.require_job(job_id).error


def test_a_dask_unit_refuses_a_package_other_than_the_jobs(tmp_path: Path) -> None:
    from appliance.batch.dask_engine import dask_unit

    src = _jsonl(tmp_path / "in.jsonl", GOOD)
    task = ChunkTask(
        job_id="j",
        input_path=str(src),
        format="jsonl",
        text_field="text",
        model="fake-embed",
        version=1,
        out_dir=str(tmp_path / "out"),
        plan=plan_chunks(src, "jsonl", 10)[0],
        model_sha256="a" * 64,
    )
    with pytest.raises(BatchError, match="every worker needs the same model repository"):
        dask_unit(task, lambda: fake.loader)
    ok = dask_unit(ChunkTask(**{**_fields(task), "model_sha256": "f" * 64}), lambda: fake.loader)
    assert ok.ok == 5


def _fields(task: ChunkTask) -> dict[str, Any]:
    return {f: getattr(task, f) for f in task.__struct_fields__}


# -- 5. environment errors: one line naming the fix, no stack trace ------------------------------


def _clean_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("INFERBOX_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()  # batch and audit commands refuse a home that is not there (a mistyped --home)
    return home


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_a_full_disk_at_submit_is_one_line_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.batch import spool

    home = _clean_home(tmp_path, monkeypatch)
    src = _jsonl(tmp_path / "in.jsonl", GOOD)

    def full(_src: Path, _dst: Path, _hasher: object = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "_copy_durably", full)
    r = _cli("batch", "submit", str(src), "--model", "fake-embed", "--home", str(home))
    assert r.exit_code == 2 and r.exception is not None and isinstance(r.exception, SystemExit)
    assert r.output.startswith(f"error: No space left on device: {home / 'spool' / 'tmp'}")
    assert "free space there" in r.output and "Traceback" not in r.output
    assert list((home / "spool/tmp").iterdir()) == []


def test_an_unusable_state_database_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _clean_home(tmp_path, monkeypatch)
    (home / "state.db").mkdir(parents=True)  # what SQLite sees on a read-only home: it cannot open the file
    r = _cli("batch", "status", "--home", str(home))
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: the state database {home / 'state.db'} cannot be opened (")
    assert f"check that {home} is writable" in r.output


def test_a_read_only_home_is_one_line_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _clean_home(tmp_path, monkeypatch)
    src = _jsonl(tmp_path / "in.jsonl", GOOD)

    def read_only(self: Path, *args: Any, **kw: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    r = _cli("batch", "submit", str(src), "--model", "fake-embed", "--home", str(home))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: Read-only file system: ")
    assert "the inferbox home must be writable by this user" in r.output


def test_a_transaction_that_sqlite_rolled_back_keeps_its_own_error(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.db")
    with pytest.raises(ValueError, match="the real error"), store._tx() as conn:
        conn.execute("ROLLBACK")  # as SQLite does itself on a full disk
        raise ValueError("the real error")  # old code: "cannot rollback - no transaction is active"
    store.close()


def test_dask_missing_names_the_batch_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _clean_home(tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    r = _cli("batch", "run", "--once", "--engine", "dask", "--home", str(home), "--loader", FAKE)
    assert r.exit_code == 2, r.output
    assert "install the batch extra: pip install 'inferbox[batch]'" in r.output


def test_an_unreachable_scheduler_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dask

    pytest.importorskip("distributed")  # its config defaults load first: the set below only overrides one
    home = _clean_home(tmp_path, monkeypatch)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        r = _cli("batch", "run", "--once", "--engine", "dask", "--scheduler", f"tcp://127.0.0.1:{port}",
                 "--home", str(home), "--loader", FAKE)  # fmt: skip
    assert r.exit_code == 2, r.output
    assert f"error: cannot reach the Dask scheduler tcp://127.0.0.1:{port} (" in r.output


def test_dask_workers_zero_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.batch.dask_engine import local_cluster

    home = _clean_home(tmp_path, monkeypatch)
    r = _cli("batch", "run", "--once", "--engine", "dask", "--dask-workers", "0", "--home", str(home))
    assert r.exit_code == 2 and "Invalid value for '--dask-workers': 0 is not in the range x>=1" in r.output
    with pytest.raises(BatchError, match="needs 1 or more workers"), local_cluster(0):
        pass


# -- 6. CSV quoting, field sizes, encodings -------------------------------------------------------


def test_a_stray_quote_inside_a_csv_field_is_text_not_a_quoted_section(tmp_path: Path) -> None:
    box = Box(tmp_path, batch_size=8)
    rows = ["id,text", '1,The 5" screen is great'] + [f"{i},row number {i}" for i in range(2, 8)]
    src = tmp_path / "q.csv"
    src.write_text("\n".join(rows) + "\n")
    job_id = box.submit(src)
    box.worker.run_once()
    job = box.store.require_job(job_id)
    assert (job.records, job.ok, job.rejected) == (7, 7, 0)  # old code: 1 record, rejected
    assert [r["id"] for r in box.rows(job_id)] == [str(i) for i in range(1, 8)]


def test_a_quote_that_never_closes_costs_its_own_line_only(tmp_path: Path) -> None:
    box = Box(tmp_path, batch_size=8)
    rows = ["id,text", "1,fine", '2,"never closed', "3,also fine", "4,still fine"]
    src = tmp_path / "q.csv"
    src.write_text("\n".join(rows) + "\n")
    job_id = box.submit(src)
    box.worker.run_once()
    assert [r["id"] for r in box.rows(job_id)] == ["1", "3", "4"]
    assert [(r["index"], r["reason"]) for r in box.rejects(job_id)] == [
        (1, 'not valid CSV: a quoted field is not closed (a stray " at a field start?)')
    ]


_any_csv = st.text(alphabet=st.sampled_from(list('ab ,"\n')), max_size=60)


@settings(max_examples=300, deadline=None)
@given(body=_any_csv, chunk=st.integers(1, 5))
def test_csv_records_split_as_pythons_csv_reads_them(
    tmp_path_factory: pytest.TempPathFactory, body: str, chunk: int
) -> None:
    """Where every quoted field closes, the records are exactly the rows Python's csv reads, in
    any chunking (a stray quote inside a field included)."""
    data = b"h\n" + body.encode()
    bounds = list(readers._text_records(data, 2, csv_mode=True))
    if any(readers._csv_record_end(data, start, len(data)) < 0 for start, _ in bounds):
        return  # a quote that never closes: csv reads to the end, here it costs its line only
    src = tmp_path_factory.mktemp("csv") / "h.csv"
    src.write_bytes(data)
    records = [r for p in plan_chunks(src, "csv", chunk) for r in read_chunk(src, "csv", p)]
    assert [r.index for r in records] == list(range(len(records)))
    got = [next(csv.reader(io.StringIO(r.raw.decode())), []) for r in records]
    assert got == list(csv.reader(io.StringIO(body)))


def test_a_csv_field_over_131072_characters_is_read_like_jsonl(tmp_path: Path) -> None:
    box = Box(tmp_path)
    long_text = "word " * 30_000
    src = tmp_path / "long.csv"
    src.write_text(f"id,text\n1,short\n2,{long_text}\n3,also short\n")
    job_id = box.submit(src)
    box.worker.run_once()
    job = box.store.require_job(job_id)
    assert (job.ok, job.rejected) == (3, 0)  # old code: "field larger than field limit (131072)"
    header = tmp_path / "hdr.csv"
    header.write_text("id,text," + "h" * 200_000 + "\n1,x,y\n")
    assert box.submit(header)  # old code: _csv.Error traceback


def test_a_record_over_the_size_limit_is_a_reject_in_jsonl_and_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 200)
    box = Box(tmp_path)
    big = json.dumps({"id": "big", "text": "x" * 300})
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", [GOOD[0], big, GOOD[1]]))
    src = tmp_path / "in.csv"
    src.write_text(f'id,text\n1,a\n2,"{"y" * 150}\n{"y" * 150}"\n3,b\n')
    csv_job = box.submit(src)
    box.worker.run_once()
    [reject] = box.rejects(job_id)
    assert reject["reason"] == f"the record is {len(big)} bytes, over the limit of 200 bytes per record"
    assert [r["id"] for r in box.rows(csv_job)] == ["1", "3"]
    assert len(box.rejects(csv_job)) == 2  # the over-long quoted field: its two lines, each on its own


def test_a_utf8_bom_does_not_cost_the_first_jsonl_record(tmp_path: Path) -> None:
    box = Box(tmp_path)
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"id":"a","text":"first"}\r\n{"id":"b","text":"second"}\r\n')
    job_id = box.submit(src)
    box.worker.run_once()
    assert [r["id"] for r in box.rows(job_id)] == ["a", "b"]
    assert box.rejects(job_id) == []


@pytest.mark.parametrize(
    ("name", "data", "encoding"),
    [
        ("u16.csv", "id,text\n1,hello\n".encode("utf-16"), "UTF-16"),
        ("u16.jsonl", '{"id":"a","text":"x"}\n{"id":"b","text":"y"}\n'.encode("utf-16"), "UTF-16"),
        ("u16le.jsonl", '{"id":"a","text":"x"}\n'.encode("utf-16-le"), "UTF-16LE"),
        ("u32.csv", "id,text\n1,hello\n".encode("utf-32"), "UTF-32"),
    ],
    ids=["utf16-csv", "utf16-jsonl", "utf16le-no-bom", "utf32-csv"],
)
def test_utf16_and_utf32_inputs_are_refused_with_the_fix(tmp_path: Path, name: str, data: bytes, encoding: str) -> None:
    src = tmp_path / name
    src.write_bytes(data)
    stem, suffix = name.split(".")
    with pytest.raises(BatchError) as info:
        submit(tmp_path / "spool", src, model="fake-embed")
    assert str(info.value) == (
        f"{name} is {encoding[:6]} text, not UTF-8; convert it to UTF-8 first, e.g. "
        f"`iconv -f {encoding} -t UTF-8 {name} > {stem}.utf8.{suffix}`"
    )


# -- 7. a spool entry under another job's name is refused, not dropped ---------------------------


def test_a_copied_job_folder_under_a_new_name_is_set_aside_with_its_reason(tmp_path: Path) -> None:
    box = Box(tmp_path)
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", GOOD))
    box.worker.run_once()
    shutil.copytree(tmp_path / "spool/cur" / job_id, tmp_path / "spool/new/rerun-1")
    shutil.copytree(tmp_path / "spool/cur" / job_id, tmp_path / "spool/new" / job_id)  # the same id again
    summary = box.worker.run_once()
    assert summary.accepted == []  # old code: accepted ['rerun-1'], then nothing recorded under that name
    assert sorted(summary.refused) == sorted(["rerun-1", job_id])
    reason = (tmp_path / "spool/bad/rerun-1/REASON").read_text()
    assert f"its job.json is for job {job_id}, not rerun-1" in reason
    assert "inferbox batch submit FILE --model fake-embed" in reason
    assert "was accepted before" in (tmp_path / "spool/bad" / job_id / "REASON").read_text()
    assert (tmp_path / "spool/cur" / job_id / "input.jsonl").is_file()  # the accepted job is untouched


# -- 8. a failed chunk waits before its next attempt; a failed job can be retried -----------------


def test_a_chunk_that_failed_waits_a_backoff_then_succeeds(tmp_path: Path) -> None:
    # the batch, then the record alone twice: the whole attempt fails, and the next one passes (an
    # error of the machine, such as a full disk, stops the run instead: test_batch_review13.py)
    failures = [RuntimeError("the device was lost") for _ in range(3)]

    class Flaky(fake.FakeModel):
        def embed_tokens(self, tokens: Sequence[fake.FakeTokens]) -> Any:
            if failures:
                raise failures.pop()
            return super().embed_tokens(tokens)

    model = Flaky()
    box = Box(tmp_path, lambda n, v: model)
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", GOOD[:1]))
    summary = box.worker.run_once()
    assert summary.finished == [job_id] and summary.failed == []
    assert box.clock.slept == [5.0]  # old code: leased again in the same instant
    leased = [i for i, e in enumerate(box.events) if e.startswith("leased")]
    assert len(leased) == 2


def test_a_released_chunk_is_not_leased_before_its_retry_time(tmp_path: Path) -> None:
    box = Box(tmp_path)
    box.submit(_jsonl(tmp_path / "in.jsonl", GOOD))
    box.worker.accept_new()
    lease = box.store.lease(box.worker.worker_id, 60)
    assert lease is not None
    assert box.store.release(lease.job.job_id, 0, error="EIO", max_attempts=3, retry_after_s=5.0) is False
    assert box.store.lease(box.worker.worker_id, 60) is None
    assert box.store.next_retry_at(3) == box.clock.t + 5.0
    box.clock.t += 5.0
    again = box.store.lease(box.worker.worker_id, 60)
    assert again is not None and again.attempts == 2
    # --watch: a round does not wait for a backoff
    assert box.store.release(again.job.job_id, 0, error="EIO", max_attempts=3, retry_after_s=20.0) is False
    assert box.worker.run_once(wait_for_retries=False).chunks == 0 and box.clock.slept == []


def test_batch_retry_runs_a_failed_job_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _clean_home(tmp_path, monkeypatch)
    src = _jsonl(tmp_path / "in.jsonl", GOOD)
    job_id = _cli("batch", "submit", str(src), "--model", "fake-embed", "--home", str(home)).stdout.strip()
    clock = Clock()
    store = JobStore(home / "state.db", clock=clock)
    broken = True

    class Sometimes(fake.FakeModel):
        def embed_tokens(self, tokens: Sequence[fake.FakeTokens]) -> Any:
            if broken:
                raise RuntimeError("the device was lost")
            return super().embed_tokens(tokens)

    w = BatchWorker(
        spool=home / "spool",
        outbox=home / "outbox",
        store=store,
        loader=lambda n, v: Sometimes(),
        clock=clock,
        sleep=clock.sleep,
    )
    assert w.run_once().failed == [job_id]
    r = _cli("batch", "retry", job_id, "--home", str(home))
    assert r.exit_code == 0, r.output
    assert f"job {job_id} queued again: 1 chunk(s) to run" in r.output
    broken = False
    assert w.run_once().finished == [job_id]
    job = store.require_job(job_id)
    assert (job.state, job.ok, job.error) == ("done", 5, "")
    store.close()
    r = _cli("batch", "retry", job_id, "--home", str(home))
    assert r.exit_code == 2 and f"job {job_id} is done; only a failed job can be retried" in r.output
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    bad_id = _cli("batch", "submit", str(bad), "--model", "fake-embed", "--home", str(home)).stdout.strip()
    r = _cli("batch", "run", "--once", "--home", str(home), "--loader", FAKE)
    assert "failed 1" in r.output
    r = _cli("batch", "retry", bad_id, "--home", str(home))
    assert r.exit_code == 2 and "failed before its input was split into chunks" in r.output


# -- the dask dashboard is really off --------------------------------------------------------------


def test_the_local_cluster_serves_no_http_route_and_not_on_8787() -> None:
    import urllib.error
    import urllib.request

    from appliance.batch.dask_engine import local_cluster

    with local_cluster(n_workers=1) as cluster:
        sockets = [s.getsockname() for s in cluster.scheduler.http_server._sockets.values()]
        assert sockets and all(host == "127.0.0.1" and port != 8787 for host, port in sockets)
        host, port = sockets[0]
        for path in ("/health", "/json/counts.json", "/info/main/workers.html", "/status"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10)
            assert info.value.code == 404


def test_a_job_failed_for_a_missing_model_runs_after_retry_once_it_is_installed(tmp_path: Path) -> None:
    from runtime.errors import ModelNotFoundError

    installed = False

    def load(name: str, version: int | None) -> fake.FakeModel:
        if not installed:
            raise ModelNotFoundError(f"model {name!r} is not in the repository")
        return fake.loader(name, version)

    box = Box(tmp_path, load)
    job_id = box.submit(_jsonl(tmp_path / "in.jsonl", GOOD))
    assert box.worker.run_once().failed == [job_id]
    assert box.store._rows("SELECT state FROM batch_chunks") == [{"state": "pending"}]  # given back: it did not run
    installed = True
    assert box.store.retry_job(job_id) == 1
    assert box.worker.run_once().finished == [job_id]  # the lease is given back at once, not after 60 s
    assert box.store.require_job(job_id).ok == 5
