"""The outermost ASGI layer: request id, in-flight/latency metrics, and the audit record.

Every HTTP request (including 404/405 answered by the router) gets a
:class:`RequestContext` in ``scope["state"]``, an ``X-Request-ID`` header on its
response, one metrics observation, and exactly one audit record.  The response
is held until :meth:`AuditSink.record` has returned: no answer (and so no
inference result) leaves the box unrecorded.  If the audit sink fails, the client
gets 503 instead of the held answer.  On a mutual-TLS server the record also
names the client's certificate (:func:`client_certificate`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from api.metrics import Metrics
from api.protocols import AuditEvent, AuditSink, AuditStatsSource, Principal
from runtime.errors import AuditError
from runtime.times import utc_iso

__all__ = ["CLIENT_GONE", "RequestContext", "client_certificate", "context_of", "envelope"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
STATE_KEY = "inferbox_ctx"


#: the longest model name a request may put in its audit record as asked (longer names are cut)
MAX_ASKED_NAME = 200


@dataclass
class RequestContext:
    """What the handlers learn about a request, for the audit record and metrics."""

    request_id: str
    started: float
    origin: str
    action: str
    #: ``time.monotonic()`` at arrival: the request's duration (the wall clock may step meanwhile)
    arrived: float = 0.0
    event: str = "metadata"
    route: str = ""
    principal: Principal | None = None
    #: the model the request named (the audit record's ``model_name``; cut to
    #: :data:`MAX_ASKED_NAME` characters) until :meth:`set_model` finds it
    model_name: str = ""
    #: the model's name once found: the metrics label (a client's made-up names never become
    #: series on the open ``/metrics``)
    metric_model: str = ""
    model_version: str = ""
    #: ``id()`` of the loaded model found (its Triton statistics count per load)
    model_instance: int = 0
    model_sha256: str = ""
    backend: str = ""
    variant: str = ""
    #: the body as read (None: not read, as for a request refused before its handler read it)
    raw_body: bytes | None = None
    details: dict[str, str] = field(default_factory=dict)
    #: SHA-256 of the client certificate the connection presented (mutual TLS), for key bindings
    client_cert_sha256: str | None = None
    #: the request changes the server's state (a model load or unload): a client that hangs up does not
    #: cancel it, so that its record says what happened, not a 499 for a change that took effect
    finish_when_gone: bool = False

    def ask_model(self, name: str) -> None:
        """The request names model ``name`` (for the audit record, before it is looked up)."""
        self.model_name = name if len(name) <= MAX_ASKED_NAME else name[: MAX_ASKED_NAME - 1] + "\u2026"

    def set_model(self, model: Any) -> None:
        """Record the serving facts of a :class:`runtime.serving.LoadedModel`."""
        self.model_name = self.metric_model = model.name
        self.model_version = str(model.version)
        self.model_instance = id(model)
        self.model_sha256 = model.package_sha256
        self.backend = model.backend
        self.variant = model.variant
        fallback = getattr(model.session, "fallback", None)
        if fallback:  # the backend above is what ran; the record also says what it fell back from
            self.details["fallback"] = str(fallback)


def context_of(scope: Any) -> RequestContext:
    ctx = scope.get("state", {}).get(STATE_KEY)
    if ctx is None:  # a scope that did not pass the envelope (should not happen)
        ctx = RequestContext(request_id=uuid.uuid4().hex, started=0.0, origin="", action="")
        scope.setdefault("state", {})[STATE_KEY] = ctx
    assert isinstance(ctx, RequestContext)
    return ctx


#: nginx's status for a request whose client closed the connection before its answer (nobody reads it)
CLIENT_GONE = 499
#: a request still running this long after its body came in listens for its client leaving (and is
#: cancelled when it has): the abandoned requests that hold the queue are the long ones
DISCONNECT_AFTER_S = 0.25

#: the longest client certificate subject an audit record keeps (its fingerprint is kept whole)
MAX_CERT_NAME = 1024


def client_certificate(scope: Scope) -> tuple[str, str] | None:
    """(subject, SHA-256 of the DER) of the client's certificate, from ASGI's TLS extension, or None.

    The server fills the extension on mutual-TLS connections (``appliance.client_cert``); the
    fingerprint is computed from the PEM when a server gives only the standard keys.
    """
    tls = (scope.get("extensions") or {}).get("tls")
    if not tls:
        return None
    chain = tls.get("client_cert_chain") or ()
    if not chain:
        return None
    sha256 = tls.get("client_cert_sha256") or hashlib.sha256(ssl.PEM_cert_to_DER_cert(chain[0])).hexdigest()
    name = str(tls.get("client_cert_name") or "")
    if len(name) > MAX_CERT_NAME:
        name = name[: MAX_CERT_NAME - 1] + "\u2026"
    return name, str(sha256)


def _error(scope: Scope, status: int, message: str) -> bytes:
    """The envelope's own error answer, in the shape of the route family the client called."""
    from api.errors import error_body  # api.errors reads the request context from this module

    return error_body(str(scope.get("path", "")), status, message)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return bytes(v).decode("latin-1")
    return None


def envelope(
    app: ASGIApp,
    *,
    audit: AuditSink | None,
    metrics: Metrics,
    clock: Callable[[], float],
) -> ASGIApp:
    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        client_id = _header(scope, b"x-request-id")
        request_id = client_id if client_id and _SANE_ID.fullmatch(client_id) else uuid.uuid4().hex
        client = scope.get("client") or ("", 0)
        ctx = RequestContext(
            request_id=request_id,
            started=clock(),
            arrived=time.monotonic(),
            origin=str(client[0]),
            action=f"{scope.get('method', '')} {scope.get('path', '')}",
        )
        if scope.get("method") == "HEAD":
            # HEAD is GET without the content (RFC 9110, 9.3.2): a load balancer's HEAD probe of
            # /v2/health/ready was a 405.  The route answers as for GET; the server sends no body.
            scope = {**scope, "method": "GET"}
        certificate = client_certificate(scope)
        if certificate is not None:  # mutual TLS: who the organisation's CA says the caller is
            ctx.details["client_cert"], ctx.details["client_cert_sha256"] = certificate
            ctx.client_cert_sha256 = certificate[1]
        scope.setdefault("state", {})[STATE_KEY] = ctx
        start_message: Message | None = None
        chunks: list[bytes] = []
        metrics.request_started()

        complete = asyncio.Event()

        async def hold(message: Message) -> None:
            nonlocal start_message
            if message["type"] == "http.response.start":
                start_message = message
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    complete.set()

        body_read = False
        # Once the body is in (and DISCONNECT_AFTER_S has passed), one read waits for the client to
        # leave: a request whose client hung up is cancelled (its texts still queued are withdrawn,
        # never run), not computed for nobody while it holds the queue (four abandoned requests of
        # 256 texts held a live one for 28 s).
        listener: asyncio.Future[Message] | None = None
        gone = False
        running = False  #: the app is being awaited (a disconnect cancels this task only then)
        rearmed = 0
        this = asyncio.current_task()
        later: asyncio.TimerHandle | None = None

        def listen() -> asyncio.Future[Message]:
            nonlocal listener
            if listener is None:
                listener = asyncio.ensure_future(receive())
                listener.add_done_callback(left)
            return listener

        def left(read: asyncio.Future[Message]) -> None:
            nonlocal gone, listener, rearmed
            if read.cancelled() or read.exception() is not None or complete.is_set():
                return
            if read.result()["type"] != "http.disconnect":
                # another message (an empty request part some servers send after a body-less request):
                # whoever awaits this read gets it, and the next read listens on (a few times at most)
                if rearmed < _REARM:
                    rearmed += 1
                    listener = None
                    listen()
                return
            if running and this is not None and not ctx.finish_when_gone:
                gone = True
                this.cancel()

        async def app_receive() -> Message:
            # A streaming response (static files) waits for http.disconnect until the client has
            # its answer; the client waits for the answer, which this envelope holds until the app
            # returns.  Once the app has sent its last chunk, tell it the exchange is over.  The
            # request's body comes straight through: racing each chunk against the answer cost
            # two futures and an asyncio.wait (~10 us) on every request.
            nonlocal body_read, later
            if body_read or start_message is not None:  # an answer has begun: it may be held
                return await _read_until(listen(), complete)
            message = await receive()
            body_read = message["type"] != "http.request" or not message.get("more_body", False)
            if body_read and message["type"] == "http.request" and listener is None:
                # listen only for a request still running after DISCONNECT_AFTER_S: a task per request
                # cost ~4 % of the server's throughput at c=32; one answered sooner costs a timer
                later = asyncio.get_running_loop().call_later(DISCONNECT_AFTER_S, listen)
            return message

        status = 500
        try:
            running = True
            try:
                await app(scope, app_receive, hold)
            except asyncio.CancelledError:
                if not gone or this is None:  # the server's own cancellation (shutdown): not ours to swallow
                    raise
                this.uncancel()  # ours, done: the audit record below must not be cancelled too
            finally:
                running = False
            if gone:
                status = CLIENT_GONE
                ctx.details["error"] = "the client closed the connection before its answer"
                if audit is not None and not _unaudited(scope, status):
                    try:
                        await audit.record(_event(ctx, audit, status, b"", clock()))
                    except Exception:
                        logger.exception("audit record failed for request %s (its client had gone)", request_id)
                return  # nobody to answer
            if start_message is None:  # the app sent nothing: answer 500 ourselves
                start_message = {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
                chunks = [_error(scope, 500, f"internal error (request id {request_id})")]
            status = int(start_message["status"])
            body = b"".join(chunks)
            if audit is not None and not _unaudited(scope, status):
                try:
                    await audit.record(_event(ctx, audit, status, body, clock()))
                except Exception as exc:
                    if isinstance(exc, AuditError):  # a refusal that names its reason (closing, a bad field)
                        # a log that cannot be written says so itself, once: not a line per request
                        quiet = isinstance(audit, AuditStatsSource) and audit.stats().failing
                        (logger.debug if quiet else logger.warning)(
                            "audit record refused for request %s (%s); answering 503", request_id, exc
                        )
                    else:
                        logger.exception("audit record failed for request %s; answering 503", request_id)
                    status = 503
                    body = _error(
                        scope, 503, f"the audit log cannot be written; request refused (request id {request_id})"
                    )
                    start_message = {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5")],
                    }
            headers = [
                (k, v)
                for k, v in start_message.get("headers", [])
                if bytes(k).lower() not in (b"x-request-id", b"content-length")
            ]
            headers.append((b"x-request-id", request_id.encode("latin-1")))
            headers.append((b"content-length", str(len(body)).encode("ascii")))
            await send({**start_message, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            if later is not None:
                later.cancel()
            if listener is not None and not listener.done():
                listener.cancel()
            metrics.request_finished(
                model=ctx.metric_model,
                route=ctx.route or "unmatched",
                status=status,
                seconds=time.monotonic() - ctx.arrived,
                version=ctx.model_version,
                instance=ctx.model_instance,
                inference=ctx.event == "inference",
            )

    return handle


#: reads after the body that return something other than http.disconnect, listened past
_REARM = 3


async def _read_until(read: asyncio.Future[Message], complete: asyncio.Event) -> Message:
    """What the one read after the body gets, or http.disconnect once the answer is complete."""
    if complete.is_set():
        return {"type": "http.disconnect"}
    finished: asyncio.Future[Any] = asyncio.ensure_future(complete.wait())
    pending: set[asyncio.Future[Any]] = {read, finished}
    try:
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:  # cancelled too (the client left): never a waiter left pending ("Task was destroyed")
        finished.cancel()
    if read.done():
        return read.result()
    return {"type": "http.disconnect"}


#: Open routes that carry no data: liveness / readiness probes, metrics scrapes and the docs
#: page.  A load balancer probing every second would otherwise flood the log with noise.
UNAUDITED_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})
UNAUDITED_PREFIXES = ("/docs",)


def _unaudited(scope: Scope, status: int) -> bool:
    path = str(scope.get("path", ""))
    if status in (401, 403, 405):  # an auth failure is always recorded (a refused scrape with metrics_auth),
        return False  # and a method the path does not take (a probe is a GET)
    return path in UNAUDITED_PATHS or path.startswith(UNAUDITED_PREFIXES)


#: the most characters of a client-given text a record keeps (the path of an unknown route, a model name
#: in a path, a detail): a 64 KB path, sent anonymously, was a 64 KB record, one fsync a request, and a
#: disk filled at ~40 MB/s without a key
RECORD_TEXT_MAX = 512


def _clip(text: str, limit: int = RECORD_TEXT_MAX) -> str:
    """``text``, or its first ``limit`` characters and how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text)} characters]"


def _event(ctx: RequestContext, audit: AuditSink, status: int, body: bytes, ended: float) -> AuditEvent:
    # a body never read (refused before it, or none) has no digest: the digest of b"" would say it was empty
    digest_in = audit.digest(ctx.raw_body).hexdigest if ctx.raw_body is not None else ""
    digest_out = audit.digest(body)
    event = ctx.event
    if status in (401, 403) and event not in ("key_create", "key_revoke"):
        event = "auth_failure"
    return AuditEvent(
        event=event,
        action=_clip(ctx.action),
        actor=ctx.principal.key_id if ctx.principal is not None else "anonymous",
        origin=_clip(ctx.origin),
        outcome="success" if status < 400 else "failure",
        status=status,
        started_at=utc_iso(ctx.started),
        ended_at=utc_iso(ended),
        request_id=ctx.request_id,
        credential_id=ctx.principal.key_id if ctx.principal is not None else "",
        model_name=_clip(ctx.model_name),
        model_version=ctx.model_version,
        model_sha256=ctx.model_sha256,
        backend=ctx.backend,
        variant=ctx.variant,
        input_digest=digest_in,
        output_digest=digest_out.hexdigest,
        digest_key_id=digest_out.key_id,
        details={k: _clip(v) for k, v in ctx.details.items()},
    )
