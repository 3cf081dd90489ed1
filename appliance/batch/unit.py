"""The per-chunk unit of work: read a chunk, run the model, write its files.

:func:`run_chunk` is a function of (input file, chunk plan, model) only: the
local worker and Dask workers run the same code, and running it twice gives
identical files.  It writes ``rejects-NNNNN.jsonl`` first and the result part
``part-NNNNN.<fmt>`` last, so "the part file exists" means the chunk's files are
complete (:func:`verify_chunk` checks that and recounts).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from appliance.batch.model import BatchModel
from appliance.batch.readers import ChunkPlan, RawRecord, RecordError, parse_record, read_chunk, record_id
from appliance.batch.writers import (
    atomic_write,
    encode_results,
    part_name,
    read_results,
    rejects_name,
    remove_temp_files,
)
from runtime.errors import BatchError, InputError

__all__ = ["TEXT_TASKS", "ChunkOutcome", "ChunkTask", "check_model_fits", "run_chunk", "streams_of", "verify_chunk"]

log = logging.getLogger(__name__)

TEXT_TASKS = ("feature-extraction", "text-classification")

T = TypeVar("T")
R = TypeVar("R")


class ChunkTask(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker needs to do one chunk (picklable, sent to Dask workers)."""

    job_id: str
    input_path: str
    format: str
    text_field: str
    model: str
    version: int | None  # the job's pinned version (None only for a job recorded before pinning)
    out_dir: str
    plan: ChunkPlan
    batch_size: int = 32
    truncate: bool = True
    model_sha256: str = ""  # the pinned package's sha256: a chunk refuses to run on another package


class ChunkOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a finished chunk produced; ``digests`` are SHA-256 of each record's bytes, in record order."""

    job_id: str
    idx: int
    part: str
    ok: int
    rejected: int
    digests: list[str]


def _digests(records: Sequence[RawRecord]) -> list[str]:
    return [hashlib.sha256(r.raw).hexdigest() for r in records]


def _reject(record: RawRecord, reason: str) -> dict[str, Any]:
    if len(reason) > 500:
        reason = reason[:497] + "..."
    return {
        "index": record.index,
        "id": record_id(record),
        "reason": reason.encode("utf-8", errors="replace").decode("utf-8"),  # an exception may quote a bad text
        "record": record.raw.decode("utf-8", errors="replace"),
    }


@dataclass(frozen=True)
class _Failed:
    """One record the model could not take: ``reason`` for the rejects; ``exc`` when the model
    raised something other than :class:`InputError` (that record, or the model itself, is at fault)."""

    reason: str
    exc: Exception | None = None


def _each(call: Callable[[list[T]], Sequence[R]], items: list[T], failed: Exception | None = None) -> list[R | _Failed]:
    """``call(items)``, or, when it raises (``failed``: it did already), its result per item: the
    batch is split in halves until the failing items are alone.  ``InputError`` on one item is
    that item's reject; any other exception on one item is tried once more, then kept as a
    :class:`_Failed` with the exception (whether that is the record's fault: :func:`_blame`)."""
    if failed is None:
        try:
            return list(call(items))
        except Exception as exc:
            failed = exc
    if len(items) > 1:
        mid = len(items) // 2
        return [*_each(call, items[:mid]), *_each(call, items[mid:])]
    if isinstance(failed, InputError):
        return [_Failed(f"the model refused the input: {failed}")]
    try:
        out: list[R | _Failed] = list(call(items))
    except InputError as again:
        return [_Failed(f"the model refused the input: {again}")]
    except Exception as again:
        return [_Failed(f"the model failed on this record: {type(again).__name__}: {again}", again)]
    log.warning("a record failed once (%s), then passed", type(failed).__name__)
    return out


def _blame(outcomes: Sequence[object]) -> None:
    """Failures count as the records' own only if the model worked on some other record here;
    else the model (or the machine) is at fault: raise, and the chunk fails (retried, then the job)."""
    failed = [o for o in outcomes if isinstance(o, _Failed) and o.exc is not None]
    if failed and all(isinstance(o, _Failed) for o in outcomes):
        exc = failed[0].exc
        assert exc is not None
        raise exc


def _softmax(logits: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: npt.NDArray[np.float32] = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


def _tokenize(model: BatchModel, texts: list[str], task: ChunkTask) -> list[Sized | _Failed]:
    """Per text: its tokens, or why the model could not take that text (the others still run)."""
    if not texts:
        return []
    out = _each(lambda batch: model.tokenize(batch, truncate=task.truncate), texts)
    _blame(out)
    return out


def _text_rows(model: BatchModel, tokens: list[Any]) -> list[dict[str, Any]]:
    vectors = model.embed_tokens(tokens)
    labels = model.manifest.labels
    if model.manifest.task == "text-classification" and labels:
        scores = _softmax(vectors)
        return [
            {"label": labels[int(np.argmax(s))], "scores": {lab: float(p) for lab, p in zip(labels, s, strict=True)}}
            for s in scores
        ]
    return [{"embedding": np.asarray(v, dtype=np.float32).tolist()} for v in vectors]


def _tensor_rows(model: BatchModel, examples: list[dict[str, npt.NDArray[Any]]]) -> list[dict[str, Any]]:
    stacked = {name: np.stack([e[name] for e in examples]) for name in examples[0]}
    outputs = model.infer(stacked)
    labels = model.manifest.labels
    rows: list[dict[str, Any]] = []
    for i in range(len(examples)):
        row: dict[str, Any] = {"outputs": {k: v[i].tolist() for k, v in outputs.items()}}
        if labels and model.manifest.task == "image-classification":
            first = next(iter(outputs.values()))[i]
            probs = _softmax(np.asarray(first).reshape(-1))
            row["label"] = labels[int(np.argmax(probs))]
            row["scores"] = {lab: float(p) for lab, p in zip(labels, probs, strict=True)}
        rows.append(row)
    return rows


def streams_of(model: BatchModel) -> int:
    """Sessions of ``model`` that run side by side (``LoadedModel.streams``; 1 for a model without)."""
    streams = getattr(model, "streams", 1)
    return streams if isinstance(streams, int) and streams > 1 else 1


def _guarded(compute: Callable[[T], R]) -> Callable[[T], R | Exception]:
    def call(batch: T) -> R | Exception:
        try:
            return compute(batch)
        except Exception as exc:  # sorted out per record by the caller
            return exc

    return call


def _run_batches(compute: Callable[[T], R], batches: Sequence[T], streams: int) -> Iterator[R]:
    """``compute(batch)`` for every batch, results in order: one after another, or with ``streams``
    > 1 on that many threads, so that a model opened as streams (:mod:`runtime.streams`) runs
    that many batches at once, each on its own session (2 single-thread OpenVINO bf16 sessions
    ran length-sorted batches of 32 ~10 % faster than one two-thread session on 2 AMX cores,
    2026-12-04).  An exception is raised in order, once the batches before it are done."""
    if streams <= 1 or len(batches) <= 1:
        yield from map(compute, batches)
        return
    with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="batch-stream") as pool:
        yield from pool.map(compute, batches)


def run_chunk(task: ChunkTask, model: BatchModel, on_step: Callable[[str], None] | None = None) -> ChunkOutcome:
    """Do one chunk from scratch and rename its files into place.

    ``on_step`` (tests, progress) is called after each durable step: ``computed``,
    ``rejects-written``, ``part-written``.
    """
    step = on_step or (lambda _name: None)
    out_dir = Path(task.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    part = part_name(task.plan.idx, task.format)
    rejects_file = rejects_name(task.plan.idx)
    for name in (part, rejects_file):
        remove_temp_files(out_dir, name)
    records = list(read_chunk(Path(task.input_path), task.format, task.plan))
    text_mode = model.manifest.task in TEXT_TASKS
    results: dict[int, dict[str, Any]] = {}
    rejects: dict[int, dict[str, Any]] = {}
    valid: list[tuple[RawRecord, Any]] = []
    for record in records:
        if record.obj is None:
            rejects[record.index] = _reject(record, record.error or "unreadable record")
            continue
        try:
            value = parse_record(
                record.obj, text_field=task.text_field if text_mode else None, inputs=model.manifest.inputs
            )
        except RecordError as exc:
            rejects[record.index] = _reject(record, str(exc))
            continue
        valid.append((record, value))

    groups: dict[Any, list[tuple[RawRecord, Any]]] = {}
    if text_mode:  # tokenized once; similar token counts batch together (less padding), as in the server
        tokenized = _tokenize(model, [value for _, value in valid], task)
        texts: list[tuple[RawRecord, Any]] = []
        for (record, _), tokens in zip(valid, tokenized, strict=True):
            if isinstance(tokens, _Failed):
                rejects[record.index] = _reject(record, tokens.reason)
            else:
                texts.append((record, tokens))
        groups["text"] = sorted(texts, key=lambda m: len(m[1]))
    else:
        for record, value in valid:
            groups.setdefault(tuple((k, v.shape) for k, v in value.items()), []).append((record, value))
    batches = [
        members[start : start + task.batch_size]
        for members in groups.values()
        for start in range(0, len(members), task.batch_size)
    ]

    def compute(values: list[Any]) -> list[dict[str, Any]]:
        rows = _text_rows(model, values) if text_mode else _tensor_rows(model, values)
        if len(rows) != len(values):
            raise BatchError(f"the model returned {len(rows)} results for {len(values)} inputs")
        return rows

    def compute_batch(batch: list[tuple[RawRecord, Any]]) -> list[dict[str, Any]]:
        return compute([v for _, v in batch])

    # Batches run as usual (side by side on streams); a batch that raises is split to find the
    # record(s) at fault, which go to the rejects.  While the model has worked on no record of the
    # chunk yet, a failed batch is split at once; two that fail on every record mean the model (or
    # the machine) is at fault, not the records: the chunk fails without running the rest.
    per_batch: dict[int, list[dict[str, Any] | _Failed]] = {}
    failed: dict[int, Exception] = {}
    worked, hopeless = False, 0
    for i, rows in enumerate(_run_batches(_guarded(compute_batch), batches, streams_of(model))):
        if not isinstance(rows, Exception):
            per_batch[i], worked = list(rows), True
            continue
        if worked:
            failed[i] = rows
            continue
        per_batch[i] = _each(compute, [v for _, v in batches[i]], rows)
        worked = any(not isinstance(row, _Failed) for row in per_batch[i])
        if not worked and any(isinstance(row, _Failed) and row.exc is not None for row in per_batch[i]):
            hopeless += 1
            if hopeless == 2 or i == len(batches) - 1:
                _blame([row for j in sorted(per_batch) for row in per_batch[j]])
    for i, error in failed.items():
        per_batch[i] = _each(compute, [v for _, v in batches[i]], error)
    for i, batch in enumerate(batches):
        for (record, _), row in zip(batch, per_batch[i], strict=True):
            if isinstance(row, _Failed):
                rejects[record.index] = _reject(record, row.reason)
            else:
                results[record.index] = {"id": record_id(record), **row}

    ordered_rejects = [rejects[i] for i in sorted(rejects)]
    ordered_results = [results[i] for i in sorted(results)]
    step("computed")
    atomic_write(out_dir / rejects_file, encode_results(ordered_rejects, "jsonl"))
    step("rejects-written")
    atomic_write(out_dir / part, encode_results(ordered_results, task.format))
    step("part-written")
    return ChunkOutcome(
        job_id=task.job_id,
        idx=task.plan.idx,
        part=part,
        ok=len(ordered_results),
        rejected=len(ordered_rejects),
        digests=_digests(records),
    )


def verify_chunk(task: ChunkTask) -> ChunkOutcome | None:
    """The outcome of a chunk whose files were renamed into place before a crash, or None.

    The files count only when results + rejects hold exactly the chunk's records.
    """
    out_dir = Path(task.out_dir)
    part = part_name(task.plan.idx, task.format)
    part_path, rejects_path = out_dir / part, out_dir / rejects_name(task.plan.idx)
    if not part_path.is_file() or not rejects_path.is_file():
        return None
    try:
        ok = len(read_results(part_path))
        rejected = [json.loads(line) for line in rejects_path.read_text("utf-8").splitlines() if line]
    except Exception as exc:  # a damaged file is recomputed
        log.warning("chunk %s/%s: existing files unreadable (%s); recomputing", task.job_id, task.plan.idx, exc)
        return None
    if ok + len(rejected) != task.plan.rec_count:
        log.warning("chunk %s/%s: existing files hold the wrong count; recomputing", task.job_id, task.plan.idx)
        return None
    records = list(read_chunk(Path(task.input_path), task.format, task.plan))
    return ChunkOutcome(
        job_id=task.job_id, idx=task.plan.idx, part=part, ok=ok, rejected=len(rejected), digests=_digests(records)
    )


def check_model_fits(model: BatchModel, fmt: str) -> None:
    """Refuse combinations no record could pass (CSV has no tensors)."""
    if model.manifest.task not in TEXT_TASKS and fmt == "csv":
        raise BatchError(
            f"model {model.name!r} takes tensors, and CSV carries only text; submit JSONL or Parquet with "
            f"fields {[s.name for s in model.manifest.inputs]}"
        )
