"""``audit ship`` and ``audit verify --against`` read the previous off-box copy as a stream.

A review of a box running for months: the second ``audit ship`` needed about 5 kB of memory
per record of the newest copy (1 GB at 200k records, the unit's ``MemoryMax``), because the
copy was read whole, split, decoded for the verifier and decoded again into a structure that
held every record.  Now the copy is verified and compared as it is streamed (its records
looked up in the log batch by batch), so memory stays flat as the copy grows.  And the first
ship verifies the log before it copies it: a log already broken is not shipped (the next run
would only raise the alarm about its own copy).
"""

from __future__ import annotations

import asyncio
import io
import re
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit import compare
from appliance.audit.compare import (
    compare_with,
    db_view,
    export_file_view,
    export_view,
    hold_to,
    read_copy,
)
from appliance.audit.exporter import export_jsonl
from appliance.audit.log import AuditLog
from appliance.audit.verify import verify_db, verify_export, verify_export_bytes, verify_export_stream

from . import audit_tamper as T

pytestmark = pytest.mark.usefixtures("clean_env")

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _cli(*args: str) -> tuple[int, str]:
    from appliance.cli import main

    result = CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)
    return result.exit_code, result.output


def _home(path: Path, key: Ed25519PrivateKey, n: int) -> Path:
    """An appliance home whose log holds ``n`` records (written in batches by the service's writer)."""
    home = T.cli_home(path, key)  # 7 records, a checkpoint every 3
    log = AuditLog(home / "audit.db", signing_key=key, digest_keys_dir=home / "keys" / "digest")
    log.start()

    async def fill() -> None:
        await asyncio.gather(*(log.record(T.event(i)) for i in range(n)))

    asyncio.run(fill())
    log.close()
    return home


def _peak(*args: str) -> tuple[int, str, int]:
    """(exit code, output, peak bytes Python allocated) of ``inferbox audit ARGS``."""
    tracemalloc.start()
    try:
        code, out = _cli(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return code, out, peak


def _second_ship(tmp_path: Path, key: Ed25519PrivateKey, n: int) -> tuple[int, int]:
    """Peak memory of a ship whose newest copy holds the whole log of ``n`` records, and of
    ``verify --against`` that copy."""
    home = _home(tmp_path / f"home{n}", key, n)
    share = tmp_path / f"share{n}"
    share.mkdir()
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 0 and "(the first copy)" in out, out
    (copy,) = share.glob("audit-*.jsonl")
    code, out, ship_peak = _peak("ship", "--home", str(home), "--to", str(share))
    assert code == 0 and "holds the previous copy" in out, out
    code, out, verify_peak = _peak("verify", "--home", str(home), "--against", str(copy))
    assert code == 0 and "holds all of 1 off-box copy" in out, out
    return ship_peak, verify_peak


def test_checking_the_previous_copy_takes_memory_that_does_not_grow_with_it(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compare, "_BATCH", 500)  # both logs fill several batches (a batch: ~0.4 kB a record)
    small_ship, small_verify = _second_ship(tmp_path, key, 1_000)
    big_ship, big_verify = _second_ship(tmp_path, key, 9_000)
    # before: about 4 kB more per record of the copy (34 MB more for the 8,000 more records here);
    # now a byte a line and the few more checkpoints
    grown = 8_000 * 50
    assert big_ship - small_ship < grown, (small_ship, big_ship)
    assert big_verify - small_verify < grown, (small_verify, big_verify)


# -- the streamed comparison finds what the in-memory one does, across batches --------------------------


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compare, "_BATCH", 3)  # records looked up in the log 3 at a time


def _export(db: Path, key: Ed25519PrivateKey, out: Path, now: datetime, **window: datetime) -> Path:
    with out.open("wb") as f:
        export_jsonl(db, f, signing_key=key, now=now, **window)
    assert verify_export(out, key.public_key()).ok
    return out


def _held(view: compare.LogView, copy: Path, key: Ed25519PrivateKey) -> list[tuple[int | None, str]]:
    with copy.open("rb") as f:
        held = hold_to(view, f, str(copy), [key.public_key()])
    assert held.report.ok
    return held.problems


@pytest.mark.usefixtures("small_batches")
def test_streamed_comparison_matches_the_whole_one_across_batches(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock(START)
    db = T.build_log(tmp_path, key, 20, checkpoint_every=4, clock=clock)
    copy = _export(db, key, tmp_path / "day1.jsonl", clock.now)
    assert _held(db_view(db), copy, key) == [] == compare_with(db_view(db), [read_copy(copy)])
    for seq in (6, 7, 11):
        T.rewrite_record(db, seq, actor="someone-else")
    conn = T.raw(db)
    conn.execute("DELETE FROM records WHERE seq IN (9, 13)")
    conn.execute("DELETE FROM checkpoints WHERE size > 12")
    conn.execute("DELETE FROM records WHERE seq > 15")
    streamed = _held(db_view(db), copy, key)
    assert streamed == compare_with(db_view(db), [read_copy(copy)])
    whats = " | ".join(w for _, w in streamed)
    assert "record 6 differs" in whats and "later record(s)" in whats
    assert "record 9 of" in whats and "missing from the log" in whats
    assert "holds records up to seq 20" in whats and "cut back" in whats


@pytest.mark.usefixtures("small_batches")
def test_an_export_verified_against_an_older_one_is_read_as_a_stream(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock(START)
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4, clock=clock)
    cut1 = clock.now + timedelta(seconds=1)
    day1 = _export(db, key, tmp_path / "day1.jsonl", cut1, until=cut1)
    clock.advance(hours=1)
    log = AuditLog(db, signing_key=key, digest_keys_dir=tmp_path / "keys" / "digest", checkpoint_every=4, clock=clock)
    for i in range(10, 22):
        clock.advance(seconds=1)
        log.append(T.event(i))
    log.close()
    whole = _export(db, key, tmp_path / "whole.jsonl", clock.now + timedelta(seconds=1))
    day2 = _export(db, key, tmp_path / "day2.jsonl", clock.now + timedelta(seconds=1), since=cut1)
    for later in (whole, day2):
        view = export_file_view(later)
        assert (view.head, view.first) == (
            export_view(read_copy(later)).head,
            export_view(read_copy(later)).first,
        )
        assert _held(view, day1, key) == [] == compare_with(export_view(read_copy(later)), [read_copy(day1)])
    # seqs asked again from the start, and past the end: read from the file as asked
    leaves = export_file_view(whole).leaves
    assert set(leaves([20, 21, 22, 40])) == {20, 21, 22}
    assert set(leaves([1, 2])) == {1, 2}
    # an edited export being verified: what differs is found as the whole comparison finds it
    lines = T.export_lines(whole)
    at = T.record_line_index(lines, 5)
    lines[at] = re.sub(rb'"leaf_hash":"[0-9a-f]{64}"', b'"leaf_hash":"' + b"0" * 64 + b'"', lines[at])
    T.write_lines(whole, lines)
    streamed = _held(export_file_view(whole), day1, key)
    assert streamed == compare_with(export_view(read_copy(whole)), [read_copy(day1)])
    assert streamed and streamed[0][0] == 5


class _Changing(io.BytesIO):
    """A file whose bytes change after the first read (a copy edited on the share while it is read)."""

    def __init__(self, first: bytes, second: bytes) -> None:
        super().__init__(first)
        self._second: bytes | None = second

    def seek(self, pos: int, whence: int = 0) -> int:
        if self._second is not None and (pos, whence) == (0, 0):
            second, self._second = self._second, None
            super().seek(0)
            self.write(second)
            self.truncate()
        return super().seek(pos, whence)


def test_a_copy_that_changes_between_the_two_reads_does_not_verify(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = T.build_log(tmp_path, key, 6, checkpoint_every=4)
    out = tmp_path / "copy.jsonl"
    with out.open("wb") as f:
        export_jsonl(db, f, signing_key=key, now=START)
    data = out.read_bytes()
    seen: list[str] = []
    report = verify_export_stream(
        io.BytesIO(data), key.public_key(), each=lambda line: seen.append(type(line).__name__)
    )
    assert report.ok and report == verify_export_bytes(data, key.public_key())
    assert seen[0] == "Header" and seen[-1] == "Trailer" and seen.count("RecordLine") == 6
    # a record edited after the first read: its own check fails, and the change is named
    edited = data.replace(b'"status":200', b'"status":201', 1)
    report = verify_export_stream(_Changing(data, edited), key.public_key())
    assert not report.ok and any("changed while it was being verified" in p.what for p in report.problems)
    # the signed trailer edited after the first read (which checked it): caught all the same
    lines = data.splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b'"lines":', b'"lines":1', 1)
    report = verify_export_stream(_Changing(data, b"".join(lines)), key.public_key())
    assert not report.ok and "changed while it was being verified" in report.summary()


# -- the first ship verifies the log -------------------------------------------------------------------


def test_the_first_ship_of_a_log_that_does_not_verify_ships_nothing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    home = T.cli_home(tmp_path / "home", key)  # 7 records, a checkpoint every 3
    T.change_field(home / "audit.db", 2, "actor", "someone-else")
    assert not verify_db(home / "audit.db", key.public_key()).ok
    share = tmp_path / "share"
    share.mkdir()
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 1, out
    assert "ALERT: the audit log" in out and "does not verify" in out and "seq 2:" in out, out
    assert "nothing was shipped" in out and "Traceback" not in out
    assert list(share.iterdir()) == []
    # a log that verifies ships its first copy as before
    good = T.cli_home(tmp_path / "good", key)
    code, out = _cli("ship", "--home", str(good), "--to", str(share))
    assert code == 0 and "(the first copy)" in out, out
