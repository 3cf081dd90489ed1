"""API keys: shown once, stored only as a SHA-256 hash, compared in constant time.

A key is ``ibx_<id>_<secret>`` (``id``: 12 hex characters, public, the audit
actor; ``secret``: 32 random bytes, URL-safe base64).  The table ``api_keys`` in
the state database (``settings.state_db``; WAL, busy timeout, ``BEGIN
IMMEDIATE`` for writes, so the server and the CLI share it) holds the id, a
name, the scopes, the SHA-256 of the whole key, creation / expiry / revocation
times, an optional per-key rate limit and an optional client certificate the
key is bound to (its SHA-256: the key then works only over mutual TLS with that
certificate, so a leaked key alone is not enough).  :class:`KeyStore` implements
:class:`api.protocols.KeyVerifier`.

Scopes: ``infer`` (every model), ``infer:<model>`` (one model), ``models:admin``,
``keys:admin``, ``audit:read``, ``metrics:read`` (``/metrics`` with ``metrics_auth``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from api.protocols import SCOPES, Principal
from appliance.sqlite import enable_wal, open_read_only
from runtime.errors import AuthError, ConfigError, InputError
from runtime.times import parse_utc_iso, utc_iso

__all__ = [
    "SCOPES",
    "FirstKeyExistsError",
    "KeyRecord",
    "KeyStore",
    "bound_key_ids",
    "certificate_sha256",
    "key_id_of",
    "parse_expiry",
]

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KEY = re.compile(r"ibx_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_ID = re.compile(r"[0-9a-f]{12}")


def key_id_of(given: str) -> str:
    """The key id in ``given``: an id, or a whole key (``ibx_<id>_<secret>``, what an operator has at
    hand in ``first-admin.key``), whose secret is never repeated back.  Anything else is an
    InputError that does not quote it either (it may be a mistyped secret)."""
    whole = _KEY.fullmatch(given.strip())
    if whole is not None:
        return whole.group(1)
    if _ID.fullmatch(given):
        return given
    looks = "a key" if given.startswith("ibx_") else "an id"
    raise InputError(
        f"that is not {looks} inferbox issued: a key id is 12 hexadecimal characters (ibx_<id>_...); "
        "see `inferbox keys list`",
        field="id",
    )


_DUMMY_HASH = hashlib.sha256(b"inferbox: no such key").hexdigest()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    scopes TEXT NOT NULL,
    key_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT,
    rate_limit_per_minute INTEGER NOT NULL DEFAULT 0,
    client_cert_sha256 TEXT,
    tokens_per_minute INTEGER NOT NULL DEFAULT 0
)
"""
#: added after the first release: tables created before it get the column on open
_ADDED_COLUMNS = {
    "client_cert_sha256": "ALTER TABLE api_keys ADD COLUMN client_cert_sha256 TEXT",
    "tokens_per_minute": "ALTER TABLE api_keys ADD COLUMN tokens_per_minute INTEGER NOT NULL DEFAULT 0",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _now() -> datetime:
    return datetime.now(UTC)


def parse_expiry(text: str) -> datetime:
    """``YYYY-MM-DD`` (the key expires at 00:00 UTC that day) or an ISO 8601 time (UTC if no zone)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"--expires: {text!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM]", field="expires"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class KeyRecord:
    """A key as stored (never the secret)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    rate_limit_per_minute: int = 0
    #: usable only on a mutual-TLS connection presenting the certificate of this SHA-256
    client_cert_sha256: str | None = None
    #: tokens its text requests may bring per minute (0: the server's tokens_per_minute)
    tokens_per_minute: int = 0

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and parse_utc_iso(self.expires_at) <= now:
            return "expired"
        return "active"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "rate_limit_per_minute": self.rate_limit_per_minute,
            "client_cert_sha256": self.client_cert_sha256,
            "tokens_per_minute": self.tokens_per_minute,
        }


def _check_scopes(scopes: Sequence[str], model: str | None) -> tuple[str, ...]:
    if not scopes:
        raise InputError(f"--scope: give at least one of {', '.join(SCOPES)} or infer:<model>", field="scope")
    if model is not None and not _MODEL_NAME.fullmatch(model):
        raise InputError(f"--model: {model!r} is not a model name", field="model")
    out: list[str] = []
    for scope in scopes:
        if scope.startswith("infer:") and _MODEL_NAME.fullmatch(scope.removeprefix("infer:")):
            out.append(scope)
        elif scope == "infer" and model is not None:
            out.append(f"infer:{model}")
        elif scope in SCOPES:
            out.append(scope)
        else:
            raise InputError(
                f"--scope: {scope!r} is not a scope; use one of {', '.join(SCOPES)} or infer:<model>", field="scope"
            )
    if model is not None and "infer" not in scopes:
        raise InputError(
            f"--model: {model!r} narrows only a plain --scope infer (given: {', '.join(scopes)}); "
            "give --scope infer --model M, or --scope infer:M without --model",
            field="model",
        )
    return tuple(dict.fromkeys(out))


class FirstKeyExistsError(InputError):
    """``KeyStore.create(first=True)`` on a store that holds a key (another process made the first one)."""


class KeyStore:
    """SQLite-backed API keys. Thread-safe; one connection, serialized by a lock."""

    def __init__(self, db_path: Path, *, clock: Callable[[], datetime] = _now) -> None:
        import sqlite_utils

        db_path = Path(db_path)
        if not db_path.parent.is_dir():
            # never a new state folder by accident (a mistyped --home): serve and install make it
            raise ConfigError(
                f"there is no state folder at {db_path.parent}; point at the one the server uses "
                "(--home or INFERBOX_HOME), or create it with `inferbox serve` or `inferbox install`"
            )
        self.path = db_path
        self._clock = clock
        self._lock = threading.Lock()
        conn = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None, timeout=10.0)
        self.db = sqlite_utils.Database(conn)
        conn.execute("PRAGMA busy_timeout = 10000")
        enable_wal(conn, timeout_s=10.0)
        conn.execute("PRAGMA synchronous = FULL")
        with self._write():
            conn.execute(_SCHEMA)
            columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(api_keys)")}
            for column, alter in _ADDED_COLUMNS.items():
                if column not in columns:
                    conn.execute(alter)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite rolled back already on a full disk: its error is the one to see
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- managing ---------------------------------------------------------------------------------
    def create(
        self,
        scopes: Sequence[str],
        *,
        model: str | None = None,
        expires: datetime | None = None,
        name: str = "",
        rate_limit_per_minute: int = 0,
        client_cert_sha256: str | None = None,
        first: bool = False,
        tokens_per_minute: int = 0,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and the secret (shown once; only its hash is kept).

        ``client_cert_sha256``: bind the key to a client certificate (see :func:`certificate_sha256`).
        ``first``: only when the store holds no key yet (checked in the insert's transaction: two servers
        first started at once on one home each made a first admin key); else :class:`FirstKeyExistsError`.
        """
        checked = _check_scopes(scopes, model)
        if client_cert_sha256 is not None and not _SHA256.fullmatch(client_cert_sha256):
            raise InputError(
                "client_cert_sha256: must be the SHA-256 of a certificate, 64 lowercase hex digits",
                field="client_cert_sha256",
            )
        now = self._clock()
        if expires is not None and expires <= now:
            raise InputError(f"--expires: {utc_iso(expires)} is in the past", field="expires")
        if rate_limit_per_minute < 0:
            raise InputError("rate_limit_per_minute: must be >= 0", field="rate_limit_per_minute")
        if tokens_per_minute < 0:
            raise InputError("tokens_per_minute: must be >= 0", field="tokens_per_minute")
        if any(unicodedata.category(c).startswith("C") for c in name):
            # `keys list` prints one key a line: a newline in a name could forge another key's line
            raise InputError("--name: control characters (a newline, a tab) are not allowed in a name", field="name")
        key_id = secrets.token_hex(6)
        secret = f"ibx_{key_id}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(
            id=key_id,
            name=name,
            scopes=checked,
            created_at=utc_iso(now),
            expires_at=utc_iso(expires) if expires is not None else None,
            revoked_at=None,
            rate_limit_per_minute=rate_limit_per_minute,
            client_cert_sha256=client_cert_sha256,
            tokens_per_minute=tokens_per_minute,
        )
        with self._write() as conn:
            if first and conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]:
                raise FirstKeyExistsError("the store already holds a key")
            conn.execute(
                "INSERT INTO api_keys (id, name, scopes, key_sha256, created_at, expires_at, revoked_at, "
                "rate_limit_per_minute, client_cert_sha256, tokens_per_minute) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
                (
                    key_id,
                    name,
                    json.dumps(list(checked)),
                    _key_hash(secret, client_cert_sha256),
                    record.created_at,
                    record.expires_at,
                    rate_limit_per_minute,
                    client_cert_sha256,
                    tokens_per_minute,
                ),
            )
        return record, secret

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = list(self.db.query("SELECT * FROM api_keys ORDER BY created_at, id"))
        return [_record(r) for r in rows]

    def get(self, key_id: str) -> KeyRecord:
        key_id = key_id_of(key_id)
        with self._lock:
            rows = list(self.db.query("SELECT * FROM api_keys WHERE id = ?", [key_id]))
        if not rows:
            raise InputError(f"key {key_id!r} does not exist; see `inferbox keys list`", field="id")
        return _record(rows[0])

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key at once (idempotent); an unknown id is an error."""
        return self.revoke_once(key_id)[0]

    def revoke_once(self, key_id: str) -> tuple[KeyRecord, bool]:
        """Revoke a key at once: (its record, whether this call revoked it).  A key revoked already
        keeps its ``revoked_at`` and gives False (of two revokes at once, one gives True); an unknown
        id is an error."""
        key_id = key_id_of(key_id)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (utc_iso(self._clock()), key_id),
            )
            changed = cur.rowcount == 1
        return self.get(key_id), changed  # get: an unknown id is an InputError

    def count(self) -> int:
        with self._lock:
            rows = list(self.db.query("SELECT COUNT(*) AS n FROM api_keys"))
        return int(rows[0]["n"])

    # -- verifying ---------------------------------------------------------------------------------
    def verify(self, secret: str) -> Principal:
        """The key's principal, or AuthError (malformed / unknown / wrong / revoked / expired)."""
        match = _KEY.fullmatch(secret)
        row: dict[str, Any] | None = None
        if match is not None:
            with self._lock:
                rows = list(self.db.query("SELECT * FROM api_keys WHERE id = ?", [match.group(1)]))
            row = rows[0] if rows else None
        digest = _key_hash(secret, row.get("client_cert_sha256") if row is not None else None)
        stored = str(row["key_sha256"]) if row is not None else _DUMMY_HASH
        same = hmac.compare_digest(digest, stored)
        if row is None or not same:
            raise AuthError("the API key is not valid; check it, or create one with `inferbox keys create`")
        record = _record(row)
        state = record.state(self._clock())
        if state == "revoked":
            raise AuthError(
                f"API key {record.id} was revoked at {record.revoked_at}; create a new key", key_id=record.id
            )
        if state == "expired":
            raise AuthError(f"API key {record.id} expired at {record.expires_at}; create a new key", key_id=record.id)
        return Principal(
            key_id=record.id,
            scopes=record.scopes,
            rate_limit_per_minute=record.rate_limit_per_minute,
            client_cert_sha256=record.client_cert_sha256,
            tokens_per_minute=record.tokens_per_minute,
        )


def bound_key_ids(db_path: Path, now: datetime | None = None) -> list[str]:
    """Ids of the active keys bound to a client certificate, read without writing (``doctor``);
    none from a state database that has no key table, or one from before bindings."""
    conn = open_read_only(db_path)
    try:
        rows = conn.execute(
            "SELECT id FROM api_keys WHERE client_cert_sha256 IS NOT NULL AND revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > ?) ORDER BY id",
            (utc_iso(now or _now()),),
        ).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such" in str(exc):  # no such table / column
            return []
        raise
    finally:
        conn.close()
    return [str(r[0]) for r in rows]


def _key_hash(secret: str, client_cert_sha256: str | None) -> str:
    """What is stored of a key: SHA-256 of the secret, and for a bound key of the secret and the
    fingerprint, so that an older inferbox, which knows nothing of bindings, refuses a bound key
    instead of accepting it from any connection."""
    data = secret if client_cert_sha256 is None else f"{secret}\nclient-cert-sha256:{client_cert_sha256}"
    return hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest()


def _record(row: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        id=str(row["id"]),
        name=str(row["name"]),
        scopes=tuple(json.loads(row["scopes"])),
        created_at=str(row["created_at"]),
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        rate_limit_per_minute=int(row["rate_limit_per_minute"]),
        client_cert_sha256=row.get("client_cert_sha256"),
        tokens_per_minute=int(row.get("tokens_per_minute") or 0),
    )


def certificate_sha256(path: Path) -> str:
    """SHA-256 of the DER of the (first) certificate in ``path``, PEM or DER: what a key is bound to."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"--client-cert: cannot read {path}: {exc.strerror or exc}", field="client_cert") from None
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise InputError(
            f"--client-cert: {path} holds no certificate (PEM or DER); give the client's certificate file",
            field="client_cert",
        ) from None
    if len(certs) > 1:
        raise InputError(
            f"--client-cert: {path} holds {len(certs)} certificates (a chain or a CA bundle?); "
            "give a file with the client's own certificate only",
            field="client_cert",
        )
    try:
        is_ca = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise InputError(
            f"--client-cert: {path} is a CA certificate ({certs[0].subject.rfc4514_string()}); "
            "give the client's own certificate, which that CA signed",
            field="client_cert",
        )
    return hashlib.sha256(certs[0].public_bytes(serialization.Encoding.DER)).hexdigest()
