"""One map from errors to HTTP answers; handlers hold no try/except for domain errors.

KServe routes answer ``{"error": "..."}``; OpenAI routes (``/v1/...``) and ``/v2/rerank`` answer
``{"error": {"message", "type", "param", "code"}}``.  A 500 never carries a
trace or an exception's text: a generic message and the request id only.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Annotated, Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException, ValidationException
from msgspec import Meta

from api.auth import Authenticator, identify
from api.envelope import CLIENT_GONE, RequestContext, context_of
from api.protocols import Principal
from runtime.errors import (
    AuthError,
    BodyTimeoutError,
    ClientGoneError,
    ForbiddenError,
    InferboxError,
    InputError,
    ModelKindError,
    ModelNotFoundError,
    OverloadError,
    PackageError,
    PayloadTooLargeError,
    RequestTimeoutError,
    SelectionError,
)

__all__ = ["KServeError", "OpenAIError", "OpenAIErrorDetail", "exception_handlers", "status_of"]

logger = logging.getLogger(__name__)

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_OPENAI_CODES = {
    401: "invalid_api_key",
    404: "model_not_found",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    504: "timeout",
}


class KServeError(msgspec.Struct):
    """The error answer of the KServe v2 routes (``/v1/...`` and ``/v2/rerank`` answer :class:`OpenAIError`)."""

    error: Annotated[str, Meta(description="What was wrong; a 400 names the field.")]


class OpenAIErrorDetail(msgspec.Struct):
    """What was wrong, in OpenAI's terms."""

    message: str
    type: Annotated[
        str,
        Meta(
            description="invalid_request_error (400, 404, 408, 413), authentication_error (401), "
            "permission_error (403), rate_limit_error (429) or server_error"
        ),
    ]
    param: Annotated[str | None, Meta(description="The field the message is about (a 400, 408 or 413), else null.")]
    code: Annotated[
        str | None,
        Meta(
            description="invalid_api_key (401), model_not_found (404 for a model that is not there; another "
            "404 has null), request_too_large (413), rate_limit_exceeded (429: the key's rate limit), server_busy "
            "(429: the server's queue is full, or the model is being unloaded), timeout (504), else null"
        ),
    ]


class OpenAIError(msgspec.Struct):
    """The error answer of ``/v1/...`` and ``/v2/rerank`` (OpenAI's shape)."""

    error: OpenAIErrorDetail


def status_of(exc: BaseException) -> int:
    if isinstance(exc, ClientGoneError):
        return CLIENT_GONE
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, BodyTimeoutError):
        return 408
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, ForbiddenError):
        return 403
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, OverloadError):
        return 429
    if isinstance(exc, RequestTimeoutError):
        return 504
    if isinstance(exc, PackageError | SelectionError):
        return 409
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


def speaks_openai(path: str) -> bool:
    """Whether ``path`` answers errors in OpenAI's shape (``/v1/...``; ``/v2/rerank``: Cohere's, not KServe's)."""
    return path.startswith("/v1/") or path == "/v2/rerank"


def error_body(
    path: str, status: int, message: str, param: str | None = None, *, code: str | bool | None = True
) -> bytes:
    """The error answer of ``path`` in its route family's shape (also for the envelope's own 500 / 503).

    ``code``: OpenAI's ``code``; True (the default): the one of ``status``.
    """
    body: OpenAIError | KServeError
    if speaks_openai(path):
        code_text = _OPENAI_CODES.get(status) if code is True else (code or None)
        body = OpenAIError(OpenAIErrorDetail(message, _OPENAI_TYPES.get(status, "server_error"), param, code_text))
    else:
        body = KServeError(message)
    return msgspec.json.encode(body)


def _validation_message(exc: HTTPException) -> tuple[str, str | None]:
    """Litestar's parameter validation, as ``key: problem`` (not the repr of its internal list)."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    named = [p for p in problems if isinstance(p, dict) and p.get("key")]
    if not named:
        return str(exc.detail) + (f": {exc.extra}" if exc.extra else ""), None
    parts = [f"{p['key']}: {p.get('message', 'not valid')}" for p in named]
    return "; ".join(parts), str(named[0]["key"])


def _no_route(request: Request[Any, Any, Any], ctx: RequestContext, exc: HTTPException) -> str:
    """A path no route matches (404), or a method it does not take (405): no guard ran, so the key
    it carried was never read and its record said ``anonymous``, like a request with no key (and
    like ``auth = false``).  The key is read here only to name who asked; the answer is the same
    whatever it is."""
    auth: Authenticator | None = request.app.state.get("auth")
    if auth is not None and auth.checks_keys:
        with contextlib.suppress(AuthError):  # refused, or no key: the answer stays this one
            identify(auth, request.headers, ctx)
    if isinstance(exc, MethodNotAllowedException):
        allowed = (exc.headers or {}).get("allow", "")
        return f"{request.url.path} does not take {request.method}; it takes {allowed} (docs/api.md)"
    return f"no route {request.method} {request.url.path}; docs/api.md lists the routes"


def _sees_every_model(principal: Principal | None) -> bool:
    """Whether the caller may know every loaded model: no key needed (auth off), or a key with
    ``infer`` on every model or the model administration scope."""
    return principal is None or principal.allows("infer") or principal.allows("models:admin")


def _handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    ctx = context_of(request.scope)
    status = status_of(exc)
    headers: dict[str, str] = {}
    param: str | None = None
    if (isinstance(exc, InferboxError) and status < 500) or isinstance(exc, PackageError | SelectionError):
        message = str(exc)
        server = request.app.state.get("server")
        if isinstance(exc, PackageError | SelectionError) and server is not None:
            message = server.registry.public(message)  # the repository's files, not the box's paths
        if isinstance(exc, ModelNotFoundError) and not _sees_every_model(ctx.principal):
            message = exc.narrow  # a key for some models learns nothing of the others, not even which are loaded
        param = getattr(exc, "field", None)  # InputError's field; "model" for a model of another kind
        if isinstance(exc, AuthError) and not isinstance(exc, ForbiddenError):
            headers["WWW-Authenticate"] = 'Bearer realm="inferbox"'
        if isinstance(exc, OverloadError):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc, BodyTimeoutError):
            # a kept-alive connection after a 408 let the same stalled client trickle on for ever
            headers["Connection"] = "close"
    elif isinstance(exc, RequestTimeoutError):
        message = str(exc)
    elif isinstance(exc, ValidationException):
        message, param = _validation_message(exc)
    elif isinstance(exc, NotFoundException | MethodNotAllowedException) and not ctx.route:
        message = _no_route(request, ctx, exc)
        headers.update(exc.headers or {})  # a 405's Allow
    elif isinstance(exc, HTTPException) and status < 500:
        message = str(exc.detail)
        if exc.extra:
            message += f": {exc.extra}"
        headers.update(exc.headers or {})
    else:
        logger.error("request %s failed", ctx.request_id, exc_info=exc)
        message = f"internal error; the server log has the details under request id {ctx.request_id}"
    ctx.details.setdefault("error", type(exc).__name__)
    # OpenAI's model_not_found only for a model that is not there, not for a path that is not, nor
    # for a loaded model of another kind
    known = status != 404 or (isinstance(exc, ModelNotFoundError) and not isinstance(exc, ModelKindError))
    code: str | bool | None = True if known else None
    if isinstance(exc, OverloadError):  # the key's limit, or the server's queue: the client acts otherwise
        code = exc.code
        server = request.app.state.get("server")
        if server is not None:
            server.metrics.request_refused(exc.code)
    body = error_body(request.url.path, status, message, param, code=code)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


exception_handlers: dict[type[Exception] | int, Any] = {Exception: _handle}
