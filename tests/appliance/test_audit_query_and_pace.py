"""The audit log's query narrows by each documented filter on its own, and a record due a
checkpoint by time is signed in its own transaction (not only at close)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.canonical import parse_time
from appliance.audit.checkpoint import load_checkpoints
from appliance.audit.log import AuditLog

from . import audit_tamper as T


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event", "batch_end"),
        ("actor", "key-x"),
        ("model_name", "other"),
        ("outcome", "failure"),
        ("request_id", "req-3"),
        ("job_id", "job-3"),
        ("status", 429),
        ("model_sha256", "cd" * 32),
    ],
)
def test_each_filter_alone_selects_only_its_records(tmp_path: Path, field: str, value: str) -> None:
    log = AuditLog(tmp_path / "audit.db", signing_key=Ed25519PrivateKey.generate(), digest_keys_dir=tmp_path / "d")
    try:
        for i in range(6):
            log.append(T.event(i, **({field: value} if i == 3 else {})))
        assert [r.seq for r in log.query(**{field: value}, limit=100)] == [4]
    finally:
        log.close()


def test_key_id_selects_a_keys_requests_and_those_it_was_refused_on(tmp_path: Path) -> None:
    """A revoked key's request is the anonymous actor's, the key only in details.refused_key_id: the
    auditor's "every request of this key" missed it."""
    log = AuditLog(tmp_path / "audit.db", signing_key=Ed25519PrivateKey.generate(), digest_keys_dir=tmp_path / "d")
    try:
        log.append(T.event(0, actor="k1", credential_id="k1"))
        log.append(T.event(1, actor="k2", credential_id="k2"))
        log.append(T.event(2, actor="anonymous", credential_id="", status=401, details={"refused_key_id": "k1"}))
        log.append(T.event(3, actor="anonymous", credential_id="", status=401, details={"refused_key_id": "k2"}))
        assert [r.seq for r in log.query(key_id="k1", limit=100)] == [1, 3]
    finally:
        log.close()


def test_a_record_due_by_time_is_signed_before_close(tmp_path: Path) -> None:
    # under steady traffic the idle timer never runs, and a CLI process only appends: the record
    # written checkpoint_interval after the newest checkpoint must bring its own (else `audit verify`
    # of the live log flags an honest record as written too long after the last signed head)
    clock, db = T.FakeClock(), tmp_path / "audit.db"
    log = AuditLog(
        db,
        signing_key=Ed25519PrivateKey.generate(),
        digest_keys_dir=tmp_path / "d",
        clock=clock,
        checkpoint_every=1000,
        checkpoint_interval_s=60,
    )
    try:
        for i in range(3):
            clock.advance(seconds=1)
            log.append(T.event(i))
        clock.advance(minutes=5)
        log.append(T.event(3))
        with sqlite3.connect(db) as conn:
            assert [c.size for c in load_checkpoints(conn)] == [0, 4]
    finally:
        log.close()


def test_the_newest_checkpoint_is_read_without_sorting_them_all(tmp_path: Path) -> None:
    # read in every append's transaction: it must not cost more as checkpoints pile up for months
    from appliance.audit.schema import connect
    from appliance.audit.store import LAST_CHECKPOINT_SQL, last_checkpoint

    clock, db = T.FakeClock(), tmp_path / "audit.db"
    log = AuditLog(db, signing_key=Ed25519PrivateKey.generate(), digest_keys_dir=tmp_path / "d", clock=clock)
    try:
        for i in range(3):
            log.append(T.event(i))
            log.checkpoint()
    finally:
        log.close()
    conn = connect(db)
    try:
        plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + LAST_CHECKPOINT_SQL))
        assert "TEMP B-TREE" not in plan, plan
        newest = conn.execute("SELECT size FROM checkpoints WHERE kind = 'checkpoint' ORDER BY id DESC").fetchone()
        found = last_checkpoint(conn)
        assert found is not None and found.size == newest[0] == 3
    finally:
        conn.close()


def test_a_clock_set_back_leaves_a_log_that_verifies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # NTP stepping a fast clock back 15 minutes (more than the 10-minute interval): before, every
    # later record failed `audit verify` as "dated back", for good, and prune, ship and backup refused
    from appliance.audit.verify import verify_db

    key, clock, db = Ed25519PrivateKey.generate(), T.FakeClock(), tmp_path / "audit.db"
    log = AuditLog(db, signing_key=key, digest_keys_dir=tmp_path / "d", clock=clock)
    try:
        for i in range(5):
            log.append(T.event(i))
            clock.advance(seconds=1)
        log.checkpoint()
        clock.advance(minutes=-15)
        stepped = clock.now
        for i in range(5, 10):
            log.append(T.event(i))
            clock.advance(seconds=1)
        with sqlite3.connect(db) as conn:
            cps = load_checkpoints(conn)
    finally:
        log.close()
    assert verify_db(db, key.public_key()).ok
    # a checkpoint at the clock's time after the step, and the records dated truly after it
    assert [c.size for c in cps][-2:] == [5, 5] and parse_time(cps[-1].created_at) == stepped
    reader = AuditLog(db, signing_key=key, digest_keys_dir=tmp_path / "d")
    try:
        records = {r.seq: r for r in reader.tail(20)}
    finally:
        reader.close()
    assert parse_time(records[6].recorded_at) == stepped
    assert sum("it was set back" in r.getMessage() for r in caplog.records) == 1


def test_a_clock_once_ahead_does_not_freeze_the_records_times(tmp_path: Path) -> None:
    # a clock a year ahead for two minutes signs a checkpoint dated then; once corrected, the records
    # must keep their true times and the idle checkpoints their pace (a floor at the newest
    # checkpoint's time would date them all at that one instant for a year)
    from appliance.audit.verify import verify_db

    key, clock, db = Ed25519PrivateKey.generate(), T.FakeClock(), tmp_path / "audit.db"
    log = AuditLog(db, signing_key=key, digest_keys_dir=tmp_path / "d", clock=clock)
    try:
        log.append(T.event(0))
        clock.advance(days=365)
        log.append(T.event(1))
        log.checkpoint()
        clock.advance(days=-365, minutes=2)
        times = []
        for i in range(2, 6):
            clock.advance(hours=1)
            log.append(T.event(i))
            times.append(clock.now)
    finally:
        log.close()
    assert verify_db(db, key.public_key()).ok
    reader = AuditLog(db, signing_key=key, digest_keys_dir=tmp_path / "d")
    try:
        records = {r.seq: r for r in reader.tail(20)}
    finally:
        reader.close()
    assert [parse_time(records[s].recorded_at) for s in (3, 4, 5, 6)] == times


def test_a_full_disk_is_said_as_a_full_disk_not_as_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a home on a full disk: SQLite rolls the transaction back itself and says "full"; a second
    # ROLLBACK replaced that with "cannot rollback - no transaction is active", and the CLI told the
    # operator the database was damaged and to restore a backup, instead of freeing space
    import sqlite3

    from appliance.cli import _database_problem

    log = AuditLog(tmp_path / "audit.db", signing_key=Ed25519PrivateKey.generate(), digest_keys_dir=tmp_path / "d")
    try:
        log.append(T.event(0))

        def full(conn: sqlite3.Connection, created_at: str | None = None) -> Any:
            conn.execute("ROLLBACK")  # as SQLite does on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")

        with monkeypatch.context() as m:
            m.setattr(log, "_sign_head", full)
            with pytest.raises(sqlite3.OperationalError, match="disk is full") as failed:
                log.checkpoint()
        message = _database_problem(failed.value)
        assert "is full" in message and "free space" in message and "damaged, or" not in message
        log.append(T.event(1))  # space freed: it goes on
    finally:
        log.close()
