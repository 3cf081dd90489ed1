"""HTTP throughput and latency at concurrency 1, 8 and 32, next to in-process.

A real server subprocess on 127.0.0.1 (:mod:`bench.server`), a closed-loop
client (``httpx.AsyncClient``: each of C workers sends its next request as
soon as the previous one answered), one text per request (a mixed-corpus
text) on ``POST /v1/embeddings`` and ``POST /v2/models/<m>/infer`` (one BYTES
input ``text``).  Each level runs for a bounded time and request count.

In-process reference: the candidate the server picks (the ranking without
autotune), opened in this process, embedding the same texts in length-sorted
batches of 32 (the server's max batch).  The ratio ``http / in-process`` is
items per second over items per second; on a 2-core box the client competes
with the server for the CPU, which the ratio includes.

``python -m bench.http [--quick] [--out DIR]`` runs this part alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import wrk
from bench.common import Config, format_table, part_main, percentile, ratio, skipped, workspace, write_chart, write_json
from bench.corpus import mixed_corpus

__all__ = [
    "ENDPOINTS",
    "closed_loop",
    "inprocess_reference",
    "measure_endpoints",
    "request_body",
    "run",
    "server_texts",
]

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/embeddings", "/v2/infer")
LEVELS = (1, 8, 32)


def request_body(endpoint: str, model: str, text: str) -> bytes:
    """The JSON body of one request carrying ``text``."""
    if endpoint == "/v1/embeddings":
        body: dict[str, Any] = {"model": model, "input": text}
    else:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
    return json.dumps(body).encode()


def endpoint_path(endpoint: str, model: str) -> str:
    return "/v1/embeddings" if endpoint == "/v1/embeddings" else f"/v2/models/{model}/infer"


async def closed_loop(
    url: str,
    bodies: Sequence[bytes],
    *,
    headers: dict[str, str],
    concurrency: int,
    max_requests: int,
    duration_s: float,
    warmup: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    transport: Any = None,
) -> dict[str, Any]:
    """C workers, each sending its next request when the last one answered.

    Stops after ``max_requests`` requests or ``duration_s`` seconds, whichever
    comes first.  Returns requests/s, latency p50/p99 (ms) and error counts.
    ``transport`` (an ``httpx.AsyncBaseTransport``) replaces the network, for tests.
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    hdrs = {"Content-Type": "application/json", **headers}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    first_error: list[str] = []
    counter = 0

    async with httpx.AsyncClient(limits=limits, timeout=120.0, transport=transport) as client:
        for i in range(warmup):
            await client.post(url, content=bodies[i % len(bodies)], headers=hdrs)

        start = clock()

        async def worker() -> None:
            nonlocal counter
            while counter < max_requests and clock() - start < duration_s:
                i = counter
                counter += 1
                t0 = clock()
                try:
                    r = await client.post(url, content=bodies[i % len(bodies)], headers=hdrs)
                    status = str(r.status_code)
                    if r.status_code != 200 and not first_error:
                        first_error.append(f"{r.status_code}: {r.text[:300]}")
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                    if not first_error:
                        first_error.append(f"{status}: {exc}")
                if status == "200":
                    latencies.append(clock() - t0)
                else:
                    errors[status] = errors.get(status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = clock() - start
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(latencies) + sum(errors.values()),
        "ok": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
    }
    if latencies:
        out["p50_ms"] = percentile(latencies, 50) * 1000
        out["p99_ms"] = percentile(latencies, 99) * 1000
    if first_error:
        out["first_error"] = first_error[0]
    return out


#: seconds of load before each measured wrk run (not counted)
WARMUP_S = 3.0


def measure_endpoints(
    base_url: str,
    headers: dict[str, str],
    model: str,
    texts: Sequence[str],
    cfg: Config,
    *,
    endpoints: Sequence[str] = ENDPOINTS,
    levels: Sequence[int] = LEVELS,
) -> list[dict[str, Any]]:
    """One closed-loop run per (endpoint, concurrency)."""
    rows: list[dict[str, Any]] = []
    for endpoint in endpoints:
        bodies = [request_body(endpoint, model, t) for t in texts]
        url = base_url + endpoint_path(endpoint, model)
        for c in levels:
            if wrk.available():
                # A C client: on a 2-core box the Python one would eat a third of the machine.
                # Warm up first: a fresh server's first batches of each shape are slow (OpenVINO
                # prepares kernels per input shape), and the audit on/off runs each start cold.
                wrk.run(
                    base_url,
                    endpoint_path(endpoint, model),
                    bodies,
                    headers,
                    concurrency=c,
                    duration_s=cfg.pick(1.0, WARMUP_S),
                )
                r = wrk.run(
                    base_url,
                    endpoint_path(endpoint, model),
                    bodies,
                    headers,
                    concurrency=c,
                    duration_s=cfg.pick(2.0, 12.0),
                )
            else:
                r = asyncio.run(
                    closed_loop(
                        url,
                        bodies,
                        headers=headers,
                        concurrency=c,
                        max_requests=cfg.pick(40 * c, 400 * c),
                        duration_s=cfg.pick(2.0, 12.0),
                        warmup=min(len(bodies), cfg.pick(4, 32)),
                    )
                )
                r["client"] = "httpx (wrk not installed: the client's CPU counts against the server)"
            r["endpoint"] = endpoint
            rows.append(r)
            print(
                f"  {endpoint} c={c}: {r['rps']:.1f} req/s, p50 {r.get('p50_ms', 0):.1f} ms, errors {r['errors']}",
                flush=True,
            )
    return rows


def inprocess_reference(cfg: Config, texts: Sequence[str]) -> dict[str, Any]:
    """Items/s of the server's candidate in this process on ``texts`` (batches of 32, by length)."""
    from bench.inprocess import choice, corpus_throughput, load_package, open_candidate

    package = load_package(cfg)
    _, chosen = choice(package)
    if chosen is None:
        return skipped("no admissible candidate for the package on this box")
    runner = open_candidate(package, chosen.backend, chosen.variant, chosen.exec_precision)
    try:
        assert package.manifest.text is not None
        from runtime.text import TextEncoder

        enc = TextEncoder.from_dir(package.path / package.manifest.text.tokenizer_dir, package.manifest.text)
        lengths = enc.count_tokens(list(texts))
        runner.encode(list(texts[:32]))  # warm up
        per_s = corpus_throughput(
            runner.encode, texts, lengths, batch_size=32, passes=cfg.pick(2, 2), budget_s=cfg.pick(5.0, 20.0)
        )
    finally:
        runner.close()
    return {"candidate": str(chosen), "items_per_s": per_s}


def server_texts(cfg: Config) -> list[str]:
    return mixed_corpus(cfg.pick(256, 2048), seed=23)


def run(cfg: Config, *, audit: bool = True, workdir: Path | None = None) -> dict[str, Any]:
    """Every endpoint x concurrency level against a fresh server; writes ``http.json`` (+ PNG)."""
    with workspace(workdir) as root:
        return _run(cfg, root, audit=audit)


def _run(cfg: Config, root: Path, *, audit: bool = True) -> dict[str, Any]:
    from bench.inprocess import load_package
    from bench.server import fresh_home, running_server

    result: dict[str, Any] = {"part": "http", "quick": cfg.quick, "audit": audit}
    try:
        package = load_package(cfg)
    except Exception as exc:
        result.update(skipped(f"no package: {type(exc).__name__}: {exc} (build it with `inferbox init`)"))
        write_json(cfg.out / "http.json", result)
        return result
    texts = server_texts(cfg)
    try:
        result["inprocess"] = inprocess_reference(cfg, texts)
    except Exception as exc:
        result["inprocess"] = skipped(f"{type(exc).__name__}: {exc}")
    try:
        with running_server(package.path.parent.parent, fresh_home(root, "http"), audit=audit) as srv:
            result["server"] = {
                "mode": srv.mode,
                "ready_s": srv.ready_s,
                "auth": srv.api_key is not None,
                "serve_error": srv.serve_error,
            }
            result["rows"] = measure_endpoints(srv.base_url, srv.headers, package.name, texts, cfg)
    except Exception as exc:
        logger.warning("http bench failed: %s", exc)
        result.update(skipped(f"{type(exc).__name__}: {exc}"))
        write_json(cfg.out / "http.json", result)
        return result
    ref = result["inprocess"].get("items_per_s")
    for r in result["rows"]:
        r["vs_inprocess"] = ratio(r["rps"], ref)
    result["table"] = format_table(
        ("endpoint", "concurrency", "rps", "p50_ms", "p99_ms", "vs_inprocess", "ok", "requests"), result["rows"]
    )
    print(f"in-process reference: {result['inprocess']}")
    print(result["table"])
    rows = result["rows"]
    result["chart"] = write_chart(
        cfg.out / "http.png",
        "HTTP requests/s (one text per request) vs in-process items/s",
        [f"{r['endpoint']} c={r['concurrency']}" for r in rows] + ["in-process"],
        {"items / s": [r["rps"] for r in rows] + [ref]},
        ylabel="items / s",
    ) or str(cfg.out / "http.png")
    write_json(cfg.out / "http.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return part_main("HTTP benchmark", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
