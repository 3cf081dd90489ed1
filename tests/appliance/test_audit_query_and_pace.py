"""The audit log's query narrows by each documented filter on its own, and a record due a
checkpoint by time is signed in its own transaction (not only at close)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
