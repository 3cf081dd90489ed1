"""Retention: remove a prefix of the log and sign the new anchor.

Only a prefix goes (records ``1..k`` all written before the cut-off); a signed
``prune`` checkpoint names ``k`` and record ``k``'s leaf hash, so the verifier
can check that record ``k+1`` links to it.  The delete passes the
``BEFORE DELETE`` trigger through a ``prune_guard`` row inserted and removed in
the same ``BEGIN IMMEDIATE`` transaction (no other connection ever sees it).
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.canonical import format_time
from appliance.audit.checkpoint import Checkpoint, make_checkpoint, store_checkpoint
from runtime.errors import AuditError

__all__ = ["PruneResult", "prune_prefix"]


@dataclass(frozen=True)
class PruneResult:
    pruned: int  #: records removed
    last_pruned_seq: int  #: 0 when nothing was removed
    checkpoint: Checkpoint | None  #: the signed prune anchor, None when nothing was removed


def prune_prefix(
    conn: sqlite3.Connection,
    *,
    log_id: str,
    key: Ed25519PrivateKey,
    before: datetime,
    now: datetime,
    min_retention_days: int,
    force: bool = False,
) -> PruneResult:
    """Delete records ``1..k`` written before ``before`` and sign the anchor at ``k``.

    Refuses (``AuditError``) a cut-off later than ``now - min_retention_days``
    unless ``force``.
    """
    floor = now - timedelta(days=min_retention_days)
    if before > floor and not force:
        raise AuditError(
            f"refusing to prune records newer than {format_time(floor)}: the minimum retention is "
            f"{min_retention_days} days (setting min_retention_days); pick an earlier --before, or pass --force"
        )
    cutoff = format_time(before)
    conn.execute("BEGIN IMMEDIATE")
    try:
        first = conn.execute("SELECT min(seq) FROM records").fetchone()[0]
        keep = conn.execute("SELECT min(seq) FROM records WHERE recorded_at >= ?", (cutoff,)).fetchone()[0]
        last_row = conn.execute("SELECT max(seq) FROM records").fetchone()[0]
        if first is None:
            conn.execute("ROLLBACK")
            return PruneResult(0, 0, None)
        last_pruned = (int(keep) - 1) if keep is not None else int(last_row)
        if last_pruned < int(first):
            conn.execute("ROLLBACK")
            return PruneResult(0, 0, None)
        anchor = conn.execute("SELECT leaf_hash FROM records WHERE seq = ?", (last_pruned,)).fetchone()[0]
        token = secrets.token_hex(8)
        conn.execute("INSERT INTO prune_guard (token) VALUES (?)", (token,))
        cur = conn.execute("DELETE FROM records WHERE seq <= ?", (last_pruned,))
        conn.execute("DELETE FROM prune_guard WHERE token = ?", (token,))
        cp = make_checkpoint(
            key, kind="prune", log_id=log_id, size=last_pruned, head_hash=str(anchor), created_at=format_time(now)
        )
        store_checkpoint(conn, cp)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return PruneResult(cur.rowcount, last_pruned, cp)
