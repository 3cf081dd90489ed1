"""Compare a log (a database or an export) with earlier off-box copies of it (exports).

The verifier alone cannot see a *cut back*: whoever can write the database can
delete the newest checkpoints together with every record after the last
window of the checkpoint kept, and what is left is a log that verifies (see
``docs/audit.md``).  An export made before the cut, kept off the box, pins
what the log held then.  :func:`compare_with` holds the log to every copy:

- every signed checkpoint of the copy is still in the log, with the same
  signature (checkpoints are never deleted, not even by a prune): a missing
  one is a cut back (or a deleted checkpoint), a different one a replaced one;
- every record of the copy (and its edge records) that the log still holds has
  the same leaf hash; one past the log's head is a cut back; records a signed
  prune removed are skipped, and the prune anchor must hash as the copy's
  record at its size did.

The copy is verified on its own first (an unverifiable copy proves nothing).
:func:`hold_to` does both while it streams the copy (``audit ship`` and
``audit verify --against``): the copy's records are checked against the log's
leaf hashes batch by batch as they are read, never held, so memory does not
grow with the copy (only its checkpoints are kept).  :func:`export_file_view`
reads an export being verified the same way.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import msgspec

from appliance.audit.checkpoint import Checkpoint, load_checkpoints
from appliance.audit.exporter import EXPORT_FORMAT_V1, CheckpointLine, EdgeLine, Header, Line, RecordLine
from appliance.audit.schema import connect, read_log_id
from appliance.audit.verify import PublicKeys, VerifyReport, verify_export_stream
from runtime.errors import AuditError

if TYPE_CHECKING:
    from appliance.audit.checkpoint import Pace

__all__ = [
    "Copy",
    "Held",
    "LogView",
    "compare_with",
    "db_view",
    "export_file_view",
    "export_view",
    "hold_to",
    "newest_copy",
    "read_copy",
]

_DECODER = msgspec.json.Decoder(Line)
_CHUNK = 500  # seqs per SQL lookup of scattered seqs
_BATCH = 5000  # a copy's records looked up in the log at a time


@dataclass(frozen=True)
class Copy:
    """What an export pins: its records' leaf hashes and every checkpoint it holds."""

    name: str
    log_id: str
    exported_at: str
    hashes: dict[int, str]  #: seq -> leaf hash of every record and edge record
    checkpoints: list[Checkpoint]
    reaches_head: bool  #: it ran to the log's head when it was made (no ``until``, or no record after it)
    last_recorded_at: str = ""  #: when its highest-seq record (or edge record) was written

    @property
    def last_seq(self) -> int:
        return max(self.hashes, default=0)


def read_copy(path: Path, data: bytes | None = None) -> Copy:
    """Parse an export (already verified: the lines are trusted to be well-formed)."""
    raw = Path(path).read_bytes() if data is None else data
    header: Header | None = None
    hashes: dict[int, str] = {}
    checkpoints: list[Checkpoint] = []
    after = False
    last: tuple[int, str] = (0, "")
    for line in raw.splitlines():
        try:
            item = _DECODER.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise AuditError(f"{path} is not an inferbox audit export ({exc})") from exc
        if isinstance(item, Header):
            header = item
        elif isinstance(item, RecordLine | EdgeLine):
            hashes[item.seq] = item.leaf_hash
            last = max(last, (item.seq, item.recorded_at))
            after = after or (isinstance(item, EdgeLine) and item.side == "after")
        elif isinstance(item, CheckpointLine):
            checkpoints.append(item)
    if header is None:
        raise AuditError(f"{path} is not an inferbox audit export (no header line)")
    reaches_head = header.until is None or (header.format != EXPORT_FORMAT_V1 and not after)
    return Copy(str(path), header.log_id, header.exported_at, hashes, checkpoints, reaches_head, last[1])


def newest_copy(folder: Path, log_id: str) -> Path | None:
    """The export of log ``log_id`` in ``folder`` made last (``audit ship``'s files; by their headers)."""
    best: tuple[str, Path] | None = None
    for path in sorted(folder.glob(f"audit-{log_id}-*.jsonl")):
        try:
            with path.open("rb") as f:
                header = _DECODER.decode(f.readline())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            header = None
        if not isinstance(header, Header) or header.log_id != log_id:
            raise AuditError(
                f"{path} is not a readable inferbox audit export of log {log_id}: move it out of the ship folder"
            )
        if best is None or header.exported_at > best[0]:
            best = (header.exported_at, path)
    return None if best is None else best[1]


def other_logs(folder: Path, log_id: str) -> dict[str, Path]:
    """The newest copy in ``folder`` of each log other than ``log_id`` (by their headers; files that are
    not readable exports are left out: they are no evidence of a log)."""
    best: dict[str, tuple[str, Path]] = {}
    for path in sorted(folder.glob("audit-*.jsonl")):
        try:
            with path.open("rb") as f:
                header = _DECODER.decode(f.readline())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        if not isinstance(header, Header) or header.log_id == log_id:
            continue
        if header.log_id not in best or header.exported_at > best[header.log_id][0]:
            best[header.log_id] = (header.exported_at, path)
    return {log: path for log, (_, path) in sorted(best.items())}


Leaves = Callable[[Sequence[int]], dict[int, str]]  #: seqs -> the leaf hashes of those the log holds


@dataclass(frozen=True)
class LogView:
    """The log being verified, as far as a comparison needs it."""

    log_id: str
    checkpoints: list[Checkpoint]
    head: int | None  #: its last seq when it reaches the log's head (a database, a whole export); None: unknown
    made_at: str | None  #: when an export was made (None: a live database)
    #: called with ascending seqs, one batch after another, as a copy is read (any order works)
    leaves: Leaves
    first: int = 1  #: the lowest seq it would hold (a window export starts mid-log)


def _db_leaves(path: Path) -> Leaves:
    def leaves(seqs: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        if not seqs:
            return out
        conn = connect(path, read_only=True)
        try:
            lo, hi = min(seqs), max(seqs)
            if hi - lo < 2 * len(seqs):  # a run of seqs (a copy's records): one range read
                wanted = set(seqs)
                rows = conn.execute("SELECT seq, leaf_hash FROM records WHERE seq BETWEEN ? AND ?", (lo, hi))
                out.update((int(s), str(h)) for s, h in rows if int(s) in wanted)
                return out
            for i in range(0, len(seqs), _CHUNK):
                chunk = list(seqs[i : i + _CHUNK])
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT seq, leaf_hash FROM records WHERE seq IN ({marks})"  # noqa: S608 (placeholders)
                out.update((int(s), str(h)) for s, h in conn.execute(sql, chunk))
        finally:
            conn.close()
        return out

    return leaves


def db_view(path: Path) -> LogView:
    conn = connect(Path(path), read_only=True)
    try:
        conn.execute("BEGIN")
        log_id = read_log_id(conn)
        checkpoints = load_checkpoints(conn)
        top = conn.execute("SELECT max(seq) FROM records").fetchone()[0]
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise AuditError(f"audit database {path} cannot be read ({exc})") from exc
    finally:
        conn.close()
    anchor = max((c.size for c in checkpoints if c.kind == "prune"), default=0)
    head = int(top) if top is not None else anchor
    return LogView(log_id, checkpoints, head, None, _db_leaves(Path(path)))


def export_view(copy: Copy) -> LogView:
    """An export being verified, seen as the log it was taken from (held in memory: see :func:`export_file_view`)."""
    head = copy.last_seq if copy.reaches_head else None
    hashes = copy.hashes
    return LogView(
        copy.log_id,
        copy.checkpoints,
        head,
        copy.exported_at,
        lambda seqs: {s: hashes[s] for s in seqs if s in hashes},
        first=min(hashes, default=1),
    )


def _lines(f: BinaryIO, path: Path) -> Iterator[tuple[int, Line]]:
    """(end offset, line) of every line of an export from where ``f`` stands; a line that does not
    parse raises (an export that does not, proves nothing)."""
    end = f.tell()
    for raw in f:
        end += len(raw)
        try:
            line = _DECODER.decode(raw[:-1] if raw.endswith(b"\n") else raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise AuditError(f"{path} is not an inferbox audit export ({exc})") from exc
        yield end, line


class _ExportLeaves:
    """The leaf hashes of an export's records and edge records, read forward from the file as asked
    (an export's lines are in seq order): memory does not grow with the export."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0  #: where the next line not yet read starts
        self._next = 0  #: no seq below it is left ahead of ``_offset``

    def __call__(self, seqs: Sequence[int]) -> dict[int, str]:
        if not seqs:
            return {}
        wanted = set(seqs)
        lo, hi = min(wanted), max(wanted)
        if lo < self._next:  # asked for something already passed: read from the start again
            self._offset, self._next = 0, 0
        out: dict[int, str] = {}
        with self._path.open("rb") as f:
            f.seek(self._offset)
            for end, line in _lines(f, self._path):
                if isinstance(line, RecordLine | EdgeLine):
                    if line.seq > hi:
                        break  # read again with the next batch
                    if line.seq in wanted:
                        out[line.seq] = line.leaf_hash
                self._offset = end
        self._next = hi + 1
        return out


def export_file_view(path: Path) -> LogView:
    """:func:`export_view` of the export at ``path``, read as a stream: only its checkpoints are held."""
    path = Path(path)
    header: Header | None = None
    checkpoints: list[Checkpoint] = []
    first = last = 0
    ordered = True
    after = False
    try:
        with path.open("rb") as f:
            for _, line in _lines(f, path):
                if isinstance(line, Header):
                    header = header or line
                elif isinstance(line, RecordLine | EdgeLine):
                    ordered = ordered and line.seq > last
                    first = first or line.seq
                    last = max(last, line.seq)
                    after = after or (isinstance(line, EdgeLine) and line.side == "after")
                elif isinstance(line, CheckpointLine):
                    checkpoints.append(line)
    except OSError as exc:
        raise AuditError(f"cannot read export {path}: {exc.strerror}") from exc
    if header is None:
        raise AuditError(f"{path} is not an inferbox audit export (no header line)")
    if not ordered:  # an export that does not verify (out of order): no forward reading; held whole
        return export_view(read_copy(path))
    reaches_head = header.until is None or (header.format != EXPORT_FORMAT_V1 and not after)
    return LogView(
        header.log_id,
        checkpoints,
        last if reaches_head else None,
        header.exported_at,
        _ExportLeaves(path),
        first=first or 1,
    )


def _describe(cp: Checkpoint) -> str:
    number = f"#{cp.index} " if cp.version >= 2 else ""
    return f"signed {cp.kind} {number}(size {cp.size}, {cp.created_at})"


def _checkpoint_problems(log: LogView, checkpoints: Sequence[Checkpoint], where: str) -> list[tuple[int | None, str]]:
    out: list[tuple[int | None, str]] = []
    by_index = {c.index: c for c in log.checkpoints if c.version >= 2}
    v1 = {(c.kind, c.size, c.head_hash, c.created_at, c.signature) for c in log.checkpoints if c.version < 2}
    newest = max(by_index, default=0)
    for cp in checkpoints:
        seq = max(cp.size, 1)
        if cp.version < 2:
            if (cp.kind, cp.size, cp.head_hash, cp.created_at, cp.signature) not in v1:
                out.append((seq, f"the {_describe(cp)} of {where} is no longer in the log (deleted or replaced)"))
            continue
        mine = by_index.get(cp.index)
        if mine is None:
            if cp.index > newest:
                cut = (log.head + 1) if log.head is not None else seq
                out.append(
                    (
                        cut,
                        f"the log's newest signed checkpoint is #{newest}, but {where} holds the {_describe(cp)}: "
                        f"the newest checkpoints were deleted with the records after them (a cut back)",
                    )
                )
                break  # every later one is missing too
            out.append((seq, f"the {_describe(cp)} of {where} is no longer in the log (deleted)"))
        elif mine.signature != cp.signature:
            out.append(
                (seq, f"the log's checkpoint #{cp.index} differs from the {_describe(cp)} of {where} (replaced)")
            )
    return out


class _RecordCheck:
    """Holds the log to a copy's records (and edge records) as they come, in batches: it keeps only the
    first and last seqs of each kind of disagreement, never the copy's records."""

    def __init__(self, log: LogView) -> None:
        self._log = log
        self._anchor = max((c for c in log.checkpoints if c.kind == "prune"), key=lambda c: c.size, default=None)
        self._pruned_to = self._anchor.size if self._anchor is not None else 0
        self._batch: list[tuple[int, str]] = []
        self.anchor_differs = False
        self.changed: int | None = None  #: the first record that differs
        self.changed_count = 0
        self.beyond: int | None = None  #: the last record past the log's head
        self.missing: int | None = None  #: the first record the log should hold and does not

    def add(self, seq: int, leaf: str) -> None:
        anchor = self._anchor
        if anchor is not None and seq == anchor.size and leaf != anchor.head_hash:
            self.anchor_differs = True
        if seq > self._pruned_to:
            self._batch.append((seq, leaf))
            if len(self._batch) >= _BATCH:
                self.flush()

    def flush(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        log = self._log
        held = log.leaves([s for s, _ in batch])
        for seq, leaf in batch:
            mine = held.get(seq)
            if mine is not None and mine != leaf:
                self.changed = seq if self.changed is None else min(self.changed, seq)
                self.changed_count += 1
            if log.head is not None:
                if seq > log.head:
                    self.beyond = seq if self.beyond is None else max(self.beyond, seq)
                if mine is None and log.first <= seq <= log.head:
                    self.missing = seq if self.missing is None else min(self.missing, seq)

    def problems(self, where: str) -> list[tuple[int | None, str]]:
        self.flush()
        log = self._log
        out: list[tuple[int | None, str]] = []
        if self.anchor_differs and self._anchor is not None:
            size = self._anchor.size
            out.append(
                (
                    size,
                    f"the prune anchor at size {size} does not match record {size} of {where} "
                    f"(records up to it were rewritten before the prune)",
                )
            )
        if self.changed is not None:
            more = f" (and {self.changed_count - 1} later record(s))" if self.changed_count > 1 else ""
            out.append((self.changed, f"record {self.changed} differs from {where}: rewritten since{more}"))
        if log.head is not None and self.beyond is not None:
            out.append(
                (
                    log.head + 1,
                    f"the log ends at seq {log.head}, but {where} holds records up to seq {self.beyond}: "
                    f"records after {log.head} were deleted (a cut back)",
                )
            )
        if self.missing is not None:
            out.append((self.missing, f"record {self.missing} of {where} is missing from the log (deleted)"))
        return out


def _where(name: str, exported_at: str) -> str:
    return f"the off-box copy {name} (exported {exported_at})"


def _refusal(log: LogView, log_id: str, exported_at: str, where: str) -> str | None:
    """Why ``log`` is not held to a copy at all (another log's copy, or one newer than the export verified)."""
    if log_id != log.log_id:
        return f"{where} is of log {log_id}, not {log.log_id}: not a copy of this log"
    if log.made_at is not None and exported_at > log.made_at:
        return (
            f"{where} was made after the export being verified ({log.made_at}): "
            f"verify the newer export --against the older one"
        )
    return None


def compare_with(log: LogView, copies: Iterable[Copy]) -> list[tuple[int | None, str]]:
    """(seq, what) for every way ``log`` disagrees with the earlier ``copies``; [] when it holds them all."""
    out: list[tuple[int | None, str]] = []
    for copy in copies:
        where = _where(copy.name, copy.exported_at)
        refused = _refusal(log, copy.log_id, copy.exported_at, where)
        if refused is not None:
            out.append((None, refused))
            continue
        out.extend(_checkpoint_problems(log, copy.checkpoints, where))
        check = _RecordCheck(log)
        for seq in sorted(copy.hashes):
            check.add(seq, copy.hashes[seq])
        out.extend(check.problems(where))
    return out


@dataclass(frozen=True)
class Held:
    """An off-box copy verified on its own and the log held to it, the copy streamed (:func:`hold_to`)."""

    name: str
    report: VerifyReport  #: the copy's own verification: the comparison counts only when it is ok
    problems: list[tuple[int | None, str]]  #: how the log disagrees with it ([] when the copy does not verify)
    last_recorded_at: str  #: when its highest-seq record (or edge record) was written


class _CopyReader:
    """Follows a copy's lines as :func:`verify_export_stream` reads them, holding the log to each record."""

    def __init__(self, log: LogView, name: str) -> None:
        self._log = log
        self._name = name
        self._records = _RecordCheck(log)
        self.header: Header | None = None
        self.checkpoints: list[Checkpoint] = []
        self.refused: str | None = None
        self.last: tuple[int, str] = (0, "")

    def __call__(self, line: Line) -> None:
        if isinstance(line, Header):
            if self.header is None:
                self.header = line
                where = _where(self._name, line.exported_at)
                self.refused = _refusal(self._log, line.log_id, line.exported_at, where)
        elif isinstance(line, RecordLine | EdgeLine):
            self.last = max(self.last, (line.seq, line.recorded_at))
            if self.header is not None and self.refused is None:
                self._records.add(line.seq, line.leaf_hash)
        elif isinstance(line, CheckpointLine):
            self.checkpoints.append(line)  # the verifier's own objects: not held twice

    def problems(self) -> list[tuple[int | None, str]]:
        if self.header is None:
            return []
        if self.refused is not None:
            return [(None, self.refused)]
        where = _where(self._name, self.header.exported_at)
        return [*_checkpoint_problems(self._log, self.checkpoints, where), *self._records.problems(where)]


def hold_to(log: LogView, f: BinaryIO, name: str, keys: PublicKeys, *, legacy_pace: Pace | None = None) -> Held:
    """Verify the off-box copy open as ``f`` with ``keys`` and hold ``log`` to it as it is read.

    What :func:`compare_with` does with :func:`read_copy`, without holding the copy: memory does not
    grow with its records (the log's leaf hashes are looked up batch by batch as the copy is read)."""
    reader = _CopyReader(log, name)
    report = verify_export_stream(f, keys, legacy_pace=legacy_pace, each=reader)
    return Held(name, report, reader.problems() if report.ok else [], reader.last[1])
