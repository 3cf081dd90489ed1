"""Read input files as records, split them into deterministic chunks, validate records.

A *record* is one line of JSONL, one row of CSV (after the header), or one row of
Parquet.  Every record counts: a blank line or an unparsable row is a record
that goes to the rejects with its reason, so that "every input record appears
exactly once in the outputs or the rejects" can be checked by counting.

Chunks are planned once, when a job is accepted: ``chunk_size`` records each,
with the byte range of each chunk for text formats, so a worker reads only its
chunk.  The plan depends only on the file and ``chunk_size``.
"""

from __future__ import annotations

import csv
import io
import json
import mmap
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from runtime.errors import BatchError
from runtime.manifest import TensorSpec

__all__ = [
    "MAX_RECORD_BYTES",
    "ChunkPlan",
    "InputChangedError",
    "RawRecord",
    "RecordError",
    "csv_header",
    "parse_record",
    "plan_chunks",
    "read_chunk",
    "record_id",
]


#: The largest record (a JSONL line, a CSV row, also a CSV field) that is read; a larger one is
#: rejected.  The same bound for every text format, and ``csv.field_size_limit`` (128 KiB by
#: default) is raised to it, so a long document in a CSV cell is treated as it is in JSONL.
MAX_RECORD_BYTES = 64 << 20

_UTF8_BOM = b"\xef\xbb\xbf"


class Buffer(Protocol):
    """``bytes`` or ``mmap``: what record scanning needs."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice, /) -> bytes: ...

    def find(self, sub: bytes, start: int = ..., end: int = ..., /) -> int: ...


class ChunkPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Records ``[rec_start, rec_start + rec_count)``; bytes ``[byte_start, byte_end)`` for JSONL/CSV."""

    idx: int
    rec_start: int
    rec_count: int
    byte_start: int = 0
    byte_end: int = 0


@dataclass(frozen=True)
class RawRecord:
    """One input record: its index in the file, its bytes, and the parsed object (or why not)."""

    index: int
    raw: bytes
    obj: dict[str, Any] | None
    error: str | None = None
    #: the ``id`` of a record that cannot be used all the same: a CSV row short of fields that still
    #: reaches the ``id`` column (its reject then names that id, not its index)
    known_id: str | None = None


class InputChangedError(BatchError):
    """The job's input no longer matches the chunks planned at accept: no attempt or retry of
    the job can help, only submitting the file again as a new job."""


class RecordError(BatchError):
    """A record that cannot be used; the message is the reject reason (the record goes to the
    job's rejects, the job goes on)."""


def _csv_record_end(data: Buffer, pos: int, n: int) -> int:
    """The offset of the newline that ends the CSV record starting at ``pos`` (``n`` at the end of
    ``data``), or -1 when a quoted field does not close (before the end, or within
    :data:`MAX_RECORD_BYTES`).

    Quoting as Python's ``csv`` (and Excel) read it: a ``"`` opens a quoted field only at the
    start of a field; inside one, ``""`` is a quote and a lone ``"`` closes it (what follows up
    to the next comma is plain text); elsewhere a ``"`` is an ordinary character.

    Linear in the record's length: ``find`` jumps from quote to quote, each search starting
    where the last one stopped, and a line's end is searched for once (again only after a quoted
    field that ran past it).  A quote outside a quoted field opens one only right after a comma.
    """
    limit = min(n, pos + MAX_RECORD_BYTES)
    i = pos  # where the scan stands: the start of a field, or plain text after a closing quote
    line_end = -1  # the end of the line holding ``i`` (-1: not searched for since ``i`` moved past it)
    opens = data[pos : pos + 1] == b'"'  # the field at ``i`` starts with a quote
    while True:
        if opens:
            j = i + 1
            while True:
                q = data.find(b'"', j, limit)
                if q < 0:
                    return -1
                if data[q + 1 : q + 2] != b'"':
                    break
                j = q + 2
            i = q + 1  # after the closing quote: plain text up to the next comma
            if line_end < i:
                line_end = -1
        if line_end < 0:
            line_end = data.find(b"\n", i)
            if line_end < 0:
                line_end = n
        q = data.find(b'"', i, line_end)
        while q >= 0 and data[q - 1 : q] != b",":  # a quote inside a plain field: text
            q = data.find(b'"', q + 1, line_end)
        if q < 0:
            return line_end
        i, opens = q, True  # a field that starts with a quote


def _text_records(data: Buffer, pos: int, csv_mode: bool) -> Iterator[tuple[int, int]]:
    """Yield (start, end) byte offsets of the records in ``data[pos:]`` (end excludes the newline).

    JSONL: one record per line.  CSV: a newline inside a quoted field does not end a record
    (:func:`_csv_record_end`); a quoted field that never closes ends its record at the end of
    its line, so one stray quote costs one record, not the rest of the file.
    ``data`` may be ``bytes`` or an ``mmap`` (large files are never read whole).
    """
    n = len(data)
    while pos < n:
        end = _csv_record_end(data, pos, n) if csv_mode else -1
        if end < 0:
            end = data.find(b"\n", pos)
        if end < 0:
            yield pos, n
            return
        yield pos, end
        pos = end + 1


def _raise_csv_field_limit() -> None:
    if csv.field_size_limit() < MAX_RECORD_BYTES:
        csv.field_size_limit(MAX_RECORD_BYTES)


def csv_header(path: Path) -> tuple[list[str], int]:
    """The header row's fields and the byte offset where the records start."""
    _raise_csv_field_limit()
    size = 1 << 16
    with path.open("rb") as f:
        while True:
            f.seek(0)
            data = f.read(size)
            complete = len(data) < size
            for start, end in _text_records(data, 0, csv_mode=True):
                if end == len(data) and not complete:
                    break  # the header may go on past what was read
                line = data[start:end].rstrip(b"\r").decode("utf-8-sig", errors="replace")
                try:
                    fields = next(csv.reader([line]), [])
                except csv.Error as exc:
                    raise BatchError(
                        f"the header row of {path.name} is not valid CSV ({exc}); check the file or its --format"
                    ) from exc
                return fields, min(end + 1, len(data))
            if complete:
                return [], 0
            size *= 4


def plan_chunks(path: Path, fmt: str, chunk_size: int) -> list[ChunkPlan]:
    """Split ``path`` into chunks of ``chunk_size`` records (the last may be shorter)."""
    if chunk_size < 1:
        raise BatchError(f"chunk size {chunk_size} is not valid; use 1 or more records per chunk")
    plans: list[ChunkPlan] = []
    if fmt == "parquet":
        total = _parquet_file(path).metadata.num_rows
        for idx, start in enumerate(range(0, total, chunk_size)):
            plans.append(ChunkPlan(idx=idx, rec_start=start, rec_count=min(chunk_size, total - start)))
        return plans
    offset = csv_header(path)[1] if fmt == "csv" else 0
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return plans
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            first_start, count, last_end, total = 0, 0, 0, 0
            for start, end in _text_records(data, offset, csv_mode=fmt == "csv"):
                if count == 0:
                    first_start = start
                count += 1
                last_end = end
                if count == chunk_size:
                    plans.append(_plan(len(plans), total, count, first_start, last_end, size))
                    total += count
                    count = 0
            if count:
                plans.append(_plan(len(plans), total, count, first_start, last_end, size))
    return plans


def _plan(idx: int, rec_start: int, count: int, byte_start: int, last_end: int, size: int) -> ChunkPlan:
    return ChunkPlan(
        idx=idx, rec_start=rec_start, rec_count=count, byte_start=byte_start, byte_end=min(last_end + 1, size)
    )


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BatchError("Parquet needs pyarrow; install the batch extra: pip install 'inferbox[batch]'") from exc
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise BatchError(f"{path} is not a readable Parquet file ({exc}); check the file or its --format") from exc


def read_chunk(path: Path, fmt: str, plan: ChunkPlan) -> Iterator[RawRecord]:
    """The records of one chunk, in file order."""
    if not path.is_file() and path.parent.parent.is_dir():
        # its chunks failed with FileNotFoundError three times, 25 s of backoff apart, and then the
        # job said `batch retry`, which failed again the same way: only a new submission can help.
        # (A Dask worker without the spool at all, cur/ missing, is not told so: a mount it lacks
        # fails the chunk's attempt there, and another worker may run it.)
        raise InputChangedError(
            f"the job's input {path} is gone (removed after the job was accepted); submit the file again as a new job"
        )
    if fmt == "parquet":
        yield from _read_parquet(path, plan)
        return
    with path.open("rb") as f:
        f.seek(plan.byte_start)
        data = f.read(plan.byte_end - plan.byte_start)
    if fmt == "jsonl" and plan.byte_start == 0 and data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]  # a UTF-8 BOM (Windows tools write one) is not part of record 0
    header: list[str] = []
    if fmt == "csv":
        header, _ = csv_header(path)
    bounds = list(_text_records(data, 0, csv_mode=fmt == "csv"))
    if len(bounds) != plan.rec_count:
        raise InputChangedError(
            f"chunk {plan.idx} of {path} holds {len(bounds)} records, the plan says {plan.rec_count}: "
            "the input file changed after it was accepted; submit it again as a new job"
        )
    for i, (start, end) in enumerate(bounds):
        raw = data[start:end].rstrip(b"\r")
        index = plan.rec_start + i
        if not raw.strip():
            yield RawRecord(index, raw, None, "empty line")
            continue
        if len(raw) > MAX_RECORD_BYTES:
            reason = f"the record is {len(raw)} bytes, over the limit of {MAX_RECORD_BYTES} bytes per record"
            yield RawRecord(index, raw, None, reason)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRecord(index, raw, None, f"not valid UTF-8 at byte {exc.start}")
            continue
        if fmt == "jsonl":
            yield _jsonl_record(index, raw, text)
        else:
            yield _csv_record(index, raw, text, header)


def _jsonl_record(index: int, raw: bytes, text: str) -> RawRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # some of json's messages end in "at" ("Invalid control character at"): one "at" here
        return RawRecord(index, raw, None, f"not valid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}")
    except RecursionError:
        return RawRecord(index, raw, None, "not valid JSON: nested too deeply")
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        if "digits" in str(exc):
            return RawRecord(index, raw, None, f"not valid JSON: a number of more than {_max_digits()} digits")
        return RawRecord(index, raw, None, f"not valid JSON: {_short(str(exc))}")
    if not isinstance(obj, dict):
        return RawRecord(index, raw, None, f"a record must be a JSON object, got {type(obj).__name__}")
    return RawRecord(index, raw, obj)


def _max_digits() -> int:
    return sys.get_int_max_str_digits()


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _csv_record(index: int, raw: bytes, text: str, header: list[str]) -> RawRecord:
    if _csv_record_end(raw, 0, len(raw)) < 0:
        return RawRecord(index, raw, None, 'not valid CSV: a quoted field is not closed (a stray " at a field start?)')
    _raise_csv_field_limit()
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        return RawRecord(index, raw, None, f"not valid CSV: {exc}")
    if len(rows) != 1:
        return RawRecord(index, raw, None, "not valid CSV: unbalanced quotes")
    row = rows[0]
    if len(row) != len(header):
        reason = f"row has {len(row)} fields, the header has {len(header)}"
        return RawRecord(index, raw, None, reason, known_id=_short_row_id(row, header))
    return RawRecord(index, raw, dict(zip(header, row, strict=True)))


def _short_row_id(row: list[str], header: list[str]) -> str | None:
    """The ``id`` column of a row with fewer fields than the header, when the row reaches it (the
    fields left out are taken to be the last ones, as a cut row has); None otherwise.  A row with
    more fields has a comma too many somewhere, so no column of it is known."""
    if len(row) >= len(header) or "id" not in header:
        return None
    column = len(header) - 1 - header[::-1].index("id")  # the last one, as a whole row's dict keeps
    return row[column] if column < len(row) else None


def _read_parquet(path: Path, plan: ChunkPlan) -> Iterator[RawRecord]:
    pf = _parquet_file(path)
    meta = pf.metadata
    groups: list[int] = []
    first_row = 0
    row = 0
    end = plan.rec_start + plan.rec_count
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row + n > plan.rec_start and row < end:
            if not groups:
                first_row = row
            groups.append(g)
        row += n
    table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    rows = table.slice(plan.rec_start - first_row, plan.rec_count).to_pylist()
    for i, obj in enumerate(rows):
        raw = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode("utf-8")
        yield RawRecord(plan.rec_start + i, raw, obj)


def record_id(record: RawRecord) -> str | int:
    """The record's ``id`` field when it has a usable one (also a short CSV row's, see
    :attr:`RawRecord.known_id`), else its index in the file.

    A string id must be writable as UTF-8 (JSON may carry a lone surrogate such as ``"\\ud800"``).
    """
    value = record.obj.get("id") if record.obj is not None else record.known_id
    if isinstance(value, str) and value and _utf8_ok(value):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return record.index


def _text(obj: dict[str, Any], name: str, kind: str) -> str:
    if name not in obj:
        raise RecordError(f"missing {kind} {name!r}")
    value = obj[name]
    if value is None:
        raise RecordError(f"{kind} {name!r} is null")
    if not isinstance(value, str):
        raise RecordError(f"{kind} {name!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(
            f"{kind} {name!r} is not valid Unicode text: it holds a lone surrogate "
            f"({value[exc.start]!r}) at character {exc.start}"
        ) from exc
    return value


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_record(
    obj: dict[str, Any], *, text_field: str | None, inputs: list[TensorSpec], pair_field: str = ""
) -> str | tuple[str, str] | dict[str, npt.NDArray[Any]]:
    """The model input of one record: its text, its (text, pair) with ``pair_field``, or its
    tensors (one example, no batch axis).

    Raises :class:`RecordError` with the reject reason.
    """
    if text_field is not None:
        text = _text(obj, text_field, "text field")
        return (text, _text(obj, pair_field, "pair field")) if pair_field else text
    tensors: dict[str, npt.NDArray[Any]] = {}
    for spec in inputs:
        if spec.name not in obj:
            raise RecordError(f"missing tensor field {spec.name!r}")
        try:
            array = np.asarray(obj[spec.name], dtype=np.dtype(spec.dtype))
        except (TypeError, ValueError, ArithmeticError, RecursionError) as exc:  # OverflowError: 2**1100
            raise RecordError(f"tensor field {spec.name!r} is not a {spec.dtype} array: {_short(str(exc))}") from exc
        want = spec.shape[1:]
        if array.ndim != len(want) or any(w not in (-1, g) for w, g in zip(want, array.shape, strict=True)):
            shown = ["?" if w == -1 else w for w in want]
            raise RecordError(f"tensor field {spec.name!r} has shape {list(array.shape)}, the model expects {shown}")
        tensors[spec.name] = array
    return tensors
