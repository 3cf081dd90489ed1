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
queued on the cluster is not leased again), and gives them back when it stops
on an error.  A worker refuses a chunk when it opens the model on another
backend or variant than the coordinator did (the one the audit log records).

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
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from typing import Any

from appliance.batch.model import BatchModel, LoaderFactory
from appliance.batch.unit import ChunkOutcome, ChunkTask, run_chunk, verify_chunk
from appliance.batch.worker import BatchWorker, RunSummary, machine_error
from runtime.errors import BatchError

__all__ = ["DaskEngine", "dask_unit", "loaded_models", "local_cluster"]

log = logging.getLogger(__name__)

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


def dask_unit(task: ChunkTask, factory: LoaderFactory) -> ChunkOutcome:
    """Run one chunk on a Dask worker (the model is loaded on the first chunk, then reused).

    The task names the job's pinned version and package, and the backend and variant the
    coordinator opened it on; another package, or the same opened otherwise, is refused.  A chunk
    that fails drops the model here (a session left broken is not reused).
    """
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
    ) -> None:
        self.worker = worker
        self.factory = factory
        self.scheduler = scheduler
        self.n_workers = n_workers
        self.in_flight_per_thread = in_flight_per_thread
        self.on_submit = on_submit or (lambda _task: None)
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
            if self.scheduler:
                try:
                    client = distributed.Client(self.scheduler)
                except (OSError, TimeoutError, ValueError, TypeError) as exc:
                    raise BatchError(
                        f"cannot reach the Dask scheduler {self.scheduler} ({exc}); check that it runs and the "
                        "address (--scheduler tcp://host:8786), or leave out --scheduler for a local cluster"
                    ) from exc
                with client:
                    self.client = client
                    yield client
                return
            with local_cluster(self.n_workers) as cluster, distributed.Client(cluster) as client:
                self.client = client
                yield client
        finally:
            self.client = None

    def _submit(self, client: Any, lease: Any, summary: RunSummary) -> Any | None:
        prepared = self.worker.prepare(lease, summary)
        if prepared is None:
            return None
        _, task = prepared
        future = client.submit(
            dask_unit,
            task,
            self.factory,
            key=f"inferbox-chunk-{task.job_id}-{lease.plan.idx}-{lease.attempts}",
            pure=False,
        )
        self.on_submit(task)
        return future

    def run_once(self, *, wait_for_retries: bool = True) -> RunSummary:
        """Accept new jobs and run every leasable chunk on the cluster; finish complete jobs.

        A local cluster is started only when there is a chunk to run (a remote scheduler is
        reached every time: a wrong address is said even with nothing to do).  Chunks
        stay leased while they wait on the cluster (renewed every third of ``lease_s``); if the
        run stops on an error (the scheduler lost, SIGINT), the chunks in flight are given back.
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
                self._work(client, first, summary, wait_for_retries)
        except BaseException:
            # whatever is still leased here runs nowhere now: the next run takes it at once
            with contextlib.suppress(Exception):
                self.worker.store.expire_worker(self.worker.worker_id)
            raise
        return summary

    def _work(self, client: Any, first: Any, summary: RunSummary, wait_for_retries: bool) -> None:
        wait = _distributed().wait
        lease_s = self.worker.config.lease_s
        try:
            threads = max(1, sum(client.nthreads().values()))
        except OSError as exc:
            raise self._lost(exc) from exc
        limit = threads * self.in_flight_per_thread
        in_flight: dict[Any, Any] = {}
        while True:
            self.worker.reclaim_dead()  # another coordinator of this host killed: its chunks now
            self.worker.fail_exhausted(summary)
            self.worker.finish_ready(summary)
            while len(in_flight) < limit:
                lease, first = first or self.worker.lease(), None
                if lease is None:
                    break
                future = self._submit(client, lease, summary)
                if future is not None:
                    in_flight[future] = lease
            if not in_flight:
                if wait_for_retries and self.worker.wait_for_retry():
                    continue
                break
            # a chunk waiting on the cluster (queued behind others, or rerun after a worker died)
            # keeps its lease: else this or another coordinator would take it again
            chunks = [(lease.job.job_id, lease.plan.idx) for lease in in_flight.values()]
            self.worker.store.renew(self.worker.worker_id, chunks, lease_s)
            try:
                done, _ = wait(list(in_flight), timeout=lease_s / 3, return_when="FIRST_COMPLETED")
            except TimeoutError:
                continue
            except (CancelledError, OSError) as exc:
                raise self._lost(exc) from exc
            for future in done:
                lease = in_flight.pop(future)
                try:
                    outcome = future.result()
                except Exception as exc:  # KilledWorker, or the unit's own error
                    if machine_error(exc):  # the chunk is not at fault: its attempt is not spent
                        self.worker.give_back(lease)
                        raise
                    self.worker.fail_chunk(lease, exc, summary)
                    continue
                self.worker.record(outcome)
                summary.chunks += 1

    def _lost(self, exc: BaseException) -> BatchError:
        where = self.scheduler or "of the local cluster"
        # Dask's own text spans lines and lists task keys: one line here
        reason = type(exc).__name__ if isinstance(exc, CancelledError) else " ".join(f"{exc}".split())[:200]
        return BatchError(
            f"lost the connection to the Dask scheduler {where} ({reason}); the chunks in flight are given "
            "back and finished chunks are kept: check the scheduler, then run the command again"
        )

    def watch(self, stop: threading.Event, poll_s: float = 2.0) -> None:
        """``run_once`` until ``stop`` is set, on one connection: a local cluster is started once
        (when there is a first chunk to run), not once a round, and closed when stopped."""
        with contextlib.ExitStack() as stack:
            self._keep = stack
            try:
                while not stop.is_set():
                    summary = self.run_once(wait_for_retries=False)
                    if not (summary.accepted or summary.chunks):
                        stop.wait(poll_s)
            finally:
                self._keep = None
