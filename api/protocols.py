"""The small interfaces the API needs from its host; ``appliance`` implements them.

The API never imports SQLite or the appliance: ``create_app()`` receives an
:class:`AuditSink` and a :class:`KeyVerifier`.  The batch worker uses the same
:class:`AuditEvent` so that both processes write one chain of one shape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

__all__ = [
    "SCOPES",
    "AuditEvent",
    "AuditReader",
    "AuditSink",
    "AuditStats",
    "AuditStatsSource",
    "Digest",
    "KeyVerifier",
    "Principal",
    "without_secrets",
]

#: every scope a key can hold (docs/api.md, *Authentication*): the first admin key has them all
SCOPES = ("infer", "models:admin", "keys:admin", "audit:read", "metrics:read")

#: a whole API key as a client sends it (``ibx_<id>_<secret>``); the id is the first group
_WHOLE_KEY = re.compile(r"ibx_([0-9a-f]{12})_[A-Za-z0-9_-]+")


def without_secrets(text: str) -> str:
    """``text`` with every whole API key in it as its id alone: the id names the key as well, and
    what is recorded or printed is read by others."""
    return _WHOLE_KEY.sub(lambda m: m.group(1), text)


Outcome = Literal["success", "failure"]


class Digest(msgspec.Struct, frozen=True):
    """HMAC-SHA256 of some bytes under the audit digest key ``key_id`` (hex)."""

    key_id: str
    hexdigest: str


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One thing that happened. Never holds a payload, text, tensor or secret.

    ``event``: inference | metadata | admin | auth_failure | key_create |
    key_revoke | model_load | model_unload | config | service_start |
    service_stop | tls_reload | audit_read | audit_export | audit_prune |
    batch_submit | batch_start | batch_end | batch_purge | backup_create | backup_restore | model_export |
    model_import | model_remove | model_pack | signing_key_rotate.  ``details`` holds
    small facts (counts, a Merkle root), never data.
    """

    event: str
    action: str  # e.g. "POST /v1/embeddings", "inferbox keys revoke"
    actor: str  # key id, "system", or the systemd unit
    origin: str  # client address, or the unit / host for batch and CLI
    outcome: Outcome
    status: int  # HTTP status, or 0 / 1 for non-HTTP events
    started_at: str  # UTC ISO 8601 with microseconds and "Z"
    ended_at: str
    request_id: str = ""
    credential_id: str = ""
    model_name: str = ""
    model_version: str = ""
    model_sha256: str = ""
    backend: str = ""
    variant: str = ""
    job_id: str = ""
    input_digest: str = ""
    output_digest: str = ""
    digest_key_id: str = ""
    details: dict[str, str] = {}


class AuditSink(Protocol):
    def digest(self, data: bytes) -> Digest:
        """HMAC-SHA256 of ``data`` under the current digest key."""
        ...

    async def record(self, event: AuditEvent) -> None:
        """Append ``event``; return only once it is durable (group commit)."""
        ...


class AuditStats(msgspec.Struct, frozen=True, kw_only=True):
    """What an audit log has done since it opened, for ``/metrics``."""

    #: records appended (committed)
    records: int
    #: write transactions committed, each one fsync (group commit: many records each)
    commits: int
    #: seconds the committed append transactions took, first statement to durable commit
    commit_seconds: float
    #: records handed to the writer and not yet committed (requests waiting for their record)
    pending: int
    #: the last append failed (a full disk, a read-only folder): requests are refused with 503 and
    #: ``/v2/health/ready`` says not ready, until an append succeeds again
    failing: bool = False
    #: records refused because an append failed, since the log opened (never goes down)
    refused: int = 0
    #: seconds the append in progress has waited so far (another process holding the database's write
    #: lock: a long prune, a copy): 0 when none is under way
    stalled_s: float = 0.0


@runtime_checkable
class AuditStatsSource(Protocol):
    """An audit sink that can say what it has done (the appliance's audit log)."""

    def stats(self) -> AuditStats: ...


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling: an API key's id and scopes (never its secret)."""

    key_id: str
    scopes: tuple[str, ...]
    rate_limit_per_minute: int = 0
    #: tokens the key's text requests may bring per minute (0: the server's default, tokens_per_minute)
    tokens_per_minute: int = 0
    #: the key works only on a connection presenting the client certificate of this SHA-256 (mutual TLS)
    client_cert_sha256: str | None = None

    def allows(self, scope: str, model: str | None = None) -> bool:
        """``infer`` grants every model; ``infer:<model>`` one model."""
        if scope in self.scopes:
            return True
        return scope == "infer" and model is not None and f"infer:{model}" in self.scopes


class KeyVerifier(Protocol):
    def verify(self, secret: str) -> Principal:
        """Return the key's principal or raise AuthError (missing/wrong/revoked/expired)."""
        ...


class AuditReader(Protocol):
    def query(self, **filters: Any) -> Sequence[Any]:
        """Records (msgspec Structs) with ``seq > after_seq`` matching the filters, oldest first."""
        ...
