"""``inferbox init``: build the default model package (all-MiniLM-L6-v2) if the repository lacks it."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import click

from appliance.commands.export import record_export, resolve_signing_key, resolve_threads
from appliance.commands.options import build_settings, state_options

__all__ = ["init"]


@click.command()
@state_options
@click.option("--force", is_flag=True, help="Build a new version even if the default model is already there.")
@click.option("--timing", type=click.Choice(["quick", "full"]), default="full", show_default=True)
def init(home: Path | None, repository: Path | None, force: bool, timing: str) -> None:
    """Build the default model package (settings.default_model) into the repository."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from export.default import build_default
    from export.report import format_report
    from runtime.package import list_versions

    settings = build_settings(home=home, repository=repository)
    name = settings.default_model
    versions = list_versions(settings.repository, name)
    if versions and not force:
        click.echo(f"{name} is already in {settings.repository} (versions {versions}); use --force to rebuild")
        return
    from appliance.server import ensure_signing_key

    # as serve's first start does: the box's own key signs the package, and the build is recorded
    for path in (settings.home, settings.keys_dir):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_signing_key(settings)
    started = datetime.now(UTC)
    manifest = build_default(
        settings.repository,
        name=name,
        timing=timing,
        threads=resolve_threads(settings),
        signing_key=resolve_signing_key(settings, None),
        progress=lambda step, message: click.echo(f"[{step}] {message}", err=True),
    )
    record_export(settings, manifest, started, "inferbox init", create_log=True)
    click.echo(format_report(manifest))
