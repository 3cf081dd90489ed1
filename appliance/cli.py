"""The ``inferbox`` command: a thin shell over the library.

Subcommands live in :mod:`appliance.commands` and are imported only when used
(so ``inferbox --help`` starts fast and the serving path never imports the
export toolchain).  Each entry of :data:`COMMANDS` is ``name -> "module:attr"``.
"""

from __future__ import annotations

import importlib
import os
import sqlite3
import subprocess
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
    "backup": "appliance.commands.backup:backup",
    "keys": "appliance.commands.keys:keys",
    "models": "appliance.commands.models:models",
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
        # What the CLI writes (state.db, audit.db, keys, outputs) is private to its user; install
        # sets its own umask for the venv and units the service user must read.
        previous_umask = os.umask(0o077)
        try:
            return super().invoke(ctx)
        except InferboxError as exc:
            # Errors we raise on purpose name the fix; no stack trace for users.
            _fail(str(exc))
        except PermissionError as exc:
            if ctx.invoked_subcommand == "install":
                _fail(f"{_os_problem(exc)}: run install as root (sudo), or pass --root DIR (a folder you can write)")
            _fail(
                f"{_os_problem(exc)}: run the command as the user that owns it (on an installed box: "
                "sudo -u inferbox env INFERBOX_HOME=/var/lib/inferbox INFERBOX_CONFIG=/etc/inferbox/inferbox.toml "
                "/opt/inferbox/venv/bin/inferbox ...)"
            )
        except BrokenPipeError:
            # the reader went away (`inferbox audit tail --json | head`): nothing is wrong with any file
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not complain again
            # 128 + SIGPIPE, as a command killed by the closed pipe ends: 1 means "verification failed"
            sys.exit(141)
        except OSError as exc:
            _fail(f"{_os_problem(exc)}; check the path and its permissions")
        except sqlite3.Error as exc:
            _fail(_database_problem(exc))
        except subprocess.CalledProcessError as exc:
            command = " ".join(str(a) for a in exc.cmd) if isinstance(exc.cmd, list | tuple) else str(exc.cmd)
            _fail(f"`{command}` failed with exit code {exc.returncode} (its output is above); fix that and run again")
        finally:
            os.umask(previous_umask)


def _database_problem(exc: sqlite3.Error) -> str:
    """What to do about a database error: who may write the file, or the file's own content."""
    text = str(exc)
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in text.lower():
        return (
            f"the disk holding the state folder is full ({exc}); nothing was damaged: free space on it "
            "(df -h on the state folder) and run the command again"
        )
    if any(word in text.lower() for word in ("readonly", "unable to open", "permission", "locked")):
        return (
            f"a database in the state folder cannot be used ({exc}); check that the state folder and its "
            "*.db files belong to the user running the command and are writable (on an installed box run it "
            "as the inferbox user: sudo -u inferbox env INFERBOX_HOME=/var/lib/inferbox ...)"
        )
    return (
        f"a database in the state folder cannot be read ({exc}): it is damaged, or was changed by hand; "
        "`inferbox audit verify` says what of the audit log is wrong, and a backup restores the state "
        "(docs/operations.md, 'Backup and restore')"
    )


def _os_problem(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename is not None else ""
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    return f"{exc.strerror or exc}:{where}" if where else str(exc.strerror or exc)


def _fail(message: str) -> None:
    from runtime.logs import error_prefix

    click.echo(f"{error_prefix()}error: {message}", err=True)
    sys.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inferbox")
def main() -> None:
    """inferbox: verified model packages, the fastest local backend, an audited API."""
