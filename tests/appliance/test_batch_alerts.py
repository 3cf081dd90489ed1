"""What an SRE alerts on (/tmp/srereview): a failed job says so in the journal and in ``batch run``'s
exit status; ``batch status`` tells a worker killed with ``kill -9`` from one at work, and dates the
backlog (when each spooled entry was submitted, when a job's chunk last finished, the oldest job
waiting).

Real SQLite, real files, the fake model; the CLI runs in process on a home of its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.batch import fake
from appliance.batch.jobs import JobStore
from appliance.batch.spool import read_request
from appliance.batch.worker import BatchWorker, WorkerConfig
from appliance.batch.writers import rejects_name
from runtime.errors import IntegrityError
from runtime.times import utc_iso

from .batch_box import Box
from .conftest import run_cli

FAKE = "appliance.batch.fake:settings_loader"
CORRUPT = (
    "models/minilm/1/tokenizer/special_tokens_map.json: sha256 fa42 does not match the manifest's 303d: the "
    "file changed; not served: re-copy the package"
)


def _lines(n: int) -> list[str]:
    return [json.dumps({"id": i, "text": f"text {i}"}) for i in range(n)]


def _job_errors(caplog: pytest.LogCaptureFixture, job_id: str) -> list[str]:
    """The ERROR lines that say the job failed (a chunk's attempt has lines of its own)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.getMessage().startswith(f"batch job {job_id} failed")
    ]


# -- a failed job is an ERROR line, and `batch run --once` exits 3 -----------------------------------


def test_a_job_whose_package_is_corrupted_logs_one_error_naming_the_job_the_reason_and_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The job failed with nothing above INFO in the journal: no alert could fire on it."""

    def corrupted(name: str, version: int | None) -> Any:
        raise IntegrityError(CORRUPT)

    box = Box(tmp_path, corrupted)
    job_id = box.submit(_lines(3))
    with caplog.at_level(logging.INFO):
        assert box.worker.run_once().failed == [job_id]
    [line] = _job_errors(caplog, job_id)
    assert "re-copy the package" in line and f"`inferbox batch retry {job_id}`" in line, line
    assert f"`inferbox batch retry {job_id}`" in box.store.require_job(job_id).error  # status says it too


def test_a_job_whose_chunk_failed_its_attempts_logs_one_error_for_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(fake.FakeModel):
        def embed_tokens(self, tokens: Any) -> Any:
            raise RuntimeError("device lost")

    box = Box(tmp_path, lambda name, version: Broken())
    job_id = box.submit(_lines(3))
    with caplog.at_level(logging.INFO):
        assert box.worker.run_once().failed == [job_id]
    [line] = _job_errors(caplog, job_id)  # beside the line of each attempt
    assert "chunk 0 failed 3 times: RuntimeError: device lost" in line and "inferbox batch retry" in line, line


def test_the_other_ways_a_job_fails_log_it_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Workers that died on its chunk, an input changed, a finish that failed: one line each, not two."""
    died_box, changed_box, finish_box = (Box(tmp_path / n, max_attempts=1) for n in ("died", "changed", "finish"))
    died = died_box.submit(_lines(2))
    died_box.worker.accept_new()
    assert died_box.store.lease("otherhost:2", 60) is not None  # by a worker that dies with it
    died_box.clock.t += 61
    changed = changed_box.submit(_lines(3))
    changed_box.worker.accept_new()
    (changed_box.root / "spool/cur" / changed / "input.jsonl").write_text('{"id": 9, "text": "x"}\n' * 20)
    unfinished = finish_box.submit(_lines(2))
    finish_box.worker.accept_new()
    lease = finish_box.worker.lease()
    assert lease is not None and finish_box.worker.process(lease)
    (finish_box.out(unfinished) / rejects_name(0)).unlink()  # its finish cannot merge the rejects
    with caplog.at_level(logging.INFO):
        assert died_box.worker.run_once().failed == [died]
        assert changed_box.worker.run_once().failed == [changed]
        assert finish_box.worker.run_once().failed == [unfinished]
    for job_id in (died, changed, unfinished):
        assert len(_job_errors(caplog, job_id)) == 1, (job_id, caplog.text)


@pytest.mark.usefixtures("clean_env")
def test_batch_run_exits_3_when_a_job_it_ran_failed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`batch run` exited 0 with "failed 1": systemd took the run for a success and nothing alerted."""
    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in _lines(2)))
    job_id = run_cli(home, "batch", "submit", str(src), "--model", "nomodel").stdout.strip()
    with caplog.at_level(logging.INFO):
        result = run_cli(home, "batch", "run", "--once", "--loader", FAKE)
    assert result.exit_code == 3, result.output
    assert "failed 1" in result.stdout and "Traceback" not in result.output
    [line] = _job_errors(caplog, job_id)
    assert "no fake model 'nomodel'" in line and f"then `inferbox batch retry {job_id}`" in line, line
    good = run_cli(home, "batch", "submit", str(src), "--model", "fake-embed").stdout.strip()
    result = run_cli(home, "batch", "run", "--once", "--loader", FAKE)  # nothing failed in this run
    assert result.exit_code == 0 and "finished 1, failed 0" in result.stdout, result.output
    assert json.loads(run_cli(home, "batch", "status", good, "--json").stdout)["jobs"][0]["state"] == "done"


def test_the_batch_unit_is_not_restarted_after_a_failed_job_and_stays_failed() -> None:
    """A restart 20 s later found nothing to do and exited 0: the unit then looked fine."""
    from appliance.commands.batch import EXIT_JOB_FAILED
    from appliance.systemd import unit_dir

    unit = (unit_dir() / "inferbox-batch.service").read_text()
    [codes] = re.findall(r"^RestartPreventExitStatus=(.*)$", unit, re.MULTILINE)
    assert "Restart=on-failure" in unit and {"78", str(EXIT_JOB_FAILED)} <= set(codes.split())
    assert EXIT_JOB_FAILED not in (0, 1, 2, 78)  # done; Ctrl-C or a crash; the machine; the configuration


def test_watch_logs_a_failed_job_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import threading

    box = Box(tmp_path)
    stop = threading.Event()
    failed = box.submit(_lines(2), model="nomodel", name="a.jsonl")
    good = box.submit(_lines(2), name="b.jsonl")
    box.worker.progress = lambda event: stop.set() if event == f"finished {good}" else None
    thread = threading.Thread(target=box.worker.watch, args=(stop,), kwargs={"poll_s": 0.01})
    with caplog.at_level(logging.INFO):
        thread.start()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert box.store.require_job(good).state == "done"  # the run went on after the failed job
    assert len(_job_errors(caplog, failed)) == 1


# -- a worker killed with kill -9 is not "at it" --------------------------------------------------------


def _dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.usefixtures("clean_env")
def test_status_says_a_killed_workers_chunk_is_taken_back_not_that_a_worker_is_at_it(tmp_path: Path) -> None:
    """After `kill -9` of `batch run`, status said "a worker is at it now" for the lease's 600 s."""
    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in _lines(3)))
    job_id = run_cli(home, "batch", "submit", str(src), "--model", "fake-embed").stdout.strip()
    store = JobStore(home / "state.db")
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    worker = BatchWorker(spool=home / "spool", outbox=home / "outbox", store=store, loader=fake.loader, worker_id=dead)
    worker.accept_new()
    assert store.lease(dead, 600) is not None  # what the killed run left: its lease, 600 s to run
    store.close()
    shown = run_cli(home, "batch", "status", job_id).stdout
    assert "a worker is at it" not in shown, shown
    assert f"its worker {dead} is gone (no such process on this host)" in shown, shown
    assert "the next `inferbox batch run` (or the batch service) takes back its 1 lease(s) at once" in shown, shown
    activity = json.loads(run_cli(home, "batch", "status", job_id, "--json").stdout)["jobs"][0]["activity"]
    assert activity == {"held": 0, "retry_at": None, "gone": 1, "gone_workers": [dead]}, activity
    result = run_cli(home, "batch", "run", "--once", "--loader", FAKE)  # as said: not 600 s later
    assert result.exit_code == 0 and "ran 1 chunk(s), finished 1" in result.stdout, result.output


def test_activity_tells_the_leases_of_workers_gone_from_this_host(tmp_path: Path) -> None:
    from appliance.batch.holders import gone_here

    box = Box(tmp_path, chunk_size=1)
    job_id = box.submit(_lines(3))
    box.worker.accept_new()
    here = socket.gethostname()
    dead, alive = f"{here}:{_dead_pid()}", f"{here}:{os.getpid()}"
    for worker in (dead, alive, "otherhost:5"):  # a process of another host cannot be asked: held
        assert box.store.lease(worker, 600) is not None
    now = box.store.activity(gone=gone_here)[job_id]
    assert (now.held, now.gone, now.gone_workers) == (2, 1, [dead])
    assert box.store.activity()[job_id].held == 3  # without the question, as before
    # what purge asks: the dead worker's lease holds nothing back (it refused purge for the lease's 600 s)
    assert box.store.held(job_id) == 2 and box.store.held(job_id, gone=lambda _worker: False) == 3
    assert box.worker.reclaim_dead() == 1  # the same judgement takes the dead one's chunk back
    assert box.store.activity(gone=gone_here)[job_id].gone == 0


# -- the backlog, dated ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
def test_status_dates_spooled_entries_a_jobs_last_chunk_and_the_oldest_job_waiting(tmp_path: Path) -> None:
    """status --json had no time for a spooled entry, none for a job's progress, and no age of the
    backlog: nothing to alert on when jobs sat still."""
    home = tmp_path / "home"
    home.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in _lines(2)))

    def submit() -> str:
        return str(run_cli(home, "batch", "submit", str(src), "--model", "fake-embed").stdout.strip())

    done = submit()
    assert run_cli(home, "batch", "run", "--once", "--loader", FAKE).exit_code == 0
    stuck = submit()
    store = JobStore(home / "state.db")
    worker = BatchWorker(
        spool=home / "spool",
        outbox=home / "outbox",
        store=store,
        loader=fake.loader,
        config=WorkerConfig(chunk_size=1),
        worker_id=f"{socket.gethostname()}:{os.getpid()}",
    )
    worker.accept_new()
    lease = worker.lease()
    assert lease is not None and worker.process(lease)  # 1 chunk of 2 done, then nothing ran it
    store.close()
    with sqlite3.connect(home / "state.db") as conn:  # submitted two hours ago
        conn.execute("UPDATE batch_jobs SET submitted_at = ? WHERE job_id = ?", (utc_iso(time.time() - 7200), stuck))
    spooled = submit()
    body = json.loads(run_cli(home, "batch", "status", "--json").stdout)
    submitted = read_request(home / "spool" / "new" / spooled).submitted_at
    assert body["spooled"] == [spooled]  # as it was: a list of ids
    assert body["spooled_entries"] == [{"job_id": spooled, "model": "fake-embed", "submitted_at": submitted}]
    jobs = {j["job_id"]: j for j in body["jobs"]}
    for job_id in (done, stuck):
        assert jobs[job_id]["started_at"] <= jobs[job_id]["last_progress_at"] <= utc_iso(), jobs[job_id]
    oldest = body["oldest_waiting"]
    assert (oldest["job_id"], oldest["state"]) == (stuck, "running") and 7190 < oldest["age_s"] < 7300, oldest
    shown = run_cli(home, "batch", "status").stdout
    assert f"{spooled}  spooled (waiting for `inferbox batch run`), submitted " in shown, shown
    assert "; last chunk done " in shown.split(stuck)[1], shown
    assert shown.splitlines()[-1] == f"oldest job waiting: {stuck} (running), submitted 2 h 0 min ago", shown
    one = json.loads(run_cli(home, "batch", "status", done, "--json").stdout)
    assert one["oldest_waiting"] is None and one["spooled_entries"] == []


def test_a_state_database_from_before_chunk_times_opens_and_gets_them(tmp_path: Path) -> None:
    box = Box(tmp_path)
    old = box.submit(_lines(2))
    box.worker.run_once()
    box.store.close()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute("ALTER TABLE batch_chunks DROP COLUMN done_at")  # as a box before the column had it
    box = Box(tmp_path)
    assert box.store.require_job(old).last_progress_at is None  # its chunk ended at a time not recorded
    new = box.submit(_lines(2), name="b.jsonl")
    box.worker.run_once()
    assert box.store.require_job(new).last_progress_at == utc_iso(box.clock.t)
