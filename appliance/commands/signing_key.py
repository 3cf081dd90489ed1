"""``inferbox signing-key``: create or show the Ed25519 key that signs packages and audit checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.commands.options import build_settings, refuse_root_in_foreign_state, state_options
from runtime.signing import (
    generate_private_key,
    key_id,
    load_private_key,
    public_key_pem,
    write_private_key,
    write_public_key,
)

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
@click.option("--force", is_flag=True, help="Replace an existing key (packages signed with it stop verifying).")
def create(home: Path | None, repository: Path | None, out: Path | None, force: bool) -> None:
    """Write a new private key (mode 0600) and <key>.pub; print the public key."""
    settings = build_settings(home=home, repository=repository)
    path = out if out is not None else settings.signing_key
    refuse_root_in_foreign_state(settings, extra=(path,))  # a key root writes there, the owner cannot read
    key = generate_private_key()
    write_private_key(key, path, overwrite=force)
    pem = public_key_pem(key)
    pub = write_public_key(key, path)
    click.echo(f"private key: {path} (mode 0600; back it up, never copy it to serving machines)")
    click.echo(f"public key:  {pub}")
    click.echo(f"key id:      {key_id(key)}")
    click.echo(f"to require signed packages, set public_key = {str(pub)!r} in [paths] of inferbox.toml")
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
