"""``serve --workers N``: every worker process's models open with ``workers = N``, so that a
``threads = 0`` session takes that worker's share of the cores, not every core."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import appliance.server as server
from appliance.commands.options import build_settings
from runtime.loader import LoaderOptions


def test_the_server_loads_models_with_its_worker_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("INFERBOX_") or key == "STATE_DIRECTORY":
            monkeypatch.delenv(key)
    seen: list[LoaderOptions] = []

    def fake_load(repository: Path, name: str, version: int | None = None, **kw: Any) -> Any:
        seen.append(kw["options"])
        raise LookupError("not needed")

    monkeypatch.setattr("runtime.loader.load_model", fake_load)
    settings = build_settings(home=tmp_path, workers=3)
    load = server.model_loader(settings, streams=settings.streams, workers=settings.workers)
    with pytest.raises(LookupError):
        load("m", None)
    assert seen[-1].workers == 3 and seen[-1].threads == 0
    registry = server.build_registry(settings)  # empty repository: nothing loaded, the loader is kept
    with pytest.raises(LookupError):
        registry.load("m")
    assert seen[-1].workers == 3
    # the batch worker is a process of its own: all of its share
    with pytest.raises(LookupError):
        server.batch_loader(settings)("m", None)
    assert seen[-1].workers == 1


def test_ctrl_c_during_the_first_start_build_exits_the_child_without_a_stack_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C reaches the terminal's whole process group: the build's child printed a stack trace
    ("Process inferbox-build-default: Traceback ...") beside the parent's "Aborted!"."""
    import export.default
    from appliance.server import _build_default_child
    from runtime.signing import generate_private_key, write_private_key

    write_private_key(generate_private_key(), tmp_path / "signing.key")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export.default, "build_default", interrupted)
    with pytest.raises(SystemExit) as exited:
        _build_default_child(str(tmp_path / "models"), "minilm", 1, str(tmp_path / "signing.key"))
    assert exited.value.code == 130
    assert "Traceback" not in capsys.readouterr().err
