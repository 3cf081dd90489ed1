"""The audit database: schema (sqlite-utils migrations), connections, triggers.

Tables: ``meta`` (the log id), ``records`` (``seq`` is the rowid, so it is unique
and ordered), ``checkpoints`` (signed heads and prune anchors; migration 0002
adds the format 2 columns: version, sequence index and link, writer pace; 0003
and 0004 the format 3 columns ``retires`` and ``pinned``: the keys a rotation
retires and the format 1 checkpoints it pins) and
``prune_guard``.  ``BEFORE UPDATE`` / ``BEFORE DELETE`` triggers abort every
change to records and checkpoints (defence in depth: anyone who can write the
file can drop them; the hash chain and signatures are the real protection).
The one sanctioned delete, pruning a prefix, inserts a row into
``prune_guard`` in the same ``BEGIN IMMEDIATE`` transaction, deletes, removes
the guard row and writes the prune checkpoint; no other connection ever sees
the guard row.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import sqlite_utils
from sqlite_utils.migrations import Migrations

from appliance.sqlite import enable_wal, open_read_only
from runtime.errors import AuditError

__all__ = ["MIGRATIONS", "connect", "ensure_schema", "read_log_id"]

MIGRATIONS = Migrations("inferbox.audit")

_RECORD_COLUMNS = """
    seq INTEGER PRIMARY KEY,
    prev_hash TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    event TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    origin TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    backend TEXT NOT NULL,
    variant TEXT NOT NULL,
    job_id TEXT NOT NULL,
    input_digest TEXT NOT NULL,
    output_digest TEXT NOT NULL,
    digest_key_id TEXT NOT NULL,
    details TEXT NOT NULL,
    leaf_hash TEXT NOT NULL
"""


@MIGRATIONS(name="0001_audit_log")
def _initial(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta (key, value) VALUES ('log_id', ?)", [str(uuid.uuid4())])
    db.execute(f"CREATE TABLE records ({_RECORD_COLUMNS})")
    db.execute("CREATE INDEX records_recorded_at ON records (recorded_at)")
    db.execute(
        """CREATE TABLE checkpoints (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('checkpoint', 'prune')),
            log_id TEXT NOT NULL,
            size INTEGER NOT NULL,
            head_hash TEXT NOT NULL,
            created_at TEXT NOT NULL,
            key_id TEXT NOT NULL,
            signature TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX checkpoints_kind_size ON checkpoints (kind, size)")
    db.execute("CREATE TABLE prune_guard (token TEXT NOT NULL)")
    db.execute(
        """CREATE TRIGGER records_no_update BEFORE UPDATE ON records
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END"""
    )
    db.execute(
        """CREATE TRIGGER records_no_delete BEFORE DELETE ON records
        WHEN NOT EXISTS (SELECT 1 FROM prune_guard)
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only; use `inferbox audit prune`'); END"""
    )
    db.execute(
        """CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
        BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END"""
    )
    db.execute(
        """CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
        BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END"""
    )
    db.execute(
        """CREATE TRIGGER meta_no_update BEFORE UPDATE ON meta
        BEGIN SELECT RAISE(ABORT, 'the audit log id never changes'); END"""
    )


@MIGRATIONS(name="0002_checkpoint_sequence_and_pace")
def _checkpoint_v2(db: sqlite_utils.Database) -> None:
    """Format 2 checkpoints: their place in the sequence and the writer's pace (see checkpoint.py)."""
    db.execute("ALTER TABLE checkpoints ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
    db.execute("ALTER TABLE checkpoints ADD COLUMN idx INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE checkpoints ADD COLUMN prev TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE checkpoints ADD COLUMN every INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE checkpoints ADD COLUMN interval_us INTEGER NOT NULL DEFAULT 0")


@MIGRATIONS(name="0003_checkpoint_retires")
def _checkpoint_v3(db: sqlite_utils.Database) -> None:
    """Format 3 checkpoints: the keys a rotation retires (checkpoint.py)."""
    db.execute("ALTER TABLE checkpoints ADD COLUMN retires TEXT NOT NULL DEFAULT ''")


@MIGRATIONS(name="0004_checkpoint_pinned")
def _checkpoint_pinned(db: sqlite_utils.Database) -> None:
    """Format 3 checkpoints: the format 1 checkpoints a rotation pins (checkpoint.py)."""
    db.execute("ALTER TABLE checkpoints ADD COLUMN pinned TEXT NOT NULL DEFAULT ''")


def connect(db_path: Path, *, busy_timeout_s: float = 30.0, read_only: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN IMMEDIATE ourselves), WAL, synchronous=FULL."""
    if read_only:
        if not db_path.is_file():
            raise AuditError(f"audit database {db_path} does not exist; pass the path of an existing audit.db")
        conn = open_read_only(db_path, timeout_s=busy_timeout_s, any_thread=True)
    else:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db_path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        enable_wal(conn, timeout_s=busy_timeout_s)
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    return conn


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Apply pending migrations inside one BEGIN IMMEDIATE (safe when two processes start together)."""
    if not MIGRATIONS.pending(sqlite_utils.Database(conn)):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        MIGRATIONS.apply(sqlite_utils.Database(conn))
        if conn.in_transaction:
            conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def read_log_id(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()
    if row is None:
        raise AuditError("audit database has no log id (meta table is empty); it is not an inferbox audit log")
    return str(row[0])
