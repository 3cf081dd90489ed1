"""Every option of every ``inferbox`` command is documented in docs/cli.md, where that command is,
and every ``inferbox COMMAND ... --option`` the docs write is an option that command has.

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


#: an ``inferbox`` command line as the docs write it: in one code span, or up to the line's end
_INVOCATION = re.compile(r"inferbox ([a-z][a-z-]*(?: [a-z][a-z-]*)?)([^`\n|]*)")


def _invocations(text: str) -> list[tuple[int, str, set[str]]]:
    """Each ``inferbox PATH ... --x`` in ``text``: its line, the command path (a group: its name),
    and the long options written after it (a shell comment after ``#`` is not the command's)."""
    known = {path for path, _ in _commands()}
    found = []
    for m in _INVOCATION.finditer(text):
        words = m.group(1).split()
        path = " ".join(words) if " ".join(words) in known else words[0]
        if path not in known:
            continue  # prose ("inferbox serves ..."), not a command line
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2).split("#")[0]))
        if options:
            found.append((text[: m.start()].count("\n") + 1, path, options))
    return found


def test_every_option_the_docs_give_a_command_is_one_of_its_own() -> None:
    """An option renamed or removed in the code, or given to the wrong command, is not left in an
    example an operator would copy."""
    commands = _commands()
    wrong = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line, path, options in _invocations(doc.read_text(encoding="utf-8")):
            # a group named alone may be followed by any of its subcommands' options
            own = {o for p, c in commands if p == path or p.startswith(path + " ") for o in _long_names(c)}
            unknown = sorted(options - own - COMMON)
            if unknown:
                wrong.append(f"{doc.name}:{line}: inferbox {path} has no {', '.join(unknown)}")
    assert not wrong, "\n".join(wrong)


def test_an_invocation_is_read_up_to_its_code_span_and_without_its_comment() -> None:
    got = _invocations("run `inferbox serve --port 9000` then --later\n`inferbox keys create --scope x # --not`")
    assert got == [(1, "serve", {"--port"}), (2, "keys create", {"--scope"})]
