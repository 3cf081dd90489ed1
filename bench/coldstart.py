"""Cold start: process start to ready, and what the big imports cost.

``inferbox serve`` on an existing package (a fresh private home each time: a
new state database and audit log; the signing key and the bench's API key are
made before the clock starts, so no admin key is created) is timed from
``Popen`` to the first ``200`` of ``GET /v2/health/ready`` (target <= 3 s).
Import times are measured inside fresh interpreters (the import statement
alone); an empty interpreter's start (``python -c pass``) is recorded beside
them as ``interpreter_s``.

``python -m bench.coldstart [--quick] [--out DIR]`` runs this part alone.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Config, format_table, part_main, skipped, summarize, workspace, write_json

__all__ = ["IMPORTS", "import_seconds", "run"]

logger = logging.getLogger(__name__)

#: modules whose import time matters to the serving path (and, for contrast, the export toolchain)
IMPORTS = (
    "onnxruntime",
    "openvino",
    "tokenizers",
    "litestar",
    "runtime.text",
    "api.app",
    "torch",
    "sentence_transformers",
)
_HEAVY = ("torch", "sentence_transformers")

#: telemetry blocked first, as every inferbox entry point does (a bare ``import openvino`` phones home)
_SNIPPET = (
    "from runtime.offline import stay_offline; stay_offline(); "
    "import time; t = time.perf_counter(); import {m}; print(time.perf_counter() - t)"
)


def import_seconds(module: str, *, python: str = sys.executable) -> float:
    """Seconds ``import module`` takes in a fresh interpreter (timed inside it)."""
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run(
        [python, "-c", _SNIPPET.format(m=module)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=root,
    )
    return float(proc.stdout.strip().splitlines()[-1])


def _interpreter_seconds(python: str = sys.executable) -> float:
    t0 = time.perf_counter()
    subprocess.run([python, "-c", "pass"], check=True, timeout=60)
    return time.perf_counter() - t0


def run(cfg: Config, *, workdir: Path | None = None) -> dict[str, Any]:
    """Server cold starts and import times; writes ``coldstart.json``."""
    with workspace(workdir) as root:
        return _run(cfg, root)


def _run(cfg: Config, root: Path) -> dict[str, Any]:
    from bench.inprocess import load_package
    from bench.server import fresh_home, running_server

    result: dict[str, Any] = {"part": "coldstart", "quick": cfg.quick}
    result["interpreter_s"] = _interpreter_seconds()
    imports: list[dict[str, Any]] = []
    for m in IMPORTS:
        if cfg.quick and m in _HEAVY:
            continue
        try:
            runs = [import_seconds(m) for _ in range(1 if m in _HEAVY else cfg.pick(1, 3))]
            imports.append({"module": m, "import_s": min(runs), "runs": len(runs)})
        except (subprocess.SubprocessError, ValueError, IndexError) as exc:
            imports.append({"module": m, **skipped(f"{type(exc).__name__}: {exc}")})
    result["imports"] = imports
    try:
        package = load_package(cfg)
    except Exception as exc:
        result["server"] = skipped(f"no package: {type(exc).__name__}: {exc} (build it with `inferbox init`)")
        package = None
    if package is not None:
        starts: list[float] = []
        modes: set[str] = set()
        errors: list[str] = []
        for i in range(cfg.pick(1, 3)):
            try:
                with running_server(package.path.parent.parent, fresh_home(root, f"cold{i}")) as srv:
                    starts.append(srv.ready_s)
                    modes.add(srv.mode)
                    if srv.serve_error:
                        errors.append(srv.serve_error[:500])
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:500])
        if starts:
            s = summarize(starts)
            result["server"] = {
                "modes": sorted(modes),
                "ready_s_median": s.median,
                "ready_s_min": s.min,
                "ready_s_max": s.max,
                "runs": s.n,
                "target_s": 3.0,
                "serve_errors": errors,
            }
        else:
            result["server"] = skipped("; ".join(errors) or "no start succeeded")
    print(format_table(("module", "import_s"), [r for r in imports if "skipped" not in r]))
    print(f"empty interpreter: {result['interpreter_s']:.3f} s; server: {result.get('server')}")
    write_json(cfg.out / "coldstart.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return part_main("cold start benchmark", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
