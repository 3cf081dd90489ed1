"""Bring a restored log forward from its off-box copies (``inferbox backup restore --audit-from``).

A backup holds the log up to the moment it was taken; the exports ``audit ship``
made since hold what came after.  :func:`catch_up` appends those later records and
checkpoints to the restored database exactly as they were (the same fields, the
same leaf hashes, the same signatures), after checking that every copy verifies
with the trusted keys, that the copies agree with each other and with the log
where they overlap (the log's head record and every checkpoint it holds), and
that nothing between the log's head and the copies' newest record is missing.
The result must verify as a whole before it is committed.  The log is then the
log as the newest copy held it: ``audit ship`` goes on from there without a cut
back, and only what was written after the last copy is lost.
"""

from __future__ import annotations

import dataclasses
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from appliance.audit.canonical import AuditRecord
from appliance.audit.checkpoint import Checkpoint, Pace, load_checkpoints, store_checkpoint
from appliance.audit.exporter import CheckpointLine, EdgeLine, Header, Line, RecordLine, Trailer
from appliance.audit.rotation import retired_by
from appliance.audit.schema import connect, read_log_id
from appliance.audit.store import head, insert_records, iter_records
from appliance.audit.verify import check_chain, verify_export_bytes
from runtime.errors import AuditError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["CatchUp", "catch_up"]

_DECODER = msgspec.json.Decoder(Line)


@dataclass(frozen=True)
class CatchUp:
    folder: str
    copies: list[str]  #: the exports read, oldest first
    records: int  #: records appended
    checkpoints: int  #: checkpoints appended
    first_seq: int  #: the first record appended (0: none)
    last_seq: int  #: the log's head afterwards
    exported_at: str  #: when the newest copy was made ("" when there was none)
    #: digest keys named by the appended records that this box does not hold (their digests cannot be recomputed)
    missing_digest_keys: list[str]
    #: SHA-256 -> seq of every ``backup_create`` record the copies hold (which archives the box wrote)
    backups: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the highest seq the copies hold (0 when there are none)
    copies_last_seq: int = 0
    #: the log's head before anything was appended (the backup's last record)
    backup_last_seq: int = 0
    #: keys the appended records revoke that the restored key store had active: revoked there too
    #: (:func:`appliance.backup.restore.restore_backup`; a leaked key revoked after the backup stays revoked)
    keys_revoked_again: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class _Copy:
    path: Path
    header: Header
    records: list[AuditRecord]
    checkpoints: list[Checkpoint]
    signed_by: str = ""  #: the key id of the copy's trailer


def _read(path: Path, keys: Sequence[Ed25519PublicKey], legacy_pace: Pace | None) -> _Copy:
    data = path.read_bytes()
    report = verify_export_bytes(data, keys, legacy_pace=legacy_pace)
    if not report.ok:
        raise AuditError(
            f"the off-box copy {path} does not verify with the backup's keys ({report.summary()}); "
            "nothing was changed. If the signing key was rotated after this backup, its later checkpoints are "
            "signed with the new key: take a backup after each rotation, or restore this one with --no-catch-up "
            "(keep the copies) and rotate the key again (docs/audit.md, Key rotation). If it is not a copy of "
            "this log, move it out of the folder"
        )
    header: Header | None = None
    signed_by = ""
    records: list[AuditRecord] = []
    checkpoints: list[Checkpoint] = []
    for line in data.splitlines():
        item = _DECODER.decode(line)
        if isinstance(item, Header):
            header = item
        elif isinstance(item, RecordLine | EdgeLine):
            fields = msgspec.structs.asdict(item)
            fields.pop("side", None)
            records.append(AuditRecord(**fields))
        elif isinstance(item, CheckpointLine):
            checkpoints.append(Checkpoint(**msgspec.structs.asdict(item)))
        elif isinstance(item, Trailer):
            signed_by = item.key_id
    assert header is not None  # a verified export has one
    return _Copy(path, header, records, checkpoints, signed_by)


def _agreement_problem(copies: Sequence[_Copy]) -> str | None:
    """Why the copies are not copies of one log as it was shipped, if they are not: every copy's checkpoints
    begin the newest copy's, and a copy signed with a key the newest copy's checkpoints retire adds no
    record past what the newest covers.  Each copy verifies on its own: a copy dropped into the share by
    whoever holds a retired key (from an old backup), dated before the newest, verified with that key and
    brought records after the newest copy's into the restored log, which then signed them."""
    newest = copies[-1]
    retired = retired_by(newest.checkpoints)
    covered = max([newest.header.last_seq, *(cp.size for cp in newest.checkpoints)])
    for c in copies[:-1]:
        if len(c.checkpoints) > len(newest.checkpoints) or not all(
            _same(a, b) for a, b in zip(c.checkpoints, newest.checkpoints, strict=False)
        ):
            return f"the checkpoints of {c.path} do not begin those of the newest copy {newest.path}"
        later = [r.seq for r in c.records if r.seq > covered]
        if later and c.signed_by in retired:
            return (
                f"{c.path} is signed with key {c.signed_by}, which the newest copy's checkpoints retire, and holds "
                f"records (seq {later[0]}..) after all the newest copy {newest.path} holds or signs"
            )
    return None


def _copies(folder: Path, log_id: str, keys: Sequence[Ed25519PublicKey], legacy_pace: Pace | None) -> list[_Copy]:
    copies = [_read(p, keys, legacy_pace) for p in sorted(folder.glob(f"audit-{log_id}-*.jsonl"))]
    for c in copies:
        if c.header.log_id != log_id:
            raise AuditError(f"{c.path} is an export of log {c.header.log_id}, not {log_id}: move it out of {folder}")
    return sorted(copies, key=lambda c: c.header.exported_at)


def _same(a: Checkpoint, b: Checkpoint) -> bool:
    return (a.kind, a.size, a.head_hash, a.signature) == (b.kind, b.size, b.head_hash, b.signature)


def _backups(merged: dict[int, AuditRecord]) -> dict[str, int]:
    """SHA-256 -> seq of every ``backup_create`` record the copies hold."""
    return {r.details["sha256"]: r.seq for r in merged.values() if r.event == "backup_create" and "sha256" in r.details}


def _overlap_problem(conn: sqlite3.Connection, merged: dict[int, AuditRecord], size: int) -> str | None:
    """The first record both the log and the copies hold with different leaf hashes, if any."""
    low = min(merged)
    if low > size:
        return None
    rows = conn.execute("SELECT seq, leaf_hash FROM records WHERE seq BETWEEN ? AND ?", (low, size)).fetchall()
    for seq, leaf in rows:
        r = merged.get(int(seq))
        if r is not None and r.leaf_hash != leaf:
            return f"seq {seq} differs between the backup's log and the off-box copies"
    return None


def _delete_pruned(conn: sqlite3.Connection, upto: int) -> None:
    """What a prune after the backup removed (its anchor is among the appended checkpoints)."""
    token = secrets.token_hex(8)
    conn.execute("INSERT INTO prune_guard (token) VALUES (?)", (token,))
    conn.execute("DELETE FROM records WHERE seq <= ?", (upto,))
    conn.execute("DELETE FROM prune_guard WHERE token = ?", (token,))


def catch_up(
    db: Path,
    folder: Path,
    keys: Sequence[Ed25519PublicKey],
    *,
    digest_dir: Path | None = None,
    signing_key_id: str | None = None,
    legacy_pace: Pace | None = None,
) -> CatchUp:
    """Append to the log in ``db`` what the exports in ``folder`` hold after its head; raise and change nothing else.

    ``signing_key_id``: the key the restored box will sign with; copies signed by another one
    after the backup (a rotation) are refused, as the box would go on with the old key.
    """
    if not folder.is_dir():
        raise AuditError(
            f"there is no folder {folder} to read the off-box copies from; mount the ship share "
            "(or pass --no-catch-up to restore the log as the backup holds it)"
        )
    conn = connect(db)
    try:
        log_id = read_log_id(conn)
        copies = _copies(folder, log_id, keys, legacy_pace)
        size, head_hash = head(conn, log_id)
        if not copies:
            return CatchUp(str(folder), [], 0, 0, 0, size, "", [])
        merged: dict[int, AuditRecord] = {}
        for c in copies:
            for r in c.records:
                seen = merged.setdefault(r.seq, r)
                if seen.leaf_hash != r.leaf_hash:
                    raise AuditError(
                        f"the off-box copies disagree at seq {r.seq} ({c.path} and an older one): "
                        "nothing was changed; verify each with `inferbox audit verify --export FILE --against ...`"
                    )
        newest = copies[-1]
        names = [str(c.path) for c in copies]
        if (disagree := _agreement_problem(copies)) is not None:
            raise AuditError(
                f"{disagree}: nothing was changed; move the copy that is not the log's out of {folder} (verify "
                "each with `inferbox audit verify --export FILE --against ...`)"
            )
        last = max(merged, default=0)
        held = load_checkpoints(conn)
        # where the copies and the backup's log overlap, they must agree (also when there is nothing to add)
        problem = _overlap_problem(conn, merged, size) if merged else None
        if problem is None and not all(_same(a, b) for a, b in zip(held, newest.checkpoints, strict=False)):
            # the shorter of the two checkpoint sequences must begin the longer one
            problem = f"the checkpoints of {newest.path} and of the backup's log ({len(held)}) differ"
        if problem is not None:
            raise AuditError(
                f"{problem}: the copies in {folder} are not copies of this log as the backup holds it; "
                "nothing was changed"
            )
        if last <= size:
            # the backup is as new as the copies: nothing to bring back (ship holds the log to them as ever)
            return CatchUp(
                str(folder), names, 0, 0, 0, size, newest.header.exported_at, [], _backups(merged), last, size
            )
        later = newest.checkpoints[len(held) :]
        # a prune after the backup: what it removed need not be in the copies (its signed anchor links on)
        pruned_to = max((cp.size for cp in later if cp.kind == "prune"), default=0)
        start = max(size, pruned_to)
        if pruned_to < size and size > 0 and (size not in merged or merged[size].leaf_hash != head_hash):
            have = min(merged)
            raise AuditError(
                f"the off-box copies in {folder} hold seq {have}..{last} but not the backup's last record "
                f"(seq {size}) as the backup holds it: they do not continue this log; nothing was changed "
                "(pass --no-catch-up, or add the earlier copies to the folder)"
            )
        gaps = [s for s in range(start + 1, last + 1) if s not in merged]
        if gaps:
            raise AuditError(
                f"the off-box copies in {folder} miss seq {gaps[0]} (between the backup's seq {size} and "
                f"their seq {last}): add the copy holding it; nothing was changed"
            )
        rotated = sorted({cp.key_id for cp in later if signing_key_id is not None and cp.key_id != signing_key_id})
        if rotated:
            raise AuditError(
                f"the log was signed with key {', '.join(rotated)} after the backup (a key rotation), but the backup "
                f"holds key {signing_key_id}: the restored box would go on signing with the old key. Nothing was "
                "changed. Take a backup after each rotation; to restore this one all the same, pass --no-catch-up, "
                "keep the copies, and rotate the key again (docs/audit.md, Key rotation)"
            )
        added = [merged[s] for s in range(start + 1, last + 1)]
        conn.execute("BEGIN IMMEDIATE")
        try:
            insert_records(conn, added)
            for cp in later:
                store_checkpoint(conn, cp)
                if cp.kind == "prune":
                    _delete_pruned(conn, cp.size)
            report = check_chain(
                log_id, iter_records(conn, log_id), load_checkpoints(conn), keys, legacy_pace=legacy_pace
            )
            if not report.ok:
                raise AuditError(
                    f"the log with the off-box copies' records does not verify ({report.summary()}); "
                    "nothing was changed"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise AuditError(f"the restored audit log could not be brought forward ({exc}); nothing was changed") from exc
    finally:
        conn.close()
    key_ids = sorted({r.digest_key_id for r in added if r.digest_key_id})
    missing = [k for k in key_ids if digest_dir is None or not (digest_dir / f"{k}.key").is_file()]
    return CatchUp(
        str(folder),
        names,
        len(added),
        len(later),
        size + 1,
        last,
        newest.header.exported_at,
        missing,
        _backups(merged),
        last,
        size,
    )
