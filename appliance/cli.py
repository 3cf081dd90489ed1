"""The ``inferbox`` command: a thin shell over the library.

Subcommands live in :mod:`appliance.commands` and are imported only when used
(so ``inferbox --help`` starts fast and the serving path never imports the
export toolchain).  Each entry of :data:`COMMANDS` is ``name -> "module:attr"``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from runtime.errors import InferboxError

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, str] = {
    "doctor": "appliance.commands.doctor:doctor",
    "config": "appliance.commands.config:config",
    "serve": "appliance.commands.serve:serve",
    "audit": "appliance.commands.audit:audit",
    "keys": "appliance.commands.keys:keys",
    "signing-key": "appliance.commands.signing_key:signing_key",
    "batch": "appliance.commands.batch:batch",
    "install": "appliance.commands.install:install",
    "bench": "appliance.commands.bench:bench",
    "export": "appliance.commands.export:export_cmd",
    "init": "appliance.commands.init:init",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        from runtime.offline import stay_offline

        stay_offline()  # before any subcommand imports OpenVINO / NNCF
        try:
            return super().invoke(ctx)
        except InferboxError as exc:
            # Errors we raise on purpose name the fix; no stack trace for users.
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inferbox")
def main() -> None:
    """inferbox: verified model packages, the fastest local backend, an audited API."""
