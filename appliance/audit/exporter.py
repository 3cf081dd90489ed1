"""JSONL export of the log for off-box copies (PCI DSS 10.3.3).

One JSON object per line, in canonical form (``msgspec`` with sorted keys, no
whitespace; the verifier re-encodes every line and rejects any other
spelling), tagged by ``type``:

1. ``header``: format, log id, export time, the ``since`` / ``until`` window
   (``null`` = from the log's start / up to its head) and the seq range;
2. for a window export, an ``edge`` line with ``side`` ``before``: the record
   just before the window (the newest one written before ``since``), unless
   the window starts at the log's start (or its prune anchor);
3. ``record`` lines in seq order (every field of the leaf hash, plus it);
4. for a window export, an ``edge`` line with ``side`` ``after``: the record
   just after the window (the oldest written at or after ``until``), unless
   the window reaches the log's head;
5. ``checkpoint`` lines: every signed checkpoint and prune anchor of the log,
   in the order written;
6. ``trailer``: line count, SHA-256 of every byte before it, and an Ed25519
   signature over both with the log's signing key.

A window export starts at the first record written at or after ``since``.  The
edge records tie it to the rest of the log: the verifier checks that the first
record links to the record before the window and the last one to the record
after it, so records removed from the database at either edge before the
export show as a gap, and that every checkpoint signed inside the window names
a size inside it.  Format ``inferbox-audit-export/1`` (no edges) still verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.canonical import AuditRecord, format_time
from appliance.audit.checkpoint import Checkpoint, load_checkpoints
from appliance.audit.schema import connect, read_log_id
from appliance.audit.store import iter_records
from runtime import signing
from runtime.errors import AuditError

__all__ = [
    "EXPORT_DOMAIN",
    "EXPORT_FORMAT",
    "EXPORT_FORMAT_V1",
    "CheckpointLine",
    "EdgeLine",
    "ExportSummary",
    "Header",
    "Line",
    "RecordLine",
    "Trailer",
    "encode_line",
    "export_jsonl",
    "trailer_signed_bytes",
]

EXPORT_FORMAT = "inferbox-audit-export/2"
EXPORT_FORMAT_V1 = "inferbox-audit-export/1"  #: no edge lines; still verifies
EXPORT_DOMAIN = "inferbox-audit-export-trailer/1"


class Header(msgspec.Struct, frozen=True, kw_only=True, tag="header", tag_field="type", forbid_unknown_fields=True):
    format: str
    log_id: str
    exported_at: str
    since: str | None
    until: str | None
    first_seq: int  #: 0 when the export holds no records
    last_seq: int


class RecordLine(AuditRecord, frozen=True, kw_only=True, tag="record", tag_field="type", forbid_unknown_fields=True):
    pass


class EdgeLine(AuditRecord, frozen=True, kw_only=True, tag="edge", tag_field="type", forbid_unknown_fields=True):
    """The record just before (``side="before"``) or just after a window export."""

    side: Literal["before", "after"]


class CheckpointLine(
    Checkpoint, frozen=True, kw_only=True, tag="checkpoint", tag_field="type", forbid_unknown_fields=True
):
    pass


class Trailer(msgspec.Struct, frozen=True, kw_only=True, tag="trailer", tag_field="type", forbid_unknown_fields=True):
    lines: int  #: lines before the trailer
    sha256: str  #: of every byte before the trailer
    key_id: str
    signature: str


Line = Header | RecordLine | EdgeLine | CheckpointLine | Trailer

_ENCODER = msgspec.json.Encoder(order="sorted")


def encode_line(line: Line) -> bytes:
    """The one canonical spelling of a line (newline included)."""
    return _ENCODER.encode(line) + b"\n"


def trailer_signed_bytes(lines: int, sha256: str) -> bytes:
    out = bytearray()
    for value in (EXPORT_DOMAIN, str(lines), sha256):
        data = value.encode("utf-8")
        out += len(data).to_bytes(8, "big") + data
    return bytes(out)


@dataclass(frozen=True)
class ExportSummary:
    records: int
    first_seq: int
    last_seq: int
    checkpoints: int
    sha256: str  #: of the whole file
    bytes: int


@dataclass(frozen=True)
class _Window:
    first: int  #: 0 when the window holds no records
    last: int
    before: int | None  #: seq of the record just before the window (since given), None: none
    after: int | None  #: seq of the record just after the window (until given), None: none


def _one(conn: sqlite3.Connection, sql: str, *params: object) -> int | None:
    value = conn.execute(sql, params).fetchone()[0]
    return None if value is None else int(value)


def _window(conn: sqlite3.Connection, since: datetime | None, until: datetime | None) -> _Window:
    if since is None:
        first = _one(conn, "SELECT min(seq) FROM records")
    else:
        first = _one(conn, "SELECT min(seq) FROM records WHERE recorded_at >= ?", format_time(since))
    if until is None:
        last = _one(conn, "SELECT max(seq) FROM records")
    else:
        last = _one(conn, "SELECT max(seq) FROM records WHERE recorded_at < ?", format_time(until))
    before = after = None
    if since is not None:
        if first is None:
            before = _one(conn, "SELECT max(seq) FROM records")
        else:
            before = _one(conn, "SELECT max(seq) FROM records WHERE seq < ?", first)
    if until is not None:
        if last is None:
            after = _one(conn, "SELECT min(seq) FROM records")
        else:
            after = _one(conn, "SELECT min(seq) FROM records WHERE seq > ?", last)
    if first is None or last is None or last < first:
        first = last = 0
    return _Window(first, last, before, after)


def _fields(obj: msgspec.Struct) -> dict[str, Any]:
    return {f: getattr(obj, f) for f in obj.__struct_fields__}


def export_jsonl(
    db_path: Path,
    out: BinaryIO,
    *,
    signing_key: Ed25519PrivateKey | Callable[[], Ed25519PrivateKey],
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime,
) -> ExportSummary:
    """Write the records of ``[since, until)`` and every checkpoint to ``out``.

    ``signing_key`` may be a callable that reads the key file: it is called after the snapshot, so a
    copy that holds a rotation's checkpoint is signed with the key the rotation put there (a key read
    before, the one it retires, made the copy fail every later verify).
    """
    if since is not None and until is not None and since >= until:
        raise AuditError(
            f"the export window is empty: since ({since.isoformat()}) is not before until ({until.isoformat()}); "
            "swap them"
        )
    conn = connect(db_path, read_only=True)
    digest = hashlib.sha256()
    whole = hashlib.sha256()
    count = 0
    size = 0

    def emit(line: Line) -> None:
        nonlocal count, size
        data = encode_line(line)
        digest.update(data)
        whole.update(data)
        out.write(data)
        count += 1
        size += len(data)

    try:
        conn.execute("BEGIN")  # one snapshot for records and checkpoints
        log_id = read_log_id(conn)
        window = _window(conn, since, until)
        first, last = window.first, window.last
        emit(
            Header(
                format=EXPORT_FORMAT,
                log_id=log_id,
                exported_at=format_time(now),
                since=format_time(since) if since else None,
                until=format_time(until) if until else None,
                first_seq=first,
                last_seq=last,
            )
        )
        records = 0
        if window.before is not None:
            for rec in iter_records(conn, log_id, window.before, window.before):
                emit(EdgeLine(side="before", **_fields(rec)))
        if first:
            for rec in iter_records(conn, log_id, first, last):
                emit(RecordLine(**_fields(rec)))
                records += 1
        if window.after is not None:
            for rec in iter_records(conn, log_id, window.after, window.after):
                emit(EdgeLine(side="after", **_fields(rec)))
        checkpoints = load_checkpoints(conn)
        for cp in checkpoints:
            emit(CheckpointLine(**_fields(cp)))
        conn.execute("COMMIT")
    finally:
        conn.close()
    body_sha = digest.hexdigest()
    key = signing_key() if callable(signing_key) else signing_key
    sig = signing.sign(key, trailer_signed_bytes(count, body_sha))
    key_id = signing.key_id(key)
    trailer = encode_line(Trailer(lines=count, sha256=body_sha, key_id=key_id, signature=sig.hex()))
    out.write(trailer)
    whole.update(trailer)
    out.flush()
    if hasattr(out, "fileno"):
        with contextlib.suppress(OSError, ValueError):  # not a real file (BytesIO)
            os.fsync(out.fileno())
    return ExportSummary(
        records=records,
        first_seq=first,
        last_seq=last,
        checkpoints=len(checkpoints),
        sha256=whole.hexdigest(),
        bytes=size + len(trailer),
    )
