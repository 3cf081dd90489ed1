"""``inferbox signing-key``: create or show the Ed25519 key that signs packages and audit checkpoints.

``create --force`` over the box's signing key retires the old one: its public half goes to
``<home>/keys/retired/<key id>.pub``, which ``audit verify``, ``audit prune``, ``audit ship``
and ``backup create`` trust besides the signing key (:func:`appliance.audit.trust.trusted_keys`)
for the checkpoints it signed before.  The audit log keeps those for good, so without it every
one of those commands would refuse the log as if it had been tampered with.  The rotation is
recorded with a checkpoint signed with the new key that retires the old one and every key
retired before it: none of them vouches for anything after it (:mod:`appliance.audit.rotation`).
A rotation that cannot be recorded puts the old key back: a key replaced without that
checkpoint would leave the old one trusted for good.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from appliance.commands.options import build_settings, refuse_root_in_foreign_state, state_options
from runtime.durable import fsync_dir, publish_new
from runtime.errors import ConfigError
from runtime.signing import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_path,
    public_key_pem,
    write_private_key,
    write_public_key,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from appliance.settings import Settings

__all__ = ["signing_key"]


@click.group(name="signing-key")
def signing_key() -> None:
    """Create or show the appliance's Ed25519 signing key."""


@signing_key.command()
@state_options
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Where to write the private key [default: the signing_key setting, <home>/keys/signing.key].",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing key; the box's old key is retired to <home>/keys/retired/ (the audit log's "
    "old checkpoints keep verifying; packages signed with it stop verifying).",
)
def create(home: Path | None, repository: Path | None, out: Path | None, force: bool) -> None:
    """Write a new private key (mode 0600) and <key>.pub; print the public key."""
    settings = build_settings(home=home, repository=repository)
    started = datetime.now(UTC)
    # absolute: the advice below is set in a file other processes read (under systemd their cwd is /)
    path = (out if out is not None else settings.signing_key).absolute()
    refuse_root_in_foreign_state(settings, extra=(path,))  # a key root writes there, the owner cannot read
    retired = None
    # only the configured path itself (`..` walked, as the kernel does for a path without links): a link to
    # it given as --out is replaced, not the key it points at
    the_boxs = os.path.normpath(path) == os.path.normpath(settings.signing_key.absolute())
    if force and the_boxs and (path.exists() or path.is_symlink()):
        retired = _retire(path, settings.keys_dir / "retired")  # before the key it keeps is gone
    old = _old_private_key(path) if retired is not None else None
    key = generate_private_key()
    write_private_key(key, path, overwrite=force)
    pem = public_key_pem(key)
    pub = write_public_key(key, path)
    if retired is not None and settings.audit and settings.audit_db.exists():
        _record_rotation(settings, path, key, old, retired, started)
    if retired is not None:
        click.echo(
            f"retired key: {retired[1]} (key id {retired[0]}): audit verify, prune, ship and backups keep "
            "trusting the checkpoints it signed before this rotation and none after it; running services "
            "sign with the new key from their next checkpoint"
        )
    click.echo(f"private key: {path} (mode 0600; back it up, never copy it to serving machines)")
    click.echo(f"public key:  {pub}")
    click.echo(f"key id:      {key_id(key)}")
    if not the_boxs:  # a key for another machine (a build box)
        click.echo(
            f"this box signs with {settings.signing_key}, not this key: to sign exports with it, set "
            f"signing_key = {str(path)!r} in [paths] of inferbox.toml where they are made"
        )
    click.echo(
        f"to require packages signed with it, set public_key = {str(pub)!r} in [paths] of inferbox.toml where "
        "they are served"
    )
    click.echo(pem, nl=False)


@signing_key.command()
@state_options
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Private key to show [default: the signing_key setting].",
)
def show(home: Path | None, repository: Path | None, key_path: Path | None) -> None:
    """Print the public key (PEM) and key id of the existing signing key."""
    path = (
        key_path
        if key_path is not None
        else build_settings(home=home, repository=repository, root_ok=True).signing_key  # only reads the key
    )
    key = load_private_key(path)
    click.echo(f"key id: {key_id(key)}")
    click.echo(public_key_pem(key), nl=False)


def _record_rotation(
    settings: Settings,
    path: Path,
    key: Ed25519PrivateKey,
    old: Ed25519PrivateKey | None,
    retired: tuple[str, Path],
    started: datetime,
) -> None:
    """Record the rotation with a checkpoint signed with ``key`` that retires the old key and every key in
    ``<keys>/retired/`` (one retired before this format retires nothing of its own); if that fails, put
    ``old`` back (and raise): a new key without that checkpoint would leave the old one trusted for good."""
    from appliance.audit.log import AuditLog
    from appliance.commands.audit import cli_event
    from runtime.errors import InferboxError

    retires = sorted({retired[0], *_retired_ids(retired[1].parent)} - {key_id(key)})
    event = cli_event(
        "signing_key_rotate",
        "inferbox signing-key create --force",
        started,
        {
            "key_id": key_id(key),
            "retired_key_id": retired[0],
            "retired_public_key": retired[1].name,
            "retired_key_ids": ",".join(retires),
        },
    )
    try:
        log = AuditLog.open(settings)
    except (InferboxError, OSError, sqlite3.Error) as exc:
        failed: BaseException | None = exc
    else:
        try:
            log.record_rotation(event, retires)
            failed = None
        except (InferboxError, OSError, sqlite3.Error) as exc:
            failed = exc
        finally:
            # after a failure no clean-shutdown checkpoint: it would be signed with the key taken back
            log.close(sign=failed is None)
    if failed is None:
        return
    # a running service may have signed with the new key meanwhile (it reads the key file before each
    # checkpoint): its public half stays trusted, among the retired keys (the next rotation retires it)
    kept = _keep_retired(key.public_key(), retired[1].parent)
    if old is None:
        raise ConfigError(
            f"the new key is in {path} but its rotation could not be recorded in the audit log ({failed}): the "
            "old key stays trusted until a rotation is recorded; once the log is writable, run `inferbox "
            "signing-key create --force` again (its record retires every key in keys/retired/)"
        ) from failed
    write_private_key(old, path, overwrite=True)
    write_public_key(old, path)
    raise ConfigError(
        f"the rotation could not be recorded in the audit log ({failed}); the old key {retired[0]} was put back "
        f"in {path} (the new key's public half is kept as {kept}: a running service may have signed with it "
        "meanwhile); run the command again once the log is writable"
    ) from failed


def _retired_ids(folder: Path) -> list[str]:
    """The ids of the public keys in ``folder`` (a file that is not one is left out)."""
    ids = []
    for p in sorted(folder.glob("*.pub")):
        try:
            ids.append(key_id(load_public_key(p)))
        except ConfigError:
            continue
    return ids


def _old_private_key(path: Path) -> Ed25519PrivateKey | None:
    """The key at ``path``, whatever its mode (it is about to be replaced), to put back if the rotation
    cannot be recorded; None when it cannot be read."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        private = serialization.load_pem_private_key(path.read_bytes()[: 1 << 14], password=None)
    except (OSError, ValueError, TypeError):
        return None
    return private if isinstance(private, Ed25519PrivateKey) else None


def _old_public_key(path: Path, retired: Path) -> Ed25519PublicKey:
    """The public half of the key at ``path``: from the key itself (whatever its mode: it is being
    replaced), else from ``<key>.pub``."""
    private = _old_private_key(path)
    if private is not None:
        return private.public_key()
    pub = public_key_path(path)
    try:
        return load_public_key(pub)
    except ConfigError:
        raise ConfigError(
            f"the signing key {path} is not a readable Ed25519 key and {pub} is not its public key, so the old "
            f"key cannot be retired to {retired}/ and audit checkpoints it signed would stop verifying: put its "
            f"public key in {retired}/ by hand, or if it never signed anything, move {path} aside and run "
            "`inferbox signing-key create` without --force"
        ) from None


def _retire(path: Path, retired: Path) -> tuple[str, Path]:
    """Keep the public half of the key at ``path`` in ``retired``; return its key id and file (an existing
    file holding the same key, under any name, is kept as it is)."""
    old = _old_public_key(path, retired)
    return key_id(old), _keep_retired(old, retired, f"the public key of {path}")


def _keep_retired(old: Ed25519PublicKey, retired: Path, what: str = "that key") -> Path:
    """Keep ``old`` in ``retired`` as ``<key id>.pub``; its file (an existing one holding the same key, under
    any name, is kept as it is)."""
    kid = key_id(old)
    retired.mkdir(parents=True, exist_ok=True)
    for existing in sorted(retired.glob("*.pub")):  # retired already (the docs' `cp` before this did it)
        try:
            if key_id(load_public_key(existing)) == kid:
                return existing
        except ConfigError:
            continue
    target = retired / f"{kid}.pub"
    tmp = retired / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            os.fchmod(fh.fileno(), 0o644)  # a public key: auditors get it (the umask filters os.open's mode)
            fh.write(public_key_pem(old))
            fh.flush()
            os.fsync(fh.fileno())
        publish_new(tmp, target)  # never over a file of that name: it holds another key (checked above)
    except FileExistsError:
        raise ConfigError(
            f"{target} exists but does not hold {what} (key id {kid}); move it aside and run the command again"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(retired)
    return target
