"""Options shared by every command that touches the appliance's state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.settings import Settings, load_settings

__all__ = ["build_settings", "state_options"]

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
