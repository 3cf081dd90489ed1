"""Options shared by every command that touches the appliance's state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.settings import Settings, load_settings

__all__ = ["build_settings", "existing_home", "state_options"]

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


def build_settings(**overrides: Any) -> Settings:
    """Settings from defaults < file < env < these CLI values (None = not given)."""
    return load_settings(overrides)


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
