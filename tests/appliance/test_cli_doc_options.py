"""Every option of every ``inferbox`` command is documented in docs/cli.md, where that command is.

``test_appliance_cli.py`` holds the commands and subcommands to the reference; this holds their
options to it: each long name (``--poll-seconds``, and a ``--x/--no-x`` pair's both halves) must
appear in the command's own part of docs/cli.md (a command's ``## inferbox NAME`` section; for a
subcommand, the bullets of its group's section that name ``inferbox GROUP SUB`` plus the section's
text outside any bullet, which speaks for all of them).  An option named only under another command
(``audit verify --public-key``) does not document ``audit ship --public-key``.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from appliance.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
CLI_MD = ROOT / "docs" / "cli.md"

#: documented once for every command, in docs/cli.md's opening paragraphs
COMMON = {"--help", "--home", "--repository"}

#: (command path, option) that are not for operators, each with why
INTERNAL = {
    # hidden: tests and dry runs swap in a fake model (appliance.batch.fake:settings_loader)
    ("batch run", "--loader"),
}


def _walk(path: str, command: click.Command) -> list[tuple[str, click.Command]]:
    out = [(path, command)]
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for sub in command.list_commands(ctx):
            child = command.get_command(ctx, sub)
            assert child is not None, f"inferbox {path} {sub} does not resolve"
            out.extend(_walk(f"{path} {sub}", child))
    return out


def _commands() -> list[tuple[str, click.Command]]:
    ctx = click.Context(main)
    out: list[tuple[str, click.Command]] = []
    for name in sorted(COMMANDS):
        command = main.get_command(ctx, name)
        assert command is not None, name
        out.extend(_walk(name, command))
    return out


def _long_names(command: click.Command) -> list[str]:
    names = [
        name
        for param in command.params
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
        if name.startswith("--")
    ]
    return sorted(set(names) - COMMON)


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^(?=## )", text, flags=re.MULTILINE)
    return {m.group(1): part for part in parts if (m := re.match(r"## inferbox (\S+)", part))}


def _split_bullets(section: str) -> tuple[list[str], str]:
    """A section's bullets (a ``- `` line and its indented lines) and the text outside them."""
    bullets: list[list[str]] = []
    rest: list[str] = []
    current: list[str] | None = None
    for line in section.splitlines():
        if line.startswith("- "):
            current = [line]
            bullets.append(current)
        elif current is not None and line.startswith("  "):
            current.append(line)
        else:
            current = None
            rest.append(line)
    return ["\n".join(b) for b in bullets], "\n".join(rest)


def _scope(path: str, sections: dict[str, str]) -> str:
    """The part of docs/cli.md that documents ``inferbox PATH``."""
    group, *sub = path.split()
    section = sections.get(group, "")
    if not sub:
        return section
    bullets, rest = _split_bullets(section)
    return "\n".join([rest, *(b for b in bullets if f"inferbox {path}" in b)])


def _named(option: str, text: str) -> bool:
    return re.search(re.escape(option) + r"(?![\w-])", text) is not None  # --json is not --json-out


@pytest.mark.parametrize(("path", "command"), [pytest.param(p, c, id=p) for p, c in _commands()])
def test_every_option_is_documented_under_its_command(path: str, command: click.Command) -> None:
    scope = _scope(path, _sections(CLI_MD.read_text(encoding="utf-8")))
    missing = [o for o in _long_names(command) if (path, o) not in INTERNAL and not _named(o, scope)]
    assert not missing, f"docs/cli.md does not document {', '.join(missing)} of `inferbox {path}` (its own part)"


def test_the_internal_list_names_real_options() -> None:
    """An option renamed or removed leaves no stale exemption behind."""
    options = {(path, o) for path, command in _commands() for o in _long_names(command)}
    assert not INTERNAL - options, sorted(INTERNAL - options)


def test_a_named_option_is_told_from_a_longer_one() -> None:
    assert _named("--json", "`--json`") and not _named("--json", "`--json-out`")
    bullets, rest = _split_bullets("intro --all\n- `inferbox g a --x`\n  more --y\n- `inferbox g b`\nend")
    assert bullets == ["- `inferbox g a --x`\n  more --y", "- `inferbox g b`"] and rest == "intro --all\nend"
