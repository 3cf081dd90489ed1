"""Options shared by every command that touches the appliance's state."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.settings import Settings, load_settings

__all__ = [
    "build_settings",
    "existing_home",
    "foreign_owner",
    "refuse_root_in_foreign_state",
    "state_options",
    "state_paths",
]

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
    """Run as root, the user other than root who owns ``path`` or, where it does not exist yet, its
    nearest existing parent (what root would create there lands in that user's folder): their name,
    or ``#uid`` without a passwd entry (as ``sudo -u`` takes it).  None when not root, or root owns it."""
    import pwd

    if os.geteuid() != 0:
        return None
    probe = Path(os.path.abspath(path))
    while True:
        try:
            uid = probe.stat().st_uid
            break
        except FileNotFoundError:
            if probe.parent == probe:
                return None
            probe = probe.parent
        except OSError:
            return None
    if uid == 0:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def state_paths(settings: Settings) -> list[Path]:
    """Where commands write for this box: the state folder, the repository, the key folders and the
    folders backups and audit copies go to."""
    paths = [settings.home, settings.repository, settings.keys_dir, settings.signing_key.parent]
    paths += [p for p in (settings.ship_dir, settings.backup_dir) if p is not None]
    return paths


def refuse_root_in_foreign_state(settings: Settings, *, also: str = "", extra: tuple[Path, ...] = ()) -> None:
    """Refuse (ConfigError naming the line to run instead) a command run as root where another user
    owns the state (:func:`state_paths`, and ``extra``), as ``sudo inferbox keys create`` on an
    installed box would be.

    Root writing there leaves databases, their journals, keys and caches the service cannot open
    (mode 0600, owned by root: the next start fails), and whoever runs as that user can replace
    the folders root works in with links to anywhere between two of its steps.  ``also``: what
    else the user must do for the command to work as the owner (``{owner}`` is filled in)."""
    from runtime.errors import ConfigError

    for path in (*state_paths(settings), *extra):
        owner = foreign_owner(path)
        if owner is not None:
            break
    else:
        return
    env = [f"INFERBOX_HOME={settings.home}"]
    if settings.config_file is not None and settings.home not in settings.config_file.parents:
        env.append(f"INFERBOX_CONFIG={settings.config_file}")
    for name, source in sorted(settings.sources.items()):
        if source.startswith("env INFERBOX_") and name != "home":  # sudo starts with a clean environment
            env.append(f"{source.removeprefix('env ')}={getattr(settings, name)}")
    raise ConfigError(
        f"{path} belongs to {owner}, and this command runs as root: what root writes there (databases and their "
        f"journals, keys, caches) the service cannot open, and folders {owner} can write are no place for root "
        f"to work in; run it as {owner}: sudo -u {owner} env {' '.join(env)} {_this_command()} ..."
        + also.replace("{owner}", owner)
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
