"""Rows <-> records: the SQL the writer, the exporter, ``tail`` and the verifier share."""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import msgspec

from appliance.audit.canonical import EVENT_FIELDS, AuditRecord, genesis_hash

__all__ = [
    "COLUMNS",
    "LastCheckpoint",
    "head",
    "insert_record",
    "insert_records",
    "iter_records",
    "last_checkpoint",
    "query_records",
    "record_row",
    "table_stats",
    "tail_records",
]

#: the columns of ``records`` in insert/select order (log_id lives in ``meta``)
COLUMNS: tuple[str, ...] = ("seq", "prev_hash", "recorded_at", *EVENT_FIELDS, "details", "leaf_hash")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM records"  # noqa: S608 (fixed column names)
_INSERT = f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608
_DETAILS = msgspec.json.Decoder(dict[str, str])


_BEFORE_DETAILS = operator.attrgetter(*COLUMNS[: COLUMNS.index("details")])


def _details_text(details: dict[str, str]) -> str:
    """The one spelling of a record's details in the database: compact JSON, keys sorted."""
    return msgspec.json.encode(dict(sorted(details.items()))).decode("utf-8")


def record_row(record: AuditRecord) -> tuple[object, ...]:
    """``record`` as a row of ``records`` (``COLUMNS`` order; details as sorted JSON)."""
    return (*_BEFORE_DETAILS(record), _details_text(record.details), record.leaf_hash)


def insert_record(conn: sqlite3.Connection, record: AuditRecord) -> None:
    conn.execute(_INSERT, record_row(record))


def insert_records(conn: sqlite3.Connection, records: Iterable[AuditRecord]) -> None:
    """Insert ``records`` in one statement run (the writer's group of one transaction)."""
    conn.executemany(_INSERT, (record_row(r) for r in records))


def _record(log_id: str, row: tuple[object, ...]) -> AuditRecord:
    values = dict(zip(COLUMNS, row, strict=True))
    raw = values.pop("details")
    try:
        details = _DETAILS.decode(str(raw))
    except (msgspec.DecodeError, msgspec.ValidationError):
        # keep the row verifiable: an unreadable details column fails its leaf hash
        details = {"<unreadable details>": str(raw)}
    else:
        if _details_text(details) != raw:
            # written in no other spelling: another one was edited in (a key given twice reads as its last
            # value here and as its first to SQLite's json_extract, which the client-certificate query uses)
            details = {"<details not as written>": str(raw)}
    try:
        return msgspec.convert({**values, "details": details, "log_id": log_id}, AuditRecord, strict=False)
    except msgspec.ValidationError:
        # a column of the wrong type: stringify so the leaf hash check reports the record
        fixed = {k: (v if k in ("seq", "status") and isinstance(v, int) else str(v)) for k, v in values.items()}
        for k in ("seq", "status"):
            if not isinstance(fixed[k], int):
                fixed[k] = -1
        return msgspec.convert({**fixed, "details": details, "log_id": log_id}, AuditRecord)


def iter_records(
    conn: sqlite3.Connection, log_id: str, first_seq: int | None = None, last_seq: int | None = None
) -> Iterator[AuditRecord]:
    """Records in seq order, optionally within ``first_seq..last_seq`` (no bound when None: every row)."""
    where: list[str] = []
    params: list[int] = []
    if first_seq is not None:
        where.append("seq >= ?")
        params.append(first_seq)
    if last_seq is not None:
        where.append("seq <= ?")
        params.append(last_seq)
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
    for row in conn.execute(sql, params):
        yield _record(log_id, tuple(row))


def table_stats(conn: sqlite3.Connection) -> tuple[int, int | None, int | None]:
    """(count, min seq, max seq) of the records table, whatever the seqs are."""
    count, lo, hi = conn.execute("SELECT count(*), min(seq), max(seq) FROM records").fetchone()
    return int(count), (None if lo is None else int(lo)), (None if hi is None else int(hi))


def tail_records(conn: sqlite3.Connection, log_id: str, n: int) -> list[AuditRecord]:
    """The newest ``n`` records, oldest first."""
    rows = conn.execute(_SELECT + " ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
    return [_record(log_id, tuple(r)) for r in reversed(rows)]


def query_records(
    conn: sqlite3.Connection,
    log_id: str,
    *,
    after_seq: int = 0,
    limit: int = 100,
    since: str | None = None,
    until: str | None = None,
    event: str | None = None,
    actor: str | None = None,
    model_name: str | None = None,
    outcome: str | None = None,
    request_id: str | None = None,
    job_id: str | None = None,
    client_cert_sha256: str | None = None,
    key_id: str | None = None,
    status: int | None = None,
    model_sha256: str | None = None,
    model_version: str | None = None,
    input_digest: str | None = None,
) -> list[AuditRecord]:
    """Records with ``seq > after_seq`` matching every given filter, oldest first (keyset paging).

    ``since`` / ``until`` compare ``recorded_at`` (UTC ISO 8601 strings): ``since <= t < until``.
    ``client_cert_sha256``: the ``details`` fact of that name (requests over mutual TLS).
    ``key_id``: the records of that API key, those it was refused on too (a revoked or expired key's
    request, or one from another client certificate, is the anonymous actor's, with the key in
    ``details.refused_key_id``; a wrong secret names no key).
    """
    where = ["seq > ?"]
    params: list[object] = [after_seq]
    if since is not None:
        where.append("recorded_at >= ?")
        params.append(since)
    if until is not None:
        where.append("recorded_at < ?")
        params.append(until)
    for column, value in (
        ("event", event),
        ("actor", actor),
        ("model_name", model_name),
        ("outcome", outcome),
        ("request_id", request_id),
        ("job_id", job_id),
        ("status", status),
        ("model_sha256", model_sha256),
        ("model_version", model_version),
        ("input_digest", input_digest),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if key_id is not None:
        refused = "CASE WHEN json_valid(details) THEN json_extract(details, '$.refused_key_id') END"
        where.append(f"(credential_id = ? OR {refused} = ?)")
        params.extend((key_id, key_id))
    if client_cert_sha256 is not None:
        # CASE: a details column that is not JSON (tampering, which verify reports) must not fail the query
        where.append("CASE WHEN json_valid(details) THEN json_extract(details, '$.client_cert_sha256') END = ?")
        params.append(client_cert_sha256)
    params.append(max(0, limit))
    sql = _SELECT + " WHERE " + " AND ".join(where) + " ORDER BY seq LIMIT ?"
    return [_record(log_id, tuple(r)) for r in conn.execute(sql, params).fetchall()]


def head(conn: sqlite3.Connection, log_id: str) -> tuple[int, str]:
    """(size, head hash) of the log: newest record, else the newest prune anchor, else the genesis."""
    row = conn.execute("SELECT seq, leaf_hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
    if row is not None:
        return int(row[0]), str(row[1])
    row = conn.execute(
        "SELECT size, head_hash FROM checkpoints WHERE kind = 'prune' ORDER BY size DESC LIMIT 1"
    ).fetchone()
    if row is not None:
        return int(row[0]), str(row[1])
    return 0, genesis_hash(log_id)


class LastCheckpoint(NamedTuple):
    size: int
    created_at: str
    every: int  #: the pace it signs (0: a format 1 checkpoint, no pace)
    interval_us: int


LAST_CHECKPOINT_SQL = (
    "SELECT size, created_at, every, interval_us FROM checkpoints WHERE +kind = 'checkpoint' ORDER BY id DESC LIMIT 1"
)


def last_checkpoint(conn: sqlite3.Connection) -> LastCheckpoint | None:
    """The newest regular checkpoint: size, created_at and the pace it signs (schema migrated).

    Read in every append's transaction and on every idle tick, so it must not grow with the log:
    ``+kind`` keeps SQLite off the ``(kind, size)`` index, which made it sort every checkpoint
    ever signed (22 ms at 38k checkpoints, nine months of idle ones; the audit writer's CPU went
    from 1 % to 19 % under the same load); the newest rows come first by id instead."""
    found = conn.execute(LAST_CHECKPOINT_SQL).fetchone()
    if found is None:
        return None
    return LastCheckpoint(int(found[0]), str(found[1]), int(found[2]), int(found[3]))
