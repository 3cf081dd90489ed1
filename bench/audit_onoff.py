"""What the audit log costs: the same HTTP run with ``INFERBOX_AUDIT=false`` and ``true``.

Four fresh servers in turn (audit off, on, on, off: drift hits both sides
alike), each warmed up, then measured on ``POST /v1/embeddings`` at
concurrency 32 with the same texts; the mean of each side counts.  The
target is audit-on throughput >= 95 % of audit-off.  With audit on, every request's
response waits until its record is durable (group commit), so this is the
price of "no inference without a record".

``python -m bench.audit_onoff [--quick] [--out DIR]`` runs this part alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Config, format_table, part_main, ratio, skipped, workspace, write_json

__all__ = ["on_vs_off", "run"]

logger = logging.getLogger(__name__)

CONCURRENCY = 32
#: ABBA: each side measured twice; the means are compared
ORDER = (False, True, True, False)


def on_vs_off(rows: Sequence[dict[str, Any]]) -> float | None:
    """Mean requests/s with audit over mean without: with the ABBA order a linear drift cancels."""
    good = [r for r in rows if "skipped" not in r]
    on = [float(r["rps"]) for r in good if r["audit"]]
    off = [float(r["rps"]) for r in good if not r["audit"]]
    if not on or not off:
        return None
    return ratio(sum(on) / len(on), sum(off) / len(off))


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
    # off, on, on, off: a drift of the box's speed during the part hits both sides alike
    for i, audit in enumerate(ORDER):
        name = f"audit-{'on' if audit else 'off'}-{i}"
        try:
            with running_server(package.path.parent.parent, fresh_home(root, name), audit=audit) as srv:
                (row,) = measure_endpoints(
                    srv.base_url,
                    srv.headers,
                    package.name,
                    texts,
                    cfg,
                    endpoints=("/v1/embeddings",),
                    levels=(CONCURRENCY,),
                    multi=None,
                )
                row.update({"audit": audit, "mode": srv.mode})
                audit_db = srv.home / "audit.db"
                row["audit_db_bytes"] = audit_db.stat().st_size if audit_db.exists() else 0
                rows.append(row)
        except Exception as exc:
            logger.warning("%s failed: %s", name, exc)
            rows.append({"audit": audit, **skipped(f"{type(exc).__name__}: {exc}")})
    result["rows"] = rows
    result["on_vs_off"] = on_vs_off(rows)
    good = [r for r in rows if "skipped" not in r]
    result["table"] = format_table(("audit", "rps", "p50_ms", "p99_ms", "ok", "audit_db_bytes"), good)
    print(result["table"])
    print(f"audit on / off: {result['on_vs_off']}")
    write_json(cfg.out / "audit_onoff.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return part_main("audit on/off benchmark", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
