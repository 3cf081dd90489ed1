"""The verifier catches every tampering audit-design.md lists, and names the first failing seq."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.exporter import export_jsonl
from appliance.audit.log import AuditLog
from appliance.audit.verify import UNPROTECTED_EXPORT_BYTES, verify_db, verify_export, verify_export_bytes

from . import audit_tamper as T


@pytest.fixture(scope="module")
def other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def db(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    # 10 records; checkpoints at sizes 0 (the empty log, before record 1), 4 and 8 (every 4) and 10 (close)
    db: Path = T.build_log(tmp_path, key, 10, checkpoint_every=4)
    return db


def _export(db: Path, key: Ed25519PrivateKey, out: Path, **window: datetime) -> Path:
    with out.open("wb") as f:
        export_jsonl(db, f, signing_key=key, now=datetime(2026, 2, 1, tzinfo=UTC), **window)
    return out


def test_untouched_log_verifies(db: Path, key: Ed25519PrivateKey) -> None:
    report = verify_db(db, key.public_key())
    assert report.ok, report.problems
    assert (report.first_seq, report.last_seq, report.records) == (1, 10, 10)
    assert report.checkpoints == 4
    assert report.covered_to == 10
    assert report.first_bad_seq is None


def test_another_public_key_fails_every_checkpoint(db: Path, other_key: Ed25519PrivateKey) -> None:
    report = verify_db(db, other_key.public_key())
    assert not report.ok
    assert report.checkpoints == 0
    assert "signature" in report.problems[0].what


def _foreign_prune_anchor(db: Path, key: Ed25519PrivateKey, other: Ed25519PrivateKey) -> None:
    T.delete_prefix(db, 3)
    T.add_checkpoint(db, other, 3, T.records(db)[0].prev_hash, kind="prune")


CASES: list[tuple[str, Callable[[Path, Ed25519PrivateKey, Ed25519PrivateKey], None], int, str]] = [
    ("changed actor", lambda d, k, o: T.change_field(d, 5, "actor", "mallory"), 5, "field changed"),
    ("changed status", lambda d, k, o: T.change_field(d, 5, "status", 500), 5, "field changed"),
    ("changed details", lambda d, k, o: T.change_field(d, 5, "details", '{"n":"99"}'), 5, "field changed"),
    (  # the last "n" is what the record held: msgspec read it back, SQLite's json_extract finds "99"
        "details with a key given twice",
        lambda d, k, o: T.change_field(d, 5, "details", '{"n":"99","n":"' + T.records(d)[4].details["n"] + '"}'),
        5,
        "field changed",
    ),
    (
        "details spelled otherwise",
        lambda d, k, o: T.change_field(d, 5, "details", '{ "n": "' + T.records(d)[4].details["n"] + '" }'),
        5,
        "field changed",
    ),
    (
        "changed recorded_at",
        lambda d, k, o: T.change_field(d, 3, "recorded_at", "2025-01-01T00:00:00.000000Z"),
        3,
        "field changed",
    ),
    ("changed digest", lambda d, k, o: T.change_field(d, 7, "input_digest", "00" * 32), 7, "field changed"),
    (
        "upper-cased prev_hash",
        lambda d, k, o: T.change_field(d, 6, "prev_hash", T.records(d)[5].prev_hash.upper()),
        6,
        "prev_hash",
    ),
    ("edited leaf_hash", lambda d, k, o: T.change_field(d, 6, "leaf_hash", "00" * 32), 6, "field changed"),
    ("rewritten record (leaf recomputed)", lambda d, k, o: T.rewrite_record(d, 5, actor="mallory"), 6, "prev_hash"),
    (
        "rewritten record under a checkpoint",
        lambda d, k, o: T.rewrite_record(d, 10, actor="mallory"),
        10,
        "inconsistent checkpoint",
    ),
    ("deleted record", lambda d, k, o: T.delete_record(d, 5), 5, "missing"),
    (  # after the newest checkpoint no signature covers it, but it may not be dated before that checkpoint
        "record appended after the newest checkpoint, dated back a year",
        lambda d, k, o: T.append_forged(d, "2025-01-15T09:00:00.000000Z"),
        11,
        "dated back",
    ),
    ("deleted first record", lambda d, k, o: T.delete_record(d, 1), 1, "missing"),
    ("inserted record", lambda d, k, o: T.insert_forged(d, 5), 6, "prev_hash"),
    ("reordered records", lambda d, k, o: T.swap_records(d, 5, 6), 5, "prev_hash"),
    ("tail cut below the newest checkpoint", lambda d, k, o: T.cut_tail(d, 6), 7, "tail cut"),
    ("tail cut to nothing", lambda d, k, o: T.cut_tail(d, 0), 1, "tail cut"),
    ("checkpoint with a bad signature", lambda d, k, o: T.corrupt_checkpoint_signature(d) and None, 10, "signature"),
    (
        "checkpoint signed by another key",
        lambda d, k, o: T.add_checkpoint(d, o, 6, T.records(d)[5].leaf_hash),
        6,
        "signing key",
    ),
    (
        "checkpoint with a wrong head (real key)",
        lambda d, k, o: T.add_checkpoint(d, k, 6, "11" * 32),
        6,
        "inconsistent checkpoint",
    ),
    (
        "later checkpoint smaller than an earlier one",
        lambda d, k, o: T.add_checkpoint(d, k, 3, T.records(d)[2].leaf_hash),
        3,
        "does not extend",
    ),
    ("prune without its checkpoint", lambda d, k, o: T.delete_prefix(d, 3), 1, "prune"),
    ("prune anchor signed by another key", _foreign_prune_anchor, 1, "prune"),
]


@pytest.mark.parametrize(("tamper", "expected_seq", "expected_what"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_db_tampering_is_caught_at_the_right_seq(
    db: Path,
    key: Ed25519PrivateKey,
    other_key: Ed25519PrivateKey,
    tamper: Callable[[Path, Ed25519PrivateKey, Ed25519PrivateKey], None],
    expected_seq: int,
    expected_what: str,
) -> None:
    assert verify_db(db, key.public_key()).ok
    tamper(db, key, other_key)
    report = verify_db(db, key.public_key())
    assert not report.ok
    assert report.first_bad_seq == expected_seq, report.problems
    first = next(p for p in report.problems if p.seq == expected_seq)
    assert expected_what in first.what, report.problems
    assert f"seq {expected_seq}" in report.summary()


def test_triggers_refuse_update_and_delete_and_pk_refuses_duplicates(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE records SET actor = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM records WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM checkpoints")
    with pytest.raises(sqlite3.IntegrityError, match="never changes"):
        conn.execute("UPDATE meta SET value = 'x'")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO records SELECT * FROM records WHERE seq = 1")  # duplicate seq
    assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 10


def test_a_legitimate_prune_verifies_and_the_chain_continues(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 6, checkpoint_every=4, clock=clock)
    log = AuditLog(db, signing_key=key, digest_keys_dir=tmp_path / "digest", clock=clock)
    cutoff = T.records(db)[3].recorded_at  # keep records 4.. (written at or after it)
    result = log.prune(datetime.fromisoformat(cutoff), min_retention_days=0)
    assert (result.pruned, result.last_pruned_seq) == (3, 3)
    assert log.append(T.event(99)) == 7
    log.close()
    report = verify_db(db, key.public_key())
    assert report.ok, report.problems
    assert (report.first_seq, report.last_seq) == (4, 7)
    out = _export(db, key, tmp_path / "e.jsonl")
    assert verify_export(out, key.public_key()).ok
    # dropping the prune anchor from the export is a prune without its checkpoint
    lines = T.export_lines(out)
    T.write_lines(out, [ln for ln in lines if b'"kind":"prune"' not in ln])
    report = verify_export(out, key.public_key())
    assert report.first_bad_seq == 1
    assert "prune" in report.problems[0].what


# -- the JSONL export -----------------------------------------------------------


def test_export_verifies_and_window_exports_verify(db: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    out = _export(db, key, tmp_path / "all.jsonl")
    report = verify_export(out, key.public_key())
    assert report.ok, report.problems
    assert (report.first_seq, report.last_seq, report.covered_to) == (1, 10, 10)
    recs = T.records(db)
    since = datetime.fromisoformat(recs[2].recorded_at)
    until = datetime.fromisoformat(recs[8].recorded_at)
    window = _export(db, key, tmp_path / "w.jsonl", since=since, until=until)
    report = verify_export(window, key.public_key())
    assert report.ok, report.problems
    assert (report.first_seq, report.last_seq) == (3, 8)
    assert report.covered_to == 8


def _move(lines: list[bytes], seq: int, fn: Callable[[list[bytes], int], None]) -> list[bytes]:
    out = list(lines)
    fn(out, T.record_line_index(out, seq))
    return out


EXPORT_CASES: list[tuple[str, Callable[[list[bytes]], list[bytes]], int, str]] = [
    ("duplicated record", lambda ls: _move(ls, 5, lambda o, i: o.insert(i + 1, o[i])), 5, "appears again"),
    (
        "reordered records",
        lambda ls: _move(ls, 5, lambda o, i: o.__setitem__(slice(i, i + 2), [o[i + 1], o[i]])),
        5,
        "missing",
    ),
    ("deleted record", lambda ls: _move(ls, 5, lambda o, i: o.__delitem__(i)), 5, "missing"),
    (
        "changed field",
        lambda ls: _move(
            ls, 5, lambda o, i: o.__setitem__(i, o[i].replace(b'"actor":"key-abc"', b'"actor":"key-xyz"'))
        ),
        5,
        "field changed",
    ),
    (
        "tail cut",
        lambda ls: [ln for ln in ls if not (b'"type":"record"' in ln and (b'"seq":9,' in ln or b'"seq":10,' in ln))],
        9,
        "ends at seq",
    ),
]


@pytest.mark.parametrize(
    ("tamper", "expected_seq", "expected_what"), [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES]
)
def test_export_tampering_is_caught_at_the_right_seq(
    db: Path,
    key: Ed25519PrivateKey,
    tmp_path: Path,
    tamper: Callable[[list[bytes]], list[bytes]],
    expected_seq: int,
    expected_what: str,
) -> None:
    out = _export(db, key, tmp_path / "e.jsonl")
    T.write_lines(out, tamper(T.export_lines(out)))
    report = verify_export(out, key.public_key())
    assert not report.ok
    assert report.first_bad_seq == expected_seq, report.problems
    assert expected_what in next(p for p in report.problems if p.seq == expected_seq).what
    # the signed trailer notices too
    assert any("after it was signed" in p.what or "lines" in p.what for p in report.problems)


def test_export_resigned_by_another_key_fails(
    db: Path, key: Ed25519PrivateKey, other_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    out = _export(db, other_key, tmp_path / "e.jsonl")  # checkpoints are still signed by `key`
    report = verify_export(out, key.public_key())
    assert not report.ok
    assert any("export signature" in p.what for p in report.problems)


def test_every_single_byte_flip_of_an_export_is_caught(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    assert UNPROTECTED_EXPORT_BYTES == ()  # documented in docs/audit.md: nothing is unprotected
    db = T.build_log(tmp_path, key, 5, checkpoint_every=2)
    out = _export(db, key, tmp_path / "e.jsonl")
    data = out.read_bytes()
    pub = key.public_key()
    assert verify_export(out, pub).ok
    header_end = data.index(b"\n") + 1
    trailer_start = data.rindex(b"\n", 0, len(data) - 1) + 1
    missed: list[int] = []
    trailer_only: list[int] = []
    for i in range(len(data)):
        report = verify_export_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :], pub)
        if report.ok:
            missed.append(i)
        elif header_end <= i < trailer_start and all("after it was signed" in p.what for p in report.problems):
            trailer_only.append(i)  # a record/checkpoint flip only the whole-file hash noticed
    assert missed == []
    assert trailer_only == []
    assert len(data) > 2000  # records, checkpoints, header and trailer were all flipped


def test_a_record_in_the_unsigned_window_dated_as_the_writer_would_still_verifies(
    db: Path, key: Ed25519PrivateKey
) -> None:
    """The window after the newest checkpoint is what docs/audit.md says no signature covers: a record
    dated within checkpoint_minutes after it is not caught (the back-dating check has to leave it)."""
    newest = T.checkpoints(db)[-1].created_at
    T.append_forged(db, newest)
    assert verify_db(db, key.public_key()).ok


def test_a_record_dated_back_is_caught_after_the_next_checkpoint_signs_it_in(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """The forged record does not stay in the unsigned window: the service's next write extends the chain
    from it and signs a checkpoint over it.  Its date still cannot be before the checkpoint before it."""
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4, clock=clock)
    T.append_forged(db, "2025-01-15T09:00:00.000000Z")
    log = AuditLog(db, signing_key=key, digest_keys_dir=tmp_path / "keys" / "digest", checkpoint_every=4, clock=clock)
    clock.advance(seconds=1)
    log.append(T.event(99))
    log.close()
    assert max(c.size for c in T.checkpoints(db)) == 12  # signed in
    report = verify_db(db, key.public_key())
    assert not report.ok and report.first_bad_seq == 11 and "dated back" in report.problems[0].what, report.problems
