"""Fixes of the audit-log review (/tmp/review/audit/REPORT.md).

Every test of a finding failed on the code before the fix; the ``honest ...`` tests guard the
other side (a log the writer wrote as designed never fails).

1. checkpoint pace and sequence: deleting checkpoints (and records after them) is caught;
2. window exports carry the records at their edges;
3. prune verifies what it signs;
4. prune / export record before (or with) acting, and survive a uid without a passwd entry;
5. no seq is invisible to the verifier;
6. a log signed before and after a key rotation verifies with both keys;
7. ``audit tail`` escapes control characters;
8. the writer type-checks each event on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
import sqlite_utils
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.protocols import AuditEvent
from appliance.audit import prune as prune_module
from appliance.audit.canonical import AuditRecord, canonical_bytes, genesis_hash, leaf_hash, parse_canonical
from appliance.audit.checkpoint import Checkpoint, Pace, make_checkpoint
from appliance.audit.exporter import Header, encode_line, export_jsonl, trailer_signed_bytes
from appliance.audit.log import AuditLog
from appliance.audit.schema import MIGRATIONS, connect
from appliance.audit.store import insert_record
from appliance.audit.verify import verify_db, verify_export, verify_export_bytes
from runtime import signing
from runtime.errors import AuditError, VerificationError
from runtime.signing import public_key_pem, write_private_key

from . import audit_tamper as T

NOW = datetime(2026, 2, 1, tzinfo=UTC)


def _log(db: Path, key: Ed25519PrivateKey, clock: T.FakeClock, **kwargs: object) -> AuditLog:
    return AuditLog(db, signing_key=key, digest_keys_dir=db.parent / "keys" / "digest", clock=clock, **kwargs)  # type: ignore[arg-type]


def _checkpoints(db: Path) -> list[Checkpoint]:
    return T.checkpoints(db)


def _sizes(db: Path) -> list[int]:
    return [c.size for c in _checkpoints(db)]


def _delete_checkpoints(db: Path, where: str, *params: object) -> None:
    T.raw(db).execute(f"DELETE FROM checkpoints WHERE {where}", params)


def _export(db: Path, key: Ed25519PrivateKey, out: Path, **window: datetime) -> Path:
    with out.open("wb") as f:
        export_jsonl(db, f, signing_key=key, now=NOW, **window)
    return out


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- 1. the verifier holds the log to the writer's checkpoint pace ---------------------------------


def test_deleting_the_checkpoints_after_a_point_is_caught_by_the_pace(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4)  # checkpoints at 0, 4, 8, 10
    _delete_checkpoints(db, "size > 4")  # no key needed: records 5..10 are now covered by nothing
    report = verify_db(db, key.public_key())
    assert not report.ok
    assert report.first_bad_seq == 8  # the writer signs at most 4 records after the checkpoint at 4
    assert "records 5..10 (6) follow the newest signed checkpoint" in report.problems[0].what
    assert "every 4 records" in report.problems[0].what


def test_the_pace_comes_from_the_signed_checkpoint_not_from_local_settings(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4)
    _delete_checkpoints(db, "size > 4")
    slow = Pace.of(100_000, timedelta(days=365))  # what lax local settings would say
    assert not verify_db(db, key.public_key(), legacy_pace=slow).ok


def test_records_written_after_the_interval_without_a_checkpoint_are_caught(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    clock = T.FakeClock()
    db = tmp_path / "audit.db"
    log = _log(db, key, clock, checkpoint_every=1000, checkpoint_interval_s=60)
    for i in range(3):
        clock.advance(seconds=1)
        log.append(T.event(i))
    clock.advance(minutes=5)
    log.append(T.event(3))  # due by time: signed with it
    log.close()
    assert verify_db(db, key.public_key()).ok
    _delete_checkpoints(db, "size = 4")
    report = verify_db(db, key.public_key())
    assert report.first_bad_seq == 4
    assert "record 4 was written at" in report.problems[0].what
    assert _sizes(db) == [0]  # the empty log's, signed before record 1
    assert "1 minutes or more after the newest signed checkpoint" in report.problems[0].what


def test_a_rewritten_log_without_any_checkpoint_fails(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = T.build_log(tmp_path, key, 5, checkpoint_every=4)
    # r8 "rewrite": drop every checkpoint, change record 2, re-chain the rest (no key used)
    conn = T.raw(db)
    conn.execute("DELETE FROM checkpoints")
    recs = T.records(db)
    conn.execute("DELETE FROM records")
    prev = recs[0].prev_hash
    for rec in recs:
        rec = msgspec.structs.replace(rec, prev_hash=prev, actor="mallory" if rec.seq == 2 else rec.actor)
        rec = msgspec.structs.replace(rec, leaf_hash=leaf_hash(rec))
        insert_record(conn, rec)
        prev = rec.leaf_hash
    report = verify_db(db, key.public_key())
    assert not report.ok and report.first_bad_seq == 1
    assert "no signed checkpoint covers records 1..5" in report.problems[0].what


def test_deleting_a_checkpoint_in_the_middle_breaks_the_signed_sequence(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4)
    _delete_checkpoints(db, "size = 4")  # records 1..4 stay covered by the checkpoint at 8
    report = verify_db(db, key.public_key())
    assert not report.ok
    assert report.first_bad_seq == 8
    assert "signed checkpoints were deleted" in report.problems[0].what
    assert "checkpoint #3" in report.problems[0].what


def test_a_replaced_checkpoint_breaks_the_link_to_the_next(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4)
    conn = T.raw(db)
    rows = conn.execute("SELECT id, size FROM checkpoints ORDER BY id").fetchall()
    cid = rows[1][0]  # the checkpoint at 4: swap it for an (older format) one, same size and head, same place
    head = T.records(db)[3].leaf_hash
    cp = make_checkpoint(
        key, kind="checkpoint", log_id=T.log_id(db), size=4, head_hash=head, created_at="2026-01-01T12:00:04.000000Z"
    )
    conn.execute(
        "UPDATE checkpoints SET signature = ?, version = 1, idx = 0, prev = '', every = 0, interval_us = 0 "
        "WHERE id = ?",
        (cp.signature, cid),
    )
    report = verify_db(db, key.public_key())
    assert not report.ok
    assert any("not the one it was signed after" in p.what for p in report.problems)


def test_honest_logs_verify_at_the_edges_of_the_pace(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    # fewer records than one window, and a writer that was never closed (killed right after writing)
    clock = T.FakeClock()
    small = tmp_path / "small" / "audit.db"
    log = _log(small, key, clock)
    log.append(T.event(1))
    log.append(T.event(2))
    log._conn = None  # abandoned without close(): no closing checkpoint, as after SIGKILL
    assert _sizes(small) == [0]
    assert verify_db(small, key.public_key()).ok
    # exactly every-1 records after the newest checkpoint, just under the interval
    clock = T.FakeClock()
    edge = tmp_path / "edge" / "audit.db"
    log = _log(edge, key, clock, checkpoint_every=5, checkpoint_interval_s=60)
    for i in range(8):
        log.append(T.event(i))
    clock.advance(seconds=59.999999)
    log.append(T.event(8))  # 4 records after the checkpoint at 5, a microsecond before the interval
    log._conn = None
    assert _sizes(edge) == [0, 5]
    report = verify_db(edge, key.public_key())
    assert report.ok, report.problems
    assert report.covered_to == 5 and report.last_seq == 9


def test_writers_with_different_paces_keep_the_stricter_one_until_their_own_checkpoint(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    clock = T.FakeClock()
    db = tmp_path / "audit.db"
    fast = _log(db, key, clock, checkpoint_every=3, checkpoint_interval_s=30)
    slow = _log(db, key, clock, checkpoint_every=1000, checkpoint_interval_s=3600)
    for i in range(40):
        clock.advance(seconds=7)
        (fast if i % 5 == 0 else slow).append(T.event(i))
    slow._conn = None  # both stopped without a closing checkpoint
    fast._conn = None
    report = verify_db(db, key.public_key())
    assert report.ok, report.problems


def _old_format_log(db: Path, key: Ed25519PrivateKey, n: int, every: int) -> None:
    """A log as the code before format 2 wrote it: schema 0001 only, format 1 checkpoints, none at size 0."""
    conn = sqlite3.connect(db, isolation_level=None)
    MIGRATIONS.apply(sqlite_utils.Database(conn), stop_before="0002_checkpoint_sequence_and_pace")
    log_id = str(conn.execute("SELECT value FROM meta").fetchone()[0])
    prev = genesis_hash(log_id)
    fields = msgspec.structs.asdict(T.event(0))
    for seq in range(1, n + 1):
        rec = AuditRecord(
            seq=seq, log_id=log_id, prev_hash=prev, recorded_at=f"2026-01-01T12:00:{seq:02d}.000000Z", **fields
        )
        rec = msgspec.structs.replace(rec, leaf_hash=leaf_hash(rec))
        insert_record(conn, rec)
        prev = rec.leaf_hash
        if seq % every == 0 or seq == n:
            cp = make_checkpoint(
                key, kind="checkpoint", log_id=log_id, size=seq, head_hash=prev, created_at=rec.recorded_at
            )
            conn.execute(
                "INSERT INTO checkpoints (kind, log_id, size, head_hash, created_at, key_id, signature) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cp.kind, cp.log_id, cp.size, cp.head_hash, cp.created_at, cp.key_id, cp.signature),
            )
    conn.close()


def test_logs_written_before_format_2_still_verify_and_continue(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    _old_format_log(db, key, 10, every=4)
    report = verify_db(db, key.public_key())  # read-only: the schema is not migrated
    assert report.ok, report.problems
    assert report.covered_to == 10
    # format 1 checkpoints sign no pace: the local one applies to the records after them
    _delete_checkpoints(db, "size > 4")
    assert verify_db(db, key.public_key()).ok  # 6 records < the default 1000
    report = verify_db(db, key.public_key(), legacy_pace=Pace.of(4, timedelta(minutes=10)))
    assert not report.ok and "--checkpoint-every" in report.problems[0].what
    # the new writer migrates the schema and continues the checkpoint sequence after the old ones
    db2 = tmp_path / "b" / "audit.db"
    db2.parent.mkdir()
    _old_format_log(db2, key, 10, every=4)
    log = _log(db2, key, T.FakeClock(datetime(2026, 1, 1, 12, 1, tzinfo=UTC)), checkpoint_every=4)
    for i in range(5):
        log.append(T.event(i))
    log.close()
    cps = _checkpoints(db2)
    assert [(c.size, c.version, c.index) for c in cps] == [(4, 1, 0), (8, 1, 0), (10, 1, 0), (14, 2, 4), (15, 2, 5)]
    report = verify_db(db2, key.public_key())
    assert report.ok, report.problems
    _delete_checkpoints(db2, "size = 8")  # a format 1 checkpoint before a format 2 one: caught too
    assert "signed checkpoints were deleted" in verify_db(db2, key.public_key()).problems[0].what


def test_an_old_log_whose_writer_never_signed_verifies_with_legacy_start(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """The code before format 2 signed its first checkpoint after 1000 records or at close; a log
    it wrote and left without one is honest. By default it fails (the same state is what deleting
    every checkpoint leaves); ``--legacy-start`` holds it to the old writer's count."""
    db = tmp_path / "audit.db"
    _old_format_log(db, key, 5, every=4)
    _delete_checkpoints(db, "1 = 1")
    report = verify_db(db, key.public_key())
    assert not report.ok and "--legacy-start" in report.problems[0].what
    assert verify_db(db, key.public_key(), legacy_start=True).ok
    # the old writer would have signed after checkpoint_every records: more is still caught
    report = verify_db(db, key.public_key(), legacy_start=True, legacy_pace=Pace.of(4, timedelta(minutes=10)))
    assert not report.ok and "signed checkpoints were deleted" in report.problems[0].what
    home = tmp_path / "home"
    runner = CliRunner()
    pub = tmp_path / "k.pub"
    pub.write_text(public_key_pem(key.public_key()))
    base = ["audit", "verify", "--home", str(home), "--db", str(db), "--public-key", str(pub)]
    from appliance.cli import main

    assert runner.invoke(main, base).exit_code == 1
    done = runner.invoke(main, [*base, "--legacy-start"])
    assert done.exit_code == 0, done.output


def test_a_format_1_export_without_any_checkpoint_verifies(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    _old_format_log(db, key, 5, every=4)
    _delete_checkpoints(db, "1 = 1")  # its writer had not signed one yet when it was exported
    lines = T.export_lines(_export(db, key, tmp_path / "e.jsonl"))
    lines[0] = lines[0].replace(b"inferbox-audit-export/2", b"inferbox-audit-export/1")
    report = verify_export_bytes(_resign(lines, key), key.public_key())
    assert report.ok, report.problems


def test_an_export_window_that_ends_before_it_starts_is_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 3, checkpoint_every=4, clock=clock)
    with pytest.raises(AuditError, match="swap them"):
        _export(db, key, tmp_path / "w.jsonl", since=_at("2026-01-02T00:00:00Z"), until=_at("2026-01-01T00:00:00Z"))


def test_max_age_flags_a_log_whose_newest_checkpoint_is_stale(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 5, checkpoint_every=4, clock=clock)
    fresh = clock.now + timedelta(minutes=5)
    assert verify_db(db, key.public_key(), now=fresh, max_age=timedelta(minutes=15)).ok
    report = verify_db(db, key.public_key(), now=clock.now + timedelta(hours=2), max_age=timedelta(minutes=15))
    assert not report.ok and "--max-age" in report.problems[0].what


# -- 2. window exports ----------------------------------------------------------------------------


def _windowed(tmp_path: Path, key: Ed25519PrivateKey, n: int = 20) -> Path:
    return T.build_log(tmp_path, key, n, checkpoint_every=4)


def test_records_removed_at_the_start_of_a_window_are_caught(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = _windowed(tmp_path, key)
    since = _at(T.records(db)[5].recorded_at)  # record 6
    T.raw(db).execute("DELETE FROM records WHERE seq BETWEEN 6 AND 13")
    report = verify_export(_export(db, key, tmp_path / "w.jsonl", since=since), key.public_key())
    assert not report.ok
    assert report.first_bad_seq == 6
    assert "record 6 is missing" in report.problems[0].what


def test_records_removed_at_the_end_of_a_window_are_caught(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = _windowed(tmp_path, key)
    recs = T.records(db)
    since, until = _at(recs[1].recorded_at), _at(recs[18].recorded_at)  # records 2..18
    T.raw(db).execute("DELETE FROM records WHERE seq BETWEEN 11 AND 18")
    report = verify_export(_export(db, key, tmp_path / "w.jsonl", since=since, until=until), key.public_key())
    assert not report.ok
    assert report.first_bad_seq == 11
    assert "record 11 is missing" in report.problems[0].what


def test_honest_window_exports_verify(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = _windowed(tmp_path, key)
    recs = T.records(db)
    pub = key.public_key()
    cases = {
        "both": ({"since": _at(recs[2].recorded_at), "until": _at(recs[8].recorded_at)}, (3, 8)),
        "since": ({"since": _at(recs[2].recorded_at)}, (3, 20)),
        "until": ({"until": _at(recs[8].recorded_at)}, (1, 8)),
        "between two records": (
            {"since": _at(recs[4].recorded_at) + timedelta(microseconds=1), "until": _at(recs[5].recorded_at)},
            (0, 0),
        ),
        "before the log": (
            {"since": datetime(2020, 1, 1, tzinfo=UTC), "until": datetime(2021, 1, 1, tzinfo=UTC)},
            (0, 0),
        ),
        "after the log": ({"since": datetime(2030, 1, 1, tzinfo=UTC)}, (0, 0)),
    }
    for name, (window, (first, last)) in cases.items():
        out = _export(db, key, tmp_path / f"{name}.jsonl", **window)
        report = verify_export(out, pub)
        assert report.ok, (name, report.problems)
        assert (report.first_seq, report.last_seq) == (first, last), name
    lines = T.export_lines(tmp_path / "both.jsonl")
    edges = [json.loads(ln) for ln in lines if b'"type":"edge"' in ln]
    assert [(e["side"], e["seq"]) for e in edges] == [("before", 2), ("after", 9)]


def test_a_window_starting_at_the_prune_anchor_verifies(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 12, checkpoint_every=4, clock=clock)
    log = _log(db, key, clock, checkpoint_every=4)
    log.prune(_at(T.records(db)[5].recorded_at), min_retention_days=0)  # records 1..5 go
    log.close()
    out = _export(db, key, tmp_path / "w.jsonl", since=datetime(2026, 1, 1, tzinfo=UTC))
    assert b'"side":"before"' not in out.read_bytes()
    report = verify_export(out, key.public_key())
    assert report.ok, report.problems
    assert report.first_seq == 6


def _resign(lines: list[bytes], key: Ed25519PrivateKey) -> bytes:
    body = b"".join(lines[:-1])
    sha = hashlib.sha256(body).hexdigest()
    count = len(lines) - 1
    sig = signing.sign(key, trailer_signed_bytes(count, sha)).hex()
    trailer = b'{"key_id":"%s","lines":%d,"sha256":"%s","signature":"%s","type":"trailer"}\n' % (
        signing.key_id(key).encode(),
        count,
        sha.encode(),
        sig.encode(),
    )
    return body + trailer


def test_a_checkpoint_signed_inside_the_window_must_name_a_size_inside_it(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    db = _windowed(tmp_path, key)
    recs = T.records(db)
    out = _export(db, key, tmp_path / "w.jsonl", since=_at(recs[5].recorded_at), until=_at(recs[10].recorded_at))
    assert verify_export(out, key.public_key()).ok
    # a window export whose header claims a wider window than its edges: the checkpoints signed at
    # 12:00:04 (size 4) and 12:00:12 (size 12) fall inside it but name sizes outside seq 6..10
    lines = T.export_lines(out)
    header = json.loads(lines[0])
    header["since"], header["until"] = "2026-01-01T12:00:03.500000Z", "2026-01-01T12:00:12.500000Z"
    lines[0] = encode_line(msgspec.json.decode(json.dumps(header).encode(), type=Header))
    report = verify_export_bytes(_resign(lines, key), key.public_key())
    assert not report.ok
    whats = " | ".join(p.what for p in report.problems)
    assert "records were removed at the window's start" in whats
    assert "records were removed at the window's end" in whats


def test_every_byte_flip_of_a_window_export_with_edges_is_caught(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = T.build_log(tmp_path, key, 6, checkpoint_every=3)
    recs = T.records(db)
    out = _export(db, key, tmp_path / "w.jsonl", since=_at(recs[2].recorded_at), until=_at(recs[4].recorded_at))
    data = out.read_bytes()
    pub = key.public_key()
    assert verify_export_bytes(data, pub).ok
    assert data.count(b'"type":"edge"') == 2
    missed = [
        i for i in range(len(data)) if verify_export_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :], pub).ok
    ]
    assert missed == []


def test_exports_of_format_1_still_verify(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    _old_format_log(db, key, 6, every=4)
    lines = T.export_lines(_export(db, key, tmp_path / "e.jsonl"))
    assert b'"version"' not in b"".join(lines)  # format 1 checkpoints keep their old spelling
    lines[0] = lines[0].replace(b"inferbox-audit-export/2", b"inferbox-audit-export/1")
    report = verify_export_bytes(_resign(lines, key), key.public_key())
    assert report.ok, report.problems


# -- 3. prune verifies what it signs ---------------------------------------------------------------


def test_prune_refuses_a_log_that_does_not_verify(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4, clock=clock)
    T.change_field(db, 5, "leaf_hash", "ab" * 32)  # the last record the prune would remove
    log = _log(db, key, clock)
    with pytest.raises(AuditError, match=r"refusing to prune: the log does not verify .*seq 5"):
        log.prune(_at(T.records(db)[5].recorded_at), min_retention_days=0)
    log.close()
    assert [r.seq for r in T.records(db)][:1] == [1]  # nothing removed
    assert "prune" not in {c.kind for c in _checkpoints(db)}


def test_prune_refuses_a_rewritten_record_inside_the_prefix(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4, clock=clock)
    T.rewrite_record(db, 2, actor="mallory")  # pruning 1..5 would erase the evidence
    log = _log(db, key, clock)
    with pytest.raises(AuditError, match="refusing to prune"):
        log.prune(_at(T.records(db)[5].recorded_at), min_retention_days=0)
    log.close()
    assert len(T.records(db)) == 10  # nothing removed, nothing added (a refused prune writes nothing itself)


def test_prune_signs_the_recomputed_leaf_and_rechecks_records_appended_meanwhile(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 6, checkpoint_every=4, clock=clock)
    other = _log(db, key, clock)  # another process's writer, appending between the two steps
    verified = prune_module._verified_leaf

    def then_append(*args: object) -> str:
        leaf = verified(*args)  # type: ignore[arg-type]
        other.append(T.event(100))  # recorded_at < the (forced, future) cut-off: it is pruned too
        return leaf

    monkeypatch.setattr(prune_module, "_verified_leaf", then_append)
    log = _log(db, key, clock)
    result = log.prune(clock.now + timedelta(days=1), min_retention_days=0, force=True)
    other.close()
    log.close()
    assert (result.pruned, result.last_pruned_seq) == (7, 7)
    assert result.checkpoint is not None
    report = verify_db(db, key.public_key())
    assert report.ok, report.problems


def test_prune_refuses_a_record_changed_between_verifying_and_deleting(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 6, checkpoint_every=4, clock=clock)
    verified = prune_module._verified_leaf

    def then_tamper(*args: object) -> str:
        leaf = verified(*args)  # type: ignore[arg-type]
        T.change_field(db, 3, "leaf_hash", "cd" * 32)  # record k, between the snapshot and the delete
        return leaf

    monkeypatch.setattr(prune_module, "_verified_leaf", then_tamper)
    log = _log(db, key, clock)
    with pytest.raises(AuditError, match="changed while prune ran"):
        log.prune(_at(T.records(db)[3].recorded_at), min_retention_days=0)
    log.close()
    assert [r.seq for r in T.records(db)][:1] == [1]


# -- 4. prune and export are recorded with (or before) the act ------------------------------------


def test_prune_and_its_record_commit_together(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    db = T.build_log(tmp_path, key, 6, checkpoint_every=4, clock=clock)
    log = _log(db, key, clock)

    def failing(result: object) -> AuditEvent:
        raise AuditError("the record could not be written")

    with pytest.raises(AuditError, match="could not be written"):
        log.prune(_at(T.records(db)[3].recorded_at), min_retention_days=0, record=failing)
    assert [r.seq for r in T.records(db)] == [1, 2, 3, 4, 5, 6]  # rolled back: no unrecorded prune
    result = log.prune(
        _at(T.records(db)[3].recorded_at),
        min_retention_days=0,
        record=lambda r: T.event(0, event="audit_prune", details={"pruned": str(r.pruned)}),
    )
    log.close()
    assert result.pruned == 3
    recs = T.records(db)
    assert [(r.seq, r.event) for r in recs][-1] == (7, "audit_prune")
    assert recs[-1].details == {"pruned": "3"}
    assert verify_db(db, key.public_key()).ok


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: Ed25519PrivateKey) -> Path:
    for name in list(os.environ):
        if name.startswith("INFERBOX_"):
            monkeypatch.delenv(name)
    return T.cli_home(tmp_path / "home", key)


def _cli(*args: str) -> tuple[int, str]:
    from appliance.cli import main

    result = CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)
    return result.exit_code, result.output


def _no_passwd_entry(uid: int) -> object:
    raise KeyError(f"getpwuid(): uid not found: {uid}")


def test_prune_without_a_passwd_entry_is_recorded_with_the_prune(
    home: Path, monkeypatch: pytest.MonkeyPatch, key: Ed25519PrivateKey
) -> None:
    monkeypatch.setattr(pwd, "getpwuid", _no_passwd_entry)
    code, out = _cli("prune", "--home", str(home), "--before", "2999-01-01", "--force")
    assert code == 0, out
    assert "pruned 7 records" in out
    recs = T.records(home / "audit.db")
    assert [(r.event, r.actor, r.outcome) for r in recs] == [("audit_prune", f"cli:uid-{os.getuid()}", "success")]
    assert recs[0].details["pruned"] == "7"
    assert verify_db(home / "audit.db", key.public_key()).ok


def test_a_refused_prune_is_recorded_as_a_failure(home: Path) -> None:
    code, out = _cli("prune", "--home", str(home), "--before", "2999-01-01")
    assert code == 2 and "min_retention_days" in out and "Traceback" not in out
    last = T.records(home / "audit.db")[-1]
    assert (last.event, last.outcome, last.status) == ("audit_prune", "failure", 1)
    assert "min_retention_days" in last.details["error"]


def test_an_export_appears_only_once_its_record_is_durable(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_file = tmp_path / "out" / "export.jsonl"
    out_file.parent.mkdir()

    def refuse(self: AuditLog, event: AuditEvent) -> int:
        raise AuditError("audit log busy")

    from appliance.cli import main

    with monkeypatch.context() as m:
        m.setattr(AuditLog, "append", refuse)
        result = CliRunner().invoke(main, ["audit", "export", "--home", str(home), "--out", str(out_file)])
        assert result.exit_code == 2 and "audit log busy" in result.output
        assert list(out_file.parent.iterdir()) == []  # neither the export nor its temporary file
        result = CliRunner().invoke(main, ["audit", "export", "--home", str(home)])
        assert result.exit_code == 2 and '"type":"header"' not in result.output  # nothing on stdout either
    monkeypatch.setattr(pwd, "getpwuid", _no_passwd_entry)
    code, out = _cli("export", "--home", str(home), "--out", str(out_file))
    assert code == 0, out
    assert [p.name for p in out_file.parent.iterdir()] == ["export.jsonl"]
    last = T.records(home / "audit.db")[-1]
    assert (last.event, last.actor) == ("audit_export", f"cli:uid-{os.getuid()}")
    assert last.details["sha256"] == hashlib.sha256(out_file.read_bytes()).hexdigest()


# -- 5. no seq is out of the verifier's sight ----------------------------------------------------


def test_a_row_with_a_huge_seq_is_seen_by_verify_db(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = T.build_log(tmp_path, key, 10, checkpoint_every=4)
    forged = msgspec.structs.replace(T.records(db)[-1], seq=(1 << 62) + 1, actor="mallory")
    insert_record(T.raw(db), forged)
    report = verify_db(db, key.public_key())
    assert not report.ok
    assert report.first_bad_seq == 11
    assert f"the next record is {(1 << 62) + 1}" in report.problems[0].what
    far = msgspec.structs.replace(forged, seq=-(1 << 62) - 5)
    db2 = T.build_log(tmp_path / "b", key, 3, checkpoint_every=4)
    insert_record(T.raw(db2), far)
    assert not verify_db(db2, key.public_key()).ok


# -- 6. key rotation ---------------------------------------------------------------------------------


def _rotated(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey, Ed25519PrivateKey, T.FakeClock]:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    clock = T.FakeClock()
    db = T.build_log(tmp_path, old, 10, checkpoint_every=4, clock=clock)
    log = _log(db, new, clock, checkpoint_every=4)
    for i in range(5):
        clock.advance(seconds=1)
        log.append(T.event(100 + i))
    log.close()
    return db, old, new, clock


def test_a_rotated_log_verifies_with_both_keys_and_prunes_with_the_old_one_named(tmp_path: Path) -> None:
    db, old, new, clock = _rotated(tmp_path)
    assert not verify_db(db, new.public_key()).ok
    report = verify_db(db, [new.public_key(), old.public_key()])
    assert report.ok, report.problems
    assert sorted(report.key_ids) == sorted([signing.key_id(old), signing.key_id(new)])
    out = _export(db, new, tmp_path / "e.jsonl")
    assert verify_export(out, [old.public_key(), new.public_key()]).ok
    log = _log(db, new, clock, checkpoint_every=4)
    with pytest.raises(AuditError, match="--public-key"):
        log.prune(datetime(2030, 1, 1, tzinfo=UTC), min_retention_days=0, force=True)
    result = log.prune(
        datetime(2030, 1, 1, tzinfo=UTC), min_retention_days=0, force=True, trusted_keys=[old.public_key()]
    )
    log.close()
    assert result.pruned == 15
    assert verify_db(db, [new.public_key(), old.public_key()]).ok


def test_cli_verify_takes_several_public_keys_and_the_retired_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("INFERBOX_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    db, old, new, _ = _rotated(home)
    assert db == home / "audit.db"
    write_private_key(new, home / "keys" / "signing.key")
    old_pub, new_pub = tmp_path / "old.pub", tmp_path / "new.pub"
    old_pub.write_text(public_key_pem(old))
    new_pub.write_text(public_key_pem(new))
    code, out = _cli("verify", "--home", str(home))
    assert code == 1 and "signing key" in out
    code, out = _cli("verify", "--home", str(home), "--public-key", str(new_pub), "--public-key", str(old_pub))
    assert code == 0 and out.startswith("OK"), out
    (home / "keys" / "retired").mkdir()
    (home / "keys" / "retired" / "old.pub").write_text(public_key_pem(old))
    code, out = _cli("verify", "--home", str(home))
    assert code == 0 and out.startswith("OK"), out


# -- 7. tail escapes what it prints -----------------------------------------------------------------


def test_tail_escapes_newlines_and_terminal_sequences(home: Path, key: Ed25519PrivateKey) -> None:
    forged = "nosuch\n       7 2026-12-05T04:00:00.000000Z key_revoke    success   0 cli:root host inferbox keys revoke"
    log = AuditLog(home / "audit.db", signing_key=key, digest_keys_dir=home / "keys" / "digest")
    log.append(T.event(1, model_name=forged, actor="\x1b[2J\x1b]0;owned\x07", action="GET /\u202eevil\\x"))
    log.close()
    code, out = _cli("tail", "--home", str(home), "-n", "2")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2  # no forged line
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "nosuch\\n       7" in lines[1]
    assert "\\x1b[2J\\x1b]0;owned\\x07" in lines[1]
    assert "GET /\\u202eevil\\\\x" in lines[1]


# -- 8. the writer type-checks each event on its own -------------------------------------------------


def test_a_badly_typed_event_fails_alone_and_stored_equals_hashed(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    log = AuditLog(db, signing_key=key, digest_keys_dir=tmp_path / "digest")
    with pytest.raises(AuditError, match="'status' must be an int, not bool"):
        log.append(AuditEvent(**{**msgspec.structs.asdict(T.event(0)), "status": True}))  # type: ignore[arg-type]
    log.start()
    bad_details = AuditEvent(**{**msgspec.structs.asdict(T.event(1)), "details": {"n": 3}})  # type: ignore[arg-type]
    bad_text = T.event(2, actor="\ud800")

    async def main() -> list[int | BaseException]:
        calls = [log.record_seq(T.event(10)), log.record_seq(bad_details), log.record_seq(bad_text)]
        calls.append(log.record_seq(T.event(11)))
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(main())
    log.close()
    assert outcomes[0] == 1 and outcomes[3] == 2  # the good ones of the same group were written
    assert isinstance(outcomes[1], AuditError) and "details" in str(outcomes[1])
    assert isinstance(outcomes[2], AuditError) and "not valid Unicode" in str(outcomes[2])
    report = verify_db(db, key.public_key())
    assert report.ok and report.last_seq == 2


def test_parse_canonical_is_an_exact_inverse(key: Ed25519PrivateKey) -> None:
    rec = AuditRecord(seq=1, log_id="x", prev_hash="0" * 64, recorded_at="t", **msgspec.structs.asdict(T.event(1)))
    data = canonical_bytes(rec)
    assert parse_canonical(data).seq == 1

    def field(value: str) -> bytes:
        raw = value.encode()
        return len(raw).to_bytes(8, "big") + raw

    one = field("1")
    for spelling in ("+1", " 1", "01", "\u0661"):
        with pytest.raises(AuditError):
            parse_canonical(data.replace(one, field(spelling), 1))


def test_store_checkpoint_round_trips_format_2(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = tmp_path / "audit.db"
    log = AuditLog(
        db, signing_key=key, digest_keys_dir=tmp_path / "digest", checkpoint_every=7, checkpoint_interval_s=90
    )
    log.append(T.event(0))
    log.close()
    cps = _checkpoints(db)
    assert [(c.version, c.index, c.every, c.interval_us) for c in cps] == [(2, 1, 7, 90_000_000), (2, 2, 7, 90_000_000)]
    assert cps[0].prev == "" and cps[1].prev == hashlib.sha256(cps[0].signature.encode()).hexdigest()
    conn = connect(db)
    with pytest.raises(sqlite3.IntegrityError):  # still append-only
        conn.execute("UPDATE checkpoints SET every = 1")
    conn.close()


def test_unreadable_rows_fail_verification_without_a_traceback(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    db = T.build_log(tmp_path, key, 6, checkpoint_every=4)
    T.raw(db).execute("UPDATE checkpoints SET size = 'four' WHERE size = 4")  # a malformed checkpoint row
    report = verify_db(db, key.public_key())
    assert not report.ok
    assert any("malformed head hash or size" in p.what for p in report.problems)
    T.raw(db).execute("UPDATE records SET actor = CAST(x'ff00fe' AS TEXT) WHERE seq = 2")  # not UTF-8
    with pytest.raises(VerificationError, match="cannot be read"):
        verify_db(db, key.public_key())


def test_cli_verify_names_the_legacy_pace_flags_and_max_age(home: Path, key: Ed25519PrivateKey) -> None:
    code, out = _cli("verify", "--home", str(home), "--max-age", "1440")
    assert code == 0, out  # the fixture's log was just written
    code, out = _cli("verify", "--home", str(home), "--checkpoint-every", "2", "--checkpoint-minutes", "1")
    assert code == 0, out  # format 2 checkpoints sign their own pace: the flags do not apply
    _delete_checkpoints(home / "audit.db", "size > 3")
    code, out = _cli("verify", "--home", str(home))
    assert code == 1 and "every 3 records" in out and "Traceback" not in out


def test_str_and_int_subclasses_are_stored_as_they_are_hashed(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    import enum

    class Status(enum.IntEnum):
        OK = 200

    class Shout(str):
        def __str__(self) -> str:
            return "SHOUTED"

    db = tmp_path / "audit.db"
    log = AuditLog(db, signing_key=key, digest_keys_dir=tmp_path / "digest")
    plain = msgspec.structs.asdict(T.event(0))
    event = AuditEvent(**{**plain, "status": Status.OK, "actor": Shout("key-abc"), "details": {Shout("n"): Shout("1")}})
    assert type(event.status) is Status and type(event.actor) is Shout
    log.append(event)
    log.close()
    rec = T.records(db)[0]
    assert (rec.status, rec.actor, rec.details) == (200, "key-abc", {"n": "1"})
    assert verify_db(db, key.public_key()).ok


def test_the_actor_of_a_command_is_its_uid_not_an_environment_variable(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LOGNAME=dpo.mueller inferbox keys create ...` run as root was recorded as cli:dpo.mueller: any
    user could name another as the actor of an admin action."""
    monkeypatch.setenv("LOGNAME", "dpo.mueller")
    monkeypatch.setenv("USER", "dpo.mueller")
    code, out = _cli("export", "--home", str(home), "--out", str(home.parent / "e.jsonl"))
    assert code == 0, out
    last = T.records(home / "audit.db")[-1]
    assert last.actor == f"cli:{pwd.getpwuid(os.getuid()).pw_name}" and "mueller" not in last.actor


def test_a_command_run_through_sudo_names_the_login_too(tmp_path: Path) -> None:
    """`sudo -u inferbox env ... inferbox keys revoke` (as the docs say) was recorded as the service user
    alone: the kernel's login uid, kept across sudo, names the person."""
    from appliance.commands.keys import cli_user

    me = pwd.getpwuid(os.getuid()).pw_name
    other = next(p for p in pwd.getpwall() if p.pw_uid != os.getuid())
    login = tmp_path / "loginuid"
    login.write_text(f"{other.pw_uid}\n")
    assert cli_user(login) == f"{me} (login {other.pw_name})"
    login.write_text(f"{os.getuid()}\n")
    assert cli_user(login) == me
    login.write_text("4294967295\n")  # no login set it (a service)
    assert cli_user(login) == me
