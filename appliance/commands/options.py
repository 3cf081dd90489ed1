"""Options shared by every command that touches the appliance's state."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.settings import Settings, load_settings

__all__ = ["build_settings", "existing_home", "foreign_owner", "refuse_root_in_foreign_state", "state_options"]

F = TypeVar("F", bound=Callable[..., Any])


def state_options(func: F) -> F:
    """Add ``--home`` and ``--repository`` (override INFERBOX_HOME / INFERBOX_REPOSITORY)."""
    func = click.option(
        "--repository",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="Model repository [env INFERBOX_REPOSITORY; default <home>/models].",
    )(func)
    func = click.option(
        "--home",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="State directory [env INFERBOX_HOME; default ~/.inferbox].",
    )(func)
    return func


def build_settings(*, root_ok: bool = False, **overrides: Any) -> Settings:
    """Settings from defaults < file < env < these CLI values (None = not given).

    Run as root on a state folder (or repository) another user owns, the command is refused
    (:func:`refuse_root_in_foreign_state`) unless ``root_ok`` (it only reads settings)."""
    settings = load_settings(overrides)
    if not root_ok:
        refuse_root_in_foreign_state(settings)
    return settings


def foreign_owner(path: Path) -> str | None:
    """Run as root, the name (or uid) of the user other than root who owns ``path``; else None
    (not root, the path missing, or owned by root)."""
    import pwd

    if os.geteuid() != 0:
        return None
    try:
        uid = path.stat().st_uid
    except OSError:
        return None
    if uid == 0:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def refuse_root_in_foreign_state(settings: Settings, *, also: str = "") -> None:
    """Refuse (ConfigError naming the line to run instead) a command run as root on a state folder or
    repository another user owns, as ``sudo inferbox keys create`` on an installed box would be.

    Root writing there leaves databases, their journals, keys and caches the service cannot open
    (mode 0600, owned by root: the next start fails), and whoever runs as that user can replace
    the folders root works in with links to anywhere between two of its steps.  ``also``: what
    else the user must do for the command to work as the owner."""
    from runtime.errors import ConfigError

    owner = foreign_owner(settings.home) or foreign_owner(settings.repository)
    if owner is None:
        return
    env = f"INFERBOX_HOME={settings.home}"
    if settings.config_file is not None and settings.home not in settings.config_file.parents:
        env += f" INFERBOX_CONFIG={settings.config_file}"
    raise ConfigError(
        f"the state folder {settings.home} or its repository {settings.repository} belongs to {owner}, and this "
        f"command runs as root: what root writes there (databases and their journals, keys, caches) the service "
        f"cannot open, and folders {owner} can write are no place for root to work in; run it as {owner}: "
        f"sudo -u {owner} env {env} {_this_command()} ...{also}"
    )


def _this_command() -> str:
    """``<venv>/bin/inferbox <subcommand>`` as this process was asked to run it."""
    exe = Path(sys.executable).parent / "inferbox"
    program = str(exe) if exe.is_file() else "inferbox"
    ctx = click.get_current_context(silent=True)
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join([program, *reversed([n for n in names if n])])


def existing_home(settings: Settings, command: str, why: str) -> Settings:
    """``settings``, refusing a state folder that does not exist (a mistyped home, or the default
    ``~/.inferbox`` of a user who is not the service): ``why`` says where the command's data belongs."""
    from runtime.errors import ConfigError

    if not settings.home.is_dir():
        raise ConfigError(
            f"home ({settings.sources.get('home', 'default')}): there is no state folder at {settings.home}; "
            f"{why}: pass --home or set INFERBOX_HOME (on an installed box: sudo -u inferbox env "
            "INFERBOX_HOME=/var/lib/inferbox INFERBOX_CONFIG=/etc/inferbox/inferbox.toml "
            f"/opt/inferbox/venv/bin/inferbox {command} ...), or create it first with `inferbox serve` or "
            "`inferbox install`"
        )
    return settings
