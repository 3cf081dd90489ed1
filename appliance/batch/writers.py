"""Write chunk results and rejects atomically, in the input's format.

Every file in ``outbox/<job>/`` appears whole or not at all: it is written to a
hidden temp file (``.tmp-<name>-<pid>-<random>``) in the same folder, flushed,
fsynced, renamed to its deterministic final name, and the folder is fsynced.
Final names depend only on the job and the chunk index, so writing a chunk
twice (a worker died after the rename, before recording it) replaces a file
with an identical one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import msgspec

from runtime.durable import fsync_dir

__all__ = [
    "TEMP_PREFIX",
    "atomic_write",
    "encode_results",
    "part_name",
    "read_results",
    "rejects_name",
    "remove_temp_files",
]

TEMP_PREFIX = ".tmp-"


def part_name(idx: int, fmt: str) -> str:
    return f"part-{idx:05d}.{fmt}"


def rejects_name(idx: int) -> str:
    return f"rejects-{idx:05d}.jsonl"


def atomic_write(final: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``final`` through a fsynced temp file and a rename."""
    tmp = final.parent / f"{TEMP_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


def remove_temp_files(folder: Path, name: str | None = None) -> int:
    """Remove temp files left by dead writers (of one final ``name``, or all); return how many."""
    if not folder.is_dir():
        return 0
    prefix = TEMP_PREFIX + (f"{name}-" if name else "")
    removed = 0
    for p in folder.iterdir():
        if p.name.startswith(prefix):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
    return removed


def _json_cell(value: Any) -> Any:
    return value if isinstance(value, str | int | float) or value is None else json.dumps(value)


def encode_results(rows: list[dict[str, Any]], fmt: str) -> Callable[[IO[bytes]], None]:
    """A writer of ``rows`` (``id`` plus result fields) in ``fmt``."""
    if fmt == "jsonl":

        def write_jsonl(f: IO[bytes]) -> None:
            for row in rows:
                f.write(msgspec.json.encode(row) + b"\n")

        return write_jsonl
    if fmt == "csv":

        def write_csv(f: IO[bytes]) -> None:
            columns = _columns(rows)
            text = io.StringIO(newline="")
            w = csv.writer(text, lineterminator="\n")
            w.writerow(columns)
            for row in rows:
                w.writerow([_json_cell(row.get(c)) for c in columns])
            f.write(text.getvalue().encode("utf-8"))

        return write_csv
    if fmt == "parquet":

        def write_parquet(f: IO[bytes]) -> None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(_arrow_table(pa, rows), f)

        return write_parquet
    raise ValueError(f"unknown output format {fmt!r}")


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    columns = ["id"]
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns


def _arrow_table(pa: Any, rows: list[dict[str, Any]]) -> Any:
    columns = _columns(rows) if rows else ["id"]
    fields = []
    for c in columns:
        if c == "id":
            fields.append(pa.field("id", pa.string()))
        elif c == "embedding":
            fields.append(pa.field(c, pa.list_(pa.float32())))
        elif c == "scores":
            fields.append(pa.field(c, pa.map_(pa.string(), pa.float32())))
        elif c == "label":
            fields.append(pa.field(c, pa.string()))
        elif c == "relevance_score":
            fields.append(pa.field(c, pa.float64()))
        else:
            fields.append(pa.field(c, pa.string()))
    data: dict[str, list[Any]] = {c: [] for c in columns}
    for row in rows:
        for c in columns:
            v = row.get(c)
            if c == "id":
                v = str(v)
            elif c == "scores":
                v = list((v or {}).items())
            elif c not in ("embedding", "label", "relevance_score"):
                v = json.dumps(v)
            data[c].append(v)
    return pa.table(data, schema=pa.schema(fields))


def read_results(path: Path) -> list[dict[str, Any]]:
    """Read a part file back (tests, verification): rows as dicts, JSON cells decoded."""
    fmt = path.suffix.lstrip(".")
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]
    if fmt == "csv":
        out: list[dict[str, Any]] = []
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                out.append({k: (v if k in ("id", "label") else json.loads(v)) for k, v in row.items()})
        return out
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    for row in rows:
        if "scores" in row:
            row["scores"] = dict(row["scores"])
        if "outputs" in row:
            row["outputs"] = json.loads(row["outputs"])
    return rows
