"""Session-wide fixtures shared by every test area.

``minilm_repository``: the default MiniLM package, built ONCE per test session
by the same code path as ``inferbox init`` (quick timing), in a temporary
repository.  Depend on it freely; it returns the repository Path, holding
``minilm/1``.  Treat the repository as read-only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.offline import stay_offline

stay_offline()  # the test session is an entry point: no OpenVINO / NNCF telemetry from tests


@pytest.fixture(scope="session")
def minilm_repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from click.testing import CliRunner

    from appliance.cli import main

    home = tmp_path_factory.mktemp("minilm-home")
    repository = home / "models"
    result = CliRunner().invoke(
        main,
        ["init", "--home", str(home), "--repository", str(repository), "--timing", "quick"],
        env={k: None for k in os.environ if k.startswith("INFERBOX_")},
        catch_exceptions=False,
    )
    if result.exit_code != 0 or not (repository / "minilm" / "1" / "manifest.json").is_file():
        pytest.fail(f"building the MiniLM package failed (exit {result.exit_code}):\n{result.output[-4000:]}")
    yield repository
