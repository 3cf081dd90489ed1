"""Signed checkpoints: Ed25519 over (kind, log id, size, head hash, UTC time).

A ``checkpoint`` says "the log ``log_id`` had ``size`` records and the leaf
hash of record ``size`` was ``head_hash`` at ``created_at``".  A ``prune``
checkpoint says "records 1..``size`` were removed; record ``size`` had leaf
hash ``head_hash``": it is the verifier's anchor for the first remaining record.
The signed bytes are length-prefixed like record canonical bytes.
"""

from __future__ import annotations

import functools
import sqlite3
from typing import Literal

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime import signing
from runtime.errors import SignatureError

__all__ = [
    "CHECKPOINT_DOMAIN",
    "Checkpoint",
    "CheckpointKind",
    "load_checkpoints",
    "make_checkpoint",
    "signature_problem",
    "signed_bytes",
    "store_checkpoint",
    "verify_signature",
]

CHECKPOINT_DOMAIN = "inferbox-audit-checkpoint/1"

CheckpointKind = Literal["checkpoint", "prune"]


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    kind: CheckpointKind
    log_id: str
    size: int
    head_hash: str
    created_at: str
    key_id: str
    signature: str  # hex of the 64-byte Ed25519 signature


def _field(out: bytearray, value: str) -> None:
    data = value.encode("utf-8")
    out += len(data).to_bytes(8, "big")
    out += data


def signed_bytes(kind: str, log_id: str, size: int, head_hash: str, created_at: str) -> bytes:
    out = bytearray()
    for value in (CHECKPOINT_DOMAIN, kind, log_id, str(size), head_hash, created_at):
        _field(out, value)
    return bytes(out)


def make_checkpoint(
    key: Ed25519PrivateKey, *, kind: CheckpointKind, log_id: str, size: int, head_hash: str, created_at: str
) -> Checkpoint:
    sig = signing.sign(key, signed_bytes(kind, log_id, size, head_hash, created_at))
    return Checkpoint(
        kind=kind,
        log_id=log_id,
        size=size,
        head_hash=head_hash,
        created_at=created_at,
        key_id=signing.key_id(key),
        signature=sig.hex(),
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


def signature_problem(cp: Checkpoint, public_key: Ed25519PublicKey) -> str | None:
    """None when ``cp`` is signed by ``public_key``, else what is wrong."""
    expected_id = signing.key_id(public_key)
    if cp.key_id != expected_id:
        return f"{cp.kind} at size {cp.size} names signing key {cp.key_id!r}, the trusted key is {expected_id}"
    try:
        sig = bytes.fromhex(cp.signature)
    except ValueError:
        return f"{cp.kind} at size {cp.size}: signature is not hex"
    if sig.hex() != cp.signature:
        return f"{cp.kind} at size {cp.size}: signature is not lower-case hex"
    why = verify_signature(public_key, signed_bytes(cp.kind, cp.log_id, cp.size, cp.head_hash, cp.created_at), sig)
    return None if why is None else f"{cp.kind} at size {cp.size}: {why}"


def store_checkpoint(conn: sqlite3.Connection, cp: Checkpoint) -> None:
    """Insert ``cp`` (the caller holds the write transaction)."""
    conn.execute(
        "INSERT INTO checkpoints (kind, log_id, size, head_hash, created_at, key_id, signature) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (cp.kind, cp.log_id, cp.size, cp.head_hash, cp.created_at, cp.key_id, cp.signature),
    )


def load_checkpoints(conn: sqlite3.Connection) -> list[Checkpoint]:
    """Every checkpoint, in the order written."""
    rows = conn.execute(
        "SELECT kind, log_id, size, head_hash, created_at, key_id, signature FROM checkpoints ORDER BY id"
    ).fetchall()
    return [
        Checkpoint(kind=r[0], log_id=r[1], size=r[2], head_hash=r[3], created_at=r[4], key_id=r[5], signature=r[6])
        for r in rows
    ]
