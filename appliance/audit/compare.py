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
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from appliance.audit.checkpoint import Checkpoint, load_checkpoints
from appliance.audit.exporter import EXPORT_FORMAT_V1, CheckpointLine, EdgeLine, Header, Line, RecordLine
from appliance.audit.schema import connect, read_log_id
from runtime.errors import AuditError

__all__ = ["Copy", "LogView", "compare_with", "db_view", "export_view", "newest_copy", "read_copy"]

_DECODER = msgspec.json.Decoder(Line)
_CHUNK = 500  # seqs per SQL lookup


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
    leaves: Leaves
    first: int = 1  #: the lowest seq it would hold (a window export starts mid-log)


def _db_leaves(path: Path) -> Leaves:
    def leaves(seqs: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        conn = connect(path, read_only=True)
        try:
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
    """An export being verified, seen as the log it was taken from."""
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


def _describe(cp: Checkpoint) -> str:
    number = f"#{cp.index} " if cp.version >= 2 else ""
    return f"signed {cp.kind} {number}(size {cp.size}, {cp.created_at})"


def _checkpoint_problems(log: LogView, copy: Copy, where: str) -> list[tuple[int | None, str]]:
    out: list[tuple[int | None, str]] = []
    by_index = {c.index: c for c in log.checkpoints if c.version >= 2}
    v1 = {(c.kind, c.size, c.head_hash, c.created_at, c.signature) for c in log.checkpoints if c.version < 2}
    newest = max(by_index, default=0)
    for cp in copy.checkpoints:
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


def _record_problems(log: LogView, copy: Copy, where: str) -> list[tuple[int | None, str]]:
    anchor = max((c for c in log.checkpoints if c.kind == "prune"), key=lambda c: c.size, default=None)
    pruned_to = anchor.size if anchor is not None else 0
    seqs = sorted(s for s in copy.hashes if s > pruned_to)
    held = log.leaves(seqs)
    out: list[tuple[int | None, str]] = []
    if anchor is not None and anchor.size in copy.hashes and copy.hashes[anchor.size] != anchor.head_hash:
        out.append(
            (
                anchor.size,
                f"the prune anchor at size {anchor.size} does not match record {anchor.size} of {where} "
                f"(records up to it were rewritten before the prune)",
            )
        )
    changed = [s for s in seqs if s in held and held[s] != copy.hashes[s]]
    if changed:
        more = f" (and {len(changed) - 1} later record(s))" if len(changed) > 1 else ""
        out.append((changed[0], f"record {changed[0]} differs from {where}: rewritten since{more}"))
    if log.head is not None:
        beyond = [s for s in seqs if s > log.head]
        if beyond:
            out.append(
                (
                    log.head + 1,
                    f"the log ends at seq {log.head}, but {where} holds records up to seq {beyond[-1]}: "
                    f"records after {log.head} were deleted (a cut back)",
                )
            )
        missing = [s for s in seqs if log.first <= s <= log.head and s not in held]
        if missing:
            out.append((missing[0], f"record {missing[0]} of {where} is missing from the log (deleted)"))
    return out


def compare_with(log: LogView, copies: Iterable[Copy]) -> list[tuple[int | None, str]]:
    """(seq, what) for every way ``log`` disagrees with the earlier ``copies``; [] when it holds them all."""
    out: list[tuple[int | None, str]] = []
    for copy in copies:
        where = f"the off-box copy {copy.name} (exported {copy.exported_at})"
        if copy.log_id != log.log_id:
            out.append((None, f"{where} is of log {copy.log_id}, not {log.log_id}: not a copy of this log"))
            continue
        if log.made_at is not None and copy.exported_at > log.made_at:
            out.append(
                (
                    None,
                    f"{where} was made after the export being verified ({log.made_at}): "
                    f"verify the newer export --against the older one",
                )
            )
            continue
        out.extend(_checkpoint_problems(log, copy, where))
        out.extend(_record_problems(log, copy, where))
    return out
