"""What every SQLite file of the appliance (state.db, audit.db) needs when it is opened."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["WAL_SIZE_LIMIT", "enable_wal", "open_read_only"]

#: pause between tries while another process holds the lock the journal-mode switch needs
RETRY_S = 0.01


def open_read_only(path: Path, *, timeout_s: float = 5.0, any_thread: bool = False) -> sqlite3.Connection:
    """A connection that cannot write ``path`` (and never creates it), in autocommit mode.

    Opened as a ``file:`` URI with ``mode=ro``, built by :meth:`Path.as_uri` so that a ``#``,
    ``?`` or ``%`` in a folder name is part of the path, not the end of it.
    """
    return sqlite3.connect(
        Path(path).resolve().as_uri() + "?mode=ro",
        uri=True,
        timeout=timeout_s,
        isolation_level=None,
        check_same_thread=not any_thread,
    )


#: bytes the WAL file is cut back to after a checkpoint (SQLite keeps its largest size otherwise)
WAL_SIZE_LIMIT = 16 << 20


def enable_wal(
    conn: sqlite3.Connection,
    *,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Put ``conn``'s database in WAL mode, retrying for up to ``timeout_s`` while it is locked.

    The switch needs an exclusive lock, and when two processes open a fresh file at the
    same moment (``inferbox serve`` and the batch service on a new box) SQLite answers
    "database is locked" at once instead of calling the busy handler, or leaves the old
    mode in place; both are retried.  Once a file is in WAL mode it stays so, and this is
    one cheap pragma.
    """
    deadline = clock() + timeout_s
    while True:
        try:
            row = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if row is not None and str(row[0]).lower() == "wal":
                # a large transaction (an audit prune of 200k records) grew the WAL to 120 MB, and
                # it stayed that size for good: cut back to this once a checkpoint has emptied it
                conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
                return
            problem = f"journal mode stayed {row[0] if row else None!r}"
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            problem = str(exc)
        if clock() >= deadline:
            raise sqlite3.OperationalError(f"cannot switch the database to WAL within {timeout_s:g} s: {problem}")
        sleep(RETRY_S)
