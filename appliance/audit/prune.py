"""Retention: remove a prefix of the log and sign the new anchor.

Only a prefix goes (records ``1..k`` all written before the cut-off); a signed
``prune`` checkpoint names ``k`` and record ``k``'s leaf hash, so the verifier
can check that record ``k+1`` links to it.  The delete passes the
``BEFORE DELETE`` trigger through a ``prune_guard`` row inserted and removed in
the same ``BEGIN IMMEDIATE`` transaction (no other connection ever sees it).

A prune never signs what it has not checked: the prefix ``1..k+1`` is verified
first (hash chain, links, every checkpoint signature and head), in a read
snapshot so that writers are not held up while a long prefix is hashed; inside
the write transaction the records from ``k`` on are checked again against the
leaf hash verified for ``k``, and the anchor signs the leaf hash recomputed
from record ``k``'s fields, never the stored column.  A log that does not
verify is not pruned (pruning would erase the evidence).
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit.canonical import AuditRecord, format_time, leaf_hash
from appliance.audit.checkpoint import (
    Checkpoint,
    Pace,
    load_checkpoints,
    sign_next,
)
from appliance.audit.store import iter_records
from runtime.errors import AuditError

__all__ = ["PruneResult", "prune_prefix"]


@dataclass(frozen=True)
class PruneResult:
    pruned: int  #: records removed
    last_pruned_seq: int  #: 0 when nothing was removed
    checkpoint: Checkpoint | None  #: the signed prune anchor, None when nothing was removed


def _plan(conn: sqlite3.Connection, cutoff: str) -> tuple[int | None, int | None]:
    """(first seq, last seq to prune) of the log now; the second is None when nothing is to go."""
    first = conn.execute("SELECT min(seq) FROM records").fetchone()[0]
    if first is None:
        return None, None
    keep = conn.execute("SELECT min(seq) FROM records WHERE recorded_at >= ?", (cutoff,)).fetchone()[0]
    last_row = conn.execute("SELECT max(seq) FROM records").fetchone()[0]
    last_pruned = (int(keep) - 1) if keep is not None else int(last_row)
    if last_pruned < int(first):
        return int(first), None
    return int(first), last_pruned


_REFUSE = (
    "refusing to prune: the log does not verify up to the prune point ({why}); pruning would erase the "
    "evidence. Run `inferbox audit verify` and follow 'On a failed verify' in docs/audit.md; if the "
    "checkpoints were signed with an earlier signing key, pass its public key with --public-key"
)


def _verified_leaf(
    conn: sqlite3.Connection, log_id: str, last_pruned: int, public_keys: Sequence[Ed25519PublicKey]
) -> str:
    """Verify records up to ``last_pruned + 1`` (and every checkpoint); the leaf hash of ``last_pruned``."""
    from appliance.audit.verify import check_chain

    found: dict[str, str] = {}

    def walk() -> Iterator[AuditRecord]:
        for rec in iter_records(conn, log_id, None, last_pruned + 1):
            if rec.seq == last_pruned:
                found["leaf"] = leaf_hash(rec)
            yield rec

    report = check_chain(log_id, walk(), load_checkpoints(conn), public_keys, to_head=False, check_pace=False)
    if not report.ok:
        raise AuditError(_REFUSE.format(why=report.summary()))
    if "leaf" not in found or report.last_seq < last_pruned:
        raise AuditError(_REFUSE.format(why=f"record {last_pruned} is not in the verified chain"))
    return found["leaf"]


def _still_linked(conn: sqlite3.Connection, log_id: str, verified: int, leaf: str, last_pruned: int) -> str:
    """Inside the write transaction: records ``verified..last_pruned + 1`` still chain from ``leaf``."""
    expected_seq, expected_prev, anchor = verified, leaf, ""
    for rec in iter_records(conn, log_id, verified, last_pruned + 1):
        computed = leaf_hash(rec)
        if rec.seq != expected_seq or rec.leaf_hash != computed:
            raise AuditError(_REFUSE.format(why=f"record {expected_seq} changed while prune ran"))
        if (rec.seq == verified and computed != leaf) or (rec.seq > verified and rec.prev_hash != expected_prev):
            raise AuditError(_REFUSE.format(why=f"record {rec.seq} does not link to the verified chain"))
        if rec.seq == last_pruned:
            anchor = computed
        expected_seq, expected_prev = rec.seq + 1, computed
    if not anchor:
        raise AuditError(_REFUSE.format(why=f"record {last_pruned} is missing"))
    return anchor


def prune_prefix(
    conn: sqlite3.Connection,
    *,
    log_id: str,
    key: Ed25519PrivateKey | Callable[[], Ed25519PrivateKey],
    before: datetime,
    now: datetime,
    min_retention_days: int,
    force: bool = False,
    public_keys: Sequence[Ed25519PublicKey] = (),
    pace: Pace | None = None,
    in_transaction: Callable[[PruneResult], None] | None = None,
) -> PruneResult:
    """Delete records ``1..k`` written before ``before`` and sign the anchor at ``k``.

    Refuses (``AuditError``) a cut-off later than ``now - min_retention_days``
    unless ``force``, and a log whose prefix does not verify under ``key`` and
    ``public_keys``.  ``key`` may be a callable that gives the key: it is called
    inside the write transaction that signs (a running writer's key, read again
    after a rotation: :mod:`appliance.audit.signer`).  ``in_transaction(result)`` runs inside the prune's write
    transaction before it commits (the caller appends the record of the prune
    there), also when nothing was removed.
    """
    floor = now - timedelta(days=min_retention_days)
    if before > floor and not force:
        raise AuditError(
            f"refusing to prune records newer than {format_time(floor)}: the minimum retention is "
            f"{min_retention_days} days (setting min_retention_days); pick an earlier --before, or pass --force"
        )
    cutoff = format_time(before)
    trusted = [(key() if callable(key) else key).public_key(), *public_keys]
    # 1. verify the prefix in a read snapshot: writers go on meanwhile
    conn.execute("BEGIN")
    try:
        first, last_pruned = _plan(conn, cutoff)
        leaf = _verified_leaf(conn, log_id, last_pruned, trusted) if last_pruned is not None else None
    finally:
        conn.execute("COMMIT")
    # 2. delete and sign inside one write transaction
    conn.execute("BEGIN IMMEDIATE")
    try:
        first_now, last_now = _plan(conn, cutoff)
        if last_now is None:
            result = PruneResult(0, 0, None)
        else:
            if leaf is None or last_pruned is None or first_now != first or last_now < last_pruned:
                # the log changed between the two steps (another prune, records before the cut-off
                # appended): verify again, here (rare, and the prefix is short then)
                leaf, last_pruned = _verified_leaf(conn, log_id, last_now, trusted), last_now
            anchor = _still_linked(conn, log_id, last_pruned, leaf, last_now)
            token = secrets.token_hex(8)
            conn.execute("INSERT INTO prune_guard (token) VALUES (?)", (token,))
            cur = conn.execute("DELETE FROM records WHERE seq <= ?", (last_now,))
            conn.execute("DELETE FROM prune_guard WHERE token = ?", (token,))
            cp = sign_next(
                conn,
                key() if callable(key) else key,
                kind="prune",
                log_id=log_id,
                size=last_now,
                head_hash=anchor,
                created_at=format_time(now),
                pace=pace,
            )
            result = PruneResult(cur.rowcount, last_now, cp)
        if in_transaction is not None:
            in_transaction(result)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result
