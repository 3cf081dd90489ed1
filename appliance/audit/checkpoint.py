"""Signed checkpoints: Ed25519 over (kind, log id, size, head hash, UTC time, sequence, pace).

A ``checkpoint`` says "the log ``log_id`` had ``size`` records and the leaf
hash of record ``size`` was ``head_hash`` at ``created_at``".  A ``prune``
checkpoint says "records 1..``size`` were removed; record ``size`` had leaf
hash ``head_hash``": it is the verifier's anchor for the first remaining record.
The signed bytes are length-prefixed like record canonical bytes.

Format 2 (``inferbox-audit-checkpoint/2``, written since checkpoints carry a
sequence) also signs:

- ``index``: the checkpoint's 1-based position among all checkpoints of the
  log (both kinds, in the order written), and ``prev``: SHA-256 of the
  previous checkpoint's signature (hex, ``""`` for the first).  Deleting or
  replacing a checkpoint anywhere before the newest one breaks the sequence.
- ``every`` / ``interval_us``: the writer's pace (``checkpoint_every`` records
  and the checkpoint interval in microseconds).  Every writer signs at least
  this often until the next checkpoint, so the verifier holds the records
  after a checkpoint to the pace the checkpoint itself signs, not to mutable
  local settings.

Format 3 (``inferbox-audit-checkpoint/3``) is a format 2 checkpoint that also
signs ``retires``: the ids of the signing keys its signer (the new key)
retires, comma-separated; and ``pinned``: SHA-256 of the signatures of every
format 1 checkpoint before it (they have no signed place in the sequence, so
a retired key's holder could otherwise swap one for a forged prune anchor).
``inferbox signing-key create --force`` signs one in the transaction that
records the rotation; from it on, in the order written,
no checkpoint signed with a retired key is valid (:mod:`appliance.audit.rotation`).
Checkpoints are never pruned and every export holds them all, so the rule
outlives the rotation record.

Format 1 checkpoints (written before) keep verifying under their own signed
bytes; they have no sequence and no pace.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Literal

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime import signing
from runtime.errors import SignatureError

__all__ = [
    "CHECKPOINT_DOMAIN",
    "CHECKPOINT_DOMAIN_V1",
    "CHECKPOINT_VERSION",
    "ROTATION_VERSION",
    "Checkpoint",
    "CheckpointKind",
    "Pace",
    "load_checkpoints",
    "make_checkpoint",
    "next_in_sequence",
    "pin_of",
    "sequence_link",
    "sign_next",
    "signature_problem",
    "signed_bytes",
    "store_checkpoint",
    "verify_signature",
]

CHECKPOINT_DOMAIN_V1 = "inferbox-audit-checkpoint/1"
CHECKPOINT_DOMAIN = "inferbox-audit-checkpoint/2"
CHECKPOINT_VERSION = 2
#: the format of a checkpoint that retires keys (``retires``)
ROTATION_VERSION = 3

CheckpointKind = Literal["checkpoint", "prune"]


class Pace(msgspec.Struct, frozen=True):
    """How often a writer signs: every ``every`` records, and when ``interval_us`` has passed."""

    every: int
    interval_us: int

    @classmethod
    def of(cls, every: int, interval: timedelta) -> Pace:
        return cls(every, interval // timedelta(microseconds=1))

    @property
    def interval(self) -> timedelta:
        return timedelta(microseconds=self.interval_us)

    def describe(self) -> str:
        minutes = self.interval_us / 60e6
        return f"every {self.every} records (checkpoint_every) or {minutes:g} minutes (checkpoint_minutes)"


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    kind: CheckpointKind
    log_id: str
    size: int
    head_hash: str
    created_at: str
    key_id: str
    signature: str  # hex of the 64-byte Ed25519 signature
    # format 2 (defaults = format 1, omitted from exports so old export lines keep their bytes)
    version: int = 1
    index: int = 0  #: 1-based position among the log's checkpoints
    prev: str = ""  #: SHA-256 (hex) of the previous checkpoint's signature; "" for the first
    every: int = 0  #: the writer's checkpoint_every
    interval_us: int = 0  #: the writer's checkpoint interval, microseconds
    # format 3
    retires: str = ""  #: ids of the keys this checkpoint's signer retires, comma-separated
    pinned: str = ""  #: SHA-256 of the format 1 checkpoints' signatures before it ("" when none)

    @property
    def retired_ids(self) -> tuple[str, ...]:
        """The key ids this checkpoint retires (format 3; none before)."""
        if self.version < ROTATION_VERSION:
            return ()
        return tuple(k for k in self.retires.split(",") if k)

    @property
    def pace(self) -> Pace | None:
        """The pace this checkpoint signs (None for format 1)."""
        if self.version < 2 or self.every < 1 or self.interval_us < 1:
            return None
        return Pace(self.every, self.interval_us)


def _field(out: bytearray, value: str) -> None:
    data = value.encode("utf-8")
    out += len(data).to_bytes(8, "big")
    out += data


def signed_bytes(
    kind: str,
    log_id: str,
    size: int,
    head_hash: str,
    created_at: str,
    *,
    version: int = 1,
    index: int = 0,
    prev: str = "",
    every: int = 0,
    interval_us: int = 0,
    retires: str = "",
    pinned: str = "",
) -> bytes:
    """The bytes a checkpoint's signature covers (format ``version``)."""
    out = bytearray()
    if version == 1:
        values: tuple[str, ...] = (CHECKPOINT_DOMAIN_V1, kind, log_id, str(size), head_hash, created_at)
    else:
        values = (
            f"inferbox-audit-checkpoint/{version}",
            kind,
            log_id,
            str(size),
            head_hash,
            created_at,
            str(index),
            prev,
            str(every),
            str(interval_us),
        )
        if version >= ROTATION_VERSION:
            values = (*values, retires, pinned)
    for value in values:
        _field(out, value)
    return bytes(out)


def _checkpoint_bytes(cp: Checkpoint) -> bytes:
    return signed_bytes(
        cp.kind,
        cp.log_id,
        cp.size,
        cp.head_hash,
        cp.created_at,
        version=cp.version,
        index=cp.index,
        prev=cp.prev,
        every=cp.every,
        interval_us=cp.interval_us,
        retires=cp.retires,
        pinned=cp.pinned,
    )


def pin_of(format1_signatures: Iterable[str]) -> str:
    """What a format 3 checkpoint's ``pinned`` holds for the format 1 checkpoints before it."""
    signatures = list(format1_signatures)
    return hashlib.sha256("\n".join(signatures).encode("ascii", "replace")).hexdigest() if signatures else ""


def sequence_link(previous_signature: str) -> str:
    """What the next checkpoint's ``prev`` holds for a previous checkpoint with this signature."""
    return hashlib.sha256(previous_signature.encode("ascii", "replace")).hexdigest()


def make_checkpoint(
    key: Ed25519PrivateKey,
    *,
    kind: CheckpointKind,
    log_id: str,
    size: int,
    head_hash: str,
    created_at: str,
    index: int | None = None,
    prev: str = "",
    pace: Pace | None = None,
    retires: str = "",
    pinned: str = "",
) -> Checkpoint:
    """Sign a checkpoint: format 2 when ``index`` is given (the writer always gives it), format 3 when it
    also ``retires`` keys, else format 1."""
    if index is None:
        if retires:
            raise ValueError("a checkpoint that retires keys has a place in the sequence (format 3)")
        version, every, interval_us, index, prev = 1, 0, 0, 0, ""
    else:
        version = ROTATION_VERSION if retires else CHECKPOINT_VERSION
        every, interval_us = (pace.every, pace.interval_us) if pace is not None else (0, 0)
    data = signed_bytes(
        kind,
        log_id,
        size,
        head_hash,
        created_at,
        version=version,
        index=index,
        prev=prev,
        every=every,
        interval_us=interval_us,
        retires=retires,
        pinned=pinned,
    )
    return Checkpoint(
        kind=kind,
        log_id=log_id,
        size=size,
        head_hash=head_hash,
        created_at=created_at,
        key_id=signing.key_id(key),
        signature=signing.sign(key, data).hex(),
        version=version,
        index=index,
        prev=prev,
        every=every,
        interval_us=interval_us,
        retires=retires,
        pinned=pinned,
    )


@functools.lru_cache(maxsize=4096)
def _signature_ok(public_raw: bytes, data: bytes, signature: bytes) -> str | None:
    """Verify once per distinct (key, bytes, signature): a verifier re-checks the same checkpoints often."""
    try:
        signing.verify(Ed25519PublicKey.from_public_bytes(public_raw), data, signature, what="signature")
    except SignatureError as exc:
        return str(exc)
    return None


def verify_signature(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> str | None:
    """None when ``signature`` is ``public_key``'s over ``data``, else why not."""
    return _signature_ok(public_key.public_bytes_raw(), data, signature)


def _by_id(keys: Ed25519PublicKey | Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    if isinstance(keys, Ed25519PublicKey):
        keys = (keys,)
    return {signing.key_id(k): k for k in keys}


def signature_problem(cp: Checkpoint, public_keys: Ed25519PublicKey | Sequence[Ed25519PublicKey]) -> str | None:
    """None when ``cp`` is signed by one of ``public_keys``, else what is wrong."""
    trusted = _by_id(public_keys)
    key = trusted.get(cp.key_id)
    if key is None:
        names = ", ".join(sorted(trusted)) or "none"
        which = "the trusted key is" if len(trusted) == 1 else "the trusted keys are"
        return f"{cp.kind} at size {cp.size} names signing key {cp.key_id!r}, {which} {names}"
    if cp.version not in (1, CHECKPOINT_VERSION, ROTATION_VERSION):
        return f"{cp.kind} at size {cp.size}: unknown checkpoint format {cp.version}"
    if (cp.version == ROTATION_VERSION) != bool(cp.retires) or (cp.pinned and cp.version < ROTATION_VERSION):
        return f"{cp.kind} at size {cp.size}: format {cp.version} with retires {cp.retires!r}"
    try:
        sig = bytes.fromhex(cp.signature)
    except ValueError:
        return f"{cp.kind} at size {cp.size}: signature is not hex"
    if sig.hex() != cp.signature:
        return f"{cp.kind} at size {cp.size}: signature is not lower-case hex"
    why = verify_signature(key, _checkpoint_bytes(cp), sig)
    return None if why is None else f"{cp.kind} at size {cp.size}: {why}"


_COLUMNS_V1 = ("kind", "log_id", "size", "head_hash", "created_at", "key_id", "signature")
_COLUMNS_V2 = ("version", "idx", "prev", "every", "interval_us")
_COLUMNS_V3 = ("retires", "pinned")


def store_checkpoint(conn: sqlite3.Connection, cp: Checkpoint) -> None:
    """Insert ``cp`` (the caller holds the write transaction; the schema is migrated)."""
    conn.execute(
        f"INSERT INTO checkpoints ({', '.join(_COLUMNS_V1 + _COLUMNS_V2 + _COLUMNS_V3)}) "  # noqa: S608
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            cp.kind,
            cp.log_id,
            cp.size,
            cp.head_hash,
            cp.created_at,
            cp.key_id,
            cp.signature,
            cp.version,
            cp.index,
            cp.prev,
            cp.every,
            cp.interval_us,
            cp.retires,
            cp.pinned,
        ),
    )


def sign_next(
    conn: sqlite3.Connection,
    key: Ed25519PrivateKey,
    *,
    kind: CheckpointKind,
    log_id: str,
    size: int,
    head_hash: str,
    created_at: str,
    pace: Pace | None,
    retires: str = "",
) -> Checkpoint:
    """Sign the log's next checkpoint (format 2: its place in the sequence, the previous one's
    link, ``pace``; format 3 when it ``retires`` keys) and store it; the caller holds the write
    transaction."""
    index, prev = next_in_sequence(conn)
    pinned = ""
    if retires:  # the format 1 checkpoints have no signed place: this one pins them
        rows = conn.execute("SELECT signature FROM checkpoints WHERE version < 2 ORDER BY id").fetchall()
        pinned = pin_of(str(r[0]) for r in rows)
    cp = make_checkpoint(
        key,
        kind=kind,
        log_id=log_id,
        size=size,
        head_hash=head_hash,
        created_at=created_at,
        index=index,
        prev=prev,
        pace=pace,
        retires=retires,
        pinned=pinned,
    )
    store_checkpoint(conn, cp)
    return cp


def next_in_sequence(conn: sqlite3.Connection) -> tuple[int, str]:
    """(index, prev) for the next checkpoint (the caller holds the write transaction)."""
    row = conn.execute("SELECT version, idx, signature FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
    if row is None:
        return 1, ""
    version, idx, signature = int(row[0]), int(row[1]), str(row[2])
    if version < 2 or idx < 1:  # the newest is a format 1 checkpoint: count (once per log)
        idx = int(conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0])
    return idx + 1, sequence_link(signature)


def _columns(conn: sqlite3.Connection) -> tuple[str, ...]:
    """The checkpoint columns this database has (one not yet migrated has fewer)."""
    names = {str(r[1]) for r in conn.execute("PRAGMA table_info(checkpoints)")}
    columns: tuple[str, ...] = _COLUMNS_V1
    if set(_COLUMNS_V2) <= names:
        columns += _COLUMNS_V2 + tuple(c for c in _COLUMNS_V3 if c in names)
    return columns


_INT_FIELDS = ("size", "version", "index", "every", "interval_us")


def _malformed(values: dict[str, object]) -> Checkpoint:
    """A row of the wrong types, kept so that the verifier reports it instead of crashing."""
    fixed = {
        k: (v if type(v) is int else -1) if k in _INT_FIELDS else (v if isinstance(v, str) else str(v))
        for k, v in values.items()
    }
    if fixed["kind"] not in ("checkpoint", "prune"):
        fixed["kind"], fixed["signature"] = "checkpoint", ""  # fails its signature check
    return msgspec.convert(fixed, Checkpoint)


def load_checkpoints(conn: sqlite3.Connection) -> list[Checkpoint]:
    """Every checkpoint, in the order written (a database not yet migrated reads as format 1)."""
    columns = _columns(conn)
    rows = conn.execute(f"SELECT {', '.join(columns)} FROM checkpoints ORDER BY id").fetchall()  # noqa: S608
    out: list[Checkpoint] = []
    for row in rows:
        values = dict(zip(columns, row, strict=True))
        values["index"] = values.pop("idx", 0)
        try:
            out.append(msgspec.convert(values, Checkpoint, strict=True))
        except msgspec.ValidationError:
            out.append(_malformed(values))
    return out
