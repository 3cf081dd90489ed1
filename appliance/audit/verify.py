"""The offline verifier: needs only the database (or an export) and the public key(s).

It recomputes every leaf hash and link, checks every checkpoint signature, that
checkpoints agree with each other and with the records, that none is missing
from the signed checkpoint sequence, that no signed checkpoint reaches past the
last record (tail cut), that a log starting after seq 1 has a signed prune
anchor for the gap, and that the records after the newest checkpoint are no
more than the writer's own pace allows (every other record is covered by a
signed checkpoint).  The report names the first failing seq and what failed.
See ``docs/audit.md`` for what it cannot detect.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.canonical import AuditRecord, genesis_hash, is_hex64, leaf_hash, parse_time
from appliance.audit.checkpoint import (
    Checkpoint,
    Pace,
    load_checkpoints,
    sequence_link,
    signature_problem,
    verify_signature,
)
from appliance.audit.exporter import (
    EXPORT_FORMAT,
    EXPORT_FORMAT_V1,
    CheckpointLine,
    EdgeLine,
    Header,
    Line,
    RecordLine,
    Trailer,
    encode_line,
    trailer_signed_bytes,
)
from appliance.audit.rotation import (
    ROTATE_EVENT,
    order_problems,
    pin_problems,
    record_problems,
    retired_signer_problem,
    retirement_problems,
)
from appliance.audit.schema import connect, read_log_id
from appliance.audit.store import iter_records, table_stats
from runtime import signing
from runtime.errors import AuditError, SignatureError, VerificationError

__all__ = [
    "DEFAULT_PACE",
    "UNPROTECTED_EXPORT_BYTES",
    "Problem",
    "VerifyReport",
    "check_chain",
    "verify_db",
    "verify_export",
    "verify_export_bytes",
    "verify_export_stream",
]

#: Bytes of an export that may change without the verifier noticing: none.
#: Every line must be in canonical form (re-encoded and compared), and the
#: signed trailer covers every byte before it.
UNPROTECTED_EXPORT_BYTES: tuple[str, ...] = ()

#: The pace a log is held to after a checkpoint that does not sign one (format 1,
#: written before checkpoints carried their pace): the settings' defaults.
DEFAULT_PACE = Pace.of(1000, timedelta(minutes=10))

PublicKeys = Ed25519PublicKey | Sequence[Ed25519PublicKey]


class Problem(msgspec.Struct, frozen=True):
    seq: int | None  #: the record the problem is first visible at (None: not tied to a record)
    what: str


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    log_id: str
    records: int  #: records checked
    first_seq: int  #: 0 when there are none
    last_seq: int
    checkpoints: int  #: checkpoints with a valid signature
    covered_to: int  #: highest seq bound to a valid signed checkpoint (later records: chain only)
    first_bad_seq: int | None
    problems: list[Problem]
    newest_checkpoint_at: str = ""  #: created_at of the newest valid regular checkpoint
    key_ids: list[str] = []  #: the keys that signed the valid checkpoints
    compared_with: list[str] = []  #: the earlier off-box copies (exports) it was held to (``--against``)

    def summary(self) -> str:
        if self.ok:
            newest = f" (newest {self.newest_checkpoint_at})" if self.newest_checkpoint_at else ""
            keys = f"; signed by {', '.join(self.key_ids)}" if len(self.key_ids) > 1 else ""
            copies = f"; holds all of {len(self.compared_with)} off-box copy(ies)" if self.compared_with else ""
            return (
                f"OK: log {self.log_id}: records {self.first_seq}..{self.last_seq} ({self.records}) verify; "
                f"{self.checkpoints} signed checkpoints{newest}; signed up to seq {self.covered_to}{keys}{copies}"
            )
        first = self.problems[0]
        if self.first_bad_seq is not None:
            return f"FAILED at seq {self.first_bad_seq}: {first.what} ({len(self.problems)} problem(s))"
        return f"FAILED: {first.what} ({len(self.problems)} problem(s))"  # the log or export as a whole

    def compared(self, copies: Sequence[str], problems: Sequence[tuple[int | None, str]]) -> VerifyReport:
        """This report, held to earlier off-box ``copies`` too (:mod:`appliance.audit.compare`)."""
        report = _with_problems(self, [Problem(seq, what) for seq, what in problems])
        return msgspec.structs.replace(report, compared_with=list(copies))


def _report(
    log_id: str,
    problems: list[Problem],
    *,
    records: int = 0,
    first_seq: int = 0,
    last_seq: int = 0,
    checkpoints: int = 0,
    covered_to: int = 0,
    newest_checkpoint_at: str = "",
    key_ids: Sequence[str] = (),
) -> VerifyReport:
    seqs = [p.seq for p in problems if p.seq is not None]
    first_bad = min(seqs) if seqs else None
    ordered = sorted(problems, key=lambda p: (p.seq is None, p.seq if p.seq is not None else 0))
    return VerifyReport(
        ok=not problems,
        log_id=log_id,
        records=records,
        first_seq=first_seq,
        last_seq=last_seq,
        checkpoints=checkpoints,
        covered_to=covered_to,
        first_bad_seq=first_bad,
        problems=ordered,
        newest_checkpoint_at=newest_checkpoint_at,
        key_ids=sorted(key_ids),
    )


def _with_problems(report: VerifyReport, more: Sequence[Problem]) -> VerifyReport:
    if not more:
        return report
    return _report(
        report.log_id,
        [*report.problems, *more],
        records=report.records,
        first_seq=report.first_seq,
        last_seq=report.last_seq,
        checkpoints=report.checkpoints,
        covered_to=report.covered_to,
        newest_checkpoint_at=report.newest_checkpoint_at,
        key_ids=report.key_ids,
    )


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:g}"


def _sequence_problems(checkpoints: Sequence[Checkpoint], valid_ids: set[int]) -> list[Problem]:
    """Format 2 checkpoints sign their position and the previous checkpoint's signature: find gaps."""
    problems: list[Problem] = []
    for position, cp in enumerate(checkpoints, start=1):
        if cp.version < 2 or id(cp) not in valid_ids:
            continue
        seq = max(cp.size, 1)
        if cp.index != position:
            if cp.index > position:
                what = (
                    f"signed checkpoints were deleted: the {cp.kind} at size {cp.size} ({cp.created_at}) is "
                    f"checkpoint #{cp.index} of the log, but only {position - 1} checkpoint(s) precede it"
                )
            else:
                what = (
                    f"checkpoints were inserted or repeated: the {cp.kind} at size {cp.size} ({cp.created_at}) is "
                    f"checkpoint #{cp.index} of the log, but {position - 1} checkpoint(s) precede it"
                )
            problems.append(Problem(seq, what))
            continue
        expected = sequence_link(checkpoints[position - 2].signature) if position > 1 else ""
        if cp.prev != expected:
            problems.append(
                Problem(
                    seq,
                    f"the checkpoint before the {cp.kind} at size {cp.size} ({cp.created_at}) is not the one it "
                    f"was signed after: a checkpoint was replaced or deleted",
                )
            )
    return problems


def _unknown_key_hint(cp: Checkpoint, public_key: PublicKeys) -> str:
    """For a checkpoint naming a key none of the trusted ones is: the likelier cause than a forgery."""
    keys = (public_key,) if isinstance(public_key, Ed25519PublicKey) else tuple(public_key)
    if cp.key_id in {signing.key_id(k) for k in keys}:
        return ""
    return (
        f" (if the log's signing key was replaced, `inferbox signing-key create --force`, the retired key's public "
        f"key may be missing from <home>/keys/retired/: put it there as {cp.key_id}.pub, or pass it with "
        "--public-key; if it never was, this checkpoint was not signed by the log's key)"
    )


def check_chain(
    log_id: str,
    records: Iterable[AuditRecord],
    checkpoints: Sequence[Checkpoint],
    public_key: PublicKeys,
    *,
    from_start: bool = True,
    to_head: bool = True,
    extra: Sequence[Problem] = (),
    before: AuditRecord | None = None,
    after: AuditRecord | None = None,
    since: str | None = None,
    until: str | None = None,
    window: bool = False,
    check_pace: bool = True,
    legacy_pace: Pace | None = None,
    legacy_start: bool = False,
    now: datetime | None = None,
    max_age: timedelta | None = None,
) -> VerifyReport:
    """Verify ``records`` (in stored order) against ``checkpoints`` (in written order).

    ``public_key``: one trusted key or several (a log signed before and after a
    key rotation).  ``from_start``: the records start at the log's start (seq 1,
    or the newest prune anchor).  ``to_head``: they end at the log's head, so no
    signed checkpoint may be larger.  A window export passes False for either,
    and ``before`` / ``after``: the records just outside it (checked for their
    leaf hash and link, not counted), ``since`` / ``until``: its bounds, and
    ``window=True`` to hold the checkpoints signed inside it to its seq range.

    ``check_pace``: the records after the newest checkpoint before the end must
    be fewer than the pace that checkpoint signs (``legacy_pace``, default
    :data:`DEFAULT_PACE`, for a format 1 checkpoint).  ``legacy_start``: the log
    was started by a writer before format 2, which signed its first checkpoint
    only after ``checkpoint_every`` records (or at close): records with no
    checkpoint at all are then held to that count instead of failing.  ``now`` / ``max_age``:
    fail when the newest checkpoint is older than ``max_age``.
    """
    problems = list(extra)
    valid: list[Checkpoint] = []
    for cp in checkpoints:
        if cp.log_id != log_id:
            problems.append(Problem(cp.size, f"{cp.kind} at size {cp.size} belongs to log {cp.log_id!r}, not {log_id}"))
        elif not is_hex64(cp.head_hash) or cp.size < 0:
            problems.append(Problem(cp.size, f"{cp.kind} at size {cp.size} has a malformed head hash or size"))
        elif (why := signature_problem(cp, public_key)) is not None:
            problems.append(
                Problem(max(cp.size, 1), f"bad checkpoint signature: {why}{_unknown_key_hint(cp, public_key)}")
            )
        else:
            valid.append(cp)
    problems.extend(_sequence_problems(checkpoints, {id(cp) for cp in valid}))
    heads: dict[int, Checkpoint] = {}
    for kind in ("checkpoint", "prune"):
        prev: Checkpoint | None = None
        for cp in (c for c in valid if c.kind == kind):
            if prev is not None and cp.size < prev.size:  # written in commit order (ids); clocks may step back
                problems.append(
                    Problem(
                        max(cp.size, 1),
                        f"inconsistent checkpoints: {kind} at size {cp.size} ({cp.created_at}) does not extend "
                        f"the earlier {kind} at size {prev.size} ({prev.created_at})",
                    )
                )
            prev = cp
    for cp in valid:
        seen = heads.setdefault(cp.size, cp)
        if seen.head_hash != cp.head_hash:
            problems.append(
                Problem(
                    max(cp.size, 1),
                    f"inconsistent checkpoints: two signed checkpoints disagree on the head at size {cp.size}",
                )
            )
    problems.extend(
        Problem(seq, what)
        for seq, what in (
            *retirement_problems(valid),
            *order_problems(valid),
            *pin_problems(checkpoints, {id(cp) for cp in valid}),
        )
    )
    regular = [c for c in valid if c.kind == "checkpoint"]
    #: the newest regular checkpoint at each size (a later one at the same size: an idle checkpoint)
    newest_at: dict[int, Checkpoint] = {}
    for cp in regular:
        newest_at[cp.size] = cp
    prunes = [c for c in valid if c.kind == "prune"]
    anchor = max(prunes, key=lambda c: c.size) if prunes else None
    expected_seq: int | None = None
    expected_prev = ""
    if from_start:
        expected_seq = anchor.size + 1 if anchor else 1
        expected_prev = anchor.head_hash if anchor else genesis_hash(log_id)
    start_seq = expected_seq
    first_seq = 0
    last_in_window: AuditRecord | None = None
    first_in_window: AuditRecord | None = None
    count = 0
    broken = False
    covered = 0
    # the newest recorded_at (and its seq) since the last regular checkpoint size walked past (pace rule)
    segment_max: tuple[str, int] | None = None
    #: the newest signed checkpoint before the record walked and the earliest date a record after it
    #: may have (parsed once per checkpoint, not once per record); None: not found yet
    dated_after: tuple[Checkpoint | None, datetime | None] | None = None
    #: the rotation records walked: (seq, the key ids they retire)
    rotations: list[tuple[int, tuple[str, ...]]] = []
    edge_before = [before] if before is not None else []
    edge_after = [after] if after is not None else []
    walk = itertools.chain(
        ((r, True) for r in edge_before), ((r, False) for r in records), ((r, True) for r in edge_after)
    )
    for rec, is_edge in walk:
        if broken:
            continue
        if expected_seq is None:
            expected_seq, expected_prev, start_seq = rec.seq, rec.prev_hash, rec.seq
        seq = expected_seq
        if rec.seq != seq:
            broken = True
            if rec.seq > seq and count == 0 and from_start and before is None:
                problems.append(
                    Problem(
                        seq,
                        f"records {seq}..{rec.seq - 1} are missing and no signed prune checkpoint anchors "
                        f"seq {rec.seq - 1} (a prune without its checkpoint, or records deleted)",
                    )
                )
            elif rec.seq > seq:
                problems.append(Problem(seq, f"record {seq} is missing (deleted); the next record is {rec.seq}"))
            else:
                problems.append(
                    Problem(rec.seq, f"record {rec.seq} appears again after record {seq - 1} (duplicated or reordered)")
                )
            continue
        if rec.log_id != log_id:
            problems.append(Problem(seq, f"record {seq} names log {rec.log_id!r}, not {log_id}"))
            broken = True
            continue
        if rec.prev_hash != expected_prev:
            problems.append(
                Problem(
                    seq,
                    f"record {seq}: prev_hash does not match the leaf hash of record {seq - 1} "
                    f"(record {seq - 1} was rewritten, a record was inserted, or this link was edited)",
                )
            )
            broken = True
            continue
        computed = leaf_hash(rec)
        if computed != rec.leaf_hash:
            problems.append(Problem(seq, f"record {seq}: a field changed (its leaf hash does not match its fields)"))
            broken = True
            continue
        if rec.event == ROTATE_EVENT and (ids := rec.details.get("retired_key_ids")):
            rotations.append((seq, tuple(k for k in ids.split(",") if k)))
        if dated_after is None:
            dated_after = _earliest_after(_newest_before(newest_at, seq))
        early = _dated_back(rec, *dated_after)
        if early is not None:
            problems.append(early)
        if seq in newest_at:
            dated_after = _earliest_after(newest_at[seq])
        signed = heads.get(seq)
        if signed is not None and signed.head_hash != computed:
            problems.append(
                Problem(
                    seq,
                    f"inconsistent checkpoint: the signed {signed.kind} at size {seq} "
                    f"has head {signed.head_hash[:16]}... but record {seq} hashes to {computed[:16]}..."
                    f" (records up to {seq} were rewritten)",
                )
            )
            broken = True
            continue
        if signed is not None:
            covered = seq
        expected_prev = computed
        expected_seq = seq + 1
        if not is_edge or rec is before:
            if seq in newest_at:
                segment_max = None
            elif segment_max is None or rec.recorded_at > segment_max[0]:
                segment_max = (rec.recorded_at, seq)
        if is_edge:
            continue
        if not first_seq:
            first_seq = rec.seq
            first_in_window = rec
        last_in_window = rec
        count += 1
    problems.extend(Problem(seq, what) for seq, what in record_problems(rotations, valid))
    last_seq = last_in_window.seq if last_in_window is not None else 0
    walked_to = (expected_seq - 1) if expected_seq is not None else 0
    if not broken and to_head and expected_seq is not None:
        beyond = [c for c in valid if c.size > walked_to]
        if beyond:
            top = max(c.size for c in beyond)
            problems.append(
                Problem(
                    walked_to + 1,
                    f"tail cut: a signed checkpoint says the log had {top} records, but it ends at seq {walked_to}",
                )
            )
    if not broken and from_start and anchor is not None and start_seq == anchor.size + 1:
        covered = max(covered, anchor.size) if count == 0 and before is None else covered
    if not broken and check_pace and last_in_window is not None and (to_head or after is not None or until):
        problems.extend(
            _pace_problems(first_seq, last_in_window.seq, segment_max, regular, newest_at, legacy_pace, legacy_start)
        )
    if not broken and window:
        problems.extend(_window_problems(first_in_window, last_in_window, before, after, since, until, regular))
    newest = regular[-1].created_at if regular else ""
    if now is not None and max_age is not None:
        if not regular:
            problems.append(Problem(None, "no signed checkpoint at all (--max-age)"))
        elif now - parse_time(newest) > max_age:
            problems.append(
                Problem(
                    None,
                    f"the newest signed checkpoint was made at {newest}, more than {_minutes(max_age)} minutes "
                    f"ago (--max-age): a running service signs one every checkpoint_minutes; the service is "
                    f"stopped, or the newest checkpoints were deleted with the records after them",
                )
            )
    return _report(
        log_id,
        problems,
        records=count,
        first_seq=first_seq if count else 0,
        last_seq=last_seq if count else 0,
        checkpoints=len(valid),
        covered_to=min(covered, last_seq) if count and after is not None else covered,
        newest_checkpoint_at=newest,
        key_ids=sorted({c.key_id for c in valid}),
    )


def _newest_before(newest_at: dict[int, Checkpoint], seq: int) -> Checkpoint | None:
    earlier = [size for size in newest_at if size < seq]
    return newest_at[max(earlier)] if earlier else None


def _earliest_after(cp: Checkpoint | None) -> tuple[Checkpoint | None, datetime | None]:
    """``cp`` and the earliest date a record after it may have (None: no bound; see :func:`_dated_back`)."""
    if cp is None or cp.pace is None:
        return cp, None
    try:
        return cp, parse_time(cp.created_at) - cp.pace.interval
    except AuditError:
        return cp, None  # a malformed time fails the checkpoint's own checks


def _dated_back(rec: AuditRecord, cp: Checkpoint | None, earliest: datetime | None) -> Problem | None:
    """A record dated more than the signed interval before the newest checkpoint before it.

    The writer dates each record after the checkpoint before it (a checkpoint and its records share
    one time, taken in the transaction that writes them).  A record dated earlier was dated back: a
    record forged into the window no checkpoint signs yet, to land in a report of another day (the
    next checkpoint then signs it in); or the box's clock was set back that far.  Checkpoints from
    before signed pace (format 1) set no bound (``earliest`` None)."""
    if cp is None or cp.pace is None or earliest is None:
        return None
    try:
        early = parse_time(rec.recorded_at) < earliest
    except AuditError:
        return None  # a malformed time fails the record's own checks
    if not early:
        return None
    return Problem(
        rec.seq,
        f"record {rec.seq} is dated {rec.recorded_at}, more than {_minutes(cp.pace.interval)} minutes before the "
        f"signed checkpoint before it (size {cp.size}, {cp.created_at}), but the writer dates each record after "
        "the checkpoint before it: dated back (a forged record), or the box's clock was set back that far",
    )


def _pace_problems(
    start: int,
    end: int,
    segment_max: tuple[str, int] | None,
    regular: Sequence[Checkpoint],
    newest_at: dict[int, Checkpoint],
    legacy_pace: Pace | None,
    legacy_start: bool = False,
) -> list[Problem]:
    """Records ``start..end`` (``end``: a transaction's last record) after the newest checkpoint before ``end``.

    The writer checks after every transaction whether ``checkpoint_every``
    records or the checkpoint interval have passed since the newest checkpoint
    and, if so, signs one in that same transaction.  So in an honest log every
    record is covered by a checkpoint, except fewer than ``checkpoint_every``
    records written less than the interval after the newest checkpoint.
    """
    if end in newest_at:
        return []
    earlier = [s for s in newest_at if s < end]
    if not earlier:
        if legacy_start or any(c.size > end for c in regular):
            # a window ending before the first checkpoint of a log from before format 2 (which signed
            # its first checkpoint only after checkpoint_every records, or at close)
            pace = legacy_pace or DEFAULT_PACE
            if end >= pace.every:
                return [
                    Problem(
                        pace.every,
                        f"records 1..{end} have no signed checkpoint, but the writer signs one every "
                        f"{pace.every} records (checkpoint_every): signed checkpoints were deleted",
                    )
                ]
            return []
        return [
            Problem(
                start,
                f"no signed checkpoint covers records {start}..{end}: the writer signs one with a log's "
                f"first records, every checkpoint_every records, every checkpoint_minutes and at close "
                f"(checkpoints deleted?). A log started by an inferbox before checkpoint format 2, whose "
                f"writer stopped before its first checkpoint, verifies with --legacy-start (its database: an "
                f"export of it cannot show where such a log began)",
            )
        ]
    cp = newest_at[max(earlier)]
    signed = cp.pace
    pace = signed if signed is not None else (legacy_pace or DEFAULT_PACE)
    legacy = ""
    if signed is None:
        legacy = (
            f" (that checkpoint predates signed pace, so the log is held to {pace.describe()} from the local "
            f"settings; if it was written with a slower pace, pass --checkpoint-every / --checkpoint-minutes)"
        )
    out: list[Problem] = []
    behind = end - cp.size
    if behind >= pace.every:
        out.append(
            Problem(
                cp.size + pace.every,
                f"records {cp.size + 1}..{end} ({behind}) follow the newest signed checkpoint before them "
                f"(size {cp.size}, {cp.created_at}) but the writer signs one every {pace.every} records: "
                f"no signed checkpoint covers them (checkpoints deleted?){legacy}",
            )
        )
    if segment_max is not None:
        written, seq = segment_max
        try:
            late = parse_time(written) - parse_time(cp.created_at) >= pace.interval
        except AuditError:
            late = False  # a malformed time fails the record's own checks
        if late:
            out.append(
                Problem(
                    seq,
                    f"record {seq} was written at {written}, {_minutes(pace.interval)} minutes or more after the "
                    f"newest signed checkpoint before it (size {cp.size}, {cp.created_at}), but the writer signs "
                    f"one within that time: no signed checkpoint covers it (checkpoints deleted?){legacy}",
                )
            )
    return out


def _window_problems(
    first: AuditRecord | None,
    last: AuditRecord | None,
    before: AuditRecord | None,
    after: AuditRecord | None,
    since: str | None,
    until: str | None,
    regular: Sequence[Checkpoint],
) -> list[Problem]:
    """A window export's edges and the checkpoints signed inside it."""
    out: list[Problem] = []
    if since is not None:
        if before is not None and not before.recorded_at < since:
            out.append(
                Problem(before.seq, f"the record before the window (seq {before.seq}) was not written before {since}")
            )
        if first is not None and first.recorded_at < since:
            out.append(Problem(first.seq, f"the window's first record (seq {first.seq}) was written before {since}"))
    if until is not None:
        if after is not None and after.recorded_at < until:
            out.append(Problem(after.seq, f"the record after the window (seq {after.seq}) was written before {until}"))
        if last is not None and not last.recorded_at < until:
            out.append(Problem(last.seq, f"the window's last record (seq {last.seq}) was not written before {until}"))
    # with a monotonic clock, a checkpoint signed at time t inside [since, until) names the head at t,
    # which lies between the record before the window and the window's last record (no record before
    # the window: it starts at the prune anchor, and checkpoints older than the anchor are legitimate)
    lo = before.seq if before is not None else None
    hi = after.seq - 1 if after is not None else None
    for cp in regular:
        if (since is not None and cp.created_at < since) or (until is not None and cp.created_at >= until):
            continue
        if lo is not None and cp.size < lo:
            out.append(
                Problem(
                    lo + 1,
                    f"a checkpoint signed inside the window ({cp.created_at}) says the log had {cp.size} records, "
                    f"but the record before the window is seq {lo}: records were removed at the window's start",
                )
            )
        elif hi is not None and cp.size > hi:
            out.append(
                Problem(
                    hi + 1,
                    f"a checkpoint signed inside the window ({cp.created_at}) says the log had {cp.size} records, "
                    f"but the record after the window is seq {hi + 1}: records were removed at the window's end",
                )
            )
    return out


def verify_db(
    db_path: Path,
    public_key: PublicKeys,
    *,
    legacy_pace: Pace | None = None,
    legacy_start: bool = False,
    now: datetime | None = None,
    max_age: timedelta | None = None,
) -> VerifyReport:
    """Verify an audit database file (opened read-only); ``legacy_start``: see :func:`check_chain`."""
    conn = connect(Path(db_path), read_only=True)
    try:
        conn.execute("BEGIN")  # one snapshot
        log_id = read_log_id(conn)
        checkpoints = load_checkpoints(conn)
        report = check_chain(
            log_id,
            iter_records(conn, log_id),
            checkpoints,
            public_key,
            legacy_pace=legacy_pace,
            legacy_start=legacy_start,
            now=now,
            max_age=max_age,
        )
        rows, lo, hi = table_stats(conn)
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:  # e.g. text that is not UTF-8, a damaged file
        raise VerificationError(
            f"audit database {db_path} cannot be read ({exc}): it was damaged or edited by hand; "
            f"keep a copy and compare it with the last off-box export"
        ) from exc
    finally:
        conn.close()
    if report.ok and (rows, lo or 0, hi or 0) != (report.records, report.first_seq, report.last_seq):
        report = _with_problems(
            report,
            [
                Problem(
                    None,
                    f"the records table holds {rows} rows (seq {lo}..{hi}) but {report.records} were verified "
                    f"(seq {report.first_seq}..{report.last_seq}): rows the verifier did not see",
                )
            ],
        )
    return report


_DECODER = msgspec.json.Decoder(Line)
_RANK = {Header: 0, RecordLine: 2, CheckpointLine: 4, Trailer: 5}

#: what the second read of an export does with each line (one byte per line, kept from the first read)
_SKIP, _DECODE, _CHECKPOINT = 0, 1, 2

#: called with every well-formed line of an export as it is verified, in file order (see :func:`verify_export`)
Each = Callable[[Line], None]


def _rank(line: Line) -> int:
    if isinstance(line, EdgeLine):
        return 1 if line.side == "before" else 3
    return _RANK[type(line)]


def verify_export(
    path: Path, public_key: PublicKeys, *, legacy_pace: Pace | None = None, each: Each | None = None
) -> VerifyReport:
    """Verify a JSONL export on its own (records, edges, checkpoints, prune anchors, signed trailer).

    The file is streamed (read twice, line by line: memory does not grow with its records); ``each``:
    see :func:`verify_export_stream`.
    """
    try:
        with Path(path).open("rb") as f:
            return verify_export_stream(f, public_key, legacy_pace=legacy_pace, each=each, named=str(path))
    except OSError as exc:
        raise AuditError(f"cannot read export {path}: {exc.strerror}") from exc


def _trailer_problem(trailer: Trailer, public_key: PublicKeys) -> str | None:
    keys = (public_key,) if isinstance(public_key, Ed25519PublicKey) else tuple(public_key)
    by_id = {signing.key_id(k): k for k in keys}
    try:
        sig = bytes.fromhex(trailer.signature)
        key = by_id.get(trailer.key_id)
        if sig.hex() != trailer.signature or key is None:
            raise SignatureError(f"export trailer is not signed by {' or '.join(sorted(by_id)) or 'a trusted key'}")
        why = verify_signature(key, trailer_signed_bytes(trailer.lines, trailer.sha256), sig)
        if why is not None:
            raise SignatureError(why)
    except (ValueError, SignatureError) as exc:
        return f"export signature: {exc}"
    return None


def _signed(checkpoints: Sequence[Checkpoint], public_key: PublicKeys) -> list[Checkpoint]:
    """The checkpoints signed by a trusted key (a forged one retires nothing)."""
    return [cp for cp in checkpoints if signature_problem(cp, public_key) is None]


def verify_export_bytes(data: bytes, public_key: PublicKeys, *, legacy_pace: Pace | None = None) -> VerifyReport:
    """:func:`verify_export` on the export's bytes."""
    return verify_export_stream(io.BytesIO(data), public_key, legacy_pace=legacy_pace)


class _Scan:
    """What the first read of an export keeps: everything but its records (one byte per line for those)."""

    def __init__(self) -> None:
        self.lines = 0
        self.ends_with_newline = False
        self.line_problems: list[Problem] = []
        self.kinds = bytearray()  #: per line, for the second read
        self.first_parsed: tuple[int, bool] | None = None  #: (line number, is a header) of the first good line
        self.header: Header | None = None
        self.headers = 0
        self.trailer: tuple[int, Trailer] | None = None  #: the first trailer and its line number
        self.trailers = 0
        self.body_sha = ""  #: of the bytes before the last trailer line
        self.whole_sha = ""  #: of every byte
        self.checkpoints: list[CheckpointLine] = []
        self.before: EdgeLine | None = None  #: the first edge record of each side, and how many
        self.befores = 0
        self.after: EdgeLine | None = None
        self.afters = 0
        self.first_record: int | None = None  #: seqs of the first and last record lines
        self.last_record: int | None = None
        self.disordered = False

    def read(self, f: BinaryIO) -> None:
        digest = hashlib.sha256()
        top = 0
        for raw in f:
            self.lines += 1
            number = self.lines
            self.ends_with_newline = raw.endswith(b"\n")
            text = raw[:-1] if self.ends_with_newline else raw
            kind = _SKIP
            try:
                line = _DECODER.decode(text)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.line_problems.append(Problem(None, f"line {number}: not a valid export line ({exc})"))
            else:
                if encode_line(line) != text + b"\n":
                    self.line_problems.append(Problem(None, f"line {number}: not in canonical form (edited by hand?)"))
                else:
                    if isinstance(line, Trailer):
                        self.body_sha = digest.hexdigest()  # every byte before this line
                    kind = self._take(number, line)
                    rank = _rank(line)
                    self.disordered = self.disordered or rank < top
                    top = max(top, rank)
            self.kinds.append(kind)
            digest.update(raw)
        self.whole_sha = digest.hexdigest()

    def _take(self, number: int, line: Line) -> int:
        if self.first_parsed is None:
            self.first_parsed = (number, isinstance(line, Header))
        if isinstance(line, RecordLine):
            if self.first_record is None:
                self.first_record = line.seq
            self.last_record = line.seq
            return _DECODE
        if isinstance(line, CheckpointLine):
            self.checkpoints.append(line)
            return _CHECKPOINT
        if isinstance(line, Header):
            self.headers += 1
            self.header = self.header or line
        elif isinstance(line, Trailer):
            self.trailers += 1
            self.trailer = self.trailer or (number, line)
        elif line.side == "before":
            self.befores += 1
            self.before = self.before or line
        else:
            self.afters += 1
            self.after = self.after or line
        return _DECODE


class _Records:
    """The second read of an export: its record lines, for :func:`check_chain`, and every line for ``each``."""

    def __init__(self, f: BinaryIO, scan: _Scan, each: Each | None) -> None:
        self._f = f
        self._scan = scan
        self._each = each
        self.unchanged: bool | None = None  #: the bytes read twice were the same (None: not read through yet)

    def __iter__(self) -> Iterator[RecordLine]:
        scan, each = self._scan, self._each
        self._f.seek(0)
        digest = hashlib.sha256()
        checkpoints = iter(scan.checkpoints)
        number = 0
        for number, raw in enumerate(self._f, start=1):
            digest.update(raw)
            kind = scan.kinds[number - 1] if number <= len(scan.kinds) else _SKIP
            if kind == _SKIP:
                continue
            line: Line | None
            if kind == _CHECKPOINT:
                line = next(checkpoints, None)  # the very objects the first read kept
            else:
                try:
                    line = _DECODER.decode(raw[:-1] if raw.endswith(b"\n") else raw)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    line = None  # changed since the first read: caught below
            if line is None:
                continue
            if each is not None:
                each(line)
            if isinstance(line, RecordLine):
                yield line
        self.unchanged = number == scan.lines and digest.hexdigest() == scan.whole_sha


def verify_export_stream(
    f: BinaryIO,
    public_key: PublicKeys,
    *,
    legacy_pace: Pace | None = None,
    each: Each | None = None,
    named: str | None = None,
) -> VerifyReport:
    """:func:`verify_export` on an open, seekable binary file.

    It is read twice, line by line, and never held whole: the first read checks every line (well-formed,
    canonical, in order), hashes the bytes for the signed trailer and keeps the header, edge records and
    checkpoints; the second feeds the records to :func:`check_chain` one at a time and fails the report
    if the bytes differ from the first read's.  ``each`` is called during the second read with every
    well-formed line in file order (header, edges, records, checkpoints, trailer): a caller follows the
    export as it is verified (:mod:`appliance.audit.compare`); what it learns counts only if the report
    is ok.  ``named``: the file's name, for an AuditError (nothing can be verified: exit 2, not the
    tampered export's 1) when no line of it is an export line at all (a wrong file given).
    """
    scan = _Scan()
    scan.read(f)
    if named is not None and scan.first_parsed is None:
        what = (
            "is empty" if scan.lines == 0 else f"is not an inferbox audit export: none of its {scan.lines} lines is one"
        )
        raise AuditError(f"{named} {what}; give a file `inferbox audit export` or `audit ship` wrote")
    problems: list[Problem] = []
    if not scan.ends_with_newline:
        problems.append(Problem(None, "export does not end with a newline (truncated?)"))
    problems.extend(scan.line_problems)
    scan.line_problems = []
    first = scan.first_parsed
    if scan.headers != 1 or first is None or not first[1] or first[0] != 1:
        problems.append(Problem(None, "export must start with exactly one header line"))
    if scan.trailers != 1 or scan.trailer is None or scan.trailer[0] != scan.lines:
        problems.append(Problem(None, "export must end with exactly one signed trailer line"))
    else:
        trailer = scan.trailer[1]
        if trailer.lines != scan.lines - 1:
            problems.append(Problem(None, f"trailer counts {trailer.lines} lines, the export has {scan.lines - 1}"))
        if scan.body_sha != trailer.sha256:
            problems.append(Problem(None, "export bytes changed after it was signed (trailer sha256 differs)"))
        if (why := _trailer_problem(trailer, public_key)) is not None or (
            why := retired_signer_problem(trailer.key_id, _signed(scan.checkpoints, public_key), "the export")
        ):
            problems.append(Problem(None, why))
    header = scan.header
    if header is None:
        return _report("", problems)
    if header.format not in (EXPORT_FORMAT, EXPORT_FORMAT_V1):
        problems.append(Problem(None, f"export format {header.format!r} is not {EXPORT_FORMAT}"))
    if scan.disordered:
        problems.append(
            Problem(None, "export lines out of order: header, edge before, records, edge after, checkpoints, trailer")
        )
    v2 = header.format == EXPORT_FORMAT
    if (scan.befores or scan.afters) and not v2:
        problems.append(Problem(None, f"edge lines in an export of format {header.format}"))
    if scan.befores > 1 or scan.afters > 1:
        problems.append(Problem(None, "an export holds at most one edge record on each side"))
    if (scan.befores and header.since is None) or (scan.afters and header.until is None):
        problems.append(Problem(None, "edge records in an export that is not bounded on that side"))
    before, after = scan.before, scan.after
    if scan.first_record is not None and scan.last_record is not None:
        if scan.first_record != header.first_seq:
            problems.append(Problem(header.first_seq, f"export header says it starts at seq {header.first_seq}"))
        if scan.last_record != header.last_seq:
            problems.append(
                Problem(
                    min(scan.last_record, header.last_seq) + 1,
                    f"export header says it ends at seq {header.last_seq}, the last record is {scan.last_record}",
                )
            )
    elif header.first_seq:
        problems.append(Problem(header.first_seq, "export header names records but the export holds none"))
    if v2:
        # no record before the window: it starts at the log's start (or its prune anchor);
        # none after it: it reaches the log's head
        from_start = header.since is None or before is None
        to_head = header.until is None or after is None
    else:
        from_start, to_head = header.since is None, header.until is None
    records = _Records(f, scan, each)
    walk = iter(records)
    report = check_chain(
        header.log_id,
        walk,
        scan.checkpoints,
        public_key,
        from_start=from_start,
        to_head=to_head,
        extra=problems,
        before=before,
        after=after,
        since=header.since if v2 else None,
        until=header.until if v2 else None,
        window=v2 and (header.since is not None or header.until is not None),
        legacy_pace=legacy_pace,
        # a format 1 export comes from a writer that signed its first checkpoint only after
        # checkpoint_every records (its header is covered by the signed trailer)
        legacy_start=not v2,
    )
    for _ in walk:  # the lines after the last record, for each (check_chain reads every record)
        pass
    if not records.unchanged:
        report = _with_problems(
            report, [Problem(None, "the export changed while it was being verified: verify it again")]
        )
    return report
