"""The spool: maildir-style job submission that is atomic under any crash.

Layout under ``settings.spool``::

    tmp/<job>/      being written by ``submit`` (never read by the worker)
    new/<job>/      complete, waiting for a worker (``inferbox-batch.path`` watches it)
    cur/<job>/      accepted: the job is in the state database
    bad/<job>/      a folder in new/ that cannot be accepted (no readable job.json, a job id
                    that is not its folder's name, ...), or a plain file found in new/ (moved
                    into a folder of its name): set aside, logged, the reason in
                    ``bad/<job>/REASON``

Each job folder holds ``job.json`` (:class:`JobRequest`) and ``input.<format>``.
``submit`` writes both into ``tmp/``, fsyncs them, and renames the folder into
``new/`` in one step, so a worker sees a whole job or nothing.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import msgspec

from runtime.durable import fsync_dir
from runtime.errors import BatchError
from runtime.times import utc_iso

__all__ = [
    "FORMATS",
    "Format",
    "JobRequest",
    "accept",
    "check_encoding",
    "detect_format",
    "new_job_id",
    "pending",
    "read_request",
    "remove_stale_staging",
    "strays",
    "submit",
]

log = logging.getLogger(__name__)

Format = Literal["jsonl", "csv", "parquet"]
FORMATS: tuple[str, ...] = ("jsonl", "csv", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class JobRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What ``inferbox batch submit`` asked for (``job.json``)."""

    job_id: str
    model: str
    version: int | None
    format: Format
    text_field: str
    source: str  # the submitted file's original path, for the operator
    submitted_at: str
    #: the field / column of each record's second text (a cross-encoder's document, an NLI
    #: hypothesis): the model then scores (text, pair) pairs; "" = single texts
    pair_field: str = ""


def new_job_id(now: Callable[[], float] = time.time) -> str:
    """Sortable and unique: ``20261128T141103Z-3f9a0c1d``."""
    stamp = datetime.fromtimestamp(now(), UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


def detect_format(path: Path, given: str | None = None) -> Format:
    if given is not None:
        if given not in FORMATS:
            raise BatchError(f"--format {given!r} is not one of {', '.join(FORMATS)}")
        return given  # type: ignore[return-value]
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BatchError(
            f"cannot tell the format of {path.name} from its suffix; name it .jsonl, .csv or .parquet, "
            "or pass --format jsonl|csv|parquet"
        )
    return fmt  # type: ignore[return-value]


_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32LE"),
    (b"\x00\x00\xfe\xff", "UTF-32BE"),
    (b"\xff\xfe", "UTF-16LE"),
    (b"\xfe\xff", "UTF-16BE"),
)


def _wide_encoding(head: bytes) -> str | None:
    """UTF-32 or UTF-16 without a BOM, told by where the zero bytes sit: the Latin letters, digits
    and punctuation of JSONL and CSV leave zero bytes in fixed columns (UTF-32: the two high bytes
    of every code unit; UTF-16: every other byte), while a NUL in a UTF-8 file falls anywhere.
    A sample that is valid UTF-8 counts as UTF-16 only when zeros fill one side of at least half
    of its byte pairs (Latin text in UTF-16 fills nearly all); text that is mostly CJK has few
    such zeros in UTF-16, but is not valid UTF-8: there any zeros on one side count.  None
    otherwise."""
    size = len(head) - len(head) % 4
    quads = size // 4
    if quads:
        col = [head[k:size:4].count(0) for k in range(4)]
        if min(col[2], col[3]) * 4 >= quads * 3 and col[0] * 4 < quads:
            return "UTF-32LE"
        if min(col[0], col[1]) * 4 >= quads * 3 and col[3] * 4 < quads:
            return "UTF-32BE"
    pairs = len(head) // 2
    even, odd = head[0 : pairs * 2 : 2].count(0), head[1 : pairs * 2 : 2].count(0)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False

    def one_side(zeros: int, other: int) -> bool:
        if zeros == 0 or other * 8 > zeros:
            return False
        return zeros * 2 >= pairs if utf8 else True

    if one_side(odd, even):
        return "UTF-16LE"
    if one_side(even, odd):
        return "UTF-16BE"
    return None


#: the magic bytes of compressed files a JSONL / CSV name may hide (a file read as text: every record
#: rejected as garbage, the job "done")
_COMPRESSED = (
    (b"\x1f\x8b", "gzip", "gzip -dc {name} > unpacked{suffix}"),
    (b"PK\x03\x04", "zip (or an Excel workbook)", "unzip -p {name} > unpacked{suffix}; a workbook: save it as CSV"),
    (b"BZh", "bzip2", "bzip2 -dc {name} > unpacked{suffix}"),
    (b"\xfd7zXZ\x00", "xz", "xz -dc {name} > unpacked{suffix}"),
    (b"(\xb5/\xfd", "zstd", "zstd -dc {name} > unpacked{suffix}"),
)


def check_encoding(source: Path) -> None:
    """Refuse a JSONL / CSV file that is UTF-16 or UTF-32 (a BOM, or zero bytes in the columns
    those encodings give Latin text: :func:`_wide_encoding`), naming the fix; otherwise its
    records would all be rejected, or misread.  A NUL byte elsewhere does not refuse the file:
    the record holding it is judged on its own (a JSON string may not hold one raw)."""
    with source.open("rb") as f:
        head = f.read(4096)
    packed = next(((kind, fix) for magic, kind, fix in _COMPRESSED if head.startswith(magic)), None)
    if packed is not None:
        fix = packed[1].format(name=source.name, suffix=source.suffix)
        raise BatchError(f"{source.name} is a {packed[0]} file, not text; unpack it first (`{fix}`) and submit that")
    encoding = next((name for bom, name in _BOMS if head.startswith(bom)), None)
    if encoding is not None:
        encoding = encoding[:6]  # iconv reads the BOM
    elif b"\x00" in head:
        encoding = _wide_encoding(head)
    if encoding is not None:
        raise BatchError(
            f"{source.name} is {encoding[:6]} text, not UTF-8; convert it to UTF-8 first, e.g. "
            f"`iconv -f {encoding} -t UTF-8 {source.name} > {source.stem}.utf8{source.suffix}`"
        )
    try:  # a cut multi-byte character at the sample's end is no fault: the decoder waits for it
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        # Excel's "CSV" on Windows, or an old export: each record holding such a byte is rejected
        log.warning(
            "%s is not UTF-8 (byte %d of its first 4 KiB): the records holding such bytes will be rejected; a "
            "Windows or Latin-1 file converts with `iconv -f WINDOWS-1252 -t UTF-8 %s > %s.utf8%s`",
            source.name,
            exc.start,
            source.name,
            source.stem,
            source.suffix,
        )


#: how many of a JSONL file's first records :func:`_check_jsonl_fields` reads
JSONL_SAMPLE = 100


def _jsonl_fields(source: Path) -> tuple[int, list[str]]:
    """How many of a JSONL file's first :data:`JSONL_SAMPLE` lines are JSON objects, and their fields."""
    keys: dict[str, None] = {}
    objects = 0
    with source.open("rb") as f:
        for line in itertools.islice(f, JSONL_SAMPLE):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser (a reject later)
                continue
            if isinstance(record, dict):
                objects += 1
                keys.update(dict.fromkeys(record))
    return objects, list(keys)


def _check_jsonl_fields(source: Path, objects: int, keys: list[str], text_field: str, pair_field: str) -> None:
    """Refuse a text model's JSONL file whose first records (``objects`` of them JSON objects, with the
    fields ``keys``) all lack the text field: every record was rejected, and the job read "done" (CSV
    and Parquet files are refused so already, from their header).  A file whose first records are all
    unreadable is judged per record."""
    for flag, name in (("--text-field", text_field), ("--pair-field", pair_field)):
        if name and objects and name not in keys:
            raise BatchError(
                f"none of the first {objects} records of {source.name} has a field {name!r} (their fields: "
                f"{list(keys)[:20]}); pass {flag} with the field that holds the text"
            )


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def _copy_durably(src: Path, dst: Path, hasher: Hasher | None = None) -> None:
    """Copy ``src`` whole, or refuse a file that changed while it was copied (still being written);
    ``hasher`` sees every byte copied."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        before = os.fstat(fin.fileno())
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
            if hasher is not None:
                hasher.update(chunk)
        fout.flush()
        os.fsync(fout.fileno())
        after = os.stat(src)
        copied = fout.tell()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or copied != after.st_size:
        raise BatchError(
            f"{src} changed while it was copied into the spool (still being written?); submit it once it is "
            "complete (the job would have held part of it)"
        )


def _warn_if_no_ids(source: Path, format_: str, fields: list[str] | None) -> None:
    """Say so when the file's ``fields`` (its header, schema, or first JSON objects' keys; None: not
    known) have no ``id``: its records are then named by their index from 0 in the outputs and
    rejects.  An ``ID`` column, read as text, put patient 2's result under id 1 without a word."""
    if fields is None or "id" in fields:
        return
    alike = [f for f in fields if f.lower() == "id" or f.lower().endswith(("_id", "-id", " id"))]
    hint = (
        f" ({', '.join(repr(f) for f in alike)} is not read as the id: rename it to 'id' to keep your ids)"
        if alike
        else " (add an 'id' column to keep your own ids)"
    )
    log.warning(
        "%s has no %s 'id': its records are named by their index from 0 in the outputs and rejects%s",
        source.name,
        "field" if format_ == "jsonl" else "column",
        hint,
    )


def _warn_if_cut(src: Path, format_: str, shown: Path) -> None:
    """A text input whose last line has no newline may be a file still being written: the job holds
    what was there (a snapshot 1.2 s into a write held 129 of 400 records, the last one cut)."""
    if format_ == "parquet":
        return
    with src.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if last not in (b"\n", b"\r"):
        log.warning(
            "%s does not end with a newline: if it is still being written, the job holds only what is there now "
            "(its last record may be cut)",
            shown,
        )


def _warn_if_empty(src: Path, format_: str, shown: Path) -> None:
    """A file without a record is taken (an export that found nothing is not an error), but said so:
    its job ended "done" with 0 records, and nothing told the operator who sent an empty file."""
    start = 0
    if format_ == "parquet":
        import pyarrow.parquet as pq

        try:
            if pq.read_metadata(src).num_rows > 0:
                return
        except Exception:  # not Parquet: the job fails, naming it
            return
    else:
        if format_ == "csv":
            from appliance.batch.readers import csv_header

            _, start = csv_header(src)
        with src.open("rb") as f:
            f.seek(start)
            while block := f.read(1 << 20):
                if block.strip():
                    return
    log.warning("%s holds no records (%s): the job will finish with nothing to do", shown, _empty_what(format_))


def _empty_what(format_: str) -> str:
    return {"csv": "a header, no rows", "parquet": "0 rows"}.get(format_, "no JSON lines")


def submit(
    spool: Path,
    source: Path,
    *,
    model: str,
    version: int | None = None,
    fmt: str | None = None,
    text_field: str = "text",
    pair_field: str = "",
    text_model: bool | None = None,
    now: Callable[[], float] = time.time,
    hasher: Hasher | None = None,
    on_staged: Callable[[str], None] | None = None,
) -> str:
    """Place ``source`` in the spool atomically; return the job id.

    ``hasher`` (an HMAC, say) is fed the bytes of the spooled copy as they are written;
    ``on_staged(job_id)`` runs once the copy is durable and before any worker can see the job (the
    audit record of the submit): if it raises, nothing is spooled.

    ``pair_field``: score (``text_field``, ``pair_field``) pairs with a text classifier.
    ``text_model``: whether the model reads text (None: not known), so that a Parquet file is held
    to a text column only for a text model (a tensor model's columns are its inputs).
    """
    if not source.is_file():
        raise BatchError(f"input file {source} does not exist or is not a file; pass a JSONL, CSV or Parquet file")
    if not model:
        raise BatchError("no model given; pass --model NAME (see `inferbox models`)")
    if version is not None and version < 1:
        raise BatchError(f"--version {version} is not valid; versions are integers from 1")
    if pair_field and pair_field == text_field:
        raise BatchError(
            f"--pair-field {pair_field!r} is also the --text-field; name the two fields of each pair "
            "(e.g. --text-field query --pair-field document)"
        )
    format_ = detect_format(source, fmt)
    if format_ != "parquet":
        check_encoding(source)
    if format_ == "csv":
        from appliance.batch.readers import csv_header

        header, _ = csv_header(source)
        if text_field not in header:
            other = next((s for s in (";", "\t", "|") if len(header) == 1 and s in header[0]), None)
            if other is not None:  # Excel in German, French, ... writes ";"; a TSV named .csv
                shown = "a tab" if other == "\t" else repr(other)
                raise BatchError(
                    f"{source.name} is separated by {shown}, not by commas (its header reads as one column, "
                    f"{header[0]!r}); save it as CSV with commas (UTF-8), or as JSONL"
                )
            raise BatchError(
                f"{source.name} has no column {text_field!r} (its header is {header}); "
                "pass --text-field with the column that holds the text"
            )
        if pair_field and pair_field not in header:
            raise BatchError(
                f"{source.name} has no column {pair_field!r} (its header is {header}); "
                "pass --pair-field with the column that holds each pair's second text"
            )
        for name in dict.fromkeys(n for n in (text_field, pair_field, "id") if n):
            if header.count(name) > 1:  # the last one was read, silently (id,text,text embedded the second)
                raise BatchError(
                    f"{source.name} has {header.count(name)} columns named {name!r} (its header is {header}); "
                    "rename all but one of them, so that the right one is read"
                )
    fields: list[str] | None = list(header) if format_ == "csv" else None  # the names a record's fields have
    if format_ == "parquet":
        import pyarrow.parquet as pq

        try:
            fields = list(pq.read_schema(source).names)
        except Exception as exc:  # not Parquet: the job fails, naming it (docs/batch.md)
            log.debug("no Parquet schema in %s: %s", source, exc)
        # a text model's file without the text column was taken, and every row of it rejected (a "done"
        # job); a tensor model's Parquet columns are its inputs, and a model not known here is not judged
        for flag, name in (("--text-field", text_field), ("--pair-field", pair_field)):
            if (pair_field or text_model) and name and fields is not None and name not in fields:
                raise BatchError(
                    f"{source.name} has no column {name!r} (its columns are {fields}); pass {flag} with the column"
                )
    if format_ == "jsonl":
        objects, keys = _jsonl_fields(source)
        fields = keys if objects else None
        if pair_field or text_model:
            _check_jsonl_fields(source, objects, keys, text_field, pair_field)
    _warn_if_no_ids(source, format_, fields)
    for sub in ("tmp", "new", "cur"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    job_id = new_job_id(now)
    request = JobRequest(
        job_id=job_id,
        model=model,
        version=version,
        format=format_,
        text_field=text_field,
        pair_field=pair_field,
        source=str(source),
        submitted_at=utc_iso(now()),
    )
    staging = spool / "tmp" / job_id
    staging.mkdir()
    try:
        _copy_durably(source, staging / f"input.{format_}", hasher)
        # what was copied is judged, the file the operator named is named
        _warn_if_cut(staging / f"input.{format_}", format_, source)
        _warn_if_empty(staging / f"input.{format_}", format_, source)
        with (staging / "job.json").open("wb") as f:
            f.write(msgspec.json.encode(request))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(staging)
        if on_staged is not None:
            on_staged(job_id)
        staging.rename(spool / "new" / job_id)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and not exc.filename:
            exc.filename = str(staging)  # where it was writing (a disk full names no file)
        raise
    fsync_dir(spool / "new")
    log.info("submitted job %s (%s, model %s)", job_id, format_, model)
    return job_id


def read_request(job_dir: Path) -> JobRequest:
    try:
        return msgspec.json.decode((job_dir / "job.json").read_bytes(), type=JobRequest)
    except (OSError, msgspec.DecodeError) as exc:
        raise BatchError(f"spool entry {job_dir} has no valid job.json ({exc}); remove it and submit again") from exc


#: a folder in ``tmp/`` none of whose files changed for this long is a submit that died mid-copy
STALE_STAGING_S = 24 * 3600.0


def remove_stale_staging(spool: Path, now: float, older_than_s: float = STALE_STAGING_S) -> list[str]:
    """Remove what killed submits left in ``tmp/`` (nothing else removed it: a 300 MB copy stayed
    for good); a folder is stale when neither it nor a file in it changed for ``older_than_s``
    (a copy in progress changes its file).  Returns the names removed."""
    staging = spool / "tmp"
    removed: list[str] = []
    try:
        entries = list(staging.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        try:
            changed = max(p.lstat().st_mtime for p in (entry, *(entry.iterdir() if _folder(entry) else ())))
        except OSError:  # gone meanwhile (its submit finished), or not readable: left alone
            continue
        if now - changed < older_than_s:
            continue
        if _folder(entry):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        log.warning("removed %s: a submit that stopped mid-copy left it (unchanged for a day)", entry)
        removed.append(entry.name)
    return removed


def _folder(path: Path) -> bool:
    """A real folder: a link to one is no job (``submit`` renames folders, it makes no links); a link
    in ``new/`` to a folder elsewhere was accepted and run, and set aside, written into."""
    return path.is_dir() and not path.is_symlink()


def pending(spool: Path) -> list[Path]:
    """Job folders in ``new/``, oldest first (job ids sort by time)."""
    new = spool / "new"
    if not new.is_dir():
        return []
    return sorted(p for p in new.iterdir() if _folder(p) and not p.name.startswith("."))


def strays(spool: Path) -> list[Path]:
    """Entries in ``new/`` that are not job folders (a file copied there by hand, a link): ``submit``
    only renames whole folders into ``new/``, so none of them is being written.  Dot-files are
    left alone (an editor's or a copy tool's)."""
    new = spool / "new"
    if not new.is_dir():
        return []
    return sorted(p for p in new.iterdir() if not p.name.startswith(".") and not _folder(p))


def accept(spool: Path, job_id: str) -> Path:
    """Move ``new/<job>`` to ``cur/<job>`` (idempotent); return the ``cur`` folder."""
    cur = spool / "cur" / job_id
    src = spool / "new" / job_id
    if src.exists():
        cur.parent.mkdir(parents=True, exist_ok=True)
        src.rename(cur)
        fsync_dir(cur.parent)
        fsync_dir(src.parent)
    if not cur.is_dir():
        raise BatchError(f"job {job_id} is neither in {src.parent} nor in {cur.parent}; submit it again")
    return cur
