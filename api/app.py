"""The app factory: ``create_app(registry=..., config=..., audit=..., keys=...)`` -> Litestar.

The factory receives every collaborator (the composition root is
``appliance``); it builds the shared :class:`~api.server.Server`, the auth guard,
one exception map, metrics and the outer envelope (request id + audit), and a
lifespan that stops the batchers on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get

from api import audit_routes, kserve, openai, rerank, triton
from api.auth import Authenticator, RateLimiter, auth_guard
from api.config import ApiConfig
from api.docs import docs_routes, openapi_config
from api.envelope import envelope
from api.errors import exception_handlers
from api.metrics import CONTENT_TYPE, Metrics
from api.metrics_share import WRITE_EVERY_S, MetricsShare
from api.protocols import AuditReader, AuditSink, AuditStatsSource, KeyVerifier
from api.server import Server
from runtime.errors import ConfigError
from runtime.serving import ModelRegistry

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


async def _metrics(request: Request[Any, Any, Any]) -> Response[str]:
    server: Server = request.app.state["server"]
    text = server.render_metrics()
    share: MetricsShare | None = request.app.state["metrics_share"]
    if share is not None:  # several workers: theirs added up, whichever of them was asked
        text = await asyncio.to_thread(share.collect, text)
    return Response(text, media_type=CONTENT_TYPE)


async def _publish_metrics(server: Server, share: MetricsShare) -> None:
    """Write this worker's series for the others every :data:`api.metrics_share.WRITE_EVERY_S`; a
    failure is said once, and its end once (not every second)."""
    failing = False
    while True:
        try:
            text = server.render_metrics()
            await asyncio.to_thread(share.write, text)
        except OSError as exc:  # the folder unwritable or its disk full: the next turn tries again
            if not failing:
                logger.warning(
                    "could not write this worker's metrics to %s (%s); trying every second", share.folder, exc
                )
            failing = True
        else:
            if failing:
                logger.info("this worker's metrics are written to %s again", share.folder)
            failing = False
        await asyncio.sleep(WRITE_EVERY_S)


#: open, as Prometheus scrapes by default; with ``metrics_auth`` the keyed route instead
metrics_route = get("/metrics", include_in_schema=False, name="metrics")(_metrics)
keyed_metrics_route = get("/metrics", include_in_schema=False, name="metrics", opt={"scope": "metrics:read"})(_metrics)


def _build_document(app: Litestar) -> None:
    """Build and cache the OpenAPI document as its route serves it (Litestar caches the dict lazily)."""
    try:
        app.plugins.get("OpenAPIPlugin").provide_openapi_schema()
    except (KeyError, AttributeError):  # another Litestar: the object at least
        _ = app.openapi_schema


def create_app(
    *,
    registry: ModelRegistry,
    config: ApiConfig,
    audit: AuditSink | None,
    keys: KeyVerifier | None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    lifespan: Sequence[Callable[[Litestar], AbstractAsyncContextManager[None]]] = (),
    audit_reader: AuditReader | None = None,
    certificate_expiry: Callable[[], float | None] | None = None,
    connection_closes: Callable[[], Mapping[str, int]] | None = None,
) -> Litestar:
    """A Litestar app serving ``registry``. ``audit=None``: audit off; ``keys`` is required when auth is on.

    ``clock``: the wall clock (audit records, request times); ``monotonic``: what the rate limits
    and the batchers' deadlines count with, so that the wall clock stepping (NTP, a restored VM)
    neither locks keys out for the step (a bucket refilled by a negative time) nor expires every
    queued request at once.

    ``lifespan``: extra context managers entered at startup, before serving (e.g. start and
    close the audit log, load the models); the batchers stop before they exit.
    ``certificate_expiry``: when the served TLS certificate expires (Unix seconds; None over HTTP),
    a ``/metrics`` gauge an alert can watch.  ``connection_closes``: the HTTP server's count of
    connections it closed on a client's account, by reason (``/metrics``).
    """
    if config.auth and keys is None:
        raise ConfigError("auth is on but no key store was given; pass keys=KeyStore(...) or set auth = false")
    metrics = Metrics(
        audit_stats=audit.stats if isinstance(audit, AuditStatsSource) else None,
        certificate_expiry=certificate_expiry,
        connection_closes=connection_closes,
    )
    server = Server(registry, config, metrics, monotonic)
    share = MetricsShare(Path(config.metrics_folder)) if config.metrics_folder else None
    authenticator = Authenticator(
        keys,
        enabled=config.auth,
        default_rate=config.rate_limit_per_minute,
        limiter=RateLimiter(monotonic),
        default_tokens=config.tokens_per_minute,
    )

    @asynccontextmanager
    async def batchers(app: Litestar) -> AsyncGenerator[None, None]:
        if config.docs:  # the OpenAPI document (~40 ms) is built here, not on the open /docs's first request
            _build_document(app)
        server.attach()
        publisher = asyncio.create_task(_publish_metrics(server, share)) if share is not None else None
        try:
            yield
        finally:
            if publisher is not None:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
            await server.stop()

    metrics_handler = keyed_metrics_route if config.metrics_auth else metrics_route
    handlers = [*kserve.routes, *triton.routes, *openai.routes, *rerank.routes, *audit_routes.routes, metrics_handler]
    openapi = openapi_config("inferbox", config.server_version, handlers) if config.docs else None
    docs = docs_routes() if config.docs else []
    app = Litestar(
        route_handlers=[*handlers, *docs],
        guards=[auth_guard],
        exception_handlers=exception_handlers,
        lifespan=[*lifespan, batchers],
        openapi_config=openapi,
        request_max_body_size=None,
        state=None,
        debug=False,
        logging_config=None,  # logging is configured by the entry point only
    )
    app.state["server"] = server
    app.state["auth"] = authenticator
    app.state["config"] = config
    app.state["audit_reader"] = audit_reader
    app.state["metrics_share"] = share
    app.asgi_handler = envelope(app.asgi_handler, audit=audit, metrics=metrics, clock=clock)  # type: ignore[assignment,arg-type]
    return app
