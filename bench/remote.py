"""``inferbox bench MODEL --url URL``: load a running inferbox server as its clients would.

The suite's HTTP part (:mod:`bench.http`) starts its own server; an operator
wants the numbers of the server that is installed: its TLS, its keys, its audit
log, its settings.  This part only sends requests:

1. ``GET /v2/models/MODEL`` with the key: the model's inputs and task, and a
   clear error before any load when the server is not there, refuses the key,
   or does not serve the model;
2. one request per endpoint (``PROBES`` one after the other before a capacity
   search), each of which must answer 200 (else the server's own message is
   the error);
3. per endpoint and concurrency level, a warm-up and then a closed loop of C
   clients (each sends its next request when the last one answered) for
   ``duration_s`` seconds: requests/s, items/s, p50/p99 latency, errors; or,
   given ``rates``, an open loop per rate (:mod:`bench.openloop`: requests on
   a fixed schedule, latency from when each was due), which says what an
   answer takes at a given load, the figure capacity planning needs; given a
   p99 target, each rate is judged against it, or, without ``rates``, the
   highest rate that keeps it is searched (:mod:`bench.capacity`).

Endpoints: a text model gets one text per request on ``/v2/models/M/infer``
(one BYTES input) and, for an embedding model, on ``/v1/embeddings``; the
texts are the suite's mixed corpus or the operator's own (``--texts``, one per
line).  A tensor model gets one row of random values per request, shaped by
its metadata.  ``per_request`` (``--batch-size``) puts that many texts, or rows,
in each request instead, as a client that batches its calls sends them.

Where ``/metrics`` is readable with the key, each row also says what the
server did meanwhile: rows per batch, time in the batch queue, the server
process's CPU per request and, with its audit log on, the records per commit
and a commit's time (all of the server's traffic counts, not only ours).

The client is ``wrk`` for plain ``http://`` when it is installed (a C client:
on a small box a Python client eats a share of the CPU the server is measured
on); otherwise httpx, which also verifies an ``https://`` server (``--ca-file``)
and presents a client certificate (mutual TLS).  wrk verifies no certificate,
so it never carries the key to an ``https://`` server.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import statistics
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from bench import capacity, wrk
from bench.common import Config, format_table, skipped, write_json
from bench.http import closed_loop, request_body, row_failure, text_groups
from bench.openloop import COLUMNS as OPEN_LOOP_COLUMNS
from bench.openloop import open_loop
from runtime.errors import BenchError

__all__ = [
    "CAPACITY_COLUMNS",
    "LEVELS",
    "MAX_RATE",
    "Plan",
    "Target",
    "capacity_line",
    "check_key",
    "error_message",
    "level_name",
    "metrics_delta",
    "parse_metrics",
    "pick_endpoint",
    "plans_for",
    "preflight",
    "read_texts",
    "run",
    "start_rate",
    "tensor_bodies",
]

#: concurrency levels, and whole seconds (wrk's unit) of each level's measured run and warm-up
#: (quick: 2 s / 1 s)
LEVELS = (1, 8, 32)
ROW_S = 10
WARMUP_S = 2
#: distinct request bodies of a tensor model (random rows)
TENSOR_BODIES = 16
#: requests per endpoint before a capacity search (one before any other load), each of which must
#: answer 200: the later ones' latency is where the search starts
PROBES = 5
#: the capacity search's ceiling unless the operator gives one (requests/s)
MAX_RATE = 10_000.0

#: the route template of ``/v2/models/<name>/infer`` in the server's metrics
INFER_ROUTE = "/v2/models/{name}/infer"
_FLOAT_TYPES = {"FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "float32"}
_INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


@dataclass(frozen=True)
class Target:
    """The server to load: its base URL, the model, and how to reach it (key, CA, client certificate)."""

    base_url: str
    model: str
    key: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    @property
    def tls(self) -> bool:
        return self.base_url.startswith("https://")

    @cached_property
    def ssl_context(self) -> ssl.SSLContext | None:
        """How an ``https://`` server is verified (the system's CAs, or ``ca_file``) and what client
        certificate is shown; built once (an encrypted key is refused, never prompted for)."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise BenchError(f"--ca-file: cannot use {self.ca_file} ({exc})") from None
        if self.client_cert is not None:

            def no_passphrase() -> str:
                raise BenchError("--client-key: the key is encrypted; give one without a passphrase")

            key = str(self.client_key) if self.client_key is not None else None
            try:
                context.load_cert_chain(str(self.client_cert), key, password=no_passphrase)
            except (OSError, ssl.SSLError) as exc:
                raise BenchError(f"--client-cert / --client-key: cannot use them ({exc})") from None
        return context

    def verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify``: the TLS context, or True for plain http (nothing to verify)."""
        return self.ssl_context if self.ssl_context is not None else True

    def scrub(self, text: str) -> str:
        """``text`` (an exception's message) with the key, wherever it appears, replaced."""
        return text.replace(self.key, "<api key>") if self.key else text

    def client(self) -> str:
        """``wrk`` (plain http, installed, no client certificate) or ``httpx``."""
        return "wrk" if not self.tls and wrk.available() else "httpx"


@dataclass(frozen=True)
class Plan:
    """One endpoint's load: its label, path, request bodies and items per request."""

    label: str
    path: str
    bodies: list[bytes]
    items: int = 1
    #: the route template the server's metrics count this endpoint's requests under
    route: str | None = None
    #: what one item is: a text, or a tensor model's row
    unit: str = "texts"
    #: how an open loop's requests arrive (:data:`bench.openloop.ARRIVALS`)
    arrivals: str = "constant"


def check_key(key: str, source: str) -> str:
    """``key`` when it can be one API key in a header (printable ASCII, no spaces), else
    :class:`BenchError` naming ``source`` (never the key)."""
    if not re.fullmatch(r"[\x21-\x7e]+", key):
        raise BenchError(
            f"{source} must hold one API key (ibx_...) and nothing else: no spaces, line breaks or other characters"
        )
    return key


def error_message(status: int, text: str) -> str:
    """The server's own message from an error answer (inferbox's, KServe's or OpenAI's shape)."""
    try:
        body = json.loads(text)
    except ValueError:
        return f"{status}: {text.strip()[:300]}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return f"{status}: {str(error if error else text)[:300]}"


def preflight(target: Target, *, timeout: float = 30.0) -> dict[str, Any]:
    """The model's metadata from the server, or :class:`BenchError` naming what to fix."""
    import httpx

    url = f"{target.base_url}/v2/models/{target.model}"
    try:
        with _client(target, timeout) as http:
            resp = http.get(url, headers=target.headers)
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise BenchError(
                f"{target.base_url}: its TLS certificate is not trusted ({target.scrub(str(exc))}); pass "
                "--ca-file with the CA certificate that signed it"
            ) from None
        raise BenchError(
            f"cannot reach {target.base_url} ({target.scrub(str(exc))}); check that `inferbox serve` runs there "
            "and the scheme, host and port of --url"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise BenchError(f"{target.base_url}: {type(exc).__name__}: {target.scrub(str(exc))}") from None
    if resp.status_code == 200:
        return _metadata(resp, url)
    message = error_message(resp.status_code, resp.text)
    if resp.status_code == 401:
        said = "refused the key" if target.key else "needs an API key"
        raise BenchError(
            f"the server {said} ({message}); pass --key-file with a key of scope infer "
            "(`inferbox keys create --scope infer`) or set INFERBOX_API_KEY"
        )
    if resp.status_code == 403:
        raise BenchError(f"the key may not use model {target.model!r} ({message}); use a key of scope infer")
    if resp.status_code == 404:
        raise BenchError(
            f"the server does not serve model {target.model!r} ({message}); `GET /v2/repository/index` "
            "lists what it has"
        )
    raise BenchError(f"{url} answered {message}")


def _client(target: Target, timeout: float) -> Any:
    """An httpx client for ``target``: its TLS context, and no proxy or other settings from the
    environment (an ``HTTP_PROXY`` would otherwise see the key of a plain-http server)."""
    import httpx

    return httpx.Client(verify=target.verify(), timeout=timeout, trust_env=False)


def _metadata(resp: Any, url: str) -> dict[str, Any]:
    """A model metadata answer, checked for the fields the load test reads."""
    try:
        meta = resp.json()
    except ValueError:
        meta = None
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("inputs"), list)
        and all(isinstance(i, dict) for i in meta["inputs"])
        and isinstance(meta.get("parameters", {}), dict)
        and isinstance(meta.get("versions", []), list)
        and all(isinstance(v, str) for v in meta.get("versions", []))
    )
    if not ok:
        raise BenchError(f"{url} did not answer model metadata; is --url an inferbox server?")
    return dict(meta)


def read_texts(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 file, or :class:`BenchError` naming the fix."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchError(f"--texts: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BenchError(f"--texts: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise BenchError(f"--texts: {path} holds no text; put one text per line")
    return texts


def batch_rows(inputs: Sequence[Mapping[str, Any]], rows: int | None) -> int:
    """The rows each request of a tensor model carries: ``rows`` (default 1) in a dynamic batch
    dimension; a batch fixed by the model's shape takes its own size only (another ``rows``:
    :class:`BenchError`)."""
    for spec in inputs:
        shape = list(spec.get("shape") or [])
        if shape and isinstance(shape[0], int) and shape[0] >= 0:
            if rows is not None and rows != shape[0]:
                raise BenchError(
                    f"input {spec.get('name')!r} has the shape {shape}: a fixed batch of {shape[0]}; "
                    f"--batch-size {rows} cannot be sent (leave --batch-size out)"
                )
            return int(shape[0])
    return 1 if rows is None else rows


def tensor_bodies(
    inputs: Sequence[Mapping[str, Any]], count: int = TENSOR_BODIES, seed: int = 0, rows: int = 1
) -> list[bytes]:
    """``count`` KServe v2 requests of ``rows`` rows each (:func:`batch_rows`): random values in
    [0, 1) for float inputs, zeros for integer ones (valid token ids and indices), ``False`` for
    booleans.  The first dimension is the batch; any other dynamic one cannot be guessed:
    :class:`BenchError`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    specs: list[tuple[str, str, list[int]]] = []
    for spec in inputs:
        name, datatype, shape = str(spec.get("name")), str(spec.get("datatype")), list(spec.get("shape") or [])
        if datatype not in _FLOAT_TYPES and datatype not in _INT_TYPES and datatype != "BOOL":
            raise BenchError(f"input {name!r} is {datatype}; the load test sends numbers, booleans or text")
        dims = [rows if i == 0 and d in (-1, None) else d for i, d in enumerate(shape)] or [rows]
        if any(not isinstance(d, int) or d < 0 for d in dims):
            raise BenchError(
                f"input {name!r} has the shape {shape}: a dynamic dimension other than the batch; "
                "the load test cannot guess its size"
            )
        specs.append((name, datatype, dims))
    bodies = []
    for _ in range(count):
        tensors = []
        for name, datatype, dims in specs:
            n = int(np.prod(dims))
            if datatype in _FLOAT_TYPES:
                data: list[Any] = rng.random(n).astype(_FLOAT_TYPES[datatype]).astype(float).tolist()
            else:
                data = [False] * n if datatype == "BOOL" else [0] * n
            tensors.append({"name": name, "shape": dims, "datatype": datatype, "data": data})
        bodies.append(json.dumps({"inputs": tensors}).encode())
    return bodies


def takes_text(meta: Mapping[str, Any]) -> bool:
    """True for a text model (one BYTES input)."""
    inputs = list(meta.get("inputs") or [])
    return len(inputs) == 1 and inputs[0].get("datatype") == "BYTES"


def plans_for(meta: Mapping[str, Any], model: str, texts: Sequence[str], per_request: int | None = None) -> list[Plan]:
    """The endpoints to load for a model with metadata ``meta`` (see the module's docstring),
    ``per_request`` texts (or rows) in each request (default: one, or a fixed batch's size)."""
    inputs = list(meta.get("inputs") or [])
    infer = f"/v2/models/{model}/infer"
    if takes_text(meta):
        per_request = per_request or 1
        groups: list[str] | list[list[str]] = list(texts) if per_request == 1 else text_groups(texts, per_request)
        plans = [Plan(infer, infer, [request_body(infer, model, g) for g in groups], per_request, INFER_ROUTE)]
        task = (meta.get("parameters") or {}).get("task")
        if task == "feature-extraction":
            v1 = [request_body("/v1/embeddings", model, g) for g in groups]
            plans.insert(0, Plan("/v1/embeddings", "/v1/embeddings", v1, per_request, "/v1/embeddings"))
        return plans
    rows = batch_rows(inputs, per_request)
    return [Plan(infer, infer, tensor_bodies(inputs, rows=rows), rows, INFER_ROUTE, unit="rows")]


#: what ``--endpoint`` names: the start of a plan's path
ENDPOINTS = {"v1": "/v1/", "v2": "/v2/"}


def pick_endpoint(plans: Sequence[Plan], endpoint: str, model: str) -> list[Plan]:
    """The plan ``endpoint`` (``v1`` or ``v2``) names, or :class:`BenchError` naming those there are."""
    chosen = [p for p in plans if p.path.startswith(ENDPOINTS[endpoint])]
    if not chosen:
        there = ", ".join(p.label for p in plans)
        raise BenchError(f"--endpoint {endpoint}: model {model!r} is served on {there} only; leave --endpoint out")
    return chosen


#: a sample line: name, optional labels (quoted values may hold braces: route="/v2/models/{name}"), value
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text exposition -> {(name, labels): value} (comments and bad lines skipped)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = value
    return out


def _total(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def metrics_delta(
    before: Mapping[tuple[str, frozenset[tuple[str, str]]], float],
    after: Mapping[tuple[str, frozenset[tuple[str, str]]], float],
    model: str,
    requests: int,
    route: str | None = None,
) -> dict[str, float]:
    """What the server did between two scrapes: ``batch_rows_mean``, ``queue_ms_mean``,
    ``server_cpu_ms`` per request (of ``requests``), with its audit log on
    ``audit_records_per_commit`` and ``audit_commit_ms`` (its group commit), and, given the
    ``route`` template the server counts under, ``served`` (its 200 answers for ``model``
    there); a figure whose series is missing is left out."""

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    out: dict[str, float] = {}
    batches = delta("inferbox_batch_size_count", model=model)
    if batches > 0:
        out["batch_rows_mean"] = delta("inferbox_batch_size_sum", model=model) / batches
    queued = delta("inferbox_queue_seconds_count", model=model)
    if queued > 0:
        out["queue_ms_mean"] = 1000.0 * delta("inferbox_queue_seconds_sum", model=model) / queued
    cpu = delta("inferbox_thread_cpu_seconds_total")
    if cpu > 0 and requests > 0:
        out["server_cpu_ms"] = 1000.0 * cpu / requests
    commits = delta("inferbox_audit_commit_seconds_count")
    if commits > 0:
        out["audit_records_per_commit"] = delta("inferbox_audit_records_total") / commits
        out["audit_commit_ms"] = 1000.0 * delta("inferbox_audit_commit_seconds_sum") / commits
    if route is not None and any(n == "inferbox_requests_total" for n, _ in after):
        out["served"] = delta("inferbox_requests_total", model=model, route=route, status="200")
    return out


class _Scraper:
    """``/metrics`` with the key; after one refusal (a 401/403 under ``metrics_auth``) it stops asking."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.why_not: str | None = None

    def __call__(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        import httpx

        if self.why_not is not None:
            return None
        try:
            with _client(self.target, 30.0) as http:
                resp = http.get(f"{self.target.base_url}/metrics", headers=self.target.headers)
        except httpx.HTTPError as exc:
            self.why_not = f"/metrics: {type(exc).__name__}: {self.target.scrub(str(exc))}"
            return None
        if resp.status_code != 200:
            self.why_not = (
                f"/metrics answered {error_message(resp.status_code, resp.text)} (a key of scope metrics:read reads it)"
            )
            return None
        return parse_metrics(resp.text)


def _probe(target: Target, plan: Plan, count: int = 1) -> list[float]:
    """``count`` requests of ``plan`` one after the other, each of which must answer 200 (else
    :class:`BenchError` with the server's message): their latencies in seconds."""
    import time

    import httpx

    latencies = []
    try:
        with _client(target, 120.0) as http:
            for i in range(count):
                began = time.perf_counter()
                resp = http.post(
                    target.base_url + plan.path,
                    content=plan.bodies[i % len(plan.bodies)],
                    headers={"Content-Type": "application/json", **target.headers},
                )
                latencies.append(time.perf_counter() - began)
                if resp.status_code != 200:
                    which = "the first request" if i == 0 else f"request {i + 1} of {count}"
                    raise BenchError(f"{plan.label}: {which} was answered {error_message(resp.status_code, resp.text)}")
    except httpx.HTTPError as exc:
        raise BenchError(f"{plan.label}: {type(exc).__name__}: {target.scrub(str(exc))}") from None
    return latencies


def _load(target: Target, plan: Plan, concurrency: int, duration_s: float) -> dict[str, Any]:
    if target.client() == "wrk":
        try:
            return wrk.run(
                target.base_url, plan.path, plan.bodies, target.headers, concurrency=concurrency, duration_s=duration_s
            )
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            raise BenchError(f"{plan.label} c={concurrency}: wrk failed: {target.scrub(str(exc))}") from None
    row = asyncio.run(
        closed_loop(
            target.base_url + plan.path,
            plan.bodies,
            headers=target.headers,
            concurrency=concurrency,
            max_requests=1 << 62,
            duration_s=duration_s,
            verify=target.verify(),
        )
    )
    row["client"] = "httpx"
    return row


def _load_open(target: Target, plan: Plan, rate: float, duration_s: float) -> dict[str, Any]:
    return asyncio.run(
        open_loop(
            target.base_url,
            plan.path,
            plan.bodies,
            headers=target.headers,
            rate=rate,
            duration_s=duration_s,
            ssl_context=target.ssl_context,
            arrivals=plan.arrivals,
        )
    )


def _step(target: Target, plan: Plan, kind: str, level: float, seconds: float) -> dict[str, Any]:
    """One level's load: an open loop at ``level`` requests/s (``kind`` "rate"), else a closed
    loop of ``level`` clients."""
    if kind == "rate":
        return _load_open(target, plan, level, seconds)
    return _load(target, plan, int(level), seconds)


#: what the server did meanwhile (:func:`metrics_delta`), after each row's own figures
SERVER_COLUMNS = ("batch_rows_mean", "queue_ms_mean", "server_cpu_ms", "audit_records_per_commit", "audit_commit_ms")
#: the closed loop's table, and the open loop's
COLUMNS = ("endpoint", "concurrency", "rps", "items_per_s", "p50_ms", "p99_ms", "ok", "errors", *SERVER_COLUMNS)
RATE_COLUMNS = ("endpoint", *OPEN_LOOP_COLUMNS, *SERVER_COLUMNS)


def level_name(row: Mapping[str, Any]) -> str:
    """Where a row was measured, for messages: ``<endpoint> c=<clients>`` or ``<endpoint> <rate>/s``."""
    if "rate" in row:
        return f"{row['endpoint']} {row['rate']:g}/s"
    return f"{row['endpoint']} c={row['concurrency']}"


def _window(
    target: Target,
    plan: Plan,
    kind: str,
    level: float,
    seconds: float,
    warmup: float,
    scrape: _Scraper,
    echo: Callable[[str], None],
    p99_ms: float | None = None,
) -> dict[str, Any]:
    """One level of ``plan``: a warm-up, then its measured run with what the server did meanwhile;
    a level with no answer is a skipped row.  With ``p99_ms`` the row says whether it met it."""
    where = level_name({"endpoint": plan.label, kind: int(level) if kind == "concurrency" else level})
    if warmup > 0:  # an open loop warms up for one request at least
        _step(target, plan, kind, level, max(warmup, 1.0 / level) if kind == "rate" else warmup)
    before = scrape()
    row = _step(target, plan, kind, level, seconds)
    after = scrape() if before is not None else None
    failure = row_failure(row)
    if failure is not None:
        row = {"endpoint": plan.label, kind: level, **skipped(failure)}
        if kind == "rate":
            row["arrivals"] = plan.arrivals
        line = f"  {where}: {failure}"
    else:
        row |= {
            "endpoint": plan.label,
            "per_request": plan.items,
            "unit": plan.unit,
            "items_per_s": row["rps"] * plan.items,
        }
        if before is not None and after is not None:
            row |= metrics_delta(before, after, target.model, int(row["requests"]), plan.route)
        dropped = f", dropped {row['dropped']}" if row.get("dropped") else ""
        line = (
            f"  {where}: {row['rps']:.1f} req/s, p50 {row.get('p50_ms', 0):.1f} ms, "
            f"p99 {row.get('p99_ms', 0):.1f} ms, errors {row['errors']}{dropped}"
        )
    if p99_ms is not None:
        why = capacity.judge(row, p99_ms)
        line += " - met" if why is None else f" - missed: {why}"
    echo(line)
    return row


def start_rate(latencies: Sequence[float], max_rate: float) -> float:
    """Where a capacity search starts: one client's rate (the median of the probes after the
    first, which meets a cold server), within ``[MIN_RATE, max_rate]``, to two figures."""
    rate = 1.0 / max(statistics.median(latencies[1:] or latencies), 1e-4)
    return min(max(float(f"{rate:.2g}"), capacity.MIN_RATE), max_rate)


def run(
    cfg: Config,
    target: Target,
    *,
    levels: Sequence[int] = LEVELS,
    rates: Sequence[float] | None = None,
    p99_ms: float | None = None,
    max_rate: float = MAX_RATE,
    duration_s: int | None = None,
    texts: Sequence[str] | None = None,
    endpoint: str | None = None,
    per_request: int | None = None,
    arrivals: str = "constant",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load ``target`` level by level (see the module's docstring); with ``cfg.out`` keeps ``remote.json``.

    ``rates``: open-loop requests/s levels instead of the closed loop's client counts ``levels``;
    ``p99_ms`` with ``rates``: each level is judged against that p99 (``meets``); without them:
    search each endpoint's capacity at that p99 (:func:`bench.capacity.search`, up to
    ``max_rate``), kept under ``capacity``.  ``texts``: what a text model is sent (default: the
    suite's mixed corpus); ``endpoint``: ``v1`` or ``v2``, that one only (default: each the model has);
    ``per_request``: texts (a tensor model: rows) in each request, as a client that batches sends them;
    ``arrivals``: how the open loop's requests arrive (evenly spaced, or ``poisson``)."""
    from bench.http import server_texts

    searching = p99_ms is not None and not rates
    meta = preflight(target)
    if texts is not None and not takes_text(meta):
        raise BenchError(f"--texts: model {target.model!r} takes tensors, not text; leave --texts out")
    plans = plans_for(meta, target.model, texts if texts is not None else server_texts(cfg), per_request)
    if endpoint is not None:
        plans = pick_endpoint(plans, endpoint, target.model)
    plans = [replace(plan, arrivals=arrivals) for plan in plans]
    probes = {plan.label: _probe(target, plan, PROBES if searching else 1) for plan in plans}
    duration = duration_s if duration_s is not None else cfg.pick(2, ROW_S)
    warmup = cfg.pick(1, WARMUP_S)
    for r in rates or ():
        if r * duration < 1:
            raise BenchError(f"--rate {r:g}: no request would be due in {duration} s; raise the rate or --duration")
    scrape = _Scraper(target)
    params = meta.get("parameters") or {}
    client = "open loop" if rates or searching else target.client()
    if client == "open loop" and arrivals != "constant":
        client += f", {arrivals} arrivals"
    echo(
        f"{target.base_url}: {target.model} v{','.join(meta.get('versions') or ['?'])} on {params.get('backend', '?')} "
        f"({params.get('variant', '?')}, {params.get('exec_precision', '?')}); client {client}"
        + (f"; {plans[0].items} {plans[0].unit} per request" if plans[0].items > 1 else "")
    )
    if client == "httpx" and not wrk.available() and re.match(r"https?://(127\.|localhost|\[::1\])", target.base_url):
        echo(
            "  note: wrk is not installed; the Python client shares this box's CPU with the server (apt-get install wrk)"
        )
    steps: list[tuple[str, float]] = [("rate", r) for r in rates] if rates else [("concurrency", c) for c in levels]
    rows: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    for plan in plans:
        if not searching:
            for kind, level in steps:
                rows.append(_window(target, plan, kind, level, duration, warmup, scrape, echo, p99_ms))
            continue
        assert p99_ms is not None
        first = start_rate(probes[plan.label], max_rate)
        echo(f"  {plan.label}: searching the highest rate with p99 <= {p99_ms:g} ms, from {first:g}/s")

        def measure(rate: float, plan: Plan = plan) -> dict[str, Any]:
            return _window(target, plan, "rate", rate, duration, warmup, scrape, echo, p99_ms)

        # a whole-second window holds one request at least from MIN_RATE (1/s) up
        result = capacity.search(measure, p99_ms, first, max_rate=max_rate)
        rows.extend(result.pop("rows"))
        found.append(
            {"endpoint": plan.label, "per_request": plan.items, "unit": plan.unit, "arrivals": arrivals, **result}
        )
        echo(f"  {plan.label}: {capacity_line(found[-1])}")
    columns = RATE_COLUMNS if rates or searching else COLUMNS
    out: dict[str, Any] = {
        "part": "remote",
        "quick": cfg.quick,
        "url": target.base_url,
        "model": target.model,
        "served_by": {k: params.get(k) for k in ("backend", "variant", "exec_precision")},
        "client": client,
        "endpoint": endpoint,
        "per_request": plans[0].items,
        "unit": plans[0].unit,
        "arrivals": arrivals if rates or searching else None,
        "duration_s": duration,
        "rows": rows,
        "table": format_table((*columns, "meets") if p99_ms is not None else columns, rows),
    }
    if p99_ms is not None:
        out["p99_target_ms"] = p99_ms
    if searching:
        out["max_rate"] = max_rate
        out["capacity"] = found
        out["capacity_table"] = format_table(CAPACITY_COLUMNS, found)
    if scrape.why_not is not None:
        out["metrics"] = f"not read: {scrape.why_not}"
    if cfg.out is not None:
        write_json(Path(cfg.out) / "remote.json", out)
    return out


#: the capacity search's summary, one row per endpoint
CAPACITY_COLUMNS = (
    "endpoint", "p99_target_ms", "rate", "p99_ms", "confirm_p99_ms", "next_rate", "next_missed"
)  # fmt: skip


def _count(value: float) -> str:
    """``value`` to three figures, in plain digits (``1,740``, not ``1.74e+03``)."""
    value = capacity.figures(value)
    return f"{value:,.0f}" if value >= 100 else f"{value:g}"


def capacity_line(found: Mapping[str, Any]) -> str:
    """One endpoint's capacity search in words: the rate, what bounded it, whether it held again."""
    target = f"p99 <= {found['p99_target_ms']:g} ms"
    budget = f"the search stopped after {found['max_windows']} windows"
    not_held = list(found.get("not_held") or [])
    nxt = found["next_rate"]
    if found["rate"] is None:
        at = f"{nxt:g}/s met it once, then missed it" if nxt in not_held else f"at {nxt:g}/s"
        line = f"no rate from {found['lowest_rate']:g}/s up met {target} twice ({at}: {found['next_missed']})"
        line += f"; {budget}, still going down" if found["windows_spent"] else ""
    else:
        again = f", again {found['confirm_p99_ms']:.1f} ms" if found["confirmed"] else ""
        per, unit = found.get("per_request", 1), found.get("unit", "texts")
        items = f" of {per} {unit} ({_count(found['rate'] * per)} {unit}/s)" if per > 1 else ""
        poisson = " arriving at random (Poisson)" if found.get("arrivals") == "poisson" else ""
        line = f"{found['rate']:g} requests/s{items}{poisson} with {target} (p99 {found['p99_ms']:.1f} ms{again})"
        if found["at_max_rate"]:
            line += "; that is the search's ceiling, so the server may take more"
        elif nxt is None:
            line += f"; {budget}, still going up, so the server may take more"
        else:
            held = "met it once, then missed it" if nxt in not_held else "missed it"
            line += f"; {nxt:g}/s {held} ({found['next_missed']})"
            if found["windows_spent"] and nxt / found["rate"] > found["resolution"]:
                line += f"; {budget}, wider apart than {found['resolution']:g}x"
    others = [r for r in not_held if r != nxt]
    if others:
        line += f"; {', '.join(f'{r:g}/s' for r in others)} also met it once, then missed it"
    if not_held:
        line += ": the box's spread is near the target"
    if found.get("descent_spent"):
        down = len(found["down"])
        line += (
            f"; the search stopped {down} window{'s' if down > 1 else ''} down from the rates that did not hold, "
            f"above its floor of {found['min_rate']:g}/s, so a lower rate may meet it"
        )
    late = found.get("next_late_ms_p99")
    if late is not None and late > found["p99_target_ms"] / 4:
        line += (
            f"; the client itself fell {late:.0f} ms behind its schedule there, so that miss may be the client's: "
            "run the load from another box"
        )
    if found.get("confirm_failed"):
        where = found.get("failed_in") or "its second window"
        line += f"; {where} failed ({found['confirm_missed']}): the server, not the box's spread"
        if found["rate"] is not None and where != "its second window":
            line += f"; {found['rate']:g}/s met it in one window only"
    elif found["rate"] is not None and not found["confirmed"]:
        line += "; met in one window only (no second window was left to confirm it)"
    return line
