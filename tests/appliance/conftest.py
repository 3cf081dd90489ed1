"""Fixtures shared by the appliance tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.cli import main


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key (one per test module)."""
    return Ed25519PrivateKey.generate()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ``INFERBOX_*`` (or systemd's ``STATE_DIRECTORY``) from the shell that runs the tests: a
    module that drives the CLI on its own homes asks for it with ``usefixtures``."""
    for name in list(os.environ):
        if name.startswith("INFERBOX_") or name == "STATE_DIRECTORY":
            monkeypatch.delenv(name)
    yield


def run_cli(home: Path, *args: str, **env: str) -> Result:
    """``inferbox ARGS`` in process on the state folder ``home`` (plus ``env``); exceptions propagate."""
    return CliRunner().invoke(main, list(args), env={"INFERBOX_HOME": str(home), **env}, catch_exceptions=False)
