"""The per-chunk unit of work: read a chunk, run the model, write its files.

:func:`run_chunk` is a function of (input file, chunk plan, model) only: the
local worker and Dask workers run the same code, and for a model whose answers
do not change from one call to the next, running it twice gives identical
files.  A model that fails only sometimes can make two runs differ: a record
that failed alone twice in one run (rejected) may pass in the other, and a run
may fail where the other completes (see :class:`_Judge`).  It writes
``rejects-NNNNN.jsonl`` first and the result part ``part-NNNNN.<fmt>`` last, so
"the part file exists" means the chunk's files are complete
(:func:`verify_chunk` checks that and recounts).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

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
from runtime.scores import sigmoid, softmax

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
    #: each record's second text: (text, pair) pairs scored by a text classifier ("" = single texts)
    pair_field: str = ""
    model: str
    version: int | None  # the job's pinned version (None only for a job recorded before pinning)
    out_dir: str
    plan: ChunkPlan
    batch_size: int = 32
    truncate: bool = True
    model_sha256: str = ""  # the pinned package's sha256: a chunk refuses to run on another package
    #: where the coordinator opened that package (its audit events name them): a Dask worker that
    #: opens it otherwise (other hardware, a fallback) refuses the chunk ("" = not checked)
    backend: str = ""
    variant: str = ""
    #: a done chunk of the same job the model gave results on: when the model fails on every record
    #: of this chunk, one of that chunk's records tells whether the model still works (:class:`_Canary`)
    canary: ChunkPlan | None = None


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
    out: dict[str, Any] = {
        "index": record.index,
        "id": record_id(record),
        "reason": reason.encode("utf-8", errors="replace").decode("utf-8"),  # an exception may quote a bad text
    }
    try:
        out["record"] = record.raw.decode("utf-8")
    except UnicodeDecodeError:  # shown readable, and kept whole: the fixed record must be the same bytes
        out["record"] = record.raw.decode("utf-8", errors="replace")
        out["record_base64"] = base64.b64encode(record.raw).decode("ascii")
    return out


@dataclass(frozen=True)
class _Failed:
    """One record the model could not take: ``reason`` for the rejects; ``exc`` when the model
    raised something other than :class:`InputError` (that record, or the model itself, is at fault:
    :class:`_Judge` decides)."""

    reason: str
    exc: Exception | None = None


class _Judge(Generic[T, R]):
    """Sorts out the batches of one stage of a chunk (tokenizing, or running the model) that raised.

    A batch that raised is split in halves until the failing items are alone.  ``InputError`` on
    one item is that item's reject.  An item that fails alone twice with another error is only a
    *suspect*: it is rejected ("the model failed on this record") only when the model
    demonstrably works around it, i.e. when a call made after that failure succeeded: a later
    part of the split, or a probe, ``call([good])`` on an item the model took before (one of this
    chunk, else ``canary``: a record of a done chunk of the job).  Otherwise the model (or the
    machine) is at fault and the first error is raised, so that the chunk fails (retried after a
    backoff, then its job fails, and ``inferbox batch retry`` runs it again):

    - a batch raises and the probe fails (a model that broke partway: two calls, no split);
    - two whole batches in a row fail on every item while nothing (no item of the chunk, no
      canary) shows that the model works, and no later batch of the chunk works either (the
      batches failing meanwhile wait, unsplit: :meth:`defers`);
    - at the end of the stage, a suspect that no later call worked around, and the probe fails
      or there is nothing to probe with (every record of a chunk failing, with no done chunk
      of the job to compare with).

    The calls made here (splits and probes) run one after another in this thread, in order; the
    batches' own calls (possibly on several streams) only provide known-good items.
    """

    def __init__(self, call: Callable[[list[T]], Sequence[R]], canary: Callable[[], bool | None]) -> None:
        self._call = call
        self._canary = canary
        self._good: list[T] = []  # an item the model took
        self._seq = 0  # calls made here, in order
        self._last_ok = 0  # the number of the last of them that succeeded
        self._suspects: list[tuple[int, _Failed]] = []  # (the call it failed at, the failure)
        self._hopeless = 0  # whole batches in a row that failed on every item, with nothing to probe

    def settle(self, items: list[T], result: Sequence[R] | Exception) -> list[R | _Failed]:
        """The per-item outcome of a batch, given what its call returned or raised."""
        if not isinstance(result, Exception):
            if items and not self._good:
                self._good.append(items[0])
            return list(result)
        verdict = None if isinstance(result, InputError) else self._works()
        if verdict is False:
            raise result
        out = self._split(items, result)
        if any(isinstance(o, _Failed) and o.exc is not None for o in out) and all(isinstance(o, _Failed) for o in out):
            if verdict is None and not self._good and isinstance(result, InputError):
                # the batch was refused, but its records alone raised: ask the canary now
                verdict = self._works()
                if verdict is False:
                    raise self._first_suspect()
            if verdict is None and not self._good:
                self._hopeless += 1
        else:
            self._hopeless = 0
        return out

    def defers(self) -> bool:
        """Whether a batch that raised should wait instead of being split now: two whole batches in
        a row failed on every item and nothing shows the model works.  A broken model then costs
        one call per batch, not a split; a later batch that works (records sorted by length put
        the short bad ones first) lets the waiting ones be split and judged after all."""
        return self._hopeless >= 2 and not self._good

    def give_up(self) -> None:
        """Raise (the chunk fails) when batches waited (:meth:`defers`) and none worked since."""
        if not self._good:
            raise self._first_suspect()

    def finish(self) -> None:
        """Raise unless every suspect was worked around (a later call, or a probe now, succeeded)."""
        if any(seq > self._last_ok for seq, _ in self._suspects) and self._works() is not True:
            raise self._first_suspect()

    def _first_suspect(self) -> Exception:
        exc = next(f.exc for _, f in self._suspects if f.exc is not None)
        assert exc is not None
        return exc

    def _try(self, items: list[T]) -> list[R | _Failed]:
        self._seq += 1
        seq = self._seq
        try:
            out: list[R | _Failed] = list(self._call(items))
        except Exception as exc:
            return self._split(items, exc)
        self._passed(seq, items)
        return out

    def _passed(self, seq: int, items: list[T]) -> None:
        self._last_ok = seq
        if items and not self._good:
            self._good.append(items[0])

    def _split(self, items: list[T], failed: Exception) -> list[R | _Failed]:
        if len(items) > 1:
            mid = len(items) // 2
            return [*self._try(items[:mid]), *self._try(items[mid:])]
        if isinstance(failed, InputError):
            return [_Failed(f"the model refused the input: {failed}")]
        self._seq += 1
        seq = self._seq
        try:
            out: list[R | _Failed] = list(self._call(items))
        except InputError as again:
            return [_Failed(f"the model refused the input: {again}")]
        except Exception as again:
            failure = _Failed(f"the model failed on this record: {type(again).__name__}: {again}", again)
            self._suspects.append((seq, failure))
            return [failure]
        log.warning("a record failed once (%s), then passed", type(failed).__name__)
        self._passed(seq, items)
        return out

    def _works(self) -> bool | None:
        """Whether the model takes a known-good item now; None when there is none."""
        self._seq += 1
        seq = self._seq
        if self._good:
            try:
                self._call(self._good[:1])
            except Exception as exc:
                log.warning("the model failed on an item it took before: %s: %s", type(exc).__name__, exc)
                return False
        else:
            verdict = self._canary()
            if verdict is not True:
                return verdict
        self._last_ok = seq
        return True


class _Canary:
    """A record of a done chunk of the same job (``task.canary``) that the model gave a result on:
    read only when nothing in this chunk shows yet whether the model works.  The records rejected
    there (``rejects-NNNNN.jsonl``) are skipped."""

    def __init__(self, task: ChunkTask, model: BatchModel, text_mode: bool) -> None:
        self.task, self.model, self.text_mode = task, model, text_mode
        self._read = False
        self._value: Any = None

    def value(self) -> Any:
        if not self._read:
            self._read = True
            self._value = self._first_good()
        return self._value

    def _first_good(self) -> Any:
        task, plan = self.task, self.task.canary
        if plan is None:
            return None
        try:
            rejects = Path(task.out_dir) / rejects_name(plan.idx)
            lines = rejects.read_text("utf-8").splitlines() if rejects.is_file() else []
            rejected = {json.loads(line)["index"] for line in lines if line}
            for record in read_chunk(Path(task.input_path), task.format, plan):
                if record.obj is None or record.index in rejected:
                    continue
                text_field = task.text_field if self.text_mode else None
                try:
                    return parse_record(
                        record.obj, text_field=text_field, inputs=self.model.manifest.inputs, pair_field=task.pair_field
                    )
                except RecordError:
                    continue
        except Exception as exc:  # then there is nothing to compare with
            log.warning("chunk %s/%s: done chunk %s unreadable (%s)", task.job_id, task.plan.idx, plan.idx, exc)
        return None

    def tokenizes(self) -> bool | None:
        value = self.value()
        if value is None:
            return None
        try:
            _tokenizer(self.model, self.task)([value])
        except Exception:
            return False
        return True

    def computes(self, compute: Callable[[list[Any]], object]) -> bool | None:
        value = self.value()
        if value is None:
            return None
        try:
            if self.text_mode:
                value = _tokenizer(self.model, self.task)([value])[0]
            compute([value])
        except Exception:
            return False
        return True


def _tokenizer(model: BatchModel, task: ChunkTask) -> Callable[[list[Any]], Sequence[Sized]]:
    """Texts -> tokens; for a pair job, (text, pair) -> the pair's tokens, as ``/v1/rerank`` forms them
    (a run of records with the same first text, one query and its documents, tokenizes it once)."""
    if not task.pair_field:

        def texts(batch: list[str]) -> Sequence[Sized]:
            try:
                return model.tokenize(batch, truncate=task.truncate)
            except InputError as exc:
                raise InputError(_in_job_terms(str(exc), task)) from None

        return texts

    def pairs(batch: list[tuple[str, str]]) -> Sequence[Sized]:
        out: list[Sized] = []
        for first, run in itertools.groupby(batch, key=lambda pair: pair[0]):
            try:
                out.extend(model.tokenize_pairs(first, [second for _, second in run], truncate=task.truncate))
            except InputError as exc:
                raise InputError(_in_job_terms(str(exc), task)) from None
        return out

    return pairs


def _in_job_terms(message: str, task: ChunkTask) -> str:
    """A tokenizer's refusal in the API's terms (``input[i]``, ``documents[i]``, the query: places in
    a request) said in the job's: its fields, and its setting ``truncate``."""
    text_field = repr(task.text_field)
    if task.pair_field:
        fields = f"{text_field} and {task.pair_field!r}"
        message = re.sub(r"documents\[\d+\] with the query", f"the pair of {fields}", message)
        message = re.sub(r"documents\[\d+\]", repr(task.pair_field), message)
        message = re.sub(r"^query:", text_field, message)
        message = message.replace("shorten the query or the document", f"shorten {fields}")
    else:
        message = re.sub(r"input\[\d+\]", text_field, message)
    return message.replace("enable truncation", "set truncate = true")


def _tokenize(model: BatchModel, texts: list[Any], task: ChunkTask, canary: _Canary) -> list[Sized | _Failed]:
    """Per text (or pair): its tokens, or why the model could not take it (the others still run)."""
    if not texts:
        return []
    tokenize = _tokenizer(model, task)
    judge: _Judge[Any, Sized] = _Judge(tokenize, canary.tokenizes)
    tokens = judge.settle(texts, _guarded(tokenize)(texts))
    judge.finish()
    return tokens


def _text_rows(model: BatchModel, tokens: list[Any], pairs: bool = False) -> list[dict[str, Any]]:
    vectors = model.embed_tokens(tokens)
    labels = model.manifest.labels
    if model.manifest.task == "text-classification" and not np.isfinite(vectors).all():
        # a NaN score would be written as null (or "nan" in CSV): the batch is split to find the
        # record(s), rejected as the model failing on them, as /v1/rerank answers 500
        raise BatchError("the model gave a score that is not a number (NaN or infinite)")
    if pairs and np.asarray(vectors).shape[-1] == 1:
        # a cross-encoder's pairs: the sigmoid of its one logit, named as /v1/rerank names it
        return [{"relevance_score": float(p)} for p in sigmoid(np.asarray(vectors).reshape(-1))]
    if model.manifest.task == "text-classification" and labels and np.asarray(vectors).shape[-1] == 1:
        # one logit (a binary head, a cross-encoder): its sigmoid, as the export's gate reads it;
        # a softmax over one value is always 1.0. The label is given when the score is above 0.5.
        probs = sigmoid(np.asarray(vectors).reshape(-1))
        return [{"label": labels[0] if p > 0.5 else None, "scores": {labels[0]: float(p)}} for p in probs]
    if model.manifest.task == "text-classification" and labels:
        scores = softmax(vectors)
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
            probs = softmax(np.asarray(first).reshape(-1))
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
                record.obj,
                text_field=task.text_field if text_mode else None,
                inputs=model.manifest.inputs,
                pair_field=task.pair_field,
            )
        except RecordError as exc:
            rejects[record.index] = _reject(record, str(exc))
            continue
        valid.append((record, value))

    canary = _Canary(task, model, text_mode)
    groups: dict[Any, list[tuple[RawRecord, Any]]] = {}
    if text_mode:  # tokenized once; similar token counts batch together (less padding), as in the server
        tokenized = _tokenize(model, [value for _, value in valid], task, canary)
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
        rows = _text_rows(model, values, bool(task.pair_field)) if text_mode else _tensor_rows(model, values)
        if len(rows) != len(values):
            raise BatchError(f"the model returned {len(rows)} results for {len(values)} inputs")
        return rows

    def compute_batch(batch: list[tuple[RawRecord, Any]]) -> list[dict[str, Any]]:
        return compute([v for _, v in batch])

    # Batches run as usual (side by side on streams); a batch that raises is split to find the
    # record(s) at fault, which go to the rejects only if the model demonstrably works around
    # them; else the model (or the machine) is at fault and the chunk fails (:class:`_Judge`).
    judge: _Judge[Any, dict[str, Any]] = _Judge(compute, lambda: canary.computes(compute))
    per_batch: dict[int, list[dict[str, Any] | _Failed]] = {}
    waiting: dict[int, Exception] = {}
    for i, rows in enumerate(_run_batches(_guarded(compute_batch), batches, streams_of(model))):
        if isinstance(rows, Exception) and judge.defers():
            waiting[i] = rows
            continue
        per_batch[i] = judge.settle([v for _, v in batches[i]], rows)
    if waiting:
        judge.give_up()
        for i, raised in waiting.items():
            per_batch[i] = judge.settle([v for _, v in batches[i]], raised)
    judge.finish()
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


def check_model_fits(model: BatchModel, fmt: str, pair_field: str = "") -> None:
    """Refuse combinations no record could pass (CSV has no tensors; pairs need a text classifier)."""
    if pair_field and model.manifest.task != "text-classification":
        raise BatchError(
            f"the job scores pairs (--pair-field {pair_field}), which needs a text classifier such as a "
            f"cross-encoder; model {model.name!r} is {model.manifest.task}: submit it without --pair-field"
        )
    if model.manifest.task not in TEXT_TASKS and fmt == "csv":
        raise BatchError(
            f"model {model.name!r} takes tensors, and CSV carries only text; submit JSONL or Parquet with "
            f"fields {[s.name for s in model.manifest.inputs]}"
        )
