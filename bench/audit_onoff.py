"""What the audit log costs: the same HTTP load with ``INFERBOX_AUDIT=false`` and ``true``.

Four servers run side by side, two with audit off and two with it on, each
warmed up; then the load (``POST /v1/embeddings`` at concurrency 32, the same
texts) visits them in short windows, one server at a time, in the order off1
on1 on2 off2, then backwards, for :data:`ROUNDS` rounds.  Each side's
throughput is the mean of its windows.  One fresh server per side, measured
once each for 12 s, read 0.88 and 0.92 on the AVX2 box although two audit-off
servers alone differed by 13 %: the box drifts within a minute, and processes
differ.  Short alternating windows spread both over the two sides alike.
With audit on, every request's response waits until its record is durable
(group commit), so this is the price of "no inference without a record".
The target is audit-on throughput >= 95 % of audit-off.

Each window also reads the server's threads' CPU (:mod:`bench.cpu`), so the
result says where the audit's price is paid: microseconds of CPU per request
on the event loop, the inference threads, the audit writer and the rest, per side.

``python -m bench.audit_onoff [--quick] [--out DIR]`` runs this part alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Config, format_table, part_main, ratio, skipped, workspace, write_json
from bench.cpu import KINDS, mean_per_request, per_request, thread_cpu
from bench.http import row_failure

__all__ = ["check_window", "cpu_split", "on_vs_off", "run", "window_order"]

logger = logging.getLogger(__name__)

CONCURRENCY = 32
#: the servers, by audit setting: two per side
SERVERS = (False, True, True, False)
#: rounds of one window per server (every other round backwards)
ROUNDS = 3
#: seconds per window (quick: 1)
WINDOW_S = 4.0


def window_order(rounds: int, servers: int = len(SERVERS)) -> list[int]:
    """Server indices window by window: 0 1 2 3, 3 2 1 0, 0 1 2 3, ..."""
    forward = list(range(servers))
    return [i for r in range(rounds) for i in (forward if r % 2 == 0 else forward[::-1])]


def check_window(row: dict[str, Any], *, warmup: bool = False) -> None:
    """Raise if any request of a measured window failed: such a window is not the server's
    throughput (a 503 from a broken audit log answers fast), so it leaves the ratio, recorded
    with its reason.  A ``warmup`` window (not counted) fails only when nothing answered."""
    failure = row_failure(row, any_error=not warmup)
    if failure is not None:
        raise RuntimeError(f"{'warming up' if warmup else 'in the window'}: {failure}")


def on_vs_off(rows: Sequence[dict[str, Any]]) -> float | None:
    """Mean requests/s with audit over mean without (over every window of each side)."""
    good = [r for r in rows if "skipped" not in r]
    on = [float(r["rps"]) for r in good if r["audit"]]
    off = [float(r["rps"]) for r in good if not r["audit"]]
    if not on or not off:
        return None
    return ratio(sum(on) / len(on), sum(off) / len(off))


def cpu_split(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean CPU microseconds per request by thread kind, per side (``off`` / ``on``), where read."""
    sides = {
        "off": mean_per_request([r.get("cpu_us_per_request") or {} for r in rows if not r["audit"]]),
        "on": mean_per_request([r.get("cpu_us_per_request") or {} for r in rows if r["audit"]]),
    }
    return sides if all(sides.values()) else {}


def run(cfg: Config, *, workdir: Path | None = None) -> dict[str, Any]:
    """Audit off vs on at concurrency 32; writes ``audit_onoff.json``."""
    with workspace(workdir) as root:
        return _run(cfg, root)


def _run(cfg: Config, root: Path) -> dict[str, Any]:
    from bench.http import measure_endpoints, server_texts
    from bench.inprocess import load_package
    from bench.server import fresh_home, running_server

    result: dict[str, Any] = {"part": "audit_onoff", "quick": cfg.quick, "concurrency": CONCURRENCY}
    try:
        package = load_package(cfg)
    except Exception as exc:
        result.update(skipped(f"no package: {type(exc).__name__}: {exc} (build it with `inferbox init`)"))
        write_json(cfg.out / "audit_onoff.json", result)
        return result
    texts = server_texts(cfg)
    rows: list[dict[str, Any]] = []
    window_s = cfg.pick(1.0, WINDOW_S)

    def measure(srv: Any, audit: bool, *, warmup: bool) -> dict[str, Any]:
        """One window on ``srv``; the warm-up pass (not counted) fails only when nothing answered."""
        before = thread_cpu(srv.pid)
        (row,) = measure_endpoints(
            srv.base_url,
            srv.headers,
            package.name,
            texts,
            cfg,
            endpoints=("/v1/embeddings",),
            levels=(CONCURRENCY,),
            multi=None,
            duration_s=window_s,
            # a warm-up pass: the client's warm-up and a window.  With one window alone (8 s less
            # on 2 AVX2 cores) the line read 0.937, 1.01 and 0.888 there: within the box's spread,
            # but not ruled out, so the warm-up stays as it was
            warmup_s=None if warmup else 0.0,
        )
        check_window(row, warmup=warmup)
        cpu = per_request(before, thread_cpu(srv.pid), int(row.get("ok") or 0))
        return {**row, "audit": audit, **({"cpu_us_per_request": cpu} if cpu else {})}

    with contextlib.ExitStack() as stack:
        servers: list[Any] = []
        try:
            for i, audit in enumerate(SERVERS):
                name = f"audit-{'on' if audit else 'off'}-{i}"
                home = fresh_home(root, name)
                servers.append(stack.enter_context(running_server(package.path.parent.parent, home, audit=audit)))
            for srv, audit in zip(servers, SERVERS, strict=True):
                measure(srv, audit, warmup=True)  # a fresh server's first batches of each shape are slow
        except Exception as exc:
            logger.warning("audit on/off servers failed: %s", exc)
            result.update(skipped(f"{type(exc).__name__}: {exc}"))
            write_json(cfg.out / "audit_onoff.json", result)
            return result
        for window, i in enumerate(window_order(cfg.pick(1, ROUNDS))):
            try:
                row = measure(servers[i], SERVERS[i], warmup=False)
                row.update({"server": i, "window": window, "mode": servers[i].mode})
            except Exception as exc:
                logger.warning("audit window %d on server %d failed: %s", window, i, exc)
                row = {"audit": SERVERS[i], "server": i, "window": window, **skipped(f"{type(exc).__name__}: {exc}")}
            rows.append(row)
        for i, srv in enumerate(servers):
            audit_db = srv.home / "audit.db"
            result.setdefault("audit_db_bytes", {})[str(i)] = audit_db.stat().st_size if audit_db.exists() else 0
    result["rows"] = rows
    result["on_vs_off"] = on_vs_off(rows)
    good = [r for r in rows if "skipped" not in r]
    result["table"] = format_table(("window", "server", "audit", "rps", "p50_ms", "p99_ms", "ok"), good)
    print(result["table"])
    print(f"audit on / off: {result['on_vs_off']}")
    cpu = cpu_split(good)
    if cpu:
        result["cpu_us_per_request"] = cpu
        print(format_table(("side", *KINDS, "total"), [{"side": f"audit {side}", **v} for side, v in cpu.items()]))
    write_json(cfg.out / "audit_onoff.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return part_main("audit on/off benchmark", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
