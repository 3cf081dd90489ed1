"""The CLI and its documentation kept in step: every command has help and a documented section."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from appliance.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
#: The reference that must have a section for every command and name every subcommand.
DOC_FILES = ["docs/cli.md"]


def _command(name: str) -> click.Command:
    ctx = click.Context(main)
    command = main.get_command(ctx, name)
    assert command is not None, f"COMMANDS[{name!r}] = {COMMANDS[name]!r} does not resolve"
    return command


def _walk(path: str, command: click.Command) -> list[tuple[str, click.Command]]:
    """The command and its subcommands (``audit``, ``audit verify``, ...), depth first."""
    out = [(path, command)]
    if isinstance(command, click.Group):
        for sub in command.list_commands(click.Context(command)):
            child = command.get_command(click.Context(command), sub)
            assert child is not None
            out.extend(_walk(f"{path} {sub}", child))
    return out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str) -> None:
    for path, command in _walk(name, _command(name)):
        assert (command.help or "").strip(), f"`inferbox {path}` has no help text (write a docstring)"
        result = CliRunner().invoke(main, [*path.split(), "--help"], prog_name="inferbox")
        assert result.exit_code == 0, result.output
        assert f"Usage: inferbox {path}" in result.output


@pytest.mark.parametrize("doc", DOC_FILES)
def test_every_command_is_documented(doc: str) -> None:
    text = (ROOT / doc).read_text(encoding="utf-8")
    headings = set(re.findall(r"^## inferbox (\S+)\s*$", text, flags=re.MULTILINE))
    missing_sections = sorted(set(COMMANDS) - headings)
    assert not missing_sections, f"{doc} has no '## inferbox <name>' section for {missing_sections}"
    stale = sorted(headings - set(COMMANDS))
    assert not stale, f"{doc} documents commands that do not exist: {stale}"
    paths = [path for name in sorted(COMMANDS) for path, _ in _walk(name, _command(name))]
    missing = [path for path in paths if " " in path and f"inferbox {path}" not in text]
    assert not missing, f"{doc} does not mention {', '.join(f'`inferbox {p}`' for p in missing)}"


def test_readme_names_every_command() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in sorted(COMMANDS) if f"`inferbox {name}" not in text]
    assert not missing, f"README.md does not mention {', '.join(f'`inferbox {n}`' for n in missing)}"


def test_group_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s", result.output, flags=re.MULTILINE), name


def test_unknown_command_fails() -> None:
    result = CliRunner().invoke(main, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.output


def test_help_imports_no_heavy_library() -> None:
    """`inferbox --help` and `inferbox doctor --help` stay light: commands are imported lazily."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from appliance.cli import main\n"
        "for args in (['--help'], ['doctor', '--help'], ['config', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0\n"
        "heavy = sorted({'torch', 'transformers', 'onnxruntime', 'openvino', 'litestar', 'sqlite_utils'} & set(sys.modules))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "", f"imported at --help: {done.stdout.strip()}"
