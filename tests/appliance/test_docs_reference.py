"""Reference tables in the docs kept true to the code: the systemd units ``inferbox install`` writes
(docs/operations.md) and the audit event names the code can write (docs/audit.md).

The event names have no single definition in the code (``AuditEvent.event`` is a ``str``), so they
are read from the source: every string constant in an event position (an ``event=`` keyword, the
event argument of the helpers that build records, a route's ``audit_event``, an assignment to an
``event``), and every place an event is passed on without being a constant must be one of those
helpers forwarding its own parameter, or a reviewed exception below.  A new way of writing an event
fails this test until it is added here, and a new event name until the docs list it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from appliance.systemd import UNITS, unit_dir

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("api", "appliance", "runtime")
UNIT_SUFFIXES = {".service", ".timer", ".path", ".socket", ".target", ".mount"}

# -- systemd units (docs/operations.md, Install) ---------------------------------------------------


def _install_table(text: str) -> str:
    """The table of docs/operations.md's first section (## Install), braces expanded
    (``inferbox-{api.service,batch.path}`` -> ``inferbox-api.service inferbox-batch.path``)."""
    section = text.split("\n## ", 2)[1]
    assert section.startswith("Install"), "docs/operations.md must open with its ## Install section"
    rows = "\n".join(line for line in section.splitlines() if line.startswith("|"))

    def expand(match: re.Match[str]) -> str:
        return " ".join(match.group(1) + part for part in match.group(2).split(","))

    return re.sub(r"([\w./-]*)\{([^{}]+)\}", expand, rows)


def test_install_table_names_every_unit_file() -> None:
    table = _install_table((ROOT / "docs" / "operations.md").read_text(encoding="utf-8"))
    files = sorted(p.name for p in unit_dir().iterdir() if p.suffix in UNIT_SUFFIXES)
    assert files, f"no unit files under {unit_dir()}"
    missing = [name for name in files if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w.-])", table)]
    assert not missing, f"docs/operations.md's install table does not name {missing}, which install writes"
    assert set(files) == set(UNITS), "appliance.systemd.UNITS (what install writes) and the unit files differ"


def test_brace_expansion_of_the_table() -> None:
    table = _install_table("# x\n\n## Install\n\n| units | `/etc/inferbox-{a.service,b.timer}` |\n\n## Next\n")
    assert "/etc/inferbox-a.service" in table and "inferbox-b.timer" in table


# -- audit event names (docs/audit.md, Event names) ------------------------------------------------

#: helpers imported across modules: name -> the position of their event argument
SHARED_HELPERS = {"cli_event": 0, "record_cli_event": 1}
#: module-private helpers: (file, name) -> the position of their event argument
LOCAL_HELPERS = {
    ("appliance/server.py", "_event"): 0,
    ("appliance/commands/keys.py", "_event"): 0,
    ("appliance/batch/worker.py", "_event"): 0,
    ("appliance/commands/models.py", "_record"): 1,
}
#: (file, function) where an event keyword is not a constant nor a helper's parameter, each reviewed
NOT_CONSTANT_OK = {
    # the request's RequestContext.event: its default, a route's audit_event or auth_failure (collected)
    ("api/envelope.py", "_event"),
    # a query filter (?event=), not a record
    ("api/audit_routes.py", "read_audit"),
    # the record of an event already written (AuditEvent -> AuditRecord)
    ("appliance/audit/log.py", "_append_in_transaction"),
}


class _Scan(ast.NodeVisitor):
    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.names: set[str] = set()
        self.unexplained: list[str] = []
        self.function: list[ast.FunctionDef | ast.AsyncFunctionDef] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.function.append(node)
        self.generic_visit(node)
        self.function.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def _helper_index(self, call: ast.Call) -> int | None:
        func = call.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name in SHARED_HELPERS:
            return SHARED_HELPERS[name]
        return LOCAL_HELPERS.get((self.rel, name))

    def _forwarded(self, value: ast.expr, position: int | None = None) -> bool:
        """``value`` is the enclosing helper's own event parameter (its callers are scanned)."""
        if not self.function or not isinstance(value, ast.Name):
            return False
        func = self.function[-1]
        index = SHARED_HELPERS.get(func.name, LOCAL_HELPERS.get((self.rel, func.name)))
        params = [a.arg for a in func.args.args if a.arg != "self"]
        return index is not None and index < len(params) and params[index] == value.id

    def _take(self, value: ast.expr | None, where: int) -> None:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            self.names.add(value.value)
        elif value is not None and not self._forwarded(value):
            func = self.function[-1].name if self.function else "<module>"
            if (self.rel, func) not in NOT_CONSTANT_OK:
                self.unexplained.append(f"{self.rel}:{where} in {func}")

    def visit_Call(self, node: ast.Call) -> None:
        for kw in node.keywords:
            if kw.arg == "event":
                self._take(kw.value, node.lineno)
        index = self._helper_index(node)
        if index is not None and index < len(node.args):
            self._take(node.args[index], node.lineno)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and key.value == "audit_event":
                self._take(value, node.lineno)
        self.generic_visit(node)

    def _assigned(self, targets: list[ast.expr], value: ast.expr | None) -> None:
        for target in targets:
            named = isinstance(target, ast.Name) and target.id == "event"
            if (named or (isinstance(target, ast.Attribute) and target.attr == "event")) and isinstance(
                value, ast.Constant
            ):
                self._take(value, target.lineno)

    def visit_Assign(self, node: ast.Assign) -> None:
        self._assigned(node.targets, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._assigned([node.target], node.value)
        self.generic_visit(node)


def _code_events() -> tuple[set[str], list[str]]:
    names: set[str] = set()
    unexplained: list[str] = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            scan = _Scan(rel)
            scan.visit(ast.parse(path.read_text(encoding="utf-8"), filename=rel))
            names |= scan.names
            unexplained += scan.unexplained
    return names, unexplained


def _doc_events() -> set[str]:
    """The first column of docs/audit.md's event table (under ``## Event names``)."""
    text = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    match = re.search(r"^## Event names\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, "docs/audit.md has no '## Event names' section"
    return set(re.findall(r"^\| `([a-z_0-9]+)` \|", match.group(1), flags=re.MULTILINE))


def test_every_event_the_code_writes_is_listed_in_the_docs() -> None:
    code, unexplained = _code_events()
    assert not unexplained, f"an event passed on in a way this test does not follow: {unexplained}"
    assert {"key_revoke", "service_stop", "inference", "auth_failure", "metadata"} <= code  # the scan works
    docs = _doc_events()
    assert not code - docs, f"docs/audit.md (Event names) does not list {sorted(code - docs)}"
    assert not docs - code, f"docs/audit.md (Event names) lists events the code never writes: {sorted(docs - code)}"


def test_the_scan_follows_each_way_of_naming_an_event() -> None:
    source = (
        "def f(x):\n"
        "    AuditEvent(event='a')\n"
        "    cli_event('b', 1)\n"
        "    record_cli_event(s, 'c')\n"
        "    route(opt={'audit_event': 'd'})\n"
        "    ctx.event = 'e'\n"
        "    AuditEvent(event=x)\n"
        "def cli_event(event, action):\n"
        "    AuditEvent(event=event)\n"
    )
    scan = _Scan("x.py")
    scan.visit(ast.parse(source))
    assert scan.names == {"a", "b", "c", "d", "e"}
    assert scan.unexplained == ["x.py:7 in f"]


# -- settings (docs/operations.md, Settings reference) ---------------------------------------------


def _settings_table() -> dict[str, str]:
    """Setting name -> its environment variable, from docs/operations.md's Settings reference."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    match = re.search(r"^## Settings reference\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, "docs/operations.md has no '## Settings reference' section"
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| `\[[a-z]+\]` \| `([A-Z_0-9]+)` \|", match.group(1), flags=re.MULTILINE)
    return dict(rows)


def test_every_setting_is_in_the_settings_reference() -> None:
    from appliance.settings import FIELDS

    table = _settings_table()
    names = {f.name for f in FIELDS}
    assert not names - set(table), f"docs/operations.md (Settings reference) does not list {sorted(names - set(table))}"
    assert not set(table) - names, f"docs/operations.md lists settings that do not exist: {sorted(set(table) - names)}"
    wrong = {name: env for name, env in table.items() if env != f"INFERBOX_{name.upper()}"}
    assert not wrong, f"wrong environment variables in docs/operations.md (Settings reference): {wrong}"
