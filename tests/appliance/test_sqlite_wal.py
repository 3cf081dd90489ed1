"""Opening the appliance's SQLite files: the switch to WAL survives a second process opening
the same fresh file at the same moment (CI once saw "database is locked" from it)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.sqlite import WAL_SIZE_LIMIT, enable_wal


class Flaky:
    """A connection whose journal-mode pragma fails ``failures`` times, then works."""

    def __init__(self, failures: list[Exception | str]) -> None:
        self.failures = failures
        self.calls = 0

    def execute(self, sql: str) -> Any:
        if sql.startswith("PRAGMA journal_size_limit"):
            return None
        assert sql == "PRAGMA journal_mode=WAL"
        self.calls += 1
        outcome = self.failures.pop(0) if self.failures else "wal"
        if isinstance(outcome, Exception):
            raise outcome
        return sqlite3.connect(":memory:").execute("SELECT ?", [outcome])


def _enable(conn: Flaky, timeout_s: float = 1.0) -> list[float]:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    enable_wal(conn, timeout_s=timeout_s, clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]
    return slept


def test_a_locked_database_is_retried_until_it_switches() -> None:
    conn = Flaky([sqlite3.OperationalError("database is locked"), "delete", sqlite3.OperationalError("busy")])
    slept = _enable(conn)
    assert conn.calls == 4 and len(slept) == 3


def test_other_errors_are_not_retried() -> None:
    conn = Flaky([sqlite3.OperationalError("disk I/O error")])
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        _enable(conn)
    assert conn.calls == 1


def test_a_lock_that_outlasts_the_timeout_names_the_problem() -> None:
    conn = Flaky([sqlite3.OperationalError("database is locked")] * 1000)
    with pytest.raises(sqlite3.OperationalError, match=r"within 0.05 s: database is locked"):
        _enable(conn, timeout_s=0.05)


def test_a_real_file_ends_in_wal(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    enable_wal(conn, timeout_s=5.0)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


OPENER = """
import sys, time
from pathlib import Path
from appliance.audit.schema import connect, ensure_schema
from appliance.keys import KeyStore
start = float(sys.argv[2])
while time.time() < start:
    pass
conn = connect(Path(sys.argv[1]) / "audit.db")
ensure_schema(conn)
KeyStore(Path(sys.argv[1]) / "state.db")
print(conn.execute("PRAGMA journal_mode").fetchone()[0])
"""


def test_processes_opening_fresh_files_together_all_succeed(tmp_path: Path) -> None:
    """Fails on the old code ("database is locked" from the journal-mode switch) every time."""
    import time

    for round_ in range(3):
        home = tmp_path / f"r{round_}"
        home.mkdir()
        start = str(time.time() + 1.5)  # every process past its imports, then all open at once
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPENER, str(home), start],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).parents[2],
            )
            for _ in range(4)
        ]
        results = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in results]
        assert [out.strip() for out, _ in results] == ["wal"] * 4


def test_a_large_transaction_does_not_leave_the_wal_large_for_good(tmp_path: Path) -> None:
    # an audit prune of 200k records left a 120 MB WAL beside the database, for good
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db, isolation_level=None)
    enable_wal(conn, timeout_s=5)
    conn.execute("CREATE TABLE t (x BLOB)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 4096,) for _ in range(5 * WAL_SIZE_LIMIT // 4 // 4096)])
    conn.execute("COMMIT")
    wal = tmp_path / "state.db-wal"
    assert wal.stat().st_size > WAL_SIZE_LIMIT
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    conn.execute("INSERT INTO t VALUES (x'00')")  # the next write starts the WAL over: cut back
    assert wal.stat().st_size <= WAL_SIZE_LIMIT
    conn.close()
