"""``inferbox config``: show the effective settings and where each came from."""

from __future__ import annotations

import json
from pathlib import Path

import click

from appliance.commands.options import build_settings, state_options
from appliance.settings import FIELDS

__all__ = ["config"]


@click.command()
@state_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def config(home: Path | None, repository: Path | None, as_json: bool) -> None:
    """Show every setting, its value and its source (default, file, env, cli)."""
    s = build_settings(home=home, repository=repository, root_ok=True)  # only reads the settings
    values = s.public_dict()
    if as_json:
        click.echo(json.dumps({"settings": values, "sources": dict(s.sources)}, indent=2))
        return
    for f in FIELDS:
        click.echo(f"[{f.section}] {f.name} = {values[f.name]!r}  ({s.sources.get(f.name)})")
