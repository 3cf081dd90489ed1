"""Audit records and their canonical bytes.

A record is an :class:`~api.protocols.AuditEvent` plus what the log adds: its
``seq``, the ``prev_hash`` it links to, the log id and the time it was written.
:func:`canonical_bytes` serializes every field in one fixed order, each one
length-prefixed (8-byte big-endian length, then UTF-8), so no two distinct
records share a serialization whatever characters their fields hold.
``leaf_hash = SHA-256(0x00 || canonical_bytes(record))`` (the RFC 6962 leaf
prefix); the first record links to ``SHA-256(log_id)``.
"""

from __future__ import annotations

import hashlib
import operator
import re
from datetime import UTC, datetime

import msgspec

from api.protocols import AuditEvent
from runtime.errors import AuditError
from runtime.times import utc_iso

__all__ = [
    "DOMAIN",
    "EVENT_FIELDS",
    "RECORD_FIELDS",
    "AuditRecord",
    "canonical_bytes",
    "checked_event",
    "format_time",
    "genesis_hash",
    "is_hex64",
    "leaf_hash",
    "parse_canonical",
    "parse_time",
]

#: first field of every canonical serialization (domain separation + version)
DOMAIN = "inferbox-audit-record/1"

#: the AuditEvent fields, in canonical order (``details`` last, as sorted pairs)
EVENT_FIELDS: tuple[str, ...] = (
    "event",
    "action",
    "actor",
    "credential_id",
    "origin",
    "outcome",
    "status",
    "started_at",
    "ended_at",
    "request_id",
    "model_name",
    "model_version",
    "model_sha256",
    "backend",
    "variant",
    "job_id",
    "input_digest",
    "output_digest",
    "digest_key_id",
)

#: every field a record's leaf hash covers, in canonical order
RECORD_FIELDS: tuple[str, ...] = ("seq", "log_id", "prev_hash", "recorded_at", *EVENT_FIELDS, "details")

_HEX64 = re.compile(r"[0-9a-f]{64}")


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One stored record: the event, its place in the chain, and its leaf hash."""

    seq: int
    log_id: str
    prev_hash: str
    recorded_at: str
    event: str
    action: str
    actor: str
    credential_id: str
    origin: str
    outcome: str
    status: int
    started_at: str
    ended_at: str
    request_id: str
    model_name: str
    model_version: str
    model_sha256: str
    backend: str
    variant: str
    job_id: str
    input_digest: str
    output_digest: str
    digest_key_id: str
    details: dict[str, str]
    leaf_hash: str = ""


def is_hex64(value: str) -> bool:
    """True for a lower-case hex SHA-256 (the only spelling the log writes)."""
    return _HEX64.fullmatch(value) is not None


def format_time(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds and ``Z`` (the one time format of the log)."""
    if moment.tzinfo is None:
        raise AuditError("audit times must be timezone-aware; pass datetime.now(UTC)")
    return utc_iso(moment)


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 date or time; naive values are taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError as exc:
        raise AuditError(f"{text!r} is not an ISO 8601 date or time (e.g. 2026-05-01 or 2026-05-01T12:00:00Z)") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def genesis_hash(log_id: str) -> str:
    """What the first record's ``prev_hash`` must be."""
    return hashlib.sha256(log_id.encode("utf-8")).hexdigest()


def _field(value: str) -> bytes:
    data = value.encode("utf-8")
    return len(data).to_bytes(8, "big") + data


_DOMAIN_FIELD = _field(DOMAIN)
_EVENT_VALUES = operator.attrgetter(*EVENT_FIELDS)


def canonical_bytes(record: AuditRecord) -> bytes:
    """The fixed-order, length-prefixed serialization the leaf hash covers."""
    values = [str(record.seq), record.log_id, record.prev_hash, record.recorded_at]
    values.extend(str(v) for v in _EVENT_VALUES(record))
    pairs = sorted(record.details.items())
    values.append(str(len(pairs)))
    for key, value in pairs:
        values.append(key)
        values.append(value)
    return b"".join([_DOMAIN_FIELD, *map(_field, values)])


_STR_FIELDS: tuple[str, ...] = tuple(f for f in EVENT_FIELDS if f != "status")
_STR_VALUES = operator.attrgetter(*_STR_FIELDS)
_SQLITE_INT = (-(1 << 63), (1 << 63) - 1)


def _plain(event: AuditEvent) -> AuditEvent:
    """``event`` with str / int subclasses (a StrEnum, an IntEnum) made plain, or AuditError naming the field."""
    changes: dict[str, object] = {}
    for name, value in zip(_STR_FIELDS, _STR_VALUES(event), strict=True):
        if not isinstance(value, str):
            raise AuditError(f"field {name!r} must be a str, not {type(value).__name__}")
        if type(value) is not str:
            changes[name] = str.__str__(value)  # what SQLite stores of a str subclass
    status = event.status
    if isinstance(status, bool) or not isinstance(status, int):
        raise AuditError(f"field 'status' must be an int, not {type(status).__name__}")
    if type(status) is not int:
        changes["status"] = int(status)
    details = event.details
    if not isinstance(details, dict):
        raise AuditError(f"field 'details' must be a dict, not {type(details).__name__}")
    plain: dict[str, str] = {}
    for key, value in details.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise AuditError(f"details must map str to str; {key!r}: {type(value).__name__}")
        plain[str.__str__(key)] = str.__str__(value)
    changes["details"] = plain
    return msgspec.structs.replace(event, **changes)


def checked_event(event: AuditEvent) -> AuditEvent:
    """``event`` with exactly the types the log stores and hashes alike; :class:`AuditError` naming a bad field.

    ``AuditEvent`` is not validated on construction: ``status=True`` would be
    stored as 1 but hashed as ``"True"``, and a non-string ``details`` value
    would fail the whole transaction.  The usual event passes a few type
    checks unchanged; str and int subclasses are made plain, anything else is refused.
    """
    if not (
        all(type(v) is str for v in _STR_VALUES(event))
        and type(event.status) is int
        and type(event.details) is dict
        and all(type(k) is str and type(v) is str for k, v in event.details.items())
    ):
        event = _plain(event)
    if not _SQLITE_INT[0] <= event.status <= _SQLITE_INT[1]:
        raise AuditError(f"field 'status' is out of range ({event.status})")
    if event.outcome not in ("success", "failure"):
        raise AuditError(f"field 'outcome' must be 'success' or 'failure', not {event.outcome!r}")
    return event


def _int_text(text: str) -> int:
    """The int a canonical decimal spells (no sign, padding or other digits: an exact inverse)."""
    value = int(text) if text.isascii() else None
    if value is None or str(value) != text:
        raise AuditError(f"canonical record bytes hold {text!r} where a decimal integer belongs")
    return value


def parse_canonical(data: bytes) -> AuditRecord:
    """Inverse of :func:`canonical_bytes` (``leaf_hash`` is recomputed)."""
    pos = 0

    def take() -> str:
        nonlocal pos
        if pos + 8 > len(data):
            raise AuditError("canonical record bytes are truncated")
        size = int.from_bytes(data[pos : pos + 8], "big")
        pos += 8
        if pos + size > len(data):
            raise AuditError("canonical record bytes are truncated")
        value = data[pos : pos + size].decode("utf-8")
        pos += size
        return value

    if take() != DOMAIN:
        raise AuditError(f"not an audit record serialization (expected {DOMAIN})")
    try:
        values: dict[str, object] = {"seq": _int_text(take())}
        for name in ("log_id", "prev_hash", "recorded_at", *EVENT_FIELDS):
            values[name] = take()
        values["status"] = _int_text(str(values["status"]))
        count = _int_text(take())
        details: dict[str, str] = {}
        last_key: str | None = None
        for _ in range(count):
            key = take()
            if last_key is not None and key <= last_key:
                raise AuditError("canonical record bytes hold details keys out of order or twice")
            last_key = key
            details[key] = take()
    except ValueError as exc:  # int() of a non-number, or bytes that are not UTF-8
        raise AuditError(f"canonical record bytes are malformed: {exc}") from exc
    values["details"] = details
    if pos != len(data):
        raise AuditError("canonical record bytes have trailing data")
    record = msgspec.convert(values, AuditRecord)
    return msgspec.structs.replace(record, leaf_hash=leaf_hash(record))


def leaf_hash(record: AuditRecord) -> str:
    """``SHA-256(0x00 || canonical_bytes(record))`` as lower-case hex."""
    return hashlib.sha256(b"\x00" + canonical_bytes(record)).hexdigest()
