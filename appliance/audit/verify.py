"""The offline verifier: needs only the database (or an export) and the public key.

It recomputes every leaf hash and link, checks every checkpoint signature, that
checkpoints agree with each other and with the records, that no signed
checkpoint reaches past the last record (tail cut), and that a log starting
after seq 1 has a signed prune anchor for the gap.  The report names the first
failing seq and what failed.  See ``docs/audit.md`` for what it cannot detect.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.canonical import AuditRecord, genesis_hash, is_hex64, leaf_hash
from appliance.audit.checkpoint import Checkpoint, signature_problem, verify_signature
from appliance.audit.exporter import (
    EXPORT_FORMAT,
    CheckpointLine,
    Header,
    Line,
    RecordLine,
    Trailer,
    encode_line,
    trailer_signed_bytes,
)
from appliance.audit.schema import connect, read_log_id
from appliance.audit.store import iter_records
from runtime import signing
from runtime.errors import AuditError, SignatureError, VerificationError

__all__ = [
    "UNPROTECTED_EXPORT_BYTES",
    "Problem",
    "VerifyReport",
    "check_chain",
    "verify_db",
    "verify_export",
    "verify_export_bytes",
]

#: Bytes of an export that may change without the verifier noticing: none.
#: Every line must be in canonical form (re-encoded and compared), and the
#: signed trailer covers every byte before it.
UNPROTECTED_EXPORT_BYTES: tuple[str, ...] = ()


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

    def summary(self) -> str:
        if self.ok:
            return (
                f"OK: log {self.log_id}: records {self.first_seq}..{self.last_seq} ({self.records}) verify; "
                f"{self.checkpoints} signed checkpoints; signed up to seq {self.covered_to}"
            )
        first = self.problems[0]
        where = f"seq {self.first_bad_seq}" if self.first_bad_seq is not None else "export"
        return f"FAILED at {where}: {first.what} ({len(self.problems)} problem(s))"

    def raise_for_problems(self) -> None:
        if not self.ok:
            raise VerificationError(self.summary(), seq=self.first_bad_seq)


def _report(
    log_id: str,
    problems: list[Problem],
    *,
    records: int = 0,
    first_seq: int = 0,
    last_seq: int = 0,
    checkpoints: int = 0,
    covered_to: int = 0,
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
    )


def check_chain(
    log_id: str,
    records: Iterable[AuditRecord],
    checkpoints: Sequence[Checkpoint],
    public_key: Ed25519PublicKey,
    *,
    from_start: bool = True,
    to_head: bool = True,
    extra: Sequence[Problem] = (),
) -> VerifyReport:
    """Verify ``records`` (in stored order) against ``checkpoints`` (in written order).

    ``from_start``: the records start at the log's start (seq 1, or the newest
    prune anchor).  ``to_head``: they end at the log's head, so no signed
    checkpoint may be larger.  A window export passes False for either.
    """
    problems = list(extra)
    valid: list[Checkpoint] = []
    for cp in checkpoints:
        if cp.log_id != log_id:
            problems.append(Problem(cp.size, f"{cp.kind} at size {cp.size} belongs to log {cp.log_id!r}, not {log_id}"))
        elif not is_hex64(cp.head_hash) or cp.size < 0:
            problems.append(Problem(cp.size, f"{cp.kind} at size {cp.size} has a malformed head hash or size"))
        elif (why := signature_problem(cp, public_key)) is not None:
            problems.append(Problem(max(cp.size, 1), f"bad checkpoint signature: {why}"))
        else:
            valid.append(cp)
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
    prunes = [c for c in valid if c.kind == "prune"]
    anchor = max(prunes, key=lambda c: c.size) if prunes else None
    expected_seq: int | None = None
    expected_prev = ""
    if from_start:
        expected_seq = anchor.size + 1 if anchor else 1
        expected_prev = anchor.head_hash if anchor else genesis_hash(log_id)
    start_seq = expected_seq
    first_seq = 0
    count = 0
    broken = False
    covered = 0
    for rec in records:
        if broken:
            continue
        if expected_seq is None:
            expected_seq, expected_prev, start_seq = rec.seq, rec.prev_hash, rec.seq
        if not first_seq:
            first_seq = rec.seq
        seq = expected_seq
        if rec.seq != seq:
            broken = True
            if rec.seq > seq and count == 0 and from_start:
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
        count += 1
    last_seq = (expected_seq - 1) if expected_seq is not None else 0
    if not broken and to_head and expected_seq is not None:
        beyond = [c for c in valid if c.size > last_seq]
        if beyond:
            top = max(c.size for c in beyond)
            problems.append(
                Problem(
                    last_seq + 1,
                    f"tail cut: a signed checkpoint says the log had {top} records, but it ends at seq {last_seq}",
                )
            )
    if not broken and from_start and anchor is not None and start_seq == anchor.size + 1:
        covered = max(covered, anchor.size) if count == 0 else covered
    return _report(
        log_id,
        problems,
        records=count,
        first_seq=first_seq if count else 0,
        last_seq=last_seq if count else 0,
        checkpoints=len(valid),
        covered_to=covered,
    )


def verify_db(db_path: Path, public_key: Ed25519PublicKey) -> VerifyReport:
    """Verify an audit database file (opened read-only)."""
    conn = connect(Path(db_path), read_only=True)
    try:
        conn.execute("BEGIN")  # one snapshot
        log_id = read_log_id(conn)
        from appliance.audit.checkpoint import load_checkpoints

        checkpoints = load_checkpoints(conn)
        report = check_chain(log_id, iter_records(conn, log_id), checkpoints, public_key)
        conn.execute("COMMIT")
        return report
    finally:
        conn.close()


_DECODER = msgspec.json.Decoder(Line)


def verify_export(path: Path, public_key: Ed25519PublicKey) -> VerifyReport:
    """Verify a JSONL export on its own (records, checkpoints, prune anchors, signed trailer)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read export {path}: {exc.strerror}") from exc
    return verify_export_bytes(data, public_key)


def verify_export_bytes(data: bytes, public_key: Ed25519PublicKey) -> VerifyReport:
    """:func:`verify_export` on the export's bytes."""
    problems: list[Problem] = []
    if not data.endswith(b"\n"):
        problems.append(Problem(None, "export does not end with a newline (truncated?)"))
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    parsed: list[tuple[int, Line]] = []
    offset = 0
    trailer_at = -1
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = _DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            problems.append(Problem(None, f"line {number}: not a valid export line ({exc})"))
        else:
            if encode_line(line) != raw + b"\n":
                problems.append(Problem(None, f"line {number}: not in canonical form (edited by hand?)"))
            else:
                parsed.append((number, line))
                if isinstance(line, Trailer):
                    trailer_at = offset
        offset += len(raw) + 1
    headers = [ln for _, ln in parsed if isinstance(ln, Header)]
    trailers = [(n, ln) for n, ln in parsed if isinstance(ln, Trailer)]
    if len(headers) != 1 or not parsed or not isinstance(parsed[0][1], Header) or parsed[0][0] != 1:
        problems.append(Problem(None, "export must start with exactly one header line"))
    if len(trailers) != 1 or trailers[0][0] != len(raw_lines):
        problems.append(Problem(None, "export must end with exactly one signed trailer line"))
    else:
        trailer = trailers[0][1]
        body = data[:trailer_at]
        if trailer.lines != len(raw_lines) - 1:
            problems.append(Problem(None, f"trailer counts {trailer.lines} lines, the export has {len(raw_lines) - 1}"))
        if hashlib.sha256(body).hexdigest() != trailer.sha256:
            problems.append(Problem(None, "export bytes changed after it was signed (trailer sha256 differs)"))
        try:
            sig = bytes.fromhex(trailer.signature)
            if sig.hex() != trailer.signature or trailer.key_id != signing.key_id(public_key):
                raise SignatureError(f"export trailer is not signed by key {signing.key_id(public_key)}")
            why = verify_signature(public_key, trailer_signed_bytes(trailer.lines, trailer.sha256), sig)
            if why is not None:
                raise SignatureError(why)
        except (ValueError, SignatureError) as exc:
            problems.append(Problem(None, f"export signature: {exc}"))
    header = headers[0] if headers else None
    if header is None:
        return _report("", problems)
    if header.format != EXPORT_FORMAT:
        problems.append(Problem(None, f"export format {header.format!r} is not {EXPORT_FORMAT}"))
    kinds = [type(ln) for _, ln in parsed]
    last_record = max((i for i, k in enumerate(kinds) if k is RecordLine), default=-1)
    first_cp = min((i for i, k in enumerate(kinds) if k is CheckpointLine), default=len(kinds))
    if last_record > first_cp:
        problems.append(Problem(None, "export lines out of order: a record follows a checkpoint"))
    records = [ln for _, ln in parsed if isinstance(ln, RecordLine)]
    checkpoints: list[Checkpoint] = [ln for _, ln in parsed if isinstance(ln, CheckpointLine)]
    if records:
        if records[0].seq != header.first_seq:
            problems.append(Problem(header.first_seq, f"export header says it starts at seq {header.first_seq}"))
        if records[-1].seq != header.last_seq:
            problems.append(
                Problem(
                    min(records[-1].seq, header.last_seq) + 1,
                    f"export header says it ends at seq {header.last_seq}, the last record is {records[-1].seq}",
                )
            )
    elif header.first_seq:
        problems.append(Problem(header.first_seq, "export header names records but the export holds none"))
    return check_chain(
        header.log_id,
        records,
        checkpoints,
        public_key,
        from_start=header.since is None,
        to_head=header.until is None,
        extra=problems,
    )
