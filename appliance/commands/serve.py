"""``inferbox serve``: the main job — build the default model if needed, then serve the API."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from appliance.commands.options import build_settings, state_options
from appliance.settings import Settings

__all__ = ["ADMIN_KEY_FILE", "check_auth_off_is_loopback", "is_loopback", "serve"]

ADMIN_KEY_FILE = "first-admin.key"


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (a name other than localhost may resolve anywhere)."""
    import ipaddress

    name = host.strip().removeprefix("[").removesuffix("]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_auth_off_is_loopback(settings: Settings) -> None:
    """Refuse to serve without API keys on an address other machines reach: every client would be admin."""
    if settings.auth or is_loopback(settings.host):
        return
    from runtime.errors import ConfigError

    raise ConfigError(
        f"auth is off ({settings.sources.get('auth', 'default')}) and host is {settings.host!r} "
        f"({settings.sources.get('host', 'default')}), not a loopback address: every client that reaches it "
        "would have every scope (admin). Keep auth on and give clients keys (`inferbox keys create`), "
        "or serve on 127.0.0.1 / ::1 / localhost to test without keys"
    )


@click.command()
@state_options
@click.option("--host", default=None, help="Address to listen on [env INFERBOX_HOST; default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="TCP port [env INFERBOX_PORT; default 8080].")
@click.option("--workers", type=int, default=None, help="Worker processes [env INFERBOX_WORKERS; default 1].")
@click.option("--backend", default=None, help="Force a backend (ort-cpu, ov-cpu, ...) [default auto].")
@click.option("--autotune/--no-autotune", default=None, help="Time every admissible candidate at load.")
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
    no_auth: bool,
    no_audit: bool,
) -> None:
    """Serve the models in the repository (KServe v2, OpenAI /v1/embeddings, /metrics).

    On an empty repository the default model (all-MiniLM-L6-v2) is built first.
    On a new box an admin key is created and printed once.
    """
    settings = build_settings(
        home=home,
        repository=repository,
        host=host,
        port=port,
        workers=workers,
        backend=backend,
        autotune=autotune,
        auth=False if no_auth else None,
        audit=False if no_audit else None,
    )
    check_auth_off_is_loopback(settings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.auth:
        logging.getLogger(__name__).warning(
            "auth is off (%s): every client on this machine has every scope", settings.sources.get("auth", "")
        )
    from appliance.server import prepare

    prepared = prepare(settings)
    if prepared.built_default:
        click.echo(f"built the default model into {settings.repository}", err=True)
    if prepared.admin_key is not None:
        _hand_over_admin_key(settings.keys_dir, prepared.admin_key_id or "", prepared.admin_key)
    import uvicorn

    if settings.workers > 1:
        from appliance.server import settings_environment

        os.environ.update(settings_environment(settings))
        uvicorn.run(
            "appliance.server:app_factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            access_log=False,
        )
        return

    from appliance.server import build_app

    app = build_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False, lifespan="on"
    )
    server = _NotifyingServer(config)
    click.echo(f"inferbox serving on http://{settings.host}:{settings.port}", err=True)
    server.run()


def _hand_over_admin_key(keys_dir: Path, key_id: str, secret: str) -> None:
    """Show the first admin key once: on a terminal, printed; otherwise (systemd, CI) in a 0600 file.

    Printing it to a non-terminal stderr would put a secret in the journal.
    """
    import sys

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


class _NotifyingServer:
    """uvicorn's server, telling systemd READY=1 only once the socket listens."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if not self.should_exit:
                    from appliance.systemd.notify import notify

                    notify("READY=1")

        self._server = Server(config)

    def run(self) -> None:
        self._server.run()
