"""The import rules of docs/design.md, checked in fresh interpreters.

- nothing in ``runtime/`` imports torch, transformers, Litestar or SQLite;
- the serving path (the API app with a real package loaded) imports neither torch
  nor transformers;
- importing a module has no side effects worth a thread or a log handler.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import runtime

HEAVY = ("torch", "transformers", "optimum", "nncf", "sentence_transformers")


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_every_runtime_module_stays_free_of_the_toolchain_the_web_and_sqlite() -> None:
    names = sorted(m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime."))
    assert "runtime.loader" in names and "runtime.package" in names
    code = (
        "import importlib, sys, threading, logging\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = [m for m in {(*HEAVY, 'litestar', 'sqlite3', 'sqlite_utils')!r} if m in sys.modules]\n"
        "print(','.join(bad) + '|' + str(threading.active_count()) + '|' + str(len(logging.getLogger().handlers)))\n"
    )
    bad, threads, handlers = _run(code).split("|")
    assert bad == ""
    assert threads == "1", "importing runtime started a thread"
    assert handlers == "0", "importing runtime configured logging"


def test_serving_app_with_a_real_package_loaded_imports_no_torch(minilm_repository: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from appliance.settings import load_settings\n"
        "from appliance.server import build_app\n"
        f"s = load_settings({{'home': {str(tmp_path)!r}, 'repository': {str(minilm_repository)!r}, "
        "'auth': False, 'audit': False}, environ={})\n"
        "app = build_app(s)\n"
        "from runtime.serving import ModelRegistry\n"
        "print(','.join(m for m in " + repr(HEAVY) + " if m in sys.modules))\n"
    )
    assert _run(code) == ""
