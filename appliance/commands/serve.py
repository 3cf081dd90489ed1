"""``inferbox serve``: the main job — build the default model if needed, then serve the API."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from appliance.commands.options import EXIT_CONFIG, build_settings, refusal, state_options
from appliance.exposure import is_loopback
from runtime.logs import configure as configure_logging

if TYPE_CHECKING:
    from appliance.settings import Settings
    from appliance.tls import TlsPlan

__all__ = ["ADMIN_KEY_FILE", "EXIT_CONFIG", "serve"]

ADMIN_KEY_FILE = "first-admin.key"


@click.command()
@state_options
@click.option("--host", default=None, help="Address to listen on [env INFERBOX_HOST; default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="TCP port [env INFERBOX_PORT; default 8080].")
@click.option("--workers", type=int, default=None, help="Worker processes [env INFERBOX_WORKERS; default 1].")
@click.option("--backend", default=None, help="Force a backend (ort-cpu, ov-cpu, ...) [default auto].")
@click.option("--autotune/--no-autotune", default=None, help="Time every admissible candidate at load.")
@click.option(
    "--retune",
    is_flag=True,
    default=False,
    help="With --autotune: forget the cached autotune decisions (<home>/cache/decisions.json) and time again.",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Serve HTTPS with this PEM certificate (and chain) [env INFERBOX_TLS_CERT].",
)
@click.option(
    "--tls-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The certificate's PEM private key, unencrypted, mode 0600/0640 [env INFERBOX_TLS_KEY].",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Require client certificates signed by this PEM CA (mutual TLS) [env INFERBOX_TLS_CLIENT_CA].",
)
@click.option("--no-auth", is_flag=True, default=False, help="Serve without API keys (loopback testing only).")
@click.option("--no-audit", is_flag=True, default=False, help="Do not write the audit log.")
def serve(
    home: Path | None,
    repository: Path | None,
    host: str | None,
    port: int | None,
    workers: int | None,
    backend: str | None,
    autotune: bool | None,
    retune: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    no_auth: bool,
    no_audit: bool,
) -> None:
    """Serve the models in the repository (KServe v2, OpenAI /v1/embeddings, /metrics).

    On an empty repository the default model (all-MiniLM-L6-v2) is built first.
    On a new box an admin key is created and printed once.
    """
    from appliance.exposure import check_exposure
    from appliance.server import public_key_of
    from appliance.tls import ssl_options

    with refusal():  # the configuration, checked before anything loads (and before workers fork)
        settings = build_settings(
            home=home,
            repository=repository,
            host=host,
            port=port,
            workers=workers,
            backend=backend,
            autotune=autotune,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            auth=False if no_auth else None,
            audit=False if no_audit else None,
        )
        tls = check_exposure(settings)
        public_key_of(settings)  # the key packages must be signed with: a missing file is named here
        _refuse_retune_without_autotune(settings, retune)
    configure_logging(settings.log_level)
    log = logging.getLogger(__name__)
    if settings.backend == "fake":
        from runtime.loader import FAKE_BACKEND_WARNING

        log.warning("backend = fake (%s): %s", settings.sources.get("backend", ""), FAKE_BACKEND_WARNING)
    if not settings.auth:
        log.warning("auth is off (%s): every client on this machine has every scope", settings.sources.get("auth", ""))
        if settings.metrics_auth:
            log.warning("metrics_auth is set, but with auth off /metrics is open like every other route")
    from appliance.settings import setting_warnings

    for warning in setting_warnings(settings):
        log.warning("%s", warning)
    if tls is not None:
        _log_certificate(log, tls)
    elif settings.allow_plaintext and not is_loopback(settings.host):
        log.warning("plain HTTP on %s (allow_plaintext): a TLS proxy in front must terminate HTTPS", settings.host)
    from appliance.server import hold_sighup, prepare

    _check_port(settings.host, settings.port)  # before the models load and the start is recorded
    hold_sighup()  # a reload (SIGHUP) during the start must not end the service
    if retune:  # before the models load (and before workers fork): every one is timed again
        _forget_decisions(settings, log)
    with refusal():  # an empty serving-only repository, a default model that did not build
        prepared = prepare(settings)
    if prepared.built_default:
        click.echo(f"built the default model into {settings.repository}", err=True)
    if prepared.admin_key is not None:
        _hand_over_admin_key(settings.keys_dir, prepared.admin_key_id or "", prepared.admin_key)
    import uvicorn

    from appliance.http_protocol import PROTOCOL as HTTP_PROTOCOL
    from appliance.http_protocol import configure as configure_deadlines

    deadlines = {"header_timeout_s": settings.header_timeout_s, "body_timeout_s": settings.body_timeout_s}
    tls_options = ssl_options(tls)
    http = tls_options.pop("http", HTTP_PROTOCOL)  # mutual TLS: its own protocol (a DeadlineProtocol too)

    if settings.workers > 1:
        from appliance.server import settings_environment
        from appliance.workers import run_workers

        os.environ.update(settings_environment(settings))
        run_workers(
            {
                "host": settings.host,
                "port": settings.port,
                "workers": settings.workers,
                "log_level": settings.log_level,
                "log_config": None,  # uvicorn's lines through the root logger: one format (runtime.logs)
                "access_log": False,
                "timeout_graceful_shutdown": math.ceil(settings.shutdown_timeout_s),
                "http": http,
                **proxy_options(settings),
                **tls_options,
            },
            deadlines=deadlines,
            on_listening=lambda: click.echo(f"inferbox serving on {_url(settings, tls)}", err=True),
        )
        return

    from appliance.server import build_app

    reloader = None
    if tls is not None:  # one process: it keeps its context, so SIGHUP can load a renewed certificate
        from appliance.tls_reload import CertificateReloader

        reloader = CertificateReloader(settings, tls)
        tls_options = {"ssl_context_factory": reloader.context_factory}
    with refusal():
        app = build_app(settings, reloads=True, reloader=reloader)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's lines through the root logger: one format, no colour codes (runtime.logs)
        access_log=False,
        # the requests in flight get this long, then the lifespan closes the audit log (its clean-shutdown
        # checkpoint): without a bound a slow request held the stop until systemd's SIGKILL skipped it
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        lifespan="on",
        http=http,
        **proxy_options(settings),
        **tls_options,
    )
    configure_deadlines(config, **deadlines)
    url = _url(settings, tls)
    server = _NotifyingServer(
        config,
        drain_s=settings.shutdown_drain_s,
        on_drain=_draining(app),
        # once the socket listens (it was printed before the bind, also when the bind then failed)
        on_ready=lambda: click.echo(f"inferbox serving on {url}", err=True),
    )
    # uvicorn raises the Ctrl-C again after its clean shutdown: a stop asked for, not click's "Aborted!"
    # and exit 1 (which `make run` reported as an error)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    hold_sighup()  # the loop's handler went with the loop: a late SIGHUP must not end the exit early


def _refuse_retune_without_autotune(settings: Settings, retune: bool) -> None:
    from runtime.errors import ConfigError

    if retune and not settings.autotune:
        raise ConfigError(
            f"--retune re-times the autotune decisions, but autotune is off ({settings.sources.get('autotune')}): "
            "add --autotune (or set autotune = true)"
        )


def _forget_decisions(settings: Settings, log: logging.Logger) -> None:
    """Empty the autotune decision cache, so that every model loaded now is timed again."""
    from runtime.autotune import DecisionCache

    removed = DecisionCache(settings.decision_cache).clear()
    log.info("--retune: forgot %d cached autotune decision(s) in %s; timing again", removed, settings.decision_cache)


def proxy_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's proxy options: a request's origin (the audit's, the logs') from X-Forwarded-For only
    when the connection comes from a ``trusted_proxies`` address.  uvicorn's default trusts 127.0.0.1,
    and on a box served on loopback every client connects from there: any of them named its own
    origin in the audit log."""
    trusted = ",".join(p.strip() for p in (settings.trusted_proxies or "").split(",") if p.strip())
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None}


def _check_port(host: str, port: int) -> None:
    """The address must be free to listen on, said before the models load: a second server on a used port
    loaded its models and recorded a start (service_start, model_load) before uvicorn failed to bind."""
    import errno
    import socket

    from runtime.errors import InferboxError

    # `error: ...` and exit 2, as every error the CLI raises on purpose (click's "Error:" and exit 1 were
    # the odd ones out); not 78: a port held by a server still stopping is free on the unit's restart
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise InferboxError(
                    f"{host}:{port} is in use (another inferbox serve on this box? `ss -ltnp 'sport = :{port}'` "
                    "names it): stop it, or serve on another port (--port, INFERBOX_PORT)"
                ) from None
            if exc.errno == errno.EACCES:
                raise InferboxError(
                    f"cannot listen on {host}:{port} ({exc.strerror}): a port below 1024 needs root or "
                    "CAP_NET_BIND_SERVICE; serve on a port above 1023 (--port), behind a proxy if need be"
                ) from None
            raise InferboxError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def _log_certificate(log: logging.Logger, tls: TlsPlan) -> None:
    from appliance.tls import expiry_warning, validity_problem

    cert = tls.certificate
    log.info(
        "HTTPS (%s): certificate %s, sha256 %s, valid until %s",
        tls.mode,
        cert.subject,
        cert.sha256,
        cert.not_after.isoformat(),
    )
    if (problem := validity_problem(tls.cert, cert)) is not None:
        log.error("%s", problem)
    elif (warning := expiry_warning(tls.cert, cert)) is not None:
        log.warning("%s", warning)


def _hand_over_admin_key(keys_dir: Path, key_id: str, secret: str) -> None:
    """Show the first admin key once: on a terminal, printed; otherwise (systemd, CI) in a 0600 file.

    Printing it to a non-terminal stderr would put a secret in the journal.
    """

    hint = "use it as `Authorization: Bearer <key>`; create narrower keys with `inferbox keys create`"
    if sys.stderr.isatty():
        click.echo(f"created the first admin key (id {key_id}), shown only this once:\n  {secret}\n{hint}", err=True)
        return
    path = keys_dir / ADMIN_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    click.echo(
        f"created the first admin key (id {key_id}) in {path} (mode 0600): read it, then delete the file. {hint}",
        err=True,
    )


def _url(settings: Settings, tls: Any) -> str:
    """Where the API listens, as a client writes it."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{'http' if tls is None else 'https'}://{host}:{settings.port}"


def _draining(app: Any) -> Callable[[], None]:
    """What marks ``app``'s server as draining (readiness 503)."""

    def mark() -> None:
        server = app.state.get("server") if hasattr(app, "state") else None
        if server is not None:
            server.draining = True

    return mark


class _NotifyingServer:
    """uvicorn's server, telling systemd READY=1 only once the socket listens; on SIGTERM with ``drain_s``,
    it answers readiness 503 (``on_drain``) and goes on serving that long before uvicorn's shutdown (a
    second signal stops it at once)."""

    def __init__(
        self,
        config: Any,
        *,
        drain_s: float = 0.0,
        on_drain: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            draining: threading.Timer | None = None

            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if not self.should_exit:
                    from appliance.systemd.notify import notify

                    if on_ready is not None:
                        on_ready()
                    notify("READY=1")

            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                # no drain before the start finished (readiness never said 200) nor on a second signal
                if (
                    sig != signal.SIGTERM
                    or drain_s <= 0
                    or not self.started
                    or self.draining is not None
                    or self.should_exit
                ):
                    if self.draining is not None:
                        self.draining.cancel()
                    super().handle_exit(sig, frame)
                    return
                if on_drain is not None:
                    on_drain()
                logging.getLogger(__name__).info(
                    "SIGTERM: readiness answers 503; serving %g s more before the stop (shutdown_drain_s)", drain_s
                )
                self.draining = threading.Timer(drain_s, super().handle_exit, (sig, frame))
                self.draining.daemon = True
                self.draining.start()

        self._server = Server(config)

    def run(self) -> None:
        self._server.run()
