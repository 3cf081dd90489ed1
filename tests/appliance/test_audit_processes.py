"""Two writer processes share one chain; a writer killed with SIGKILL leaves a chain that verifies."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.protocols import AuditEvent
from appliance.audit.log import AuditLog
from appliance.audit.verify import verify_db
from runtime.signing import write_private_key

# A writer: appends `count` records (forever when count is 0) and prints each durable seq.
WRITER = """
import sys
from pathlib import Path
from api.protocols import AuditEvent
from appliance.audit.log import AuditLog
from runtime.signing import load_private_key

db, key_path, name, count = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
log = AuditLog(db, signing_key=load_private_key(key_path), digest_keys_dir=db.parent / "digest", checkpoint_every=25)
log.start()
i = 0
while count == 0 or i < count:
    seq = log.append(AuditEvent(
        event="batch_record", action="batch", actor=name, origin="test", outcome="success", status=0,
        started_at="2026-01-01T00:00:00.000000Z", ended_at="2026-01-01T00:00:00.000000Z", request_id=f"{name}-{i}",
    ))
    print(seq, flush=True)
    i += 1
log.close()
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    key_path = tmp_path / "signing.key"
    write_private_key(key, key_path)
    return tmp_path / "audit.db", key_path, key


def _writer(db: Path, key_path: Path, name: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(key_path), name, str(count)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )


def test_two_processes_appending_concurrently_leave_one_valid_chain(
    setup: tuple[Path, Path, Ed25519PrivateKey],
) -> None:
    db, key_path, key = setup
    procs = [_writer(db, key_path, name, 300) for name in ("api", "batch")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    seqs = [int(s) for out in outputs for s in out.split()]
    assert sorted(seqs) == list(range(1, 601))  # no seq handed out twice
    report = verify_db(db, key.public_key())
    assert report.ok, report.problems
    assert report.last_seq == 600 and report.covered_to == 600
    conn = sqlite3.connect(db)
    actors = dict(conn.execute("SELECT actor, count(*) FROM records GROUP BY actor").fetchall())
    conn.close()
    assert actors == {"api": 300, "batch": 300}


def test_kill_9_mid_stream_leaves_a_chain_that_verifies(setup: tuple[Path, Path, Ed25519PrivateKey]) -> None:
    db, key_path, key = setup
    proc = _writer(db, key_path, "victim", 0)
    assert proc.stdout is not None
    durable: list[int] = []
    while len(durable) < 50:
        line = proc.stdout.readline()
        assert line, "the writer exited early"
        durable.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()  # seqs it reported durable before it died count too
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    durable += [int(s) for s in rest.split()]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    present = {row[0] for row in conn.execute("SELECT seq FROM records")}
    conn.close()
    assert set(durable) <= present
    report = verify_db(db, key.public_key())
    assert report.ok, report.problems
    assert report.last_seq >= max(durable)


def _fork_event(actor: str) -> AuditEvent:
    return AuditEvent(
        event="batch_start", action="fork", actor=actor, origin="test", outcome="success", status=0,
        started_at="2026-01-01T00:00:00.000000Z", ended_at="2026-01-01T00:00:00.000000Z",
    )  # fmt: skip


def _append_in_child(log: AuditLog) -> None:
    log.append(_fork_event("child"))
    os._exit(0)


def _started_with_a_record(db: Path, key: Ed25519PrivateKey) -> AuditLog:
    """A log whose writer runs, with the parent's first record in it."""
    log = AuditLog(db, signing_key=key, digest_keys_dir=db.parent / "digest")
    log.start()
    assert log.append(_fork_event("parent")) == 1
    return log


def _exit_code(child: BaseProcess, timeout: float) -> int | None:
    """The child's exit code, or None when it had not ended within ``timeout`` (then killed)."""
    child.join(timeout=timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        return None
    return child.exitcode


def test_a_forked_child_opens_its_own_connection(setup: tuple[Path, Path, Ed25519PrivateKey]) -> None:
    db, _, key = setup
    log = AuditLog(db, signing_key=key, digest_keys_dir=db.parent / "digest")
    assert log.append(_fork_event("parent")) == 1  # the parent's connection is open now
    child = multiprocessing.get_context("fork").Process(target=_append_in_child, args=(log,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert log.append(_fork_event("parent")) == 3  # the parent's connection still works and sees the child's record
    log.close()
    report = verify_db(db, key.public_key())
    assert report.ok and report.last_seq == 3


def test_a_child_forked_while_the_writer_runs_and_a_lock_is_held_writes_on_its_own(
    setup: tuple[Path, Path, Ed25519PrivateKey],
) -> None:
    """The writer thread does not cross a fork, and a lock held at the fork (here by a request
    handing its record over) would stay held in the child for ever: the child's log starts
    afresh, so its record is written (straight to the database) instead of waiting for ever."""
    db, _, key = setup
    log = _started_with_a_record(db, key)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with log._handover_lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    try:
        child = multiprocessing.get_context("fork").Process(target=_append_in_child, args=(log,))
        child.start()
    finally:
        release.set()
        holder.join()
    assert _exit_code(child, 30) == 0, "the child's append never returned"
    assert log.append(_fork_event("parent")) == 3  # the parent's writer goes on, after the child's record
    log.close()
    report = verify_db(db, key.public_key())
    assert report.ok and report.last_seq >= 3


def test_a_child_forked_while_the_writer_is_in_its_transaction_can_write(
    setup: tuple[Path, Path, Ed25519PrivateKey],
) -> None:
    """SQLite keeps its file locks' bookkeeping in process memory: a child forked inside the
    parent's write transaction would find the write lock held for ever ("database is locked"
    after the busy timeout, on every record).  The fork waits for the transaction instead."""
    db, _, key = setup
    log = _started_with_a_record(db, key)
    inside = threading.Event()

    def transaction() -> None:  # what the writer does for each group, held open a little longer
        with log._lock:
            conn = log._connection()
            conn.execute("BEGIN IMMEDIATE")
            inside.set()
            time.sleep(0.5)
            conn.execute("COMMIT")

    writer = threading.Thread(target=transaction)
    writer.start()
    assert inside.wait(10)
    child = multiprocessing.get_context("fork").Process(target=_append_in_child, args=(log,))
    child.start()  # waits for the transaction
    writer.join()
    assert _exit_code(child, 25) == 0, "the child could not write (the parent's write lock crossed the fork)"
    assert log.append(_fork_event("parent")) == 3
    log.close()
    assert verify_db(db, key.public_key()).ok
