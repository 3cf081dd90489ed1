"""``inferbox audit verify --against EXPORT``: a log held to its earlier off-box copies.

The verifier alone cannot see a cut back to an earlier checkpoint (the newest
checkpoints deleted with every record after the kept one's window): these
tests first show that it passes alone, then that the comparison catches it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.compare import compare_with, db_view, export_view, read_copy
from appliance.audit.exporter import export_jsonl
from appliance.audit.log import AuditLog
from appliance.audit.verify import verify_db, verify_export

from . import audit_tamper as T

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _export(db: Path, key: Ed25519PrivateKey, out: Path, now: datetime, **window: datetime) -> Path:
    with out.open("wb") as f:
        export_jsonl(db, f, signing_key=key, now=now, **window)
    assert verify_export(out, key.public_key()).ok
    return out


def _writer(tmp: Path, key: Ed25519PrivateKey, clock: T.FakeClock) -> AuditLog:
    return AuditLog(
        tmp / "audit.db", signing_key=key, digest_keys_dir=tmp / "keys" / "digest", checkpoint_every=4, clock=clock
    )


def _append(log: AuditLog, clock: T.FakeClock, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        clock.advance(seconds=1)
        log.append(T.event(i))


def _compare(db: Path, *copies: Path) -> list[tuple[int | None, str]]:
    return compare_with(db_view(db), [read_copy(c) for c in copies])


def _cut_back(db: Path, keep: int) -> None:
    """Delete every checkpoint after size ``keep`` and every record after ``keep``: no key needed."""
    conn = T.raw(db)
    conn.execute("DELETE FROM checkpoints WHERE size > ?", (keep,))
    conn.execute("DELETE FROM records WHERE seq > ?", (keep,))


@pytest.fixture
def clock() -> T.FakeClock:
    return T.FakeClock(START)


def test_a_cut_back_verifies_alone_and_fails_against_an_earlier_export(
    tmp_path: Path, key: Ed25519PrivateKey, clock: T.FakeClock
) -> None:
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4, clock=clock)  # checkpoints at 0, 4, 8, 10
    copy = _export(db, key, tmp_path / "day1.jsonl", clock.now)
    assert _compare(db, copy) == []  # an honest log holds its copy
    _cut_back(db, 4)
    assert verify_db(db, key.public_key()).ok  # the gap this feature closes
    problems = _compare(db, copy)
    assert problems, "the cut back went unnoticed"
    seq, what = problems[0]
    assert seq == 5 and "cut back" in what and "#3" in what
    assert any("holds records up to seq 10" in w for _, w in problems)


def test_a_cut_back_the_service_wrote_over_is_caught_as_replaced_records_and_checkpoints(
    tmp_path: Path, key: Ed25519PrivateKey, clock: T.FakeClock
) -> None:
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4, clock=clock)
    copy = _export(db, key, tmp_path / "day1.jsonl", clock.now)
    _cut_back(db, 4)
    log = _writer(tmp_path, key, clock)  # the service goes on: seqs 5.. and checkpoints #3.. again
    _append(log, clock, 8, first=100)
    log.close()
    assert verify_db(db, key.public_key()).ok
    problems = _compare(db, copy)
    whats = " | ".join(w for _, w in problems)
    assert "checkpoint #3 differs" in whats and "replaced" in whats
    assert any(seq == 5 and what.startswith("record 5 differs") for seq, what in problems)


def test_a_record_rewritten_after_the_export_before_any_checkpoint_covered_it_is_caught(
    tmp_path: Path, key: Ed25519PrivateKey, clock: T.FakeClock
) -> None:
    log = _writer(tmp_path, key, clock)
    _append(log, clock, 10)  # checkpoints at 0, 4, 8: records 9 and 10 rest on the chain alone
    db = tmp_path / "audit.db"
    copy = _export(db, key, tmp_path / "copy.jsonl", clock.now)
    T.rewrite_record(db, 10, actor="someone-else")  # the last record: no link to break
    log.close()  # the service's closing checkpoint signs the rewritten chain
    assert verify_db(db, key.public_key()).ok
    problems = _compare(db, copy)
    assert [seq for seq, _ in problems] == [10] and "record 10 differs" in problems[0][1]


def test_an_honest_log_that_grew_and_was_pruned_holds_its_old_copies(
    tmp_path: Path, key: Ed25519PrivateKey, clock: T.FakeClock
) -> None:
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4, clock=clock)
    day1 = _export(db, key, tmp_path / "day1.jsonl", clock.now)
    clock.advance(days=1)
    log = _writer(tmp_path, key, clock)
    _append(log, clock, 6, first=10)
    log.prune(START + timedelta(seconds=7), min_retention_days=0)  # records 1..6 (written 12:00:01..06)
    log.close()
    report = verify_db(db, key.public_key())
    assert report.ok and report.first_seq == 7
    assert _compare(db, day1) == []
    # the prune anchor must be what the copy held at its size
    T.raw(db).execute("UPDATE checkpoints SET head_hash = ? WHERE kind = 'prune'", ("0" * 64,))
    assert any("prune anchor at size 6" in w for _, w in _compare(db, day1))


def test_daily_window_exports_are_held_to_the_day_before(
    tmp_path: Path, key: Ed25519PrivateKey, clock: T.FakeClock
) -> None:
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4, clock=clock)
    cut1 = clock.now + timedelta(seconds=1)
    day1 = _export(db, key, tmp_path / "day1.jsonl", cut1, until=cut1)
    clock.advance(hours=1)
    log = _writer(tmp_path, key, clock)
    _append(log, clock, 5, first=10)
    log.close()
    day2 = _export(db, key, tmp_path / "day2.jsonl", clock.now + timedelta(seconds=1), since=cut1)
    assert compare_with(export_view(read_copy(day2)), [read_copy(day1)]) == []
    # the wrong way round: a clear refusal, not a false alarm
    reversed_ = compare_with(export_view(read_copy(day1)), [read_copy(day2)])
    assert len(reversed_) == 1 and "--against the older one" in reversed_[0][1]
    # day 2 made after a cut back to size 4 and fresh records: it no longer agrees with day 1
    _cut_back(db, 4)
    log = _writer(tmp_path, key, clock)
    _append(log, clock, 7, first=200)
    log.close()
    forged = _export(db, key, tmp_path / "day2b.jsonl", clock.now + timedelta(seconds=1), since=cut1)
    problems = compare_with(export_view(read_copy(forged)), [read_copy(day1)])
    assert any("checkpoint #3 differs" in w for _, w in problems)


def test_a_copy_of_another_log_or_one_that_does_not_verify_is_reported(
    tmp_path: Path, key: Ed25519PrivateKey, clock: T.FakeClock
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    db = T.build_log(tmp_path / "a", key, 5, clock=clock)
    other = _export(T.build_log(tmp_path / "b", key, 5, clock=clock), key, tmp_path / "other.jsonl", clock.now)
    problems = _compare(db, other)
    assert len(problems) == 1 and "not a copy of this log" in problems[0][1]


def _cli(*args: str) -> tuple[int, str]:
    from appliance.cli import main

    result = CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_verify_against(tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("INFERBOX_"):
            monkeypatch.delenv(name)
    home = T.cli_home(tmp_path / "home", key)  # 7 records, a checkpoint every 3
    copy = tmp_path / "offbox.jsonl"
    code, out = _cli("export", "--home", str(home), "--out", str(copy))
    assert code == 0, out
    code, out = _cli("verify", "--home", str(home), "--against", str(copy))
    assert code == 0 and "holds all of 1 off-box copy" in out, out
    code, out = _cli("verify", "--home", str(home), "--against", str(copy), "--json")
    assert code == 0 and json.loads(out)["compared_with"] == [str(copy)]
    _cut_back(home / "audit.db", 3)
    code, out = _cli("verify", "--home", str(home))
    assert code == 0, out  # alone, it passes
    code, out = _cli("verify", "--home", str(home), "--against", str(copy))
    assert code == 1 and "cut back" in out and "Traceback" not in out, out
    # a copy that does not verify on its own proves nothing: said so, exit 1
    data = bytearray(copy.read_bytes())
    data[40] ^= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(bytes(data))
    code, out = _cli("verify", "--home", str(home), "--export", str(copy), "--against", str(bad))
    assert code == 1 and "does not verify on its own" in out, out
    code, out = _cli("verify", "--home", str(home), "--against", str(tmp_path / "missing.jsonl"))
    assert code != 0 and "cannot read the off-box copy" in out and "Traceback" not in out, out


# -- inferbox audit ship ------------------------------------------------------------------------------


def _ship_home(tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch) -> Path:
    import os

    for name in list(os.environ):
        if name.startswith("INFERBOX_"):
            monkeypatch.delenv(name)
    return T.cli_home(tmp_path / "home", key)  # 7 records, a checkpoint every 3


def _more(home: Path, key: Ed25519PrivateKey, n: int, first: int) -> None:
    log = AuditLog(home / "audit.db", signing_key=key, digest_keys_dir=home / "keys" / "digest", checkpoint_every=3)
    for i in range(first, first + n):
        log.append(T.event(i))
    log.close()


def test_ship_copies_each_new_stretch_after_checking_the_last_copy(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _ship_home(tmp_path, key, monkeypatch)
    share = tmp_path / "share"
    share.mkdir()
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 0 and "(the first copy)" in out, out
    first = sorted(share.glob("audit-*.jsonl"))
    assert len(first) == 1 and read_copy(first[0]).reaches_head
    _more(home, key, 5, first=100)
    monkeypatch.setenv("INFERBOX_SHIP_DIR", str(share))  # the setting, as the unit gives it
    code, out = _cli("ship", "--home", str(home))
    assert code == 0 and f"holds the previous copy {first[0].name}" in out, out
    copies = sorted(share.glob("audit-*.jsonl"))
    assert len(copies) == 2
    newer = read_copy(copies[1])
    older = read_copy(copies[0])
    # the second copy starts where the first ended (they overlap in its last record) and runs to the head
    assert older.last_seq in newer.hashes and min(newer.hashes) <= older.last_seq < newer.last_seq
    assert verify_export(copies[1], key.public_key()).ok
    assert compare_with(export_view(newer), [older]) == []
    # the database holds both; a ship is recorded like an export
    code, out = _cli("verify", "--home", str(home), "--against", str(copies[0]), "--against", str(copies[1]))
    assert code == 0, out
    assert any(r.event == "audit_export" and r.action == "inferbox audit ship" for r in T.records(home / "audit.db"))


def test_ship_refuses_and_alerts_when_the_log_lost_what_the_last_copy_holds(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _ship_home(tmp_path, key, monkeypatch)
    share = tmp_path / "share"
    share.mkdir()
    assert _cli("ship", "--home", str(home), "--to", str(share))[0] == 0
    _cut_back(home / "audit.db", 3)
    _more(home, key, 4, first=200)  # the service went on writing over the cut
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 1 and "ALERT: the log no longer holds the off-box copy" in out and "nothing was shipped" in out
    assert len(list(share.glob("audit-*.jsonl"))) == 1
    # a copy that does not verify (edited on the share) stops the ship too
    copy = next(share.glob("audit-*.jsonl"))
    copy.write_bytes(copy.read_bytes().replace(b'"status":200', b'"status":201', 1))
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 1 and "does not verify" in out and "Traceback" not in out, out


def test_ship_alerts_when_a_copy_it_recorded_shipping_is_gone_from_the_share(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest copy deleted from the share: ship shipped its records again from the one before it,
    exit 0; every copy deleted: it started again from the first record.  The log says what it shipped."""
    home = _ship_home(tmp_path, key, monkeypatch)
    share = tmp_path / "share"
    share.mkdir()
    assert _cli("ship", "--home", str(home), "--to", str(share))[0] == 0
    _more(home, key, 3, first=100)
    assert _cli("ship", "--home", str(home), "--to", str(share))[0] == 0
    older, newest = sorted(share.glob("audit-*.jsonl"))
    newest.unlink()
    _more(home, key, 2, first=200)
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 1 and f"ALERT: the off-box copy {newest.name}" in out and "is not in" in out, out
    assert "the copies before it do not hold its records" in out and sorted(share.glob("audit-*")) == [older]
    older.unlink()
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 1 and "no copy of this log is left there" in out and "--new-series" in out, out
    code, out = _cli("ship", "--home", str(home), "--to", str(share), "--new-series")  # moved aside on purpose
    assert code == 0 and "(the first copy)" in out, out
    code, out = _cli("ship", "--home", str(home), "--to", str(share))  # and the series goes on from it
    assert code == 0, out


def test_ship_alerts_when_the_box_started_a_new_log_beside_its_old_copies(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deleted or emptied audit.db is made anew at the next write (the service's start): the log then
    verifies alone, and its first copy used to be shipped beside the old log's copies without a word.  Now
    copies of another log signed by this box's key and none of this one is an ALERT, as a cut back is;
    another box's copies (its own key) may share the folder."""
    home = _ship_home(tmp_path, key, monkeypatch)
    share = tmp_path / "share"
    share.mkdir()
    other_box = T.cli_home(tmp_path / "other", Ed25519PrivateKey.generate())
    assert _cli("ship", "--home", str(other_box), "--to", str(share))[0] == 0
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 0 and "(the first copy)" in out, out  # the other box's copy is no alarm
    for name in ("audit.db", "audit.db-wal", "audit.db-shm"):
        (home / name).unlink(missing_ok=True)
    _more(home, key, 3, first=300)  # the service starts again: a new log, which verifies on its own
    assert _cli("verify", "--home", str(home))[0] == 0
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 1 and "ALERT" in out and "none of the log the box holds now" in out, out
    assert "nothing was shipped" in out and "Traceback" not in out
    assert len(list(share.glob("audit-*.jsonl"))) == 2
    # set up anew on purpose: the old copies moved away, the new log ships
    kept = tmp_path / "old-copies"
    kept.mkdir()
    own_old = [c for c in share.glob("audit-*.jsonl") if verify_export(c, key.public_key()).ok]
    assert len(own_old) == 1
    own_old[0].rename(kept / own_old[0].name)
    code, out = _cli("ship", "--home", str(home), "--to", str(share))
    assert code == 0 and "(the first copy)" in out, out


def test_ship_says_where_to_ship_and_never_creates_a_missing_mount(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _ship_home(tmp_path, key, monkeypatch)
    code, out = _cli("ship", "--home", str(home))
    assert code == 2 and "--to FOLDER" in out and "ship_dir" in out
    code, out = _cli("ship", "--home", str(home), "--to", str(tmp_path / "not-mounted"))
    assert code == 1 and "is the off-box share mounted?" in out
    assert not (tmp_path / "not-mounted").exists()


def test_a_new_log_on_a_box_that_wrote_records_before_is_logged_as_a_warning(
    tmp_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """The digest keys outlive a deleted audit.db: a new log beside them says so in the service's log."""
    import logging

    def start(home: Path) -> None:
        log = AuditLog(home / "audit.db", signing_key=key, digest_keys_dir=home / "keys" / "digest")
        log.append(T.event(0))
        log.digest(b"x")  # a request's digest: the box's first digest key
        log.close()

    with caplog.at_level(logging.WARNING, logger="appliance.audit.log"):
        start(tmp_path)  # a new box: no warning
        assert not [r for r in caplog.records if "a new log" in r.getMessage()]
        start(tmp_path)  # the same log again: no warning
        assert not [r for r in caplog.records if "a new log" in r.getMessage()]
        (tmp_path / "audit.db").write_bytes(b"")  # emptied
        start(tmp_path)
    warned = [r.getMessage() for r in caplog.records if "a new log" in r.getMessage()]
    assert len(warned) == 1 and str(tmp_path / "audit.db") in warned[0], warned


def test_a_digest_key_made_before_a_new_boxs_first_record_is_not_an_old_log(
    tmp_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """``batch submit`` keys its input's HMAC before it appends: on a new box that is no lost log."""
    import logging

    with caplog.at_level(logging.WARNING, logger="appliance.audit.log"):
        log = AuditLog(tmp_path / "audit.db", signing_key=key, digest_keys_dir=tmp_path / "keys" / "digest")
        log.keyring.hasher()  # the box's first digest key, before its first record
        log.append(T.event(0))
        log.close()
    assert log.keyring.key_ids()
    assert not [r for r in caplog.records if "a new log" in r.getMessage()]
