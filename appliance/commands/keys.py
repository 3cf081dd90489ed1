"""``inferbox keys create | list | revoke``: manage API keys (a thin shell over :mod:`appliance.keys`).

Key creation and revocation are recorded to the audit log (``key_create`` /
``key_revoke``) when audit is on: the log is opened *before* the key is touched,
so an audit log that cannot be written stops the command.  The recorder is
built by :data:`recorder_factory` (settings -> ``record(event)`` or None), which a
composition root or a test may replace.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click

from api.protocols import AuditEvent
from appliance.commands.options import build_settings, existing_home, state_options
from appliance.keys import KeyStore, certificate_sha256, parse_expiry
from appliance.settings import Settings
from runtime.times import utc_iso

__all__ = ["Recorder", "cli_user", "keys", "recorder_factory"]

Recorder = Callable[[AuditEvent], None]


@contextmanager
def _audit_log_recorder(settings: Settings) -> Iterator[Recorder | None]:
    """The appliance's audit log when ``settings.audit`` is on, else None."""
    if not settings.audit:
        yield None
        return
    from appliance.audit.log import AuditLog

    log = AuditLog.open(settings)

    def record(event: AuditEvent) -> None:
        log.append(event)

    try:
        yield record
    finally:
        log.close()


#: settings -> context manager yielding a recorder (or None: not recorded)
recorder_factory: Callable[[Settings], AbstractContextManager[Recorder | None]] = _audit_log_recorder


#: /proc/self/loginuid when no login set it (a service, a container)
_NO_LOGIN = 4294967295


def cli_user(loginuid: Path = Path("/proc/self/loginuid")) -> str:
    """Who runs the command, for a record's ``actor`` (``cli:<user>``): the name of the process's real
    uid, and, when the kernel's login uid (set at login, kept across ``sudo``) is another user, that
    login too: ``inferbox (login alice)`` for ``sudo -u inferbox`` run by alice.

    Never from the environment: ``getpass.getuser()`` read ``LOGNAME`` / ``USER`` first, so any user
    could name someone else as the actor of a key creation or a prune.  A uid without a passwd
    entry (``docker --user 4242``) is ``uid-4242``.  Shared with ``inferbox audit``.
    """
    uid = os.getuid()
    name = _user_name(uid)
    try:
        login = int(loginuid.read_text().strip())
    except (OSError, ValueError):
        login = _NO_LOGIN
    if login not in (_NO_LOGIN, uid):
        return f"{name} (login {_user_name(login)})"
    return name


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid-{uid}"


def _settings(home: Path | None, repository: Path | None) -> Settings:
    """The settings, refusing a state folder that does not exist (a mistyped or default home)."""
    settings = build_settings(home=home, repository=repository)
    return existing_home(settings, "keys", "keys live in the state folder the server uses")


def _event(kind: str, action: str, key_id: str, details: dict[str, str], started: str) -> AuditEvent:
    return AuditEvent(
        event=kind,
        action=action,
        actor=f"cli:{cli_user()}",
        origin=socket.gethostname(),
        outcome="success",
        status=0,
        started_at=started,
        ended_at=utc_iso(),
        credential_id=key_id,
        details=details,
    )


@click.group()
def keys() -> None:
    """Create, list and revoke API keys (shown once, stored only as a hash)."""


@keys.command("create")
@state_options
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    help="infer | infer:<model> | models:admin | keys:admin | audit:read | metrics:read (repeatable).",
)
@click.option("--model", default=None, help="Narrow the infer scope to this model.")
@click.option("--expires", default=None, help="Expiry: YYYY-MM-DD (00:00 UTC) or an ISO 8601 time.")
@click.option("--name", default="", help="A label for the key (who or what uses it).")
@click.option(
    "--rate-limit",
    "rate_limit",
    type=click.IntRange(min=0),
    default=0,
    help="Requests per minute for this key (0 = the rate_limit_per_minute setting).",
)
@click.option(
    "--tokens-per-minute",
    "tokens_per_minute",
    type=click.IntRange(min=0),
    default=0,
    help="Tokens per minute the key's text requests may bring (texts as the model tokenizes them, the "
    "usage.prompt_tokens of /v1/embeddings; 0 = the tokens_per_minute setting).",
)
@click.option(
    "--client-cert",
    "client_cert",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Bind the key to this client certificate (PEM or DER): it then works only over mutual TLS with it.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"id": ..., "key": ...}.')
def create(
    *,
    home: Path | None,
    repository: Path | None,
    scopes: tuple[str, ...],
    model: str | None,
    expires: str | None,
    name: str,
    rate_limit: int,
    tokens_per_minute: int,
    client_cert: Path | None,
    as_json: bool,
) -> None:
    """Create a key and print it once."""
    settings = _settings(home, repository)
    started = utc_iso()
    expiry = parse_expiry(expires) if expires else None
    bound = certificate_sha256(client_cert) if client_cert is not None else None
    if bound is not None and settings.tls_client_ca is None:
        click.echo(
            "warning: the settings this command reads set no tls_client_ca; a server without it asks for no "
            "client certificates and refuses a key bound to one; see docs/operations.md (Mutual TLS)",
            err=True,
        )
    with recorder_factory(settings) as record:
        store = KeyStore(settings.state_db)
        try:
            rec, secret = store.create(
                scopes,
                model=model,
                expires=expiry,
                name=name,
                rate_limit_per_minute=rate_limit,
                client_cert_sha256=bound,
                tokens_per_minute=tokens_per_minute,
            )
        finally:
            store.close()
        if record is not None:
            details = {
                "scopes": ",".join(rec.scopes),
                "name": name,
                "expires_at": rec.expires_at or "",
                "rate_limit_per_minute": str(rec.rate_limit_per_minute),
                "tokens_per_minute": str(rec.tokens_per_minute),
            }
            if bound is not None:
                details["client_cert_sha256"] = bound
            record(_event("key_create", "inferbox keys create", rec.id, details, started))
    if model is not None and (missing := _unknown_model(settings, model)):
        click.echo(f"warning: {missing}", err=True)  # stderr: a script reading the key from stdout gets it
    if as_json:
        click.echo(json.dumps({"id": rec.id, "key": secret}))
        return
    binding = f"; only with the client certificate sha256 {bound}" if bound is not None else ""
    click.echo(f"created key {rec.id} (scopes: {', '.join(rec.scopes)}{binding})")
    click.echo(secret)
    click.echo("This key is shown only once: store it now. Only its hash is kept.", err=True)


def _unknown_model(settings: Settings, model: str) -> str:
    """What to warn of when the repository does not hold ``model``: the key is made (the model may be
    installed later), but a mistyped name gave a key that every request was refused with."""
    from appliance.models.listing import absent

    missing = absent(settings.repository, model)
    if missing is None:
        return ""
    return f"{missing}; this key is refused for every other model, so check the name (`inferbox models list`)"


@keys.command("list")
@state_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_keys(home: Path | None, repository: Path | None, as_json: bool) -> None:
    """List keys (ids, scopes, state; never the secrets)."""
    settings = _settings(home, repository)
    store = KeyStore(settings.state_db)
    try:
        records = store.list()
    finally:
        store.close()
    now = datetime.now(UTC)
    if as_json:
        click.echo(json.dumps([{**r.as_dict(), "state": r.state(now)} for r in records], indent=2))
        return
    if not records:
        click.echo("no keys; create one with `inferbox keys create --scope infer`")
        return
    for r in records:
        expiry = r.expires_at or "never"
        cert = f"  cert {r.client_cert_sha256[:16]}" if r.client_cert_sha256 else ""
        limits = "".join(
            f"  {n} {unit}/min" for n, unit in ((r.rate_limit_per_minute, "req"), (r.tokens_per_minute, "tokens")) if n
        )
        click.echo(f"{r.id}  {r.state(now):8}  {','.join(r.scopes):30}  expires {expiry}{cert}{limits}  {r.name}")


@keys.command("revoke")
@state_options
@click.argument("key_id")
def revoke(home: Path | None, repository: Path | None, key_id: str) -> None:
    """Revoke a key at once (a key revoked already is left as it is)."""
    settings = _settings(home, repository)
    started = utc_iso()
    with recorder_factory(settings) as record:
        store = KeyStore(settings.state_db)
        try:
            rec, changed = store.revoke_once(key_id)
        finally:
            store.close()
        if not changed:
            # nothing changed, so nothing is recorded (as `models import` of a package already
            # there): the log's key_revoke record is the revocation's one, with its time
            click.echo(f"key {rec.id} was already revoked at {rec.revoked_at}; nothing changed")
            return
        if record is not None:
            record(_event("key_revoke", "inferbox keys revoke", rec.id, {}, started))
    click.echo(f"revoked key {rec.id}")
