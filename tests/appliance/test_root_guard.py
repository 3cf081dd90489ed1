"""Root on a state folder another user owns: every command that touches the state says to run as
that user (``sudo inferbox keys create`` on an installed box left a root-owned journal the service
could not open), and writes nothing; commands that only read settings still run."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from appliance.cli import main


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"INFERBOX_HOME": str(home)}, catch_exceptions=False)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state folder the service user ``inferbox`` owns, this process running as root."""
    home = tmp_path / "var-lib-inferbox"
    (home / "models").mkdir(parents=True)
    (home / "input.jsonl").write_text('{"id": "1", "text": "x"}\n')
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(
        "appliance.commands.options.foreign_owner", lambda p: "inferbox" if home in (p, *p.parents) else None
    )
    return home


COMMANDS = [
    ["keys", "create", "--scope", "infer", "--name", "a"],
    ["keys", "list"],
    ["audit", "verify"],
    ["batch", "submit", "{home}/input.jsonl", "--model", "minilm"],
    ["models", "list"],
    ["backup", "create", "--to", "{tmp}", "--same-disk"],
    ["serve", "--port", "1"],
    ["doctor"],
    ["init"],
    ["signing-key", "create"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_a_command_that_touches_the_state_is_refused_with_the_line_to_run(
    served: Path, tmp_path: Path, command: list[str]
) -> None:
    before = sorted(p.relative_to(served) for p in served.rglob("*"))
    args = [a.format(home=served, tmp=tmp_path) for a in command]
    result = run(served, *args)
    assert result.exit_code == (78 if command[0] == "serve" else 2), result.output  # serve: EX_CONFIG, no restarts
    words = [w for w in command if not w.startswith("-")][:2]
    subcommand = " ".join(
        words if command[0] in ("keys", "audit", "batch", "models", "backup", "signing-key") else words[:1]
    )
    assert f"sudo -u inferbox env INFERBOX_HOME={served} " in result.stderr, result.stderr
    assert f"inferbox {subcommand} ..." in result.stderr, result.stderr
    assert sorted(p.relative_to(served) for p in served.rglob("*")) == before


def test_a_repository_another_user_owns_is_refused_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repository = tmp_path / "srv-models"
    repository.mkdir()
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("appliance.commands.options.foreign_owner", lambda p: "svc" if p == repository else None)
    result = run(tmp_path / "root-home", "models", "list", "--repository", str(repository))
    assert result.exit_code == 2 and "sudo -u svc env" in result.stderr


def test_reading_the_settings_as_root_still_works(served: Path) -> None:
    result = run(served, "config")
    assert result.exit_code == 0 and str(served) in result.output
    result = run(served, "signing-key", "show")  # no key yet: the missing key is the problem, not root
    assert "sudo -u" not in result.output


def test_root_on_its_own_state_folder_is_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ownership check: a folder root owns (this test's, when it runs as root) or not root at all."""
    from appliance.commands.options import foreign_owner

    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert foreign_owner(tmp_path / "missing") is None
    owner = foreign_owner(tmp_path)
    assert owner is None if tmp_path.stat().st_uid == 0 else owner
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert foreign_owner(tmp_path) is None
