"""Timing and reporting helpers shared by every benchmark.

Everything here is deterministic given its inputs (the clock is injectable),
so the statistics are unit-tested on fixed numbers; nothing here asserts a
wall-clock time.  Results are plain dicts (JSON-ready); a part that cannot run
records :func:`skipped` instead of raising, so one missing piece never sinks
the whole run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Config",
    "Stats",
    "format_table",
    "free_port",
    "is_skipped",
    "markdown_table",
    "percentile",
    "physical_cores",
    "ratio",
    "skipped",
    "summarize",
    "time_calls",
    "workspace",
    "write_chart",
    "write_json",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    """What one benchmark run measures and where it writes.

    ``quick`` shrinks every count so the whole suite checks itself end to end
    in a couple of minutes; its numbers are not for the record.
    """

    out: Path
    quick: bool = False
    model: str = "minilm"
    home: Path | None = None
    repository: Path | None = None

    def pick(self, quick: T, full: T) -> T:
        """``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full


def physical_cores() -> int:
    """Physical cores (psutil), falling back to the logical count."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil is a hard dependency
        n = None
    return int(n or os.cpu_count() or 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(xs[lo])
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in seconds."""

    n: int
    mean: float
    median: float
    p50: float
    p99: float
    min: float
    max: float

    def to_dict(self, unit: str = "ms") -> dict[str, float]:
        scale = 1000.0 if unit == "ms" else 1.0
        return {
            "n": self.n,
            f"mean_{unit}": self.mean * scale,
            f"p50_{unit}": self.p50 * scale,
            f"p99_{unit}": self.p99 * scale,
            f"min_{unit}": self.min * scale,
            f"max_{unit}": self.max * scale,
        }


def summarize(samples: Sequence[float]) -> Stats:
    """Mean, median (= p50), p99, min and max of ``samples``."""
    if not samples:
        raise ValueError("summarize needs at least one sample")
    med = percentile(samples, 50)
    return Stats(
        n=len(samples),
        mean=sum(samples) / len(samples),
        median=med,
        p50=med,
        p99=percentile(samples, 99),
        min=float(min(samples)),
        max=float(max(samples)),
    )


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int,
    runs: int,
    clock: Clock = time.perf_counter,
    budget_s: float | None = None,
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then up to ``runs`` times timed.

    ``budget_s`` stops the timed loop early once that much time has passed
    (at least one timed call always runs), so a slow candidate cannot blow
    the suite's time limit.  Returns the per-call durations in seconds.
    """
    for _ in range(warmup):
        fn()
    out: list[float] = []
    start = clock()
    for _ in range(max(1, runs)):
        t0 = clock()
        fn()
        out.append(clock() - t0)
        if budget_s is not None and clock() - start >= budget_s:
            break
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def skipped(reason: str) -> dict[str, Any]:
    """The record a part writes when it cannot run here."""
    return {"skipped": reason}


def is_skipped(result: Mapping[str, Any]) -> bool:
    return "skipped" in result


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        if abs(value) > 0.99:  # cosines: keep the digits that matter
            return f"{value:.5f}"
        return f"{value:.4g}" if abs(value) >= 0.001 else f"{value:.2e}"
    return str(value)


def _rows(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    return [[_cell(r.get(c)) for c in columns] for r in rows]


def format_table(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """A plain-text table with aligned columns (for the terminal)."""
    body = _rows(columns, rows)
    widths = [max([len(c), *(len(r[i]) for r in body)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))) for r in body
    ]
    return "\n".join(lines)


def markdown_table(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """A GitHub-flavoured markdown table (for the results page)."""
    body = _rows(columns, rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in body]
    return "\n".join(lines)


def _default(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return repr(obj)


def write_json(path: Path, data: object) -> Path:
    """Write ``data`` as indented JSON (atomically: temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_default) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def write_chart(
    path: Path,
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    ylabel: str = "",
) -> str | None:
    """A grouped horizontal bar chart as PNG. Returns a note when it was skipped.

    Needs matplotlib (optional: ``pip install matplotlib``); without it the
    chart is skipped and the note says so, the JSON and tables still appear.
    """
    import importlib

    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install matplotlib)"
    if not labels or not series:
        return "chart skipped: nothing to plot"
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(series)
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(labels) * max(1, n) ** 0.5))
    for k, (name, values) in enumerate(series.items()):
        ys = [i + k * height for i in range(len(labels))]
        ax.barh(ys, [v or 0.0 for v in values], height=height, label=name)
    ax.set_yticks([i + height * (n - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(ylabel)
    if n > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def workspace(workdir: Path | None = None) -> Iterator[Path]:
    """``workdir`` as is, or a temporary folder removed afterwards."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="inferbox-bench-") as tmp:
        yield Path(tmp)


def part_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark part takes: ``[--quick] [--out DIR] [--model M] [--home H] [--repository R]``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--repository", type=Path, default=None)
    return p


def part_config(args: argparse.Namespace) -> Config:
    """The :class:`Config` of parsed :func:`part_parser` options; also sets up logging, offline."""
    import logging

    from runtime.offline import stay_offline

    stay_offline()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return Config(out=args.out, quick=args.quick, model=args.model, home=args.home, repository=args.repository)


def part_main(description: str, run: Callable[[Config], object], argv: Sequence[str] | None = None) -> int:
    """The command line of one benchmark part: ``python -m bench.<part> [--quick] [--out DIR] ...``."""
    run(part_config(part_parser(description).parse_args(argv)))
    return 0
