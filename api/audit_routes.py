"""``GET /v1/audit``: read the audit log over the API (scope ``audit:read``).

The read is itself recorded (event ``audit_read``) by the request envelope, like
every request.  Filters: ``event``, ``actor``, ``model``, ``outcome``,
``request_id``, ``job_id``, ``key_id``, ``status``, ``model_sha256``,
``client_cert_sha256``, ``since`` / ``until`` (UTC ISO 8601); paging with
``after_seq`` + ``limit`` (at most 1000); the answer's ``next_after_seq`` is the
cursor for the next page (null at the end).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, get
from litestar.exceptions import NotFoundException
from litestar.handlers import HTTPRouteHandler

from api.docs import KEY, documented
from api.envelope import context_of
from api.errors import OpenAIError
from api.protocols import AuditReader, without_secrets
from api.schemas import AuditPage
from runtime.errors import InputError
from runtime.times import utc_iso

__all__ = ["MAX_PAGE", "MAX_SEQ", "routes"]

MAX_PAGE = 1000
#: SQLite's largest integer: the highest sequence number a record can have
MAX_SEQ = 2**63 - 1
#: characters of a filter value kept in the audit_read record (values are ids and times: a longer one is cut)
MAX_FILTER_CHARS = 200


def _utc(value: str | None, field: str) -> str | None:
    """``value`` (an ISO 8601 date or time; naive means UTC) in the log's own time format, which
    compares as text; a 400 naming ``field`` when it is not one."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InputError(
            f"{field}: {value[:64]!r} is not an ISO 8601 date or time (e.g. 2026-05-01 or 2026-05-01T12:00:00Z)",
            field=field,
        ) from None
    return utc_iso(moment)


def _fingerprint(value: str) -> str:
    """A SHA-256 fingerprint as stored (64 lowercase hex digits) from how tools print it
    (``openssl x509 -fingerprint -sha256``: upper case, colons)."""
    digits = value.replace(":", "").strip().lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise InputError(
            f"client_cert_sha256: {value[:100]!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)",
            field="client_cert_sha256",
        )
    return digits


#: the query parameters of GET /v1/audit (the handler's own arguments)
PARAMETERS = (
    "after_seq",
    "limit",
    "event",
    "actor",
    "model",
    "outcome",
    "request_id",
    "job_id",
    "since",
    "until",
    "client_cert_sha256",
    "key_id",
    "status",
    "model_sha256",
    "model_version",
    "input_digest",
)
#: a record's field names that a reader may try as filters, and the parameter that filters on them
SPELLED_AS = {
    "model_name": "model",
    "event_type": "event",
    "seq": "after_seq",
    "ts": "since",
    "credential_id": "key_id",
    "refused_key_id": "key_id",
}


def _known_parameters(request: Request[Any, Any, Any]) -> None:
    """An unknown filter is a 400, not ignored: ``?model_name=x`` answered the whole log, which an
    auditor would read as every record being about ``x``."""
    unknown = sorted(set(request.query_params) - set(PARAMETERS))
    if unknown:
        name = unknown[0]
        hint = f"use {SPELLED_AS[name]}" if name in SPELLED_AS else f"the filters are {', '.join(PARAMETERS)}"
        raise InputError(f"{name}: not a parameter of /v1/audit; {hint}", field=name)
    # `?event=a&event=b` answered only b's records, read as "a or b" (own review 14)
    counts = Counter(name for name, _ in request.query_params.multi_items())
    repeated = sorted(name for name, n in counts.items() if n > 1)
    if repeated:
        name = repeated[0]
        raise InputError(
            f"{name}: given more than once; each filter takes one value (ask once per value and join the pages)",
            field=name,
        )


@get(
    "/v1/audit",
    opt={"scope": "audit:read", "audit_event": "audit_read"},
    security=KEY,
    operation_class=documented(
        AuditPage,
        OpenAIError,
        "A page of audit records; the read is itself recorded (audit_read).",
        (400, 404),
        description="The audit log, oldest first, filtered and paged (scope audit:read); 404 when the server "
        "runs without the audit log. since/until: an ISO 8601 date or time (without an offset: UTC). "
        "client_cert_sha256: the records naming that client certificate (requests over mutual TLS with it, "
        "keys bound to it). key_id: the records of that API key, the requests it was refused on (revoked, "
        "expired, another client certificate) included. status: the HTTP status (429 for the rate-limited; "
        "0 for a command's records). model_sha256: a model package's hash (64 hex digits). model_version: "
        "with model, that version's records. input_digest: the records of a request whose body had that "
        "digest (`inferbox audit digest --key-id ID FILE` computes it on the box).",
        tag="Audit",
    ),
)
async def read_audit(
    request: Request[Any, Any, Any],
    after_seq: int = 0,
    limit: int = 100,
    event: str | None = None,
    actor: str | None = None,
    model: str | None = None,
    outcome: str | None = None,
    request_id: str | None = None,
    job_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
    client_cert_sha256: str | None = None,
    key_id: str | None = None,
    status: int | None = None,
    model_sha256: str | None = None,
    model_version: str | None = None,
    input_digest: str | None = None,
) -> dict[str, Any]:
    context_of(request.scope).event = "audit_read"
    reader: AuditReader | None = request.app.state.get("audit_reader")
    if reader is None:
        raise NotFoundException("the audit log is off on this server (setting audit = false)")
    _known_parameters(request)
    if not 1 <= limit <= MAX_PAGE:
        raise InputError(f"limit: must be between 1 and {MAX_PAGE}, got {limit}", field="limit")
    if not 0 <= after_seq <= MAX_SEQ:
        raise InputError(f"after_seq: must be between 0 and {MAX_SEQ}, got {after_seq}", field="after_seq")
    since, until = _utc(since, "since"), _utc(until, "until")
    if since is not None and until is not None and since >= until:
        raise InputError(
            f"until: {until} is not after since ({since}); the window is since <= time < until", field="until"
        )
    if outcome is not None and outcome not in ("success", "failure"):
        raise InputError(f"outcome: must be success or failure, got {outcome!r}", field="outcome")
    if client_cert_sha256 is not None:
        client_cert_sha256 = _fingerprint(client_cert_sha256)
    if status is not None and not 0 <= status <= 999:
        raise InputError(
            f"status: must be between 0 and 999 (an HTTP status, or 0/1 for a command), got {status}", field="status"
        )
    if model_sha256 is not None:
        model_sha256 = model_sha256.strip().lower()  # stored in lower case; an upper-case copy matched nothing
    if input_digest is not None:
        input_digest = input_digest.strip().lower()
    # a whole key given where its id goes: the id is the filter, and the secret is never recorded
    key_id = None if key_id is None else without_secrets(key_id.strip())
    actor = None if actor is None else without_secrets(actor)
    records = await asyncio.to_thread(
        reader.query,
        after_seq=after_seq,
        limit=limit,
        event=event,
        actor=actor,
        model_name=model,
        outcome=outcome,
        request_id=request_id,
        job_id=job_id,
        since=since,
        until=until,
        client_cert_sha256=client_cert_sha256,
        key_id=key_id,
        status=status,
        model_sha256=model_sha256,
        model_version=model_version,
        input_digest=input_digest,
    )
    rows = [msgspec.to_builtins(r) for r in records]
    asked = {
        "after_seq": after_seq,
        "limit": limit,
        "event": event,
        "actor": actor,
        "model": model,
        "outcome": outcome,
        "request_id": request_id,
        "job_id": job_id,
        "since": since,
        "until": until,
        "client_cert_sha256": client_cert_sha256,
        "key_id": key_id,
        "status": status,
        "model_sha256": model_sha256,
        "model_version": model_version,
        "input_digest": input_digest,
    }
    # what was read, as `inferbox audit tail` records it: the filters given and the records answered
    details = context_of(request.scope).details
    # every filter given (status=0 too), and after_seq when it is not the start
    details.update(
        {
            k: without_secrets(str(v))[:MAX_FILTER_CHARS]
            for k, v in asked.items()
            if v is not None and not (k == "after_seq" and v == 0)
        }
    )
    details["records"] = str(len(rows))
    cursor = rows[-1]["seq"] if len(rows) == limit else None
    return {"records": rows, "next_after_seq": cursor}


routes: list[HTTPRouteHandler] = [read_audit]
