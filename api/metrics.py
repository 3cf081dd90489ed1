"""Prometheus metrics, written by hand in the text exposition format (no dependency).

Series (all prefixed ``inferbox_``): ``requests_total{model,route,status}``,
``request_duration_seconds{route}`` (histogram), ``queue_seconds{model}`` (each item's),
``batch_size{model}``, ``inference_seconds{model}`` (histograms, from the
batchers), ``batcher_items_total{model,outcome}`` (:data:`ITEM_OUTCOMES`),
``in_flight_requests``, ``queue_depth{model}`` and ``queue_limit{model}`` (items: a text of a
text request, or a tensor request), and
``model_info{model,version,backend,variant,exec_precision,streams,fallback}`` (always 1:
the backend and precision the proved session runs in; ``streams``: sessions running
batches side by side; ``fallback``: empty, or what the session fell back from and to
when ``allow_fallback`` let it run elsewhere),
``model_ready{model,version}`` (1 loaded; 0 a version whose load failed, or a model
unloaded on request), ``static_shapes{model}`` (static-shape copies compiled so far, OpenVINO) and
``connections_closed_total{reason}`` (when the HTTP server tells them: closed on a client's
account, appliance.http_protocol), ``thread_cpu_seconds_total{thread}`` (this process's CPU by thread kind: ``loop``,
``inference``, ``audit``, ``other``; Linux only, :class:`runtime.threads.ThreadCpu`).
With the audit log on: ``audit_records_total``, ``audit_commit_seconds`` (a summary:
``_sum`` the commits' time, ``_count`` the commits, each one fsync, so records over
commits is the group commit's size), ``audit_pending_records`` (requests waiting for
their record to be durable), ``audit_up`` (0 while appends fail),
``audit_refused_records_total`` and ``audit_write_stalled_seconds`` (the append in progress).
And the standard process series (as Prometheus' client libraries name them):
``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
``process_open_fds``, ``process_max_fds``, ``process_start_time_seconds``, and
``inferbox_build_info{version}`` (always 1).
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from api.protocols import AuditStats
from runtime.batcher import TIME_BUCKETS, BatchStats
from runtime.threads import ThreadCpu

if TYPE_CHECKING:
    import psutil

    from runtime.serving import LoadedModel

__all__ = ["CONTENT_TYPE", "REFUSAL_CODES", "Histogram", "Metrics", "ModelInfo"]

#: the codes of a 429 (runtime.errors.OverloadError.code)
REFUSAL_CODES = ("rate_limit_exceeded", "server_busy")

logger = logging.getLogger(__name__)

#: Prometheus' text format; Litestar adds "; charset=utf-8" to a text/ type (given here too, it sent it twice)
CONTENT_TYPE = "text/plain; version=0.0.4"

#: the batchers count their queue and inference times into these bounds themselves (BatchStats)
LATENCY_BUCKETS = TIME_BUCKETS
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: what became of the items a batcher was given: answered, failed in their batch, refused at the
#: queue (429), given up on past their timeout (504)
ITEM_OUTCOMES = ("completed", "failed", "rejected", "timed_out")


def _items(stats: BatchStats) -> dict[str, int]:
    return {
        "completed": stats.completed,
        "failed": stats.failed,
        "rejected": stats.rejected,
        "timed_out": stats.timed_out,
    }


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _time_histograms(
    name: str, retired: Mapping[str, Histogram], batchers: Mapping[str, Sequence[BatchStats]], kind: str
) -> list[str]:
    """The ``name`` histogram per model: the gone batchers' counts (``retired``) and the running ones'
    ``<kind>_buckets`` / ``<kind>_seconds``."""
    out: list[str] = []
    for model in sorted({*retired, *batchers}):
        h = Histogram(LATENCY_BUCKETS)
        if model in retired:
            h.merge(retired[model])
        for stats in batchers.get(model, ()):
            h.add(getattr(stats, f"{kind}_buckets"), getattr(stats, f"{kind}_seconds"))
        out += h.lines(name, [("model", model)])
    return out


@functools.cache
def _version() -> str:
    """The installed inferbox's version ("unknown" when run from a tree not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("inferbox")
    except PackageNotFoundError:
        return "unknown"


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float, n: int = 1) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += n
        self.total += value * n
        self.count += n

    def add(self, counts: Sequence[int], total: float) -> None:
        """Add samples counted elsewhere by the same bounds: ``counts[i]`` in bucket ``i``, one more
        count at the end for those above every bound (:class:`runtime.batcher.BatchStats`), their sum
        ``total``."""
        for i, n in enumerate(counts[: len(self.counts)]):
            self.counts[i] += n
        self.count += sum(counts)
        self.total += total

    def merge(self, other: Histogram) -> None:
        self.add([*other.counts, other.count - sum(other.counts)], other.total)

    def lines(self, name: str, labels: Sequence[tuple[str, str]]) -> Iterable[str]:
        running = 0
        for le, c in zip(self.buckets, self.counts, strict=True):
            running += c
            yield f"{name}_bucket{_labels([*labels, ('le', _num(le))])} {running}"
        yield f"{name}_bucket{_labels([*labels, ('le', '+Inf')])} {self.count}"
        yield f"{name}_sum{_labels(labels)} {_num(self.total)}"
        yield f"{name}_count{_labels(labels)} {self.count}"


@dataclass(frozen=True)
class ModelInfo:
    model: str
    version: str
    backend: str
    variant: str
    exec_precision: str
    streams: int = 1
    static_shapes: int = 0
    #: ``CUDAExecutionProvider -> CPUExecutionProvider`` when the session fell back; else empty
    fallback: str = ""

    @classmethod
    def of(cls, model: LoadedModel) -> ModelInfo:
        """The facts of a :class:`runtime.serving.LoadedModel` (its fallback read from the session)."""
        return cls(
            model.name,
            str(model.version),
            model.backend,
            model.variant,
            model.exec_precision,
            model.streams,
            model.static_shapes,
            fallback=getattr(model.session, "fallback", None) or "",
        )


class Metrics:
    """Process-local metrics; thread-safe. Render with :meth:`render`."""

    def __init__(
        self,
        thread_cpu: ThreadCpu | None = None,
        audit_stats: Callable[[], AuditStats] | None = None,
        certificate_expiry: Callable[[], float | None] | None = None,
        connection_closes: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._proc: psutil.Process | None = None
        self.thread_cpu = thread_cpu if thread_cpu is not None else ThreadCpu()
        #: the audit log's figures (None: audit off, or a sink that keeps none)
        self.audit_stats = audit_stats
        #: when the served TLS certificate expires, Unix seconds (None: plain HTTP)
        self.certificate_expiry = certificate_expiry
        #: connections the HTTP server closed on a client's account, by reason (None: not told)
        self.connection_closes = connection_closes
        self.requests: dict[tuple[str, str, str], int] = {}
        #: 429 answers by their code (both codes written from 0: an alert's rate() sees the first burst)
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_CODES, 0)
        self.durations: dict[str, Histogram] = {}
        #: queue and inference times, by model label, of the batchers that are gone (as the batch sizes)
        self.retired_queue: dict[str, Histogram] = {}
        self.retired_inference: dict[str, Histogram] = {}
        #: batch size -> batches, by model label, of the batchers that are gone (a replaced or
        #: unloaded version's): the histogram counts on from them
        self.retired_batch_sizes: dict[str, dict[int, int]] = {}
        #: items by outcome (:data:`ITEM_OUTCOMES`), by model label, of the batchers that are gone
        self.retired_items: dict[str, dict[str, int]] = {}
        #: inference requests by (model, version, id of the loaded model): [succeeded, their seconds,
        #: failed, their seconds] (Triton's statistics extension, :mod:`api.triton`): a version loaded
        #: again counts from zero, as its batchers do; dropped when the loaded model retires
        self.outcomes: dict[tuple[str, str, int], list[float]] = {}
        self.in_flight = 0

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_refused(self, code: str) -> None:
        """One request answered 429, by ``code``: ``rate_limit_exceeded`` (its key's limit: that client
        slows down) or ``server_busy`` (the server's queue: capacity is short)."""
        with self._lock:
            self.refused[code] = self.refused.get(code, 0) + 1

    def request_finished(
        self,
        *,
        model: str,
        route: str,
        status: int,
        seconds: float,
        version: str = "",
        instance: int = 0,
        inference: bool = False,
    ) -> None:
        """One request answered; ``inference``: it asked model ``model`` (version ``version``, the
        loaded model ``instance``) for an inference, counted as succeeded (status below 400) or failed
        per loaded version too."""
        with self._lock:
            self.in_flight -= 1
            key = (model, route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.durations.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)
            if inference and model:
                counts = self.outcomes.get((model, version, instance))
                if counts is None:
                    counts = self.outcomes[(model, version, instance)] = [0, 0.0, 0, 0.0]
                at = 0 if status < 400 else 2
                counts[at] += 1
                counts[at + 1] += seconds

    def outcomes_of(self, model: str, version: str, instance: int) -> tuple[int, float, int, float]:
        """Inference requests of a loaded model: succeeded, their seconds, failed, theirs."""
        with self._lock:
            ok, ok_s, failed, failed_s = self.outcomes.get((model, version, instance), (0, 0.0, 0, 0.0))
        return int(ok), ok_s, int(failed), failed_s

    def forget_outcomes(self, model: str, version: str, instance: int) -> None:
        """The loaded model retired: its counts go with it (and its id may be reused)."""
        with self._lock:
            self.outcomes.pop((model, version, instance), None)

    def absorb(self, model: str, stats: BatchStats) -> None:
        """Keep what the batcher behind ``stats`` counted under ``model`` after it is gone (its model
        version retired): its queue and inference times and its batch sizes, which the next version's
        batcher goes on from. Call once, after it stopped, and pass it to :meth:`render` no more."""
        with self._lock:
            self.retired_queue.setdefault(model, Histogram(LATENCY_BUCKETS)).add(
                stats.queue_buckets, stats.queue_seconds
            )
            self.retired_inference.setdefault(model, Histogram(LATENCY_BUCKETS)).add(
                stats.inference_buckets, stats.inference_seconds
            )
            items = self.retired_items.setdefault(model, dict.fromkeys(ITEM_OUTCOMES, 0))
            for outcome, n in _items(stats).items():
                items[outcome] += n
            sizes = self.retired_batch_sizes.setdefault(model, {})
            for size, n in stats.batch_sizes.items():
                sizes[size] = sizes.get(size, 0) + n

    def render(
        self,
        batchers: Mapping[str, Sequence[BatchStats]],
        models: Sequence[ModelInfo],
        ready: Sequence[tuple[str, int, bool]] = (),
    ) -> str:
        """The exposition text. ``batchers``: every running batcher's stats by model label, those of
        a replaced version still in its grace beside the new version's (their queues add up);
        ``ready``: (name, version, ready) of the registry's model versions
        (:meth:`runtime.serving.ModelRegistry.readiness`)."""
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP inferbox_requests_total HTTP requests by model, route and status.",
                "# TYPE inferbox_requests_total counter",
            ]
            for (model, route, status), n in sorted(self.requests.items()):
                out.append(
                    f"inferbox_requests_total{_labels([('model', model), ('route', route), ('status', status)])} {n}"
                )
            out += [
                "# HELP inferbox_refused_requests_total Requests answered 429, by code: rate_limit_exceeded (a "
                "key's limit of requests or tokens: that client slows down), server_busy (the queue full, or too "
                "far behind for the request's timeout, or a model being unloaded: capacity is short).",
                "# TYPE inferbox_refused_requests_total counter",
                *(
                    f"inferbox_refused_requests_total{_labels([('code', k)])} {n}"
                    for k, n in sorted(self.refused.items())
                ),
            ]
            out += [
                "# HELP inferbox_request_duration_seconds Request latency by route.",
                "# TYPE inferbox_request_duration_seconds histogram",
            ]
            for route, h in sorted(self.durations.items()):
                out += h.lines("inferbox_request_duration_seconds", [("route", route)])
            out += [
                "# HELP inferbox_in_flight_requests Requests being served now.",
                "# TYPE inferbox_in_flight_requests gauge",
                f"inferbox_in_flight_requests {self.in_flight}",
            ]
            out += [
                "# HELP inferbox_queue_seconds Time each item waited in the batch queue before its batch began (an "
                "item: a text of a text request, or a tensor request).",
                "# TYPE inferbox_queue_seconds histogram",
            ]
            out += _time_histograms("inferbox_queue_seconds", self.retired_queue, batchers, "queue")
            out += [
                "# HELP inferbox_inference_seconds Time one batch spent in the session.",
                "# TYPE inferbox_inference_seconds histogram",
            ]
            out += _time_histograms("inferbox_inference_seconds", self.retired_inference, batchers, "inference")
            out += ["# HELP inferbox_batch_size Rows per batch run.", "# TYPE inferbox_batch_size histogram"]
            for model in sorted({*self.retired_batch_sizes, *batchers}):
                h = Histogram(BATCH_BUCKETS)
                for sizes in (
                    self.retired_batch_sizes.get(model, {}),
                    *(s.batch_sizes for s in batchers.get(model, ())),
                ):
                    for size, n in sizes.items():
                        h.observe(size, n)
                out += h.lines("inferbox_batch_size", [("model", model)])
            out += [
                "# HELP inferbox_batcher_items_total Items the batcher was given, by outcome: completed, failed "
                "(their batch's error), rejected (the queue full, or too far behind for their timeout: 429), "
                "timed_out (given up on past their timeout: 504).",
                "# TYPE inferbox_batcher_items_total counter",
            ]
            for model in sorted({*self.retired_items, *batchers}):
                counts = dict(self.retired_items.get(model, dict.fromkeys(ITEM_OUTCOMES, 0)))
                for stats in batchers.get(model, ()):
                    for outcome, n in _items(stats).items():
                        counts[outcome] += n
                out += [
                    f"inferbox_batcher_items_total{_labels([('model', model), ('outcome', k)])} {counts[k]}"
                    for k in ITEM_OUTCOMES
                ]
        out += [
            "# HELP inferbox_queue_depth Items waiting in the batch queue (a text of a text request, or a tensor "
            "request); compare with inferbox_queue_limit.",
            "# TYPE inferbox_queue_depth gauge",
        ]
        for model, all_stats in sorted(batchers.items()):
            depth = sum(stats.queue_depth for stats in all_stats)
            out.append(f"inferbox_queue_depth{_labels([('model', model)])} {depth}")
        out += [
            "# HELP inferbox_queue_limit Items the batch queue holds at most (queue_limit): a request whose items "
            "do not fit is answered 429.",
            "# TYPE inferbox_queue_limit gauge",
        ]
        for model, all_stats in sorted(batchers.items()):
            limit = max((stats.queue_limit for stats in all_stats), default=0)
            out.append(f"inferbox_queue_limit{_labels([('model', model)])} {limit}")
        out += [
            "# HELP inferbox_model_info The backend and variant serving each loaded model.",
            "# TYPE inferbox_model_info gauge",
        ]
        for m in models:
            labels = [
                ("model", m.model),
                ("version", m.version),
                ("backend", m.backend),
                ("variant", m.variant),
                ("exec_precision", m.exec_precision),
                ("streams", str(m.streams)),
                ("fallback", m.fallback),
            ]
            out.append(f"inferbox_model_info{_labels(labels)} 1")
        out += [
            "# HELP inferbox_model_ready 1 for each loaded model version; 0 for a version in the repository whose "
            "last load failed, or a model unloaded on request.",
            "# TYPE inferbox_model_ready gauge",
        ]
        out += [
            f"inferbox_model_ready{_labels([('model', name), ('version', str(version))])} {int(is_ready)}"
            for name, version, is_ready in ready
        ]
        out += [
            "# HELP inferbox_static_shapes Static-shape copies of the model compiled for shapes that repeat.",
            "# TYPE inferbox_static_shapes gauge",
        ]
        for m in models:
            out.append(f"inferbox_static_shapes{_labels([('model', m.model)])} {m.static_shapes}")
        try:
            cpu = self.thread_cpu.totals()
        except Exception:  # a scrape never fails for this series: it is left out
            logger.exception("could not read the threads' CPU time")
            cpu = {}
        if cpu:
            out += [
                "# HELP inferbox_thread_cpu_seconds_total CPU time of this process by thread: loop (the event "
                "loop), inference (the infer-* threads that run batches), audit (the audit writer), other (the "
                "rest, e.g. OpenVINO's own threads that run a lone request).",
                "# TYPE inferbox_thread_cpu_seconds_total counter",
            ]
            out += [f"inferbox_thread_cpu_seconds_total{_labels([('thread', k)])} {_num(v)}" for k, v in cpu.items()]
        out += self._audit_lines()
        out += self._certificate_lines()
        out += self._connection_lines()
        out += self._process_lines()
        return "\n".join(out) + "\n"

    def _process_lines(self) -> list[str]:
        """This process's CPU, memory, open files and start, and the build (the series an SRE's dashboards
        and alerts expect: memory growth, a file-descriptor limit near, a restart)."""
        try:
            proc = self._process()
            with proc.oneshot():
                cpu, memory, started = proc.cpu_times(), proc.memory_info(), proc.create_time()
                fds = proc.num_fds()
            import resource

            max_fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except Exception:  # a scrape never fails for these series: they are left out
            logger.exception("could not read this process's figures")
            return []
        lines = [
            "# HELP process_cpu_seconds_total CPU time of this process (user and system).",
            "# TYPE process_cpu_seconds_total counter",
            f"process_cpu_seconds_total {_num(cpu.user + cpu.system)}",
            "# HELP process_resident_memory_bytes Resident memory of this process.",
            "# TYPE process_resident_memory_bytes gauge",
            f"process_resident_memory_bytes {memory.rss}",
            "# HELP process_open_fds Open file descriptors (connections among them).",
            "# TYPE process_open_fds gauge",
            f"process_open_fds {fds}",
        ]
        if max_fds != resource.RLIM_INFINITY:
            lines += [
                "# HELP process_max_fds The process's limit of open file descriptors (LimitNOFILE).",
                "# TYPE process_max_fds gauge",
                f"process_max_fds {max_fds}",
            ]
        lines += [
            "# HELP process_start_time_seconds When this process started (Unix time).",
            "# TYPE process_start_time_seconds gauge",
            f"process_start_time_seconds {_num(started)}",
            "# HELP inferbox_build_info The inferbox version serving (always 1).",
            "# TYPE inferbox_build_info gauge",
            f"inferbox_build_info{_labels([('version', _version())])} 1",
        ]
        return lines

    def _process(self) -> psutil.Process:
        import os

        import psutil

        if self._proc is None or self._proc.pid != os.getpid():  # a worker forked after it was made
            self._proc = psutil.Process()
        return self._proc

    def _connection_lines(self) -> list[str]:
        if self.connection_closes is None:
            return []
        closes = self.connection_closes()
        return [
            "# HELP inferbox_connections_closed_total Connections the server closed on the client's account: "
            "header_timeout (headers not in within header_timeout_s: 408), read_timeout (none of an answer read "
            "within body_timeout_s: reset), bad_request (bytes that are no HTTP request: 400), header_too_large "
            "(a request line and headers over 64 KiB: 431). No request "
            "reached the API, so they are not in requests_total or the audit log.",
            "# TYPE inferbox_connections_closed_total counter",
            *(f"inferbox_connections_closed_total{_labels([('reason', k)])} {n}" for k, n in sorted(closes.items())),
        ]

    def _certificate_lines(self) -> list[str]:
        expiry = self.certificate_expiry() if self.certificate_expiry is not None else None
        if expiry is None:
            return []
        return [
            "# HELP inferbox_tls_certificate_expiry_timestamp_seconds When the served TLS certificate expires "
            "(Unix time; alert on it minus time() below 30 days: the server warns only at start and reload).",
            "# TYPE inferbox_tls_certificate_expiry_timestamp_seconds gauge",
            f"inferbox_tls_certificate_expiry_timestamp_seconds {_num(expiry)}",
        ]

    def _audit_lines(self) -> list[str]:
        if self.audit_stats is None:
            return []
        try:
            audit = self.audit_stats()
        except Exception:  # a scrape never fails for these series: they are left out
            logger.exception("could not read the audit log's figures")
            return []
        return [
            "# HELP inferbox_audit_records_total Records the audit log has committed.",
            "# TYPE inferbox_audit_records_total counter",
            f"inferbox_audit_records_total {audit.records}",
            "# HELP inferbox_audit_commit_seconds The audit log's write transactions (each one fsync): their "
            "time and count.",
            "# TYPE inferbox_audit_commit_seconds summary",
            f"inferbox_audit_commit_seconds_sum {_num(audit.commit_seconds)}",
            f"inferbox_audit_commit_seconds_count {audit.commits}",
            "# HELP inferbox_audit_pending_records Records waiting to be committed (their requests wait too).",
            "# TYPE inferbox_audit_pending_records gauge",
            f"inferbox_audit_pending_records {audit.pending}",
            "# HELP inferbox_audit_up 0 while the audit log cannot be written (a full disk): every request is "
            "answered 503 and /v2/health/ready says not ready; 1 otherwise.",
            "# TYPE inferbox_audit_up gauge",
            f"inferbox_audit_up {0 if audit.failing else 1}",
            "# HELP inferbox_audit_refused_records_total Records the audit log could not write (their requests "
            "were answered 503).",
            "# TYPE inferbox_audit_refused_records_total counter",
            f"inferbox_audit_refused_records_total {audit.refused}",
            "# HELP inferbox_audit_write_stalled_seconds How long the audit append in progress has waited "
            "(another process holding the database's write lock: a prune, a copy); 0 when none is under way. "
            "Past 5 s /v2/health/ready says not ready: the requests wait on it.",
            "# TYPE inferbox_audit_write_stalled_seconds gauge",
            f"inferbox_audit_write_stalled_seconds {_num(audit.stalled_s)}",
        ]
