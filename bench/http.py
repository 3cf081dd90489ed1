"""HTTP throughput and latency at concurrency 1, 8 and 32, next to in-process.

A real server subprocess on 127.0.0.1 (:mod:`bench.server`), a closed-loop
client (``wrk`` with C connections, :mod:`bench.wrk`; without wrk
``httpx.AsyncClient`` with C workers, each sending its next request as soon as
the previous one answered), one text per request (a mixed-corpus text) on
``POST /v1/embeddings`` and ``POST /v2/models/<m>/infer`` (one BYTES input
``text``).  Each level is warmed up, then runs ``ROW_S`` seconds.

In-process reference: the candidate the server picks (the ranking without
autotune), opened in this process, embedding the same texts in length-sorted
batches of 32 (the server's max batch), measured before and after the server's
runs and averaged (:func:`around`; "after" is the mean of the alternating
view's in-process windows, below, which run after the rows).  The ratio ``http / in-process`` is
items per second over items per second; on a 2-core box the client competes
with the server for the CPU, which the ratio includes.

A second reference splits that ratio in two: the same model in this process
behind the server's own batching (``api.server.Server.embed``: tokenize, the
dynamic batcher), fed by C closed-loop single-text submitters and no HTTP.
``vs_batcher`` is HTTP over that at the same C: what HTTP, JSON, auth and audit
cost; ``batcher / in-process`` is what forming batches from C single texts in
arrival order costs against sorting the whole corpus.  ``server_cpu_ms`` is the
server process's CPU time per request, which the client sharing the box does
not change.

An informative fourth view (no target): the open loop (:mod:`bench.openloop`)
on ``/v1/embeddings`` at :data:`OPEN_FRACTIONS` of the c=32 row's requests/s,
latency counted from when each request was due: what an answer takes at a
given share of the server's capacity, the figure a service-level objective is
written in.  A fifth (no target either) is that objective's own figure: the
highest open-loop rate whose p99 stays within :data:`CAPACITY_P99_MS`
(:func:`bench.capacity.search`, as ``inferbox bench --url --p99-ms`` runs it).

The target line (c=32 >= 0.85 of in-process) is judged on a third measurement,
:func:`alternate`: the server at c=32 on ``/v1/embeddings`` and the in-process
reference in turn, in short windows (server, in-process, in-process, server,
...), the model open in this process meanwhile.  A 12 s row (6 s since) against
references taken minutes before and after read 0.71 on one endpoint and 0.90
on the other in one run: the box drifts by 10-20 % within a minute.

``python -m bench.http [--quick] [--out DIR]`` runs this part alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench import wrk
from bench.capacity import figures
from bench.common import (
    Config,
    format_table,
    is_skipped,
    part_main,
    percentile,
    ratio,
    skipped,
    workspace,
    write_chart,
    write_json,
)
from bench.corpus import mixed_corpus
from bench.openloop import COLUMNS as OPEN_LOOP_COLUMNS
from runtime.errors import BenchError

__all__ = [
    "ENDPOINTS",
    "alternate",
    "around",
    "closed_loop",
    "inprocess_reference",
    "measure_endpoints",
    "measure_reference",
    "reference_model",
    "request_body",
    "row_failure",
    "run",
    "run_loop",
    "server_batching",
    "server_texts",
    "text_groups",
    "windows_reference",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

ENDPOINTS = ("/v1/embeddings", "/v2/infer")
#: the target's measurement: rounds of one server and one in-process window each, seconds per window
ALTERNATE_ROUNDS = 3
ALTERNATE_S = 4.0
LEVELS = (1, 8, 32)
#: a client that batches: this many texts per /v1/embeddings request, at these concurrencies
MULTI_TEXTS = 32
MULTI_LEVELS = (1, 4)
COLUMNS = (
    "endpoint",
    "concurrency",
    "rps",
    "items_per_s",
    "p50_ms",
    "p99_ms",
    "vs_inprocess",
    "vs_batcher",
    "server_cpu_ms",
    "ok",
    "requests",
)


def request_body(endpoint: str, model: str, text: str | Sequence[str]) -> bytes:
    """The JSON body of one request carrying ``text``, or the list of texts ``text``."""
    texts = [text] if isinstance(text, str) else list(text)
    if endpoint == "/v1/embeddings":
        body: dict[str, Any] = {"model": model, "input": text if isinstance(text, str) else texts}
    else:
        body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    return json.dumps(body).encode()


def text_groups(texts: Sequence[str], per_request: int) -> list[list[str]]:
    """``texts`` in groups of ``per_request`` for one request each, every text in one group at
    least and every group full (the last wraps round to the first texts)."""
    count = max(1, -(-len(texts) // per_request))
    return [[texts[(i * per_request + j) % len(texts)] for j in range(per_request)] for i in range(count)]


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
    verify: Any = True,
) -> dict[str, Any]:
    """C workers, each sending its next request when the last one answered.

    Stops after ``max_requests`` requests or ``duration_s`` seconds, whichever
    comes first.  Returns requests/s, latency p50/p99 (ms) and error counts.
    ``transport`` (an ``httpx.AsyncBaseTransport``) replaces the network, for tests;
    ``verify``: httpx's (an ``ssl.SSLContext`` for a private CA or a client certificate).
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    hdrs = {"Content-Type": "application/json", **headers}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    first_error: list[str] = []
    counter = 0

    # trust_env=False: no proxy from the environment between the client and the server it measures
    async with httpx.AsyncClient(
        limits=limits, timeout=120.0, transport=transport, verify=verify, trust_env=False
    ) as client:
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


#: seconds of each measured row, and of load before it (not counted)
ROW_S = 6.0
WARMUP_S = 2.0
#: seconds of the in-process reference in sorted batches (split between its two ways), and of
#: each level of the in-process batcher reference (after its warm-up)
REFERENCE_S = 8.0
BATCHER_S = 5.0
BATCHER_WARMUP_S = 1.5


def measure_endpoints(
    base_url: str,
    headers: dict[str, str],
    model: str,
    texts: Sequence[str],
    cfg: Config,
    *,
    endpoints: Sequence[str] = ENDPOINTS,
    levels: Sequence[int] = LEVELS,
    server_cpu_s: Callable[[], float | None] | None = None,
    multi: tuple[int, Sequence[int]] | None = (MULTI_TEXTS, MULTI_LEVELS),
    duration_s: float | None = None,
    warmup_s: float | None = None,
) -> list[dict[str, Any]]:
    """One closed-loop run per (endpoint, concurrency), one text per request; then, with
    ``multi`` = (k, levels), ``POST /v1/embeddings`` carrying k texts per request (a client
    that batches).  ``server_cpu_s()`` (the server's CPU seconds so far) adds
    ``server_cpu_ms`` per request to each row; ``texts_per_request`` says how many items a
    request is.  ``duration_s`` / ``warmup_s`` override the run's and its warm-up's length
    (``warmup_s=0``: none)."""
    plans: list[tuple[str, str, list[bytes], int, Sequence[int]]] = [
        (e, endpoint_path(e, model), [request_body(e, model, t) for t in texts], 1, levels) for e in endpoints
    ]
    if multi is not None and "/v1/embeddings" in endpoints:
        k, multi_levels = multi
        bodies = [request_body("/v1/embeddings", model, group) for group in text_groups(texts, k)]
        plans.append((f"/v1/embeddings x{k}", "/v1/embeddings", bodies, k, multi_levels))
    rows: list[dict[str, Any]] = []
    for label, path, bodies, per_request, plan_levels in plans:
        for c in plan_levels:
            r = _measure(base_url, path, bodies, headers, c, cfg, server_cpu_s, duration_s, warmup_s)
            failure = row_failure(r)
            if failure is not None:  # every request failed (a 401, a dead server): no throughput
                rows.append({"endpoint": label, "concurrency": c, **skipped(failure)})
                print(f"  {label} c={c}: {failure}", flush=True)
                continue
            r["endpoint"] = label
            r["texts_per_request"] = per_request
            r["items_per_s"] = r["rps"] * per_request
            rows.append(r)
            print(
                f"  {label} c={c}: {r['rps']:.1f} req/s, p50 {r.get('p50_ms', 0):.1f} ms, errors {r['errors']}",
                flush=True,
            )
    return rows


def row_failure(row: dict[str, Any], *, any_error: bool = False) -> str | None:
    """Why a closed-loop row is no throughput of the server, or None: it was skipped, no request
    succeeded, or (``any_error``) any request failed."""
    if is_skipped(row):
        return str(row["skipped"])
    errors = row.get("errors") or {}
    if not row.get("ok"):
        return f"no successful request: {row.get('first_error') or errors or 'none answered'}"
    if any_error and errors:
        return f"requests failed: {errors}" + (f" (first: {row['first_error']})" if row.get("first_error") else "")
    return None


def _measure(
    base_url: str,
    path: str,
    bodies: list[bytes],
    headers: dict[str, str],
    c: int,
    cfg: Config,
    server_cpu_s: Callable[[], float | None] | None,
    duration_s: float | None = None,
    warmup_s: float | None = None,
) -> dict[str, Any]:
    """One closed-loop run at concurrency ``c`` on ``base_url + path`` (wrk when installed, else httpx)."""
    duration = duration_s if duration_s is not None else cfg.pick(2.0, ROW_S)
    warmup = warmup_s if warmup_s is not None else cfg.pick(1.0, WARMUP_S)
    if wrk.available():
        # A C client: on a 2-core box the Python one would eat a third of the machine.
        # Warm up first: a fresh server's first batches of each shape are slow (OpenVINO
        # prepares kernels per input shape), and the audit on/off runs each start cold.
        if warmup > 0:
            wrk.run(base_url, path, bodies, headers, concurrency=c, duration_s=warmup)
        cpu0 = server_cpu_s() if server_cpu_s is not None else None
        r = wrk.run(base_url, path, bodies, headers, concurrency=c, duration_s=duration)
    else:
        cpu0 = None
        r = asyncio.run(
            closed_loop(
                base_url + path,
                bodies,
                headers=headers,
                concurrency=c,
                max_requests=cfg.pick(40 * c, 400 * c),
                duration_s=duration,
                warmup=min(len(bodies), cfg.pick(4, 32)) if warmup > 0 else 0,
            )
        )
        r["client"] = "httpx (wrk not installed: the client's CPU counts against the server)"
    cpu1 = server_cpu_s() if cpu0 is not None and server_cpu_s is not None else None
    if cpu0 is not None and cpu1 is not None and r.get("ok"):
        r["server_cpu_ms"] = 1000.0 * (cpu1 - cpu0) / r["ok"]
    return r


class Reference:
    """The server's candidate opened in this process: one session with every core (``model``,
    ``encode``) and, where the server runs several streams, one session per stream with its
    share of the cores (``streams``: an ``encode`` each)."""

    def __init__(self, chosen: Any, model: Any, streams: Sequence[Any], lengths: list[int]) -> None:
        self.chosen = chosen
        self.model = model
        self.lengths = lengths
        self._stream_models = list(streams)
        self.streams = [_encoder(m) for m in streams]
        self.encode = _encoder(model)

    def figures(self, texts: Sequence[str], budget_s: float, *, passes: int = 1) -> dict[str, Any]:
        """:meth:`throughput` with the candidate and its stream count (``texts``: those it opened
        with, or :meth:`with_texts`'s)."""
        return {
            "candidate": str(self.chosen),
            "stream_count": max(1, len(self.streams)),
            **self.throughput(texts, budget_s, passes=passes),
        }

    def with_texts(self, texts: Sequence[str]) -> Reference:
        """The same sessions, for ``texts`` (their token counts) instead of the ones it opened with."""
        lengths = [len(t) for t in self.model.tokenize(list(texts), truncate=True)]
        return Reference(self.chosen, self.model, self._stream_models, lengths)

    def throughput(self, texts: Sequence[str], budget_s: float, *, passes: int = 1) -> dict[str, float]:
        """Items/s on ``texts`` in length-sorted batches of 32 and the process's CPU ms per item,
        each way: ``one_session`` / ``one_session_cpu_ms_per_item`` and, with several streams,
        ``streams_per_s`` / ``streams_cpu_ms_per_item`` (the stream sessions side by side); then
        ``items_per_s`` and ``cpu_ms_per_item`` of the faster way, named by ``way``.  With
        streams each way gets half of ``budget_s`` (the suite's time stays as it was)."""
        from bench.inprocess import corpus_throughput, parallel_corpus_throughput

        def timed(measure: Callable[[], float]) -> tuple[float, float]:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            rate = measure()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            return rate, 1000.0 * cpu / max(rate * wall, 1.0)

        if len(self.streams) > 1:
            budget_s /= 2.0
        ways = {
            "one_session": timed(
                lambda: corpus_throughput(
                    self.encode, texts, self.lengths, batch_size=32, passes=passes, budget_s=budget_s
                )
            )
        }
        if len(self.streams) > 1:
            ways["streams"] = timed(
                lambda: parallel_corpus_throughput(self.streams, texts, self.lengths, batch_size=32, budget_s=budget_s)
            )
        way = max(ways, key=lambda w: ways[w][0])  # a tie keeps one session
        out: dict[str, Any] = {
            "one_session": ways["one_session"][0],
            "one_session_cpu_ms_per_item": ways["one_session"][1],
        }
        if "streams" in ways:
            out |= {"streams_per_s": ways["streams"][0], "streams_cpu_ms_per_item": ways["streams"][1]}
        return out | {"way": way, "items_per_s": ways[way][0], "cpu_ms_per_item": ways[way][1]}

    def served(self) -> Any:
        """The model as the server holds it: the stream sessions and the wide one in one
        :class:`~runtime.streams.SessionPool` (closing stays with :func:`reference_model`)."""
        import dataclasses

        from runtime.streams import SessionPool

        if not self._stream_models:
            return self.model
        pool = SessionPool([m.session for m in self._stream_models], self.model.session)
        return dataclasses.replace(self.model, session=pool, streams=len(self._stream_models))


def _encoder(model: Any) -> Callable[[Sequence[str]], Any]:
    def encode(batch: Sequence[str]) -> Any:
        return model.embed(batch, truncate=True)[0]

    return encode


@contextlib.contextmanager
def reference_model(cfg: Config, texts: Sequence[str], *, streams: bool = True) -> Iterator[Reference | None]:
    """The candidate the server would pick (``streams=False``: the batch worker), opened here as
    the server opens it (one session with every core, plus one per stream where it runs several:
    :func:`runtime.streams.plan_streams`) and warmed up; None when no candidate is admissible."""
    from bench.inprocess import choice, load_package, open_model
    from runtime.backends.static_shapes import DEFAULT_STATIC_SHAPES
    from runtime.hardware import default_threads
    from runtime.streams import plan_streams

    package = load_package(cfg)
    _, chosen = choice(package, streams=streams)
    if chosen is None:
        yield None
        return
    cores = default_threads()
    device = "cpu" if chosen.backend.endswith("-cpu") else chosen.backend
    n, threads = plan_streams(0, device, cores)
    opened: list[Any] = []
    try:
        model = open_model(
            package, chosen.backend, chosen.variant, chosen.exec_precision, static_shapes=DEFAULT_STATIC_SHAPES
        )
        opened.append(model)
        stream_models: list[Any] = []
        for _ in range(n if n > 1 else 0):
            stream_models.append(
                open_model(
                    package,
                    chosen.backend,
                    chosen.variant,
                    chosen.exec_precision,
                    threads=threads,
                    cpu_pinning=False,
                )
            )
            opened.append(stream_models[-1])
        lengths = [len(t) for t in model.tokenize(list(texts), truncate=True)]
        ref = Reference(chosen, model, stream_models, lengths)
        for encode in (ref.encode, *ref.streams):
            encode(list(texts[:32]))  # warm up
        yield ref
    finally:
        for m in opened:
            m.close()


def inprocess_reference(
    cfg: Config,
    texts: Sequence[str],
    levels: Sequence[int] = LEVELS,
    *,
    passes: int = 2,
    budget_s: float | None = None,
    streams: bool = True,
) -> dict[str, Any]:
    """The server's candidate in this process on ``texts``: ``items_per_s`` in length-sorted
    batches of 32 (``passes`` over them in at most ``budget_s``), and ``batcher`` {C: items/s}
    through the server's batching (:func:`server_batching`).  ``streams=False``: the batch
    worker's candidate (:func:`bench.inprocess.choice`)."""
    with reference_model(cfg, texts, streams=streams) as ref:
        if ref is None:
            return skipped("no admissible candidate for the package on this box")
        return measure_reference(ref, cfg, texts, levels, passes=passes, budget_s=budget_s)


def measure_reference(
    ref: Reference,
    cfg: Config,
    texts: Sequence[str],
    levels: Sequence[int] = LEVELS,
    *,
    passes: int = 2,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """:func:`inprocess_reference` on an opened :func:`reference_model` of ``texts``."""
    sorted_corpus = ref.figures(texts, budget_s or cfg.pick(5.0, REFERENCE_S), passes=passes)
    model = ref.served()
    batcher: dict[str, Any] = {}
    for c in levels:
        try:
            batcher[str(c)] = run_loop(
                server_batching(
                    model,
                    texts,
                    concurrency=c,
                    duration_s=cfg.pick(1.0, BATCHER_S),
                    warmup_s=cfg.pick(0.3, BATCHER_WARMUP_S),
                )
            )
        except Exception as exc:  # one level failing keeps the sorted reference and the others
            logger.warning("in-process batcher reference at c=%d failed: %s", c, exc)
            batcher[str(c)] = skipped(f"{type(exc).__name__}: {exc}")
    return {**sorted_corpus, "batcher": batcher}


def around(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One reference from the in-process runs before and after the server's: the mean of each
    figure (a linear drift of the machine's speed during the server runs cancels); a figure
    only ``before`` has (the batcher levels, measured before only) is kept as it is; the two
    runs are kept under ``before`` / ``after``.  One failed run: the other's figures, with the
    failed one's reason kept under its side."""
    if is_skipped(before) and is_skipped(after):
        return skipped(f"before the server runs: {before['skipped']}; after: {after['skipped']}")
    if is_skipped(before) or is_skipped(after):
        good = after if is_skipped(before) else before
        return {**good, "before": before, "after": after}

    def mean(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: mean(a[k], b[k]) if k in b else a[k] for k in a}
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return (a + b) / 2.0
        return a

    out = {**mean(before, after), "before": before, "after": after}
    if before.get("way") != after.get("way"):  # the faster way differed: the means mix the two
        out["way"] = "mixed"
    return out


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the event loop the server uses (uvloop where installed, as uvicorn picks it)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def server_batching(
    model: Any, texts: Sequence[str], *, concurrency: int, duration_s: float, warmup_s: float
) -> dict[str, float]:
    """Items/s and CPU ms per item of ``concurrency`` closed-loop submitters of one text each
    through :meth:`api.server.Server.embed` (the server's tokenizing and batching, no HTTP).
    Run it with :func:`run_loop` to get the server's event loop."""
    from api.config import ApiConfig
    from api.metrics import Metrics
    from api.server import Server
    from runtime.serving import ModelRegistry

    registry = ModelRegistry(lambda _n, _v: model, list)
    registry.add(model)  # the server batches only a model its registry holds
    server = Server(registry, ApiConfig(), Metrics(), time.monotonic)
    counter = 0
    done = 0

    async def worker(until: float) -> None:
        nonlocal counter, done
        while time.perf_counter() < until:
            i = counter
            counter += 1
            await server.embed(model, [texts[i % len(texts)]])
            done += 1

    async def phase(until: float) -> None:
        # a TaskGroup: one submitter failing cancels and awaits the others before the batcher stops
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker(until))

    try:
        await phase(time.perf_counter() + warmup_s)
        done = 0
        cpu0, start = time.process_time(), time.perf_counter()
        await phase(start + duration_s)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - start
    finally:
        await server.stop()
    return {"items_per_s": done / wall, "cpu_ms_per_item": 1000.0 * cpu / max(done, 1)}


def alternate(server: Callable[[], float], inprocess: Callable[[], float], rounds: int) -> dict[str, Any]:
    """Items/s of ``server()`` and ``inprocess()`` windows in turn (ABBA: server first in even
    rounds, in-process first in odd ones); ``ratio`` is the mean of the server's over the mean
    of the in-process ones."""
    per: dict[str, list[float]] = {"server": [], "inprocess": []}
    order: list[str] = []
    for r in range(max(1, rounds)):
        for kind in ("server", "inprocess") if r % 2 == 0 else ("inprocess", "server"):
            per[kind].append(server() if kind == "server" else inprocess())
            order.append(kind)
    mean = {k: sum(v) / len(v) for k, v in per.items()}
    return {
        "order": order,
        "server_per_s": per["server"],
        "inprocess_per_s": per["inprocess"],
        "ratio": ratio(mean["server"], mean["inprocess"]),
    }


def _alternate(
    cfg: Config, srv: Any, model_name: str, texts: Sequence[str], opened: Reference | None = None
) -> dict[str, Any]:
    """:func:`alternate` for ``srv`` at c=32 on /v1/embeddings against the server's candidate here
    (``opened``: that candidate already open for ``texts``, else it is opened here)."""
    window = cfg.pick(1.0, ALTERNATE_S)
    windows: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        ref = opened if opened is not None else stack.enter_context(reference_model(cfg, texts))
        if ref is None:
            return skipped("no admissible candidate for the package on this box")

        def server() -> float:
            (row,) = measure_endpoints(
                srv.base_url,
                srv.headers,
                model_name,
                texts,
                cfg,
                endpoints=("/v1/embeddings",),
                levels=(32,),
                multi=None,
                duration_s=window,
                warmup_s=0.0,
            )
            failure = row_failure(row)
            if failure is not None:
                raise RuntimeError(failure)
            return float(row["items_per_s"])

        def inprocess() -> float:
            windows.append(ref.throughput(texts, window))
            return windows[-1]["items_per_s"]

        # One untimed in-process window first (the server is warm from its rows).  Without it
        # the first in-process window read 87-109/s against 125-155/s for the next two in all
        # three ORT-served runs of 2026-12-03 (a fresh ORT session's first pass over the shapes
        # is ~4 % slower, which explains only part of it): the line read 0.97-1.00 for 0.88-0.90.
        ref.throughput(texts, window)
        out = alternate(server, inprocess, cfg.pick(1, ALTERNATE_ROUNDS))
    return {
        "candidate": str(ref.chosen),
        "stream_count": max(1, len(ref.streams)),
        "concurrency": 32,
        "endpoint": "/v1/embeddings",
        "window_s": window,
        **out,
        "inprocess_one_session_per_s": [w["one_session"] for w in windows],
        "inprocess_streams_per_s": [w["streams_per_s"] for w in windows if "streams_per_s" in w],
        "inprocess_windows": windows,
    }


def windows_reference(alternating: dict[str, Any]) -> dict[str, Any] | None:
    """The in-process reference after the server's rows, from the alternating view's in-process
    windows (taken after the rows, the same measure as :func:`inprocess_reference`'s, 4 s each):
    the mean of each figure, ``way`` the one every window took (else ``mixed``); None when that
    view has no window.  Measured once more after the server, it cost ~20 s of the suite on 2
    AVX2 cores."""
    windows = [w for w in alternating.get("inprocess_windows") or () if isinstance(w, dict)]
    if not windows:
        return None
    numbers = [k for k, v in windows[0].items() if isinstance(v, (int, float)) and all(k in w for w in windows)]
    ways = {w.get("way") for w in windows}
    return {
        "candidate": alternating.get("candidate"),
        "stream_count": alternating.get("stream_count", 1),
        **{k: sum(float(w[k]) for w in windows) / len(windows) for k in numbers},
        "way": ways.pop() if len(ways) == 1 else "mixed",
        "batcher": {},
        "windows": len(windows),
    }


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
    # the server's candidate, opened once here for the reference before the server's runs and for
    # the alternating windows (an opening, its streams' first calls included, took 14 s on 2 AVX2
    # cores); it idles while the server's rows run
    stack = contextlib.ExitStack()
    opened: Reference | None = None
    try:
        opened = stack.enter_context(reference_model(cfg, texts))
        before = (
            measure_reference(opened, cfg, texts)
            if opened is not None
            else skipped("no admissible candidate for the package on this box")
        )
    except Exception as exc:
        before = skipped(f"{type(exc).__name__}: {exc}")
    try:
        with stack, running_server(package.path.parent.parent, fresh_home(root, "http"), audit=audit) as srv:
            result["server"] = {
                "mode": srv.mode,
                "ready_s": srv.ready_s,
                "auth": srv.api_key is not None,
                "serve_error": srv.serve_error,
            }
            result["rows"] = measure_endpoints(
                srv.base_url, srv.headers, package.name, texts, cfg, server_cpu_s=_cpu_of(srv.pid)
            )
            try:
                result["alternating"] = _alternate(cfg, srv, package.name, texts, opened)
            except Exception as exc:  # the rows still count; the target then falls back to the c=32 row
                logger.warning("alternating server / in-process windows failed: %s", exc)
                result["alternating"] = skipped(f"{type(exc).__name__}: {exc}")
            result["open_loop"] = _open_loop(cfg, srv, package.name, texts, result["rows"])
            result["capacity"] = _capacity(cfg, srv, package.name, texts, result["rows"], open_loop=result["open_loop"])
    except Exception as exc:
        logger.warning("http bench failed: %s", exc)
        result.update(skipped(f"{type(exc).__name__}: {exc}"))
        result["inprocess"] = before
        write_json(cfg.out / "http.json", result)
        return result
    after = windows_reference(result.get("alternating") or {})
    if after is None:  # the alternating view failed: one more reference run
        try:
            after = inprocess_reference(cfg, texts, levels=())  # the batcher levels: before only
        except Exception as exc:
            after = skipped(f"{type(exc).__name__}: {exc}")
    result["inprocess"] = around(before, after)
    ref = result["inprocess"].get("items_per_s")
    batcher = result["inprocess"].get("batcher") or {}
    if result["capacity"].get("rate") is not None:
        result["capacity"]["vs_inprocess"] = ratio(result["capacity"]["rate"], ref)
    for r in result["rows"]:
        if is_skipped(r):
            continue
        r["vs_inprocess"] = ratio(r["items_per_s"], ref)
        if r["texts_per_request"] == 1:  # the batcher reference submits one text at a time
            r["vs_batcher"] = ratio(r["rps"], (batcher.get(str(r["concurrency"])) or {}).get("items_per_s"))
    rows = [r for r in result["rows"] if not is_skipped(r)]
    result["table"] = format_table(COLUMNS, rows)
    print(f"in-process reference: {result['inprocess']}")
    print(result["table"])
    result["chart"] = write_chart(
        cfg.out / "http.png",
        "HTTP items/s vs in-process items/s",
        [f"{r['endpoint']} c={r['concurrency']}" for r in rows] + ["in-process"],
        {"items / s": [r["items_per_s"] for r in rows] + [ref]},
        ylabel="items / s",
    ) or str(cfg.out / "http.png")
    write_json(cfg.out / "http.json", result)
    return result


#: the open loop's rates, as shares of the c=32 closed-loop row's requests/s on /v1/embeddings
OPEN_FRACTIONS = (0.5, 0.8)
OPEN_COLUMNS = ("fraction", *OPEN_LOOP_COLUMNS)


def _open_loop(
    cfg: Config, srv: Any, model: str, texts: Sequence[str], rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The open loop at :data:`OPEN_FRACTIONS` of the c=32 row's rate (a warm-up, then a row each).

    A row in which any request failed is that failure with its reason, not numbers (the
    percentiles of the answers that came would hide the rest); a failed warm-up ends the view
    (a dead or hung server would cost each load the client's timeout)."""
    c32 = _c32(rows)
    if c32 is None:
        return skipped("no c=32 row on /v1/embeddings to take the rates from")
    bodies = [request_body("/v1/embeddings", model, t) for t in texts]
    duration, warmup = cfg.pick(2.0, ROW_S), cfg.pick(1.0, WARMUP_S)
    out: list[dict[str, Any]] = []
    try:
        for fraction in OPEN_FRACTIONS:
            rate = figures(fraction * float(c32["rps"]))  # as the capacity search rounds its rates

            failure = row_failure(_open_load(srv, bodies, rate, warmup), any_error=True)
            if failure is not None:
                out.append({"fraction": fraction, "rate": rate, **skipped(f"warming up: {failure}")})
                print(f"  open loop {fraction:.0%} of c=32: warming up failed: {failure}", flush=True)
                break
            row = _open_load(srv, bodies, rate, duration)
            failure = row_failure(row, any_error=True)
            if failure is not None:
                out.append({"fraction": fraction, "rate": rate, **skipped(failure)})
                print(f"  open loop {fraction:.0%} of c=32: {failure}", flush=True)
                continue
            print(
                f"  open loop {fraction:.0%} of c=32 ({rate}/s): {row['rps']:.1f} answered/s, "
                f"p50 {row.get('p50_ms', 0):.1f} ms, p99 {row.get('p99_ms', 0):.1f} ms, dropped {row['dropped']}",
                flush=True,
            )
            out.append({"fraction": fraction, **row})
    except Exception as exc:  # informative only: the closed-loop rows and the target stand without it
        logger.warning("open loop failed: %s", exc)
        return skipped(f"{type(exc).__name__}: {exc}")
    measured = [r for r in out if not is_skipped(r)]
    return {"closed_loop_c32_rps": c32["rps"], "rows": out, "table": format_table(OPEN_COLUMNS, measured)}


def _open_load(srv: Any, bodies: Sequence[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """One open-loop load of ``/v1/embeddings`` on ``srv``, on plain asyncio as ``inferbox bench
    --url --rate`` runs it (the same client CPU figures)."""
    from bench.openloop import open_loop

    return asyncio.run(
        open_loop(srv.base_url, "/v1/embeddings", bodies, headers=srv.headers, rate=rate, duration_s=seconds)
    )


#: the service-level view's p99 target (ms): the highest open-loop rate that keeps it
CAPACITY_P99_MS = 100.0


def _capacity(
    cfg: Config,
    srv: Any,
    model: str,
    texts: Sequence[str],
    rows: Sequence[dict[str, Any]],
    *,
    open_loop: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The capacity at p99 <= :data:`CAPACITY_P99_MS` on ``/v1/embeddings`` (no target;
    :func:`bench.capacity.search`, as ``inferbox bench --url --p99-ms`` runs it): from half the c=32
    row's rate, within an eighth and one and a half times it, each window warmed up, at most
    :data:`CAPACITY_WINDOWS` windows, up to two second windows and two more windows below a rate that did not
    hold (~1 minute here).  A warm-up in which a request failed ends it with that reason, as the open
    loop's does (a dead or hung server would cost each window the client's timeout).  A first window
    at a rate ``open_loop`` measured (its 50 % share is the search's start) is that row, run the
    same way minutes before (``open_loop: true``), not run again; a second window runs."""
    from bench.capacity import search

    c32 = _c32(rows)
    if c32 is None:
        return skipped("no c=32 row on /v1/embeddings to start from")
    duration, warmup = cfg.pick(2.0, ROW_S), cfg.pick(1.0, WARMUP_S)
    rps = float(c32["rps"])
    try:
        bodies = [request_body("/v1/embeddings", model, t) for t in texts]
        measured = {
            float(r["rate"]): r
            for r in (open_loop or {}).get("rows") or ()
            if isinstance(r, dict) and not is_skipped(r) and "rate" in r
        }

        def measure(rate: float) -> dict[str, Any]:
            if rate in measured:
                row = {k: v for k, v in measured.pop(rate).items() if k != "fraction"} | {"open_loop": True}
                p99 = row.get("p99_ms", float("nan"))
                print(f"  capacity search {rate:g}/s: the open loop's window (p99 {p99:.1f} ms)", flush=True)
                return row
            failure = row_failure(_open_load(srv, bodies, rate, warmup), any_error=True)
            if failure is not None:
                raise BenchError(f"warming up at {rate:g}/s: {failure}")
            row = _open_load(srv, bodies, rate, duration)
            print(
                f"  capacity search {rate:g}/s: p99 {row.get('p99_ms', float('nan')):.1f} ms, errors {row['errors']}, "
                f"dropped {row['dropped']}",
                flush=True,
            )
            return row

        found = search(
            measure,
            CAPACITY_P99_MS,
            rps / 2,
            min_rate=max(1.0, rps / 8),
            max_rate=max(1.0, 1.5 * rps),
            max_windows=CAPACITY_WINDOWS,
        )
        found["closed_loop_c32_rps"] = rps
        found["vs_closed_loop_c32"] = ratio(found["rate"], rps) if found["rate"] is not None else None
        found["table"] = format_table(CAPACITY_ROW_COLUMNS, found["rows"])
    except Exception as exc:  # informative only, as the open loop: the closed-loop rows stand without it
        logger.warning("capacity search failed: %s", exc)
        return skipped(f"{type(exc).__name__}: {exc}")
    return found


#: the suite's search: at most this many windows (the confirmation not counted); six until
#: 2026-12-07, when a search took nine 8 s windows (72 s) on 2 AVX2 cores and still ended
#: unconfirmed (its 6 s windows' p99 moves by 20 % at ~25 requests/s).  ``inferbox bench --url
#: --p99-ms`` searches as long as an operator lets it
CAPACITY_WINDOWS = 4


#: a capacity search's windows, as the results page shows them
CAPACITY_ROW_COLUMNS = ("rate", "rps", "p50_ms", "p99_ms", "errors", "dropped", "meets", "confirming")


def _c32(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured c=32 row on ``/v1/embeddings`` with a rate, if there is one."""
    c32 = next(
        (r for r in rows if r.get("endpoint") == "/v1/embeddings" and r.get("concurrency") == 32 and not is_skipped(r)),
        None,
    )
    return c32 if c32 is not None and c32.get("rps") else None


def _cpu_of(pid: int) -> Callable[[], float | None] | None:
    """CPU seconds (user + system, every thread) of process ``pid`` so far (None once it is
    gone), or None without psutil: the rows then go without ``server_cpu_ms``."""
    try:
        import psutil

        proc = psutil.Process(pid)
    except Exception:
        return None

    def cpu() -> float | None:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # the server died: its rows keep their errors, without CPU figures
            return None
        return float(t.user + t.system)

    return cpu


def main(argv: Sequence[str] | None = None) -> int:
    return part_main("HTTP benchmark", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
