"""Offline batch processing: spool, job state, readers/writers, workers (local and Dask).

Modules by concept: :mod:`.spool` (atomic submission), :mod:`.jobs` (job and
chunk state with leases), :mod:`.readers` / :mod:`.writers` (formats, chunking,
atomic files), :mod:`.unit` (the per-chunk unit of work), :mod:`.worker` (local
``run_once`` / ``watch``), :mod:`.dask_engine` (the same unit on Dask).
Nothing heavy is imported here.
"""

__all__: list[str] = []
