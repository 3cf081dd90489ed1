"""``inferbox batch run --engine dask``: the same per-chunk unit on a Dask cluster.

The coordinator (this process) keeps the job state: it accepts spooled jobs,
leases chunks in SQLite, submits :func:`dask_unit` for each to the cluster,
and records each outcome exactly as the local worker does.  A Dask worker
loads a model once per process (:data:`_MODELS`, keyed by the loader and the
model) and reuses it for every chunk it runs.

When a Dask worker dies mid-chunk, Dask runs the task again elsewhere; when
it gives up (``KilledWorker``) the coordinator releases the chunk and leases
it again.  Either way the unit starts from scratch and renames files with
deterministic names, so the outputs are those of a local run.
The coordinator renews the leases of the chunks it has in flight (a chunk
queued on the cluster is not leased again).  When it stops for the machine (a
scheduler unreachable, lost or left without workers, a local cluster that
cannot start, SIGINT) it gives the chunks it holds back without spending
their attempts: only a chunk whose task failed (or killed its Dask workers:
``KilledWorker``) spends one, and so does a chunk that was on a worker that
went away (died, or was stopped) when the run stops because none is left: a
worker without a nanny is not restarted, so Dask never says ``KilledWorker``
there, and a chunk that kills workers was run again on every restart, for good.
A worker refuses a chunk when it opens the model on another backend or
variant than the coordinator did (the one the audit log records).

Without ``scheduler`` a :class:`distributed.LocalCluster` is started (worker
processes, one thread each, on 127.0.0.1; no dashboard: the scheduler's HTTP
server, which Dask always starts, serves no route and listens on a random
loopback port, never 8787).  With a remote
scheduler, the spool and outbox must be on storage every worker mounts at the
same path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from typing import Any

from appliance.batch.model import BatchModel, LoaderFactory
from appliance.batch.unit import ChunkOutcome, ChunkTask, run_chunk, verify_chunk
from appliance.batch.worker import BatchWorker, RunSummary
from runtime.errors import BatchError

__all__ = ["DaskEngine", "dask_unit", "loaded_models", "local_cluster"]

log = logging.getLogger(__name__)

#: how long a scheduler may have no worker (when the run starts, or later mid-job) before the run
#: stops with an error that says so; its tasks would wait there for good
WORKER_WAIT_S = 60.0

#: the loggers whose records Dask writes with a traceback, or over several lines (a lost scheduler,
#: a task that failed): condensed to one line each while the engine runs (:func:`_one_line_logs`)
_DASK_LOGGERS = (
    "distributed",
    "distributed.client",
    "distributed.core",
    "distributed.utils",
    "distributed.batched",
    "distributed.comm.tcp",
    "distributed.deploy.spec",
    "distributed.nanny",
    "distributed.scheduler",
    "distributed.worker",
    "tornado.application",
    "asyncio",
)

#: per Dask worker process: (loader key, name, version) -> model, created once
_MODELS: dict[tuple[str, str, int | None], BatchModel] = {}
_LOADS: list[tuple[str, int | None]] = []


def _distributed() -> Any:
    """``distributed``, typed loosely (its annotations are partial)."""
    try:
        return importlib.import_module("distributed")
    except ImportError as exc:  # depends on the install
        raise BatchError(
            "--engine dask needs dask.distributed; install the batch extra: pip install 'inferbox[batch]'"
        ) from exc


class _OneLine(logging.Filter):
    """A record with a traceback or several lines, as one line (the exception's type and text kept):
    the engine's own error names what happened and the fix; Dask's stack traces only bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and "\n" not in text:
            return True
        if exc is not None:
            text = f"{text} ({type(exc).__name__}: {exc})" if text.strip() else f"{type(exc).__name__}: {exc}"
        record.msg, record.args = " ".join(text.split())[:500], None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


_ONE_LINE = _OneLine()


@contextlib.contextmanager
def _one_line_logs() -> Iterator[None]:
    """Dask's records condensed to one line each for the duration (this process's loggers)."""
    loggers = [logging.getLogger(name) for name in _DASK_LOGGERS]
    for logger in loggers:
        logger.addFilter(_ONE_LINE)  # a set: adding it twice (nested) keeps one
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_ONE_LINE)


def _loader_key(factory: LoaderFactory) -> str:
    try:
        return hashlib.sha256(pickle.dumps(factory)).hexdigest()
    except (pickle.PicklingError, TypeError, AttributeError):
        return f"id:{id(factory)}"


def _load(factory: LoaderFactory, task: ChunkTask, *, fresh: bool = False) -> BatchModel:
    key = (_loader_key(factory), task.model, task.version)
    model = None if fresh else _MODELS.get(key)
    if model is None:
        model = factory()(task.model, task.version)
        _MODELS[key] = model
        _LOADS.append((task.model, task.version))
    return model


def dask_unit(task: ChunkTask, factory: LoaderFactory, *, one_line_logs: bool = False) -> ChunkOutcome:
    """Run one chunk on a Dask worker (the model is loaded on the first chunk, then reused).

    The task names the job's pinned version and package, and the backend and variant the
    coordinator opened it on; another package, or the same opened otherwise, is refused.  A chunk
    that fails drops the model here (a session left broken is not reused).  ``one_line_logs``
    (workers of a local cluster, which write to the coordinator's stderr): this worker's report
    of a failed task ("Compute Failed" and a traceback) is one line; the coordinator logs the
    error too.
    """
    if one_line_logs:
        logging.getLogger("distributed.worker").addFilter(_ONE_LINE)
    model = _load(factory, task)
    if task.model_sha256 and model.package_sha256 != task.model_sha256:
        model = _load(factory, task, fresh=True)  # reinstalled since this worker loaded it?
        if model.package_sha256 != task.model_sha256:
            raise BatchError(
                f"model {task.model!r} version {task.version} on this Dask worker is package "
                f"{model.package_sha256[:12]}..., job {task.job_id} runs on {task.model_sha256[:12]}...; "
                "every worker needs the same model repository"
            )
    if task.variant and (model.backend, model.variant) != (task.backend, task.variant):
        raise BatchError(
            f"model {task.model!r} version {task.version} opened on this Dask worker as {model.backend} "
            f"{model.variant}, job {task.job_id} runs on {task.backend} {task.variant} (what the coordinator "
            "opened and the audit log records); a job never mixes variants: give every worker the same hardware "
            "and model settings (backend, allow_fallback), or run the job with --engine local"
        )
    try:
        return verify_chunk(task) or run_chunk(task, model)
    except Exception:
        _MODELS.pop((_loader_key(factory), task.model, task.version), None)  # the next attempt loads it again
        raise


def loaded_models() -> dict[str, Any]:
    """This process's model cache (run on workers with ``client.run``): pid, loads."""
    return {"pid": os.getpid(), "loads": list(_LOADS), "cached": len(_MODELS)}


@contextlib.contextmanager
def local_cluster(n_workers: int = 2) -> Iterator[Any]:
    """A LocalCluster of worker processes with one thread each, on 127.0.0.1, no dashboard.

    Dask's scheduler starts an HTTP server even with the dashboard off (it would serve
    ``/health``, ``/json/...`` and ``/info/...`` on 127.0.0.1:8787): here it gets no route and a
    random loopback port.
    """
    if n_workers < 1:
        raise BatchError(f"--dask-workers {n_workers} is not valid; a local cluster needs 1 or more workers")
    distributed = _distributed()
    import dask

    # the worker processes start with SIGINT ignored: a terminal's Ctrl-C reaches the whole process
    # group, and each worker printed a KeyboardInterrupt traceback; this process stops them (close)
    ignored = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignored else None
    try:
        with dask.config.set({"distributed.scheduler.http.routes": []}):
            cluster = distributed.LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                host="127.0.0.1",
                scheduler_port=0,
                scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            )
    except (OSError, TimeoutError, RuntimeError) as exc:  # RuntimeError: "Cluster failed to start: ..."
        raise BatchError(
            f"cannot start a local Dask cluster on 127.0.0.1 ({_one_line(exc)}); check that the loopback "
            "interface is up and that processes may listen on it, or run with --engine local (or "
            "--scheduler tcp://host:8786)"
        ) from exc
    finally:
        if ignored:
            signal.signal(signal.SIGINT, previous)
    try:
        yield cluster
    finally:
        cluster.close()


class DaskEngine:
    """Runs a :class:`BatchWorker`'s chunks on a Dask cluster."""

    def __init__(
        self,
        worker: BatchWorker,
        factory: LoaderFactory,
        *,
        scheduler: str | None = None,
        n_workers: int = 2,
        in_flight_per_thread: int = 2,
        on_submit: Callable[[ChunkTask], None] | None = None,
        worker_wait_s: float = WORKER_WAIT_S,
    ) -> None:
        self.worker = worker
        self.factory = factory
        self.scheduler = scheduler
        self.n_workers = n_workers
        self.in_flight_per_thread = in_flight_per_thread
        self.on_submit = on_submit or (lambda _task: None)
        self.worker_wait_s = worker_wait_s
        self._workerless_since: float | None = None  # when the scheduler was first seen with no worker
        self.client: Any = None
        _distributed()  # not installed: said now, not once there is work
        self._keep: contextlib.ExitStack | None = None  # set by :meth:`watch`: the connection outlives a round

    @contextlib.contextmanager
    def connected(self) -> Iterator[Any]:
        """A client to the scheduler, or to a local cluster started for the duration
        (:meth:`run_once` reuses it while it is open: ``--watch`` starts one cluster, not one a round)."""
        if self.client is not None:
            yield self.client
            return
        distributed = _distributed()
        try:
            with _one_line_logs():
                yield from self._connect(distributed)
        finally:
            self.client = None

    def _connect(self, distributed: Any) -> Iterator[Any]:
        if self.scheduler:
            try:
                client = distributed.Client(self.scheduler)
            except (OSError, TimeoutError, ValueError, TypeError) as exc:
                raise BatchError(
                    f"cannot reach the Dask scheduler {self.scheduler} ({_one_line(exc)}); check that it runs and "
                    "the address (--scheduler tcp://host:8786), or leave out --scheduler for a local cluster"
                ) from exc
            with client:
                self.client = client
                yield client
            return
        with local_cluster(self.n_workers) as cluster, distributed.Client(cluster) as client:
            self.client = client
            yield client

    def _submit(self, client: Any, lease: Any, summary: RunSummary) -> Any | None:
        prepared = self.worker.prepare(lease, summary)
        if prepared is None:
            return None
        _, task = prepared
        future = client.submit(
            dask_unit,
            task,
            self.factory,
            one_line_logs=not self.scheduler,
            key=f"inferbox-chunk-{task.job_id}-{lease.plan.idx}-{lease.attempts}",
            pure=False,
        )
        self.on_submit(task)
        return future

    def run_once(self, *, wait_for_retries: bool = True, stop: threading.Event | None = None) -> RunSummary:
        """Accept new jobs and run every leasable chunk on the cluster; finish complete jobs.

        A local cluster is started only when there is a chunk to run (a remote scheduler is
        reached every time: a wrong address is said even with nothing to do).  Chunks
        stay leased while they wait on the cluster (renewed every third of ``lease_s``); if the
        run stops on an error (the scheduler unreachable or lost, SIGINT), the chunks it holds
        are given back without spending their attempts.  Once ``stop`` is set no chunk is
        submitted; the ones in flight are waited for.
        """
        summary = RunSummary()
        summary.accepted = self.worker.accept_new(summary)
        self.worker.reclaim_dead()
        self.worker.fail_exhausted(summary)
        self.worker.finish_ready(summary)
        first = self.worker.lease()
        config = self.worker.config
        idle = first is None and not (
            wait_for_retries and self.worker.store.next_retry_at(config.max_attempts) is not None
        )
        if idle and not self.scheduler:
            return summary  # a local cluster (processes, models) is started only for work; a remote one is asked
        try:
            if self._keep is not None and self.client is None:
                self._keep.enter_context(self.connected())  # kept open across rounds
            with self.connected() as client:
                self._work(client, first, summary, wait_for_retries, stop)
        except BaseException as exc:
            # what is still leased here runs nowhere now, and did not fail (the machine did): the
            # next run takes it at once, its attempts as they were
            try:
                given = self.worker.store.expire_worker(self.worker.worker_id, spent=False)
                if given and isinstance(exc, KeyboardInterrupt | SystemExit):  # stopped from outside
                    log.warning(
                        "stopped: the chunk in progress is given back (%d chunk(s)); the next `inferbox batch "
                        "run` resumes it",
                        given,
                    )
            except Exception as gone:  # its lease runs out instead: the chunk is taken again then
                log.warning(
                    "the chunks in progress could not be given back (%s); they are taken again when their "
                    "leases run out",
                    gone,
                )
            raise
        return summary

    def _work(
        self, client: Any, first: Any, summary: RunSummary, wait_for_retries: bool, stop: threading.Event | None
    ) -> None:
        self._await_workers(client)
        limit = max(1, self._nthreads(client)) * self.in_flight_per_thread
        in_flight: dict[Any, Any] = {}
        while True:
            self.worker.reclaim_dead()  # another coordinator of this host killed: its chunks now
            self.worker.fail_exhausted(summary)
            self.worker.finish_ready(summary)
            stopping = stop is not None and stop.is_set()
            if stopping and first is not None:
                self.worker.give_back(first)  # stopped before it was submitted
                first = None
            while not stopping and len(in_flight) < limit:
                lease, first = first or self.worker.lease(), None
                if lease is None:
                    break
                future = self._submit(client, lease, summary)
                if future is not None:
                    in_flight[future] = lease
            if not in_flight:
                if not stopping and wait_for_retries and self.worker.wait_for_retry():
                    continue
                break
            # a chunk waiting on the cluster (queued behind others, or rerun after a worker died)
            # keeps its lease: else this or another coordinator would take it again
            chunks = [(lease.job.job_id, lease.plan.idx) for lease in in_flight.values()]
            self.worker.store.renew(self.worker.worker_id, chunks, self.worker.config.lease_s)
            done = self._wait(client, list(in_flight))
            for future in done:
                self._collect(future, in_flight.pop(future), summary)
            if not done:
                self._check_workers(client, in_flight, summary)

    def _wait(self, client: Any, futures: list[Any]) -> list[Any]:
        """The futures done within a tick (none when the tick ran out)."""
        tick = min(self.worker.config.lease_s / 3, self.worker_wait_s / 4)
        try:
            done, _ = _distributed().wait(futures, timeout=tick, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        except (CancelledError, OSError) as exc:
            raise self._lost(exc) from exc
        return list(done)

    def _collect(self, future: Any, lease: Any, summary: RunSummary) -> None:
        """Record a finished chunk, or its failure: a failed task spends an attempt of the chunk."""
        try:
            outcome = future.result()
        except CancelledError as exc:  # the scheduler went away: it cancels every future
            raise self._lost(exc) from exc
        except Exception as exc:  # KilledWorker, an input changed, or the unit's own error: as the local worker
            self.worker.chunk_failed(lease, exc, summary)
            return
        self.worker.record(outcome)
        summary.chunks += 1

    def _nthreads(self, client: Any) -> int:
        try:
            return int(sum(client.nthreads().values()))
        except OSError as exc:
            raise self._lost(exc) from exc

    def _await_workers(self, client: Any) -> None:
        """Wait up to ``worker_wait_s`` for the scheduler's first worker (its tasks would wait for good)."""
        self._workerless_since = None
        try:
            client.wait_for_workers(1, timeout=self.worker_wait_s)
        except TimeoutError as exc:
            raise self._no_workers("has no worker") from exc
        except OSError as exc:
            raise self._lost(exc) from exc

    def _check_workers(self, client: Any, in_flight: dict[Any, Any], summary: RunSummary) -> None:
        """Stop once the scheduler has had no worker for ``worker_wait_s`` (all of them gone mid-job).
        A chunk that was on a worker that died (not one that left) spends its attempt first: a worker
        without a nanny is not restarted, so Dask never gives up on the chunk with ``KilledWorker``,
        and a chunk that kills workers would otherwise be given back, and run again, for good."""
        if self._nthreads(client) > 0:
            self._workerless_since = None
            return
        now = time.monotonic()
        if self._workerless_since is None:
            self._workerless_since = now
            log.warning("the Dask scheduler %s has no worker left; waiting for one", self._where())
        elif now - self._workerless_since >= self.worker_wait_s:
            died = _deaths(client, [future.key for future in in_flight])
            for future, lease in list(in_flight.items()):
                deaths = died.get(future.key, 0)
                if deaths:
                    del in_flight[future]
                    self.worker.chunk_failed(lease, _worker_died(deaths), summary)
            raise self._no_workers("has had no worker")

    def _no_workers(self, state: str) -> BatchError:
        fix = (
            f"start workers on it (dask worker {self.scheduler}), or leave out --scheduler for a local cluster"
            if self.scheduler
            else "its worker processes could not start or stay up (memory? see the log above)"
        )
        return BatchError(
            f"the Dask scheduler {self._where()} {state} for {self.worker_wait_s:g} s; the chunks in flight are "
            f"given back and finished chunks are kept: {fix}, then run the command again"
        )

    def _where(self) -> str:
        return self.scheduler or "of the local cluster"

    def _lost(self, exc: BaseException) -> BatchError:
        # Dask's own text spans lines and lists task keys: one line here
        reason = type(exc).__name__ if isinstance(exc, CancelledError) else _one_line(exc)
        return BatchError(
            f"lost the connection to the Dask scheduler {self._where()} ({reason}); the chunks in flight are "
            "given back and finished chunks are kept: check the scheduler, then run the command again"
        )

    def watch(self, stop: threading.Event, poll_s: float = 2.0) -> None:
        """``run_once`` until ``stop`` is set, on one connection: a local cluster is started once
        (when there is a first chunk to run), not once a round, and closed when stopped."""
        with contextlib.ExitStack() as stack:
            self._keep = stack
            try:
                while not stop.is_set():
                    summary = self.run_once(wait_for_retries=False, stop=stop)
                    if not (summary.accepted or summary.chunks):
                        stop.wait(poll_s)
            finally:
                self._keep = None


def _deaths(client: Any, keys: list[Any]) -> dict[Any, int]:
    """How many workers died (not left: ``suspicious`` in Dask's terms) while running each task of
    ``keys``, as the scheduler counts them; empty when it cannot say (it refuses to run code)."""

    def suspicious(keys: list[Any], dask_scheduler: Any = None) -> dict[Any, int]:
        # defined here so that it travels by value: the scheduler need not have inferbox installed
        tasks = dask_scheduler.tasks
        return {k: int(tasks[k].suspicious) for k in keys if k in tasks}

    try:
        return dict(client.run_on_scheduler(suspicious, keys))
    except Exception as exc:  # the run stops anyway: the chunks are given back as before
        log.warning("could not ask the Dask scheduler which chunks were on a worker that died: %s", _one_line(exc))
        return {}


def _worker_died(deaths: int) -> BatchError:
    workers = "worker" if deaths == 1 else f"{deaths} workers"
    return BatchError(
        f"the Dask {workers} running it went away mid-chunk (died, or was stopped) and none was left; a worker "
        "without a nanny is not restarted, so Dask never gives up on such a chunk: a record that crashes the "
        "model, or too little memory for the chunk, does this"
    )


def _one_line(exc: BaseException) -> str:
    """Dask's error text on one line, at most 200 characters."""
    return " ".join(f"{exc}".split())[:200]
