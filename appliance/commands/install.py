"""``inferbox install``: user, folders, venv, configuration, signing key, systemd units."""

from __future__ import annotations

import sys
from pathlib import Path

import click

__all__ = ["install"]


@click.command()
@click.option("--prefix", type=click.Path(path_type=Path), default=Path("/opt/inferbox"), show_default=True)
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/"),
    show_default=True,
    help="Install into this folder tree instead of the live system (images, tests): no user, no systemctl.",
)
@click.option("--no-enable", is_flag=True, help="Install the units without enabling them.")
@click.option("--no-venv", is_flag=True, help="Do not create <prefix>/venv (it exists, or tests).")
@click.option(
    "--source",
    default=None,
    help="What pip installs into the venv [default: this source tree, else inferbox==<this version>].",
)
@click.option(
    "--wheelhouse",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Install from these wheels only (offline boxes).",
)
@click.option("--api-memory-max", default="8G", show_default=True, help="MemoryMax= of inferbox-api.service.")
@click.option("--batch-memory-max", default="8G", show_default=True, help="MemoryMax= of inferbox-batch.service.")
@click.option(
    "--ship-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="A mounted folder of another machine: enables inferbox-audit-ship.timer, which copies the audit "
    "log there hourly (docs/audit.md).",
)
@click.option(
    "--backup-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="A mounted folder on another disk or machine: enables inferbox-backup.timer, which writes a backup "
    "of the state there daily and keeps the newest backup_keep (docs/operations.md).",
)
@click.option(
    "--backup-encrypt-to",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="The public key (`inferbox backup keygen`'s .pub; its private key stays off the box) every backup is "
    "encrypted to: copied to /etc/inferbox/backup.pub and set as backup_encrypt_to in a new inferbox.toml.",
)
def install(
    prefix: Path,
    root: Path,
    no_enable: bool,
    no_venv: bool,
    source: str | None,
    wheelhouse: Path | None,
    api_memory_max: str,
    batch_memory_max: str,
    ship_dir: Path | None,
    backup_dir: Path | None,
    backup_encrypt_to: Path | None,
) -> None:
    """Install inferbox as systemd services (see docs/operations.md)."""
    from appliance.install import InstallOptions
    from appliance.install import install as do_install

    if not prefix.is_absolute():
        raise click.BadParameter("must be an absolute path", param_hint="--prefix")
    if ship_dir is not None and not ship_dir.is_absolute():
        raise click.BadParameter("must be an absolute path (the unit's ReadWritePaths=)", param_hint="--ship-dir")
    if backup_dir is not None and not backup_dir.is_absolute():
        raise click.BadParameter("must be an absolute path (the unit's ReadWritePaths=)", param_hint="--backup-dir")
    report = do_install(
        InstallOptions(
            prefix=prefix,
            root=root,
            enable=not no_enable,
            venv=not no_venv,
            source=source,
            wheelhouse=wheelhouse,
            api_memory_max=api_memory_max,
            batch_memory_max=batch_memory_max,
            python=sys.executable,
            ship_dir=ship_dir,
            backup_dir=backup_dir,
            backup_encrypt_to=backup_encrypt_to,
        ),
        say=lambda line: click.echo(line, err=True),
    )
    for path in report.created:
        click.echo(f"created  {path}")
    for path in report.kept:
        click.echo(f"kept     {path}")
    for unit in report.enabled:
        click.echo(f"enabled  {unit}")
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
