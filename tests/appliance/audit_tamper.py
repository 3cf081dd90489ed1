"""Reusable ways to build an audit log and tamper with it (the DB file or its JSONL export).

Tamper helpers edit the SQLite file directly with ``sqlite3`` after dropping the
append-only triggers, the way an attacker with file access would.  Load this
module from a test with :func:`load` (the test suite runs in importlib mode).
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.protocols import AuditEvent
from appliance.audit.canonical import AuditRecord, format_time, leaf_hash
from appliance.audit.checkpoint import Checkpoint, load_checkpoints, make_checkpoint, store_checkpoint
from appliance.audit.log import AuditLog
from appliance.audit.store import COLUMNS, insert_record, iter_records
from runtime.signing import public_key_pem, write_private_key


class FakeClock:
    """A settable UTC clock (tests advance it instead of sleeping)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def event(i: int = 0, **overrides: object) -> AuditEvent:
    values: dict[str, object] = {
        "event": "inference",
        "action": "POST /v1/embeddings",
        "actor": "key-abc",
        "origin": "127.0.0.1",
        "outcome": "success",
        "status": 200,
        "started_at": "2026-01-01T12:00:00.000000Z",
        "ended_at": "2026-01-01T12:00:00.100000Z",
        "request_id": f"req-{i}",
        "model_name": "minilm",
        "model_version": "1",
        "model_sha256": "ab" * 32,
        "backend": "onnxruntime",
        "variant": "onnx-int8",
        "details": {"n": str(i)},
    }
    values.update(overrides)
    return msgspec.convert(values, AuditEvent)


def build_log(
    tmp: Path, key: Ed25519PrivateKey, n: int = 10, *, checkpoint_every: int = 4, clock: FakeClock | None = None
) -> Path:
    """A log of ``n`` records with checkpoints every ``checkpoint_every`` and one at close."""
    db = tmp / "audit.db"
    clock = clock or FakeClock()
    log = AuditLog(
        db, signing_key=key, digest_keys_dir=tmp / "keys" / "digest", checkpoint_every=checkpoint_every, clock=clock
    )
    for i in range(n):
        clock.advance(seconds=1)
        log.append(event(i))
    log.close()
    return db


def raw(db: Path) -> sqlite3.Connection:
    """A connection with the append-only triggers dropped (what an attacker does first)."""
    conn = sqlite3.connect(db, isolation_level=None)
    for name in ("records_no_update", "records_no_delete", "checkpoints_no_update", "checkpoints_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    return conn


def log_id(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()[0])


def records(db: Path) -> list[AuditRecord]:
    conn = sqlite3.connect(db)
    try:
        return list(iter_records(conn, log_id(db)))
    finally:
        conn.close()


def change_field(db: Path, seq: int, field: str, value: object) -> None:
    assert field in COLUMNS
    raw(db).execute(f"UPDATE records SET {field} = ? WHERE seq = ?", (value, seq))


def rewrite_record(db: Path, seq: int, **changes: object) -> None:
    """Change fields of ``seq`` and recompute its leaf hash (a smarter attacker)."""
    rec = msgspec.structs.replace(next(r for r in records(db) if r.seq == seq), **changes)
    rec = msgspec.structs.replace(rec, leaf_hash=leaf_hash(rec))
    conn = raw(db)
    conn.execute("DELETE FROM records WHERE seq = ?", (seq,))
    insert_record(conn, rec)


def delete_record(db: Path, seq: int) -> None:
    raw(db).execute("DELETE FROM records WHERE seq = ?", (seq,))


def delete_prefix(db: Path, upto: int) -> None:
    """Delete records 1..upto without a prune checkpoint."""
    raw(db).execute("DELETE FROM records WHERE seq <= ?", (upto,))


def cut_tail(db: Path, keep: int) -> None:
    raw(db).execute("DELETE FROM records WHERE seq > ?", (keep,))


def insert_forged(db: Path, at: int) -> None:
    """Insert a well-formed forged record at ``at`` (linked to ``at - 1``), shifting later seqs up."""
    recs = records(db)
    conn = raw(db)
    for rec in sorted((r for r in recs if r.seq >= at), key=lambda r: -r.seq):
        conn.execute("UPDATE records SET seq = ? WHERE seq = ?", (rec.seq + 1, rec.seq))
    prev = next(r for r in recs if r.seq == at - 1)
    forged = msgspec.structs.replace(prev, seq=at, prev_hash=prev.leaf_hash, actor="intruder")
    insert_record(conn, msgspec.structs.replace(forged, leaf_hash=leaf_hash(forged)))


def append_forged(db: Path, recorded_at: str) -> None:
    """Append a well-formed forged record after the head (in the window no checkpoint signs yet)."""
    head = records(db)[-1]
    forged = msgspec.structs.replace(
        head, seq=head.seq + 1, prev_hash=head.leaf_hash, actor="intruder", recorded_at=recorded_at
    )
    insert_record(raw(db), msgspec.structs.replace(forged, leaf_hash=leaf_hash(forged)))


def swap_records(db: Path, a: int, b: int) -> None:
    """Swap the contents of two records, keeping each row's seq (a reordering)."""
    recs = {r.seq: r for r in records(db)}
    conn = raw(db)
    conn.execute("DELETE FROM records WHERE seq IN (?, ?)", (a, b))
    insert_record(conn, msgspec.structs.replace(recs[b], seq=a))
    insert_record(conn, msgspec.structs.replace(recs[a], seq=b))


def add_checkpoint(db: Path, key: Ed25519PrivateKey, size: int, head_hash: str, *, kind: str = "checkpoint") -> None:
    """Store a checkpoint signed by ``key`` (another key, or the real one with a wrong head)."""
    cp = make_checkpoint(
        key,
        kind=kind,  # type: ignore[arg-type]
        log_id=log_id(db),
        size=size,
        head_hash=head_hash,
        created_at=format_time(datetime(2026, 6, 1, tzinfo=UTC)),
    )
    store_checkpoint(raw(db), cp)


def corrupt_checkpoint_signature(db: Path) -> int:
    """Flip one bit of the newest checkpoint's signature; returns its size."""
    conn = raw(db)
    cid, size, sig = conn.execute("SELECT id, size, signature FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    conn.execute("UPDATE checkpoints SET signature = ? WHERE id = ?", (flipped, cid))
    return int(size)


# -- export JSONL --------------------------------------------------------------


def export_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def record_line_index(lines: list[bytes], seq: int) -> int:
    needle = b'"seq":%d,' % seq
    return next(i for i, ln in enumerate(lines) if b'"type":"record"' in ln and needle in ln)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def checkpoints(db: Path) -> list[Checkpoint]:
    """Every checkpoint of the log in ``db``, in written order."""
    conn = sqlite3.connect(db)
    try:
        return load_checkpoints(conn)
    finally:
        conn.close()


def cli_home(home: Path, key: Ed25519PrivateKey) -> Path:
    """An appliance home for the CLI tests: ``key`` as signing key (and its ``.pub``), and an audit
    log of 7 records signed every 3."""
    write_private_key(key, home / "keys" / "signing.key")
    (home / "keys" / "signing.key.pub").write_text(public_key_pem(key))
    log = AuditLog(home / "audit.db", signing_key=key, digest_keys_dir=home / "keys" / "digest", checkpoint_every=3)
    for i in range(7):
        log.append(event(i))
    log.close()
    return home
