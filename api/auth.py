"""Authentication, scopes and per-key rate limits.

A route declares what it needs in its ``opt``: ``{"scope": "infer"}`` (model from
the path, or any ``infer``/``infer:<model>`` scope when the model is in the body),
``{"scope": "models:admin"}``, ... or no scope (open: health, docs, metrics).
:func:`auth_guard` reads ``Authorization: Bearer <key>``, asks the
:class:`~api.protocols.KeyVerifier`, checks the scope and the key's token bucket.
Rate limits are keyed on the key id, never on client-supplied headers.  A key
bound to a client certificate (``inferbox keys create --client-cert``) works only
on a mutual-TLS connection that presented that certificate.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api.envelope import RequestContext, context_of
from api.protocols import SCOPES, KeyVerifier, Principal
from runtime.errors import AuthError, ForbiddenError, InputError, OverloadError, shown

__all__ = [
    "ANONYMOUS",
    "Authenticator",
    "RateLimiter",
    "auth_guard",
    "authorization_of",
    "identify",
    "token_charge",
]

#: the principal when auth is off: every scope
ANONYMOUS = Principal(key_id="anonymous", scopes=SCOPES)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Buckets per key id and unit (requests, tokens): ``per_minute`` of the unit, refilled continuously;
    burst = per_minute."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def take(self, key_id: str, per_minute: int, cost: int = 1, unit: str = "requests") -> None:
        """Take ``cost`` of ``unit`` from the key's bucket, or raise a 429 (nothing taken) saying when it has them."""
        if per_minute <= 0:
            return
        now = self._clock()
        rate = per_minute / 60.0
        with self._lock:
            b = self._buckets.get((key_id, unit))
            if b is None:
                b = self._buckets[key_id, unit] = _Bucket(float(per_minute), now)
            # never a negative refill: a clock that stepped back would lock the key out for the step
            b.tokens = min(float(per_minute), b.tokens + max(0.0, now - b.updated) * rate)
            b.updated = now
            if b.tokens < cost:
                wait = (cost - b.tokens) / rate
                raise OverloadError(
                    f"rate limit of {per_minute} {unit} per minute reached for key {key_id}"
                    + (f" (this request brings {cost})" if unit != "requests" else "")
                    + "; retry later",
                    retry_after=max(1.0, wait),
                    code="rate_limit_exceeded",
                )
            b.tokens -= cost

    def give_back(self, key_id: str, per_minute: int, cost: int, unit: str) -> None:
        """Return ``cost`` taken by :meth:`take` for a request the server then refused (nothing of it ran)."""
        with self._lock:
            b = self._buckets.get((key_id, unit))
            if b is not None:
                b.tokens = min(float(per_minute), b.tokens + cost)


class Authenticator:
    """Turns an Authorization header into a :class:`Principal`, or raises AuthError/Forbidden/Overload."""

    def __init__(
        self,
        keys: KeyVerifier | None,
        *,
        enabled: bool,
        default_rate: int,
        limiter: RateLimiter,
        default_tokens: int = 0,
    ) -> None:
        self.keys = keys
        self.enabled = enabled
        self.default_rate = default_rate
        self.default_tokens = default_tokens
        self.limiter = limiter

    @property
    def checks_keys(self) -> bool:
        """Whether a request's key is checked at all (off: every request is :data:`ANONYMOUS`)."""
        return self.enabled and self.keys is not None

    def principal(self, authorization: str | None, client_cert_sha256: str | None = None) -> Principal:
        """``client_cert_sha256``: the fingerprint of the certificate the connection presented (mutual TLS)."""
        if not self.checks_keys or self.keys is None:  # (the second test narrows the type)
            return ANONYMOUS
        if not authorization:
            raise AuthError("Authorization: missing; send 'Authorization: Bearer <api key>'")
        kind, _, secret = authorization.partition(" ")
        if kind.lower() != "bearer" or not secret.strip():
            raise AuthError("Authorization: expected 'Bearer <api key>'")
        principal = self.keys.verify(secret.strip())
        bound = principal.client_cert_sha256
        if bound is not None and not hmac.compare_digest(bound, client_cert_sha256 or ""):
            presented = "presented another" if client_cert_sha256 else "presented none"
            raise AuthError(
                f"API key {principal.key_id} is bound to a client certificate and this connection {presented}; "
                "connect with that certificate (mutual TLS)",
                key_id=principal.key_id,
            )
        return principal

    def check(self, principal: Principal, scope: str, model: str | None, any_model: bool) -> None:
        if principal is ANONYMOUS:
            return
        if scope == "infer" and any_model:
            ok = "infer" in principal.scopes or any(s.startswith("infer:") for s in principal.scopes)
        else:
            ok = principal.allows(scope, model)
        if not ok:
            what = f"{scope} on model {shown(model)}" if model else scope
            raise ForbiddenError(f"key {principal.key_id} lacks the scope {what}; create a key with --scope {scope}")
        rate = principal.rate_limit_per_minute or self.default_rate
        self.limiter.take(principal.key_id, rate)

    def token_charge(self, principal: Principal | None) -> Callable[[int, str], Callable[[], None]] | None:
        """What charges a text request's tokens to ``principal``'s tokens-per-minute bucket, once its texts
        are tokenized (None: no limit); it returns what gives them back, for a request the server then
        refuses (a full queue: not the key's doing).  A request that brings more than a whole minute's
        tokens can never pass: a 400 naming ``field`` instead of a 429 to retry."""
        if principal is None or principal is ANONYMOUS:
            return None
        per_minute = principal.tokens_per_minute or self.default_tokens
        if per_minute <= 0:
            return None

        def charge(tokens: int, field: str) -> Callable[[], None]:
            if tokens > per_minute:
                raise InputError(
                    f"{field}: {tokens} tokens in one request is over the limit of {per_minute} tokens per minute "
                    f"of key {principal.key_id}; send fewer or shorter texts in each request",
                    field=field,
                )
            self.limiter.take(principal.key_id, per_minute, tokens, "tokens")
            return lambda: self.limiter.give_back(principal.key_id, per_minute, tokens, "tokens")

        return charge


def token_charge(request: Any) -> Callable[[int, str], Callable[[], None]] | None:
    """The tokens-per-minute charge of ``request``'s key (:meth:`Authenticator.token_charge`), None when unlimited."""
    auth: Authenticator | None = request.app.state.get("auth")
    return auth.token_charge(context_of(request.scope).principal) if auth is not None else None


def authorization_of(headers: Any) -> str | None:
    """The request's one ``Authorization`` header (``None`` without one); two or more are refused: a
    proxy that adds its own key ahead of the client's, or the client's after it, must not decide
    silently which of them is checked (the first one won)."""
    values: list[str] = headers.getall("authorization", [])
    if len(values) > 1:
        raise AuthError(f"Authorization: sent {len(values)} times; send one 'Authorization: Bearer <api key>'")
    return values[0] if values else None


def identify(auth: Authenticator, headers: Any, ctx: RequestContext) -> Principal:
    """The principal of the request's key (its ``headers``), set on the request context; a real key
    refused is named there for the audit record (``refused_key_id``) before the AuthError goes on.
    With auth off the headers are not read: a proxy's second Authorization header is no reason to
    refuse an anonymous request."""
    authorization = authorization_of(headers) if auth.checks_keys else None
    try:
        ctx.principal = auth.principal(authorization, ctx.client_cert_sha256)
    except AuthError as exc:
        if exc.key_id is not None:
            ctx.details["refused_key_id"] = exc.key_id
        raise
    return ctx.principal


async def auth_guard(connection: Any, handler: Any) -> None:
    """Litestar guard for every route; sets the request context's route and principal.

    A coroutine on purpose: Litestar runs a plain-function guard in a worker thread, a
    thread hop per request that cost more than the work (one indexed SQLite read, WAL).
    So the key lookup runs on the event loop: it must stay a point read that a writer
    cannot block (WAL), or move behind ``anyio.to_thread`` again.
    """
    ctx = context_of(connection.scope)
    ctx.route = str(connection.scope.get("path_template", ""))
    # what the route does, known before the key is checked: a request refused here (a 429 of the rate
    # limit) is recorded as the inference or model change it asked for, not as a metadata read
    event = handler.opt.get("audit_event")
    if event is not None:
        ctx.event = event
        named = connection.path_params.get("name")
        if isinstance(named, str) and not ctx.model_name:
            ctx.ask_model(named)
    needed = handler.opt.get("scope")
    if needed is None:
        return
    auth: Authenticator = connection.app.state["auth"]
    principal = identify(auth, connection.headers, ctx)
    model = connection.path_params.get("name") if needed == "infer" else None
    auth.check(principal, needed, model, any_model=needed == "infer" and model is None)
