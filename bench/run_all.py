"""The one benchmark command: every part, one run, one box, one results page.

``python -m bench.run_all [--quick] [--out bench/results] [--only inprocess,http]``
(``make bench`` runs it).  Parts, in order: ``inprocess``, ``http``,
``audit_onoff``, ``batch``, ``coldstart``, ``memory``.  Each writes its own
JSON (and PNG) under ``--out``; this writes ``latest.json`` (everything plus
the targets of issue 7, met or not) and ``README.md`` (the tables).  A part
that cannot run records ``skipped: <reason>`` and the run goes on.

When the default package is missing from the repository, ``inferbox init
--timing quick`` is run first (it builds it from the bundled MiniLM, as a first
``inferbox serve`` does) unless ``--no-init``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import Config, is_skipped, markdown_table, skipped, write_json

__all__ = [
    "INIT_TIMING",
    "PARTS",
    "SUITE_GOAL_S",
    "main",
    "nested_skips",
    "render_readme",
    "run",
    "suite_target",
    "targets",
]

logger = logging.getLogger(__name__)

PARTS = ("inprocess", "http", "audit_onoff", "batch", "coldstart", "memory")
#: the parts that feed texts, with what they send: a tensor or image package skips them
TEXT_PARTS = {
    "http": "sends texts to /v1/embeddings",
    "audit_onoff": "sends texts to /v1/embeddings",
    "batch": "submits jobs of texts",
    "memory": "runs batches of 32 x 128 tokens",
}


def _tensor_inprocess(cfg: Config) -> dict[str, Any]:
    from bench.inprocess import load_package
    from bench.tensors import run

    return run(cfg, package=load_package(cfg))


def _part(name: str, *, text: bool = True) -> Callable[[Config], dict[str, Any]]:
    if name == "inprocess":
        from bench.inprocess import run as inprocess

        return inprocess if text else _tensor_inprocess
    if name == "http":
        from bench.http import run as http

        return http
    if name == "audit_onoff":
        from bench.audit_onoff import run as audit_onoff

        return audit_onoff
    if name == "batch":
        from bench.batch_vs_inprocess import run as batch

        return batch
    if name == "coldstart":
        from bench.coldstart import run as coldstart

        return coldstart
    if name == "memory":
        from bench.memory import run as memory

        return memory
    raise ValueError(f"unknown part {name!r}; parts: {', '.join(PARTS)}")


#: the timing of the package this suite builds: the one a first ``inferbox serve`` (``make run``)
#: builds, so the suite measures the package a new user serves.  The parts time every candidate
#: themselves; full timing's longer windows and unranked scenarios cost 226 s against 156 s on
#: 2 AVX2 cores (and pushed the suite over its 15 minutes there)
INIT_TIMING = "quick"


def ensure_package(cfg: Config, *, init: bool) -> dict[str, Any]:
    """Open the package, building it with ``inferbox init`` first when it is missing (the
    default model only: another one is exported by its owner)."""
    from appliance.settings import load_settings
    from bench.inprocess import load_package
    from runtime.errors import ModelNotFoundError

    try:
        p = load_package(cfg)
        return {
            "name": p.name,
            "version": p.version,
            "path": str(p.path),
            "built": False,
            "task": p.manifest.task,
            "text": p.manifest.text is not None,
        }
    except ModelNotFoundError as exc:
        default = load_settings({"home": cfg.home, "repository": cfg.repository}).default_model
        if cfg.model != default:
            return skipped(f"{exc} (`inferbox init` builds only the default model {default!r})")
        if not init:
            return skipped(f"{exc} (run `inferbox init`)")
    from bench.server import inferbox_command

    args = [*inferbox_command(), "init", "--timing", INIT_TIMING]
    if cfg.home is not None:
        args += ["--home", str(cfg.home)]
    if cfg.repository is not None:
        args += ["--repository", str(cfg.repository)]
    print(f"building the default package: {' '.join(args[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=1800)
    if proc.returncode != 0:
        return skipped(f"`inferbox init` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    p = load_package(cfg)
    return {
        "name": p.name,
        "version": p.version,
        "path": str(p.path),
        "built": True,
        "init_s": time.perf_counter() - t0,
        "timing": INIT_TIMING,
        "task": p.manifest.task,
        "text": p.manifest.text is not None,
    }


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, higher_is_better: bool, where: str) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        op = ">=" if higher_is_better else "<="
        out.append({"target": name, "value": value, "goal": f"{op} {target:g}", "met": met, "from": where})

    rows = [r for r in _get(parts, "inprocess", "rows") or [] if not is_skipped(r) and r.get("kind") == "candidate"]
    best_tp = max(rows, key=lambda r: r.get("x_best_pt") or 0, default=None)
    best_lat = min(rows, key=lambda r: r.get("b1_vs_fp32") or float("inf"), default=None)
    best_pt = _get(parts, "inprocess", "best_pytorch") or "none ran"
    name = f"b32x128 throughput vs the best PyTorch ({best_pt}; best gate-passing candidate)"
    h2h = _get(parts, "inprocess", "head_to_head")
    if isinstance(h2h, dict) and "ratio" in h2h:  # alternating in one process: the drift cancels
        from bench.inprocess import h2h_order

        where = f"{h2h['candidate']} vs {h2h['baseline']}, {h2h_order(h2h)}"
        add(f"{name[:-1]}, head to head)", h2h["ratio"], 2.0, True, where)
    else:  # the one-shot table (say why the head to head is missing)
        where = best_tp["runner"] if best_tp else "inprocess"
        if isinstance(h2h, dict) and is_skipped(h2h):
            where += f" (one-shot; head to head skipped: {h2h['skipped']})"
        add(name, best_tp and best_tp.get("x_best_pt"), 2.0, True, where)
    add(
        "batch-1 p50 latency vs PyTorch fp32 (best gate-passing candidate)",
        best_lat and best_lat.get("b1_vs_fp32"),
        0.25,
        False,
        best_lat["runner"] if best_lat else "inprocess",
    )
    http_rows = _get(parts, "http", "rows") or []
    c32 = next((r for r in http_rows if r.get("endpoint") == "/v1/embeddings" and r.get("concurrency") == 32), None)
    alternating = _get(parts, "http", "alternating")
    if isinstance(alternating, dict) and alternating.get("ratio") is not None:
        rounds = len(alternating.get("server_per_s") or [])
        where = f"http /v1/embeddings, {rounds} server and {rounds} in-process windows in turn"
        add("HTTP c=32 vs in-process", alternating["ratio"], 0.85, True, where + _http_context(c32))
    else:
        where = "http /v1/embeddings (one run"
        if isinstance(alternating, dict) and is_skipped(alternating):
            where += f"; windows in turn skipped: {alternating['skipped']}"
        where += ")" + _http_context(c32)
        add("HTTP c=32 vs in-process", c32 and c32.get("vs_inprocess"), 0.85, True, where)
    add("audit on vs off", _get(parts, "audit_onoff", "on_vs_off"), 0.95, True, "audit_onoff")
    add("batch (net) vs in-process", _get(parts, "batch", "net_vs_inprocess"), 0.90, True, "batch")
    add("cold start to ready (s)", _get(parts, "coldstart", "server", "ready_s_median"), 3.0, False, "coldstart")
    return out


def _open_loop_section(open_loop: Any) -> list[str]:
    """The HTTP part's open loop (no target): latency at shares of the closed loop's c=32 rate."""
    from bench.http import OPEN_COLUMNS

    if not isinstance(open_loop, dict):
        return []
    if is_skipped(open_loop):
        return [f"Open loop: skipped ({open_loop['skipped']}).", ""]
    return [
        "Open loop on /v1/embeddings (no target; requests on a fixed schedule at a share of the c=32 closed "
        f"loop's {open_loop['closed_loop_c32_rps']:.1f} requests/s, latency counted from when each was due; "
        "the client shares the box's CPU, `client_cpu_ms`):",
        "",
        markdown_table(OPEN_COLUMNS, [r for r in open_loop.get("rows") or [] if not is_skipped(r)]),
        "",
        *[
            f"- open loop at {r['fraction']:.0%} ({r['rate']}/s): not measured: {r['skipped']}"
            for r in open_loop.get("rows") or []
            if is_skipped(r)
        ],
        "",
    ]


def _capacity_section(found: Any) -> list[str]:
    """The HTTP part's capacity at a p99 target (no target of its own): the search's windows and answer."""
    from bench.http import CAPACITY_ROW_COLUMNS
    from bench.remote import capacity_line

    if not isinstance(found, dict):
        return []
    if is_skipped(found):
        return [f"Capacity at a p99 target: skipped ({found['skipped']}).", ""]
    shares = [
        f"{found[key]:.2f} of {what}"
        for key, what in (("vs_closed_loop_c32", "the c=32 closed loop"), ("vs_inprocess", "in-process"))
        if isinstance(found.get(key), float)
    ]
    again = ", `confirming` the second windows" if any(r.get("confirming") for r in found.get("rows") or []) else ""
    return [
        f"Capacity at p99 <= {found['p99_target_ms']:g} ms on /v1/embeddings (no target; the highest open-loop rate "
        f"that keeps it, `inferbox bench --url --p99-ms` on this server; every window below{again}):",
        "",
        markdown_table(CAPACITY_ROW_COLUMNS, found.get("rows") or []),
        "",
        f"{capacity_line(found)}" + (f" ({', '.join(shares)})." if shares else "."),
        "",
    ]


def _http_context(c32: dict[str, Any] | None) -> str:
    """The c=32 row's load client (a Python client shares the cores with the server) and its
    ratio to the same 32 single-text callers through the server's batching in process."""
    if not c32:
        return ""
    out = f"; client {c32.get('client', '?')}"
    if isinstance(c32.get("vs_batcher"), (int, float)):
        out += f"; vs the server's batching in process (same callers, no HTTP): {c32['vs_batcher']:.2f}"
    return out


#: the whole suite's goal, package build included (issue 7: "under 15 minutes")
SUITE_GOAL_S = 900.0


def suite_target(report: dict[str, Any], parts: Sequence[str]) -> list[dict[str, Any]]:
    """The suite's own time as a target row, for a full (not quick) run of every part; the
    ``from`` says whether this run built the package (``inferbox init``) and how long that took."""
    if report.get("quick") or tuple(parts) != PARTS or report.get("seconds") is None:
        return []
    package = report.get("package") or {}
    if package.get("built"):
        where = f"this run, package built first ({package.get('init_s', 0):.0f} s of it, {package.get('timing', 'full')} timing)"
    else:
        where = "this run, package already built"
    seconds = float(report["seconds"])
    return [
        {
            "target": "whole suite, one command (s)",
            "value": seconds,
            "goal": f"<= {SUITE_GOAL_S:g}",
            "met": seconds <= SUITE_GOAL_S,
            "from": where,
        }
    ]


def nested_skips(part: Any, path: str) -> list[tuple[str, str]]:
    """(path, reason) of every ``skipped`` record inside ``part`` below its top level, except its
    table rows (the part's own skip and its rows' are shown with its table) and inside the
    ``before`` / ``after`` runs a reference averaged (their skips are in the mean; a side that
    failed whole is listed)."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, where: str, top: bool) -> None:
        if isinstance(value, dict):
            if not top and is_skipped(value):
                found.append((where, str(value["skipped"])))
                return
            for key, item in value.items():
                copy = key in ("before", "after") and isinstance(item, dict) and not is_skipped(item)
                if not (top and key == "rows") and not copy:
                    walk(item, f"{where}.{key}", False)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]", False)

    if isinstance(part, dict) and not is_skipped(part):
        walk(part, path, True)
    return found


def _section(title: str, part: Any, columns: Sequence[str], rows_key: str = "rows") -> list[str]:
    lines = [f"## {title}", ""]
    if not isinstance(part, dict):
        return [*lines, "not run", ""]
    if is_skipped(part):
        return [*lines, f"skipped: {part['skipped']}", ""]
    rows = part.get(rows_key) or []
    good = [r for r in rows if not is_skipped(r)]
    if good:
        lines += [markdown_table(columns, good), ""]
    for r in rows:
        if is_skipped(r):
            label = r.get("runner") or r.get("target") or r.get("audit") or "?"
            if "endpoint" in r:
                label = f"{r['endpoint']} c={r.get('concurrency', '?')}"
            elif "window" in r:
                label = f"window {r['window']} (server {r.get('server')}, audit {'on' if r.get('audit') else 'off'})"
            lines.append(f"- skipped {label}: {r['skipped']}")
    return [*lines, ""]


def _spread(ref: dict[str, Any], *keys: str) -> str:
    """``; X before the server runs, Y after``: a figure of the in-process runs before and after
    the server's (how far the box drifted meanwhile), or nothing when either is missing."""
    runs = [_get(ref, side, *keys) for side in ("before", "after")]
    return f"; {runs[0]:.1f} before the server runs, {runs[1]:.1f} after" if None not in runs else ""


def render_readme(report: dict[str, Any]) -> str:
    """The markdown results page."""
    from bench import tensors
    from bench.inprocess import COLUMNS

    parts = report.get("parts", {})
    machine = _get(parts, "inprocess", "machine") or {}
    lines = [
        "# inferbox benchmark results",
        "",
        f"Run {report['started_at']} -> {report['finished_at']} ({report['seconds']:.0f} s), "
        f"commit `{report.get('commit') or '?'}`, `python -m bench.run_all{' --quick' if report['quick'] else ''}`.",
        "",
    ]
    if report["quick"]:
        lines += [
            "> **Quick mode**: tiny sizes, checking the suite end to end. These numbers are not for the record.",
            "",
        ]
    lines += [
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} physical cores at "
        f"{machine.get('ghz', 0):.2f} GHz ({machine.get('clock_source', '?')}); peaks (G ops/s): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in (machine.get("peak_gops") or {}).items())
        + (
            "; a bare matrix product here (OpenVINO, every core) reached (G ops/s): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in machine["gemm_gops"].items())
            if machine.get("gemm_gops")
            else ""
        )
        + (
            f"; GPU: {machine['gpu']}, peaks (G ops/s, datasheet): "
            + (", ".join(f"{k} {v:,.0f}" for k, v in machine["gpu_peak_gops"].items()) or "not known")
            if machine.get("gpu")
            else ""
        ),
        "",
        "## Targets (issue 7)",
        "",
        markdown_table(("target", "value", "goal", "met", "from"), report.get("targets", [])),
        "",
    ]
    flops = _get(parts, "inprocess", "flops") or {}
    if flops.get("flops_per_item"):
        per = f"sentence at {flops['tokens']} tokens" if "tokens" in flops else "row"
        amount = flops["flops_per_item"]
        shown = f"{amount / 1e9:.3f} GFLOP" if amount >= 1e7 else f"{amount:,.0f} FLOP"
        lines += [
            f"FLOPs per {per} (matrix products and convolutions of `{flops['variant']}`, counted from the graph): "
            f"{shown}.",
            "",
        ]
    if _get(parts, "inprocess", "kind") == "tensor":
        title = f"In-process, on the package's samples (rows/s in calls of {_get(parts, 'inprocess', 'batch')})"
        lines += _section(title, parts.get("inprocess"), tensors.COLUMNS)
    else:
        lines += _section("In-process (items/s; latency in ms; x_ = throughput ratio)", parts.get("inprocess"), COLUMNS)
    h2h = _get(parts, "inprocess", "head_to_head")
    if isinstance(h2h, dict) and "ratio" in h2h:
        from bench.inprocess import h2h_order

        n = int(h2h.get("side_by_side") or 1)
        opened = "both open" if n == 1 else f"the baseline and {n} candidates open"
        lines += [
            f"Head to head, b32x128, {opened} in one process, batches in turn {h2h_order(h2h)} "
            f"(the target's figure; the rows above were measured minutes apart): {h2h['candidate']} "
            f"{h2h['candidate_per_s']:.1f}/s vs {h2h['baseline']} {h2h['baseline_per_s']:.1f}/s = "
            f"{h2h['ratio']:.2f}x.",
            "",
        ]
        others = [h for h in h2h.get("contenders") or [] if isinstance(h, dict)]
        if others:
            said = [
                f"{h['candidate']} {h['ratio']:.2f}x" if "ratio" in h else f"skipped: {h.get('skipped')}"
                for h in others
            ]
            lines += [f"Also head to head (the next best rows of the table): {'; '.join(said)}.", ""]
    rejected = _get(parts, "inprocess", "rejected") or []
    if rejected:
        lines += ["Candidates not run (rejected by the ranking; unusable backends once each):", ""]
        unusable: set[str] = set()
        for r in rejected:
            backend = r["candidate"].split("/")[0]
            if r["reason"].startswith("backend not usable"):
                if backend not in unusable:
                    unusable.add(backend)
                    lines.append(f"- {backend}/*: {r['reason']}")
                continue
            lines.append(f"- {r['candidate']}: {r['reason']}")
        lines.append("")
    from bench.http import COLUMNS as HTTP_COLUMNS

    lines += _section(
        "HTTP (closed loop; one text per request unless the endpoint says xN)", parts.get("http"), HTTP_COLUMNS
    )
    ref = _get(parts, "http", "inprocess")
    if isinstance(ref, dict) and "items_per_s" in ref:
        way = {
            "streams": "on the stream sessions side by side",
            "one_session": "on one session",
            "mixed": "on the faster of one session and the stream sessions (which differed between the runs)",
        }.get(str(ref.get("way")), "")
        cpu = f"{ref['cpu_ms_per_item']:.2f} CPU ms per item" if "cpu_ms_per_item" in ref else "CPU not measured"
        lines += [
            f"In-process reference (`vs_inprocess`): {ref.get('candidate', '?')} at {ref['items_per_s']:.1f} items/s "
            f"in length-sorted batches of 32 {way} ({cpu}{_spread(ref, 'items_per_s')}).".replace("  ", " "),
            "",
        ]
        batcher = ref.get("batcher") or {}
        if batcher:
            levels = ", ".join(
                f"c={c} {v['items_per_s']:.1f} items/s ({v['cpu_ms_per_item']:.2f} CPU ms"
                f"{_spread(ref, 'batcher', c, 'items_per_s')})"
                if "items_per_s" in v
                else f"c={c} not measured ({v.get('skipped', 'failed')})"
                for c, v in batcher.items()
            )
            lines += [
                "The same model behind the server's own batching, C single-text submitters in this process, "
                f"no HTTP (`vs_batcher`): {levels}.",
                "",
            ]
    alternating = _get(parts, "http", "alternating")
    if isinstance(alternating, dict) and "ratio" in alternating:
        server = ", ".join(f"{v:.1f}" for v in alternating.get("server_per_s") or [])
        inproc = ", ".join(f"{v:.1f}" for v in alternating.get("inprocess_per_s") or [])
        lines += [
            f"Server and in-process in turn (the target; c=32 on /v1/embeddings, {alternating.get('window_s')} s "
            f"windows, order {' '.join(alternating.get('order') or [])}): server {server} items/s; in-process "
            f"{inproc} items/s; ratio of the means {alternating['ratio']:.3f}.",
            "",
        ]
    elif isinstance(alternating, dict) and "skipped" in alternating:
        lines += [f"Server and in-process in turn: skipped ({alternating['skipped']}).", ""]
    lines += _open_loop_section(_get(parts, "http", "open_loop"))
    lines += _capacity_section(_get(parts, "http", "capacity"))
    lines += _section(
        "Audit on / off (POST /v1/embeddings, c=32; four live servers, short windows in turn)",
        parts.get("audit_onoff"),
        ("window", "server", "audit", "rps", "p50_ms", "p99_ms", "ok"),
    )
    split = _get(parts, "audit_onoff", "cpu_us_per_request")
    if isinstance(split, dict) and split:
        lines += [
            "CPU per request by thread, in microseconds (mean of each side's windows; `loop`: the event loop, "
            "`inference`: the infer-* threads that run batches, `audit`: the audit writer):",
            "",
            markdown_table(
                ("audit", "loop", "inference", "audit_writer", "other", "total"),
                [
                    {"audit": side, **{("audit_writer" if k == "audit" else k): round(v) for k, v in cpu.items()}}
                    for side, cpu in split.items()
                ],
            ),
            "",
        ]
    b = parts.get("batch")
    lines += ["## Batch vs in-process", ""]
    if isinstance(b, dict) and not is_skipped(b):
        lines += [
            markdown_table(
                ("records", "seconds", "gross_per_s", "net_per_s", "inprocess_per_s", "net_vs_inprocess"),
                [
                    {
                        "records": _get(b, "big", "records"),
                        "seconds": _get(b, "big", "seconds"),
                        "gross_per_s": b.get("gross_per_s"),
                        "net_per_s": b.get("net_per_s"),
                        "inprocess_per_s": _get(b, "inprocess", "items_per_s"),
                        "net_vs_inprocess": b.get("net_vs_inprocess"),
                    }
                ],
            ),
            "",
        ]
    else:
        lines += [f"skipped: {_get(b, 'skipped') or 'not run'}", ""]
    c = parts.get("coldstart")
    lines += ["## Cold start and imports", ""]
    if isinstance(c, dict) and not is_skipped(c):
        lines += [f"Server start to ready: {c.get('server')}", ""]
        lines += [markdown_table(("module", "import_s"), [r for r in c.get("imports", []) if not is_skipped(r)]), ""]
    else:
        lines += [f"skipped: {_get(c, 'skipped') or 'not run'}", ""]
    lines += _section(
        "Peak memory (MiB, one process per candidate)",
        parts.get("memory"),
        ("target", "rss_after_imports_mb", "rss_after_open_mb", "peak_rss_mb"),
    )
    missing = [f"- {path}: {reason}" for name in PARTS for path, reason in nested_skips(parts.get(name), name)]
    if missing:
        lines += ["## Not measured in this run", "", *missing, ""]
    charts = sorted(p.name for p in Path(report["out"]).glob("*.png"))
    if charts:
        lines += ["## Charts", ""] + [f"![{n}]({n})" for n in charts] + [""]
    return "\n".join(lines)


def _commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except OSError:
        return None
    return proc.stdout.strip() or None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(cfg: Config, parts: Sequence[str] = PARTS, *, init: bool = True) -> dict[str, Any]:
    """Run ``parts`` in order; write ``latest.json`` and ``README.md`` under ``cfg.out``."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "started_at": _now(),
        "quick": cfg.quick,
        "out": str(cfg.out),
        "commit": _commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "parts": {},
        "part_seconds": {},
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    report["package"] = ensure_package(cfg, init=init)
    text = report["package"].get("text", True)
    for name in parts:
        print(f"== {name} (at {time.perf_counter() - t0:.0f} s)", flush=True)
        t = time.perf_counter()
        if not text and name in TEXT_PARTS:
            task = report["package"].get("task")
            report["parts"][name] = skipped(f"this part {TEXT_PARTS[name]}; {cfg.model} is a {task} model")
            report["part_seconds"][name] = 0.0
            continue
        try:
            report["parts"][name] = _part(name, text=text)(cfg)
        except Exception as exc:  # a part must never sink the run
            logger.exception("part %s failed", name)
            report["parts"][name] = skipped(f"{type(exc).__name__}: {exc}")
        report["part_seconds"][name] = time.perf_counter() - t
    report["finished_at"] = _now()
    report["seconds"] = time.perf_counter() - t0
    report["targets"] = targets(report["parts"]) + suite_target(report, parts)
    write_json(cfg.out / "latest.json", report)
    (cfg.out / "README.md").write_text(render_readme(report) + "\n", encoding="utf-8")
    print(markdown_table(("target", "value", "goal", "met", "from"), report["targets"]))
    print(f"results: {cfg.out / 'README.md'} ({report['seconds']:.0f} s)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from runtime.offline import stay_offline

    stay_offline()
    p = argparse.ArgumentParser(description="Run the whole inferbox benchmark suite.")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite end to end in a few minutes")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder [bench/results]")
    p.add_argument("--model", default="minilm", help="package name in the repository [minilm]")
    p.add_argument("--home", type=Path, default=None, help="inferbox home (settings; default ~/.inferbox)")
    p.add_argument("--repository", type=Path, default=None, help="model repository [<home>/models]")
    p.add_argument("--only", default=None, help=f"comma-separated parts to run ({', '.join(PARTS)})")
    p.add_argument("--no-init", action="store_true", help="do not build a missing package with `inferbox init`")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parts = PARTS if not a.only else tuple(x.strip() for x in a.only.split(",") if x.strip())
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
    cfg = Config(out=a.out, quick=a.quick, model=a.model, home=a.home, repository=a.repository)
    run(cfg, parts, init=not a.no_init)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
