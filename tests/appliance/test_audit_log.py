"""The writer: group commit, durability, checkpoints (every N, idle timer, close), prune, digests, canaries."""

from __future__ import annotations

import asyncio
import hashlib
import stat
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.protocols import AuditEvent, AuditSink
from appliance.audit import log as audit_log
from appliance.audit.checkpoint import Checkpoint
from appliance.audit.log import AuditLog
from appliance.audit.schema import connect
from appliance.audit.verify import verify_db
from runtime.errors import AuditError

from . import audit_tamper as T


def _log(tmp_path: Path, key: Ed25519PrivateKey, **kwargs: object) -> AuditLog:
    return AuditLog(tmp_path / "audit.db", signing_key=key, digest_keys_dir=tmp_path / "keys" / "digest", **kwargs)  # type: ignore[arg-type]


def _checkpoints(db: Path) -> list[Checkpoint]:
    return T.checkpoints(db)


def test_audit_log_is_an_audit_sink(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    sink: AuditSink = _log(tmp_path, key)  # mypy checks the protocol; this checks it at run time too
    assert callable(sink.digest) and asyncio.iscoroutinefunction(sink.record)


def test_group_commit_uses_fewer_transactions_than_records(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = _log(tmp_path, key, checkpoint_every=50)
    log.start()

    async def main() -> list[int]:
        return await asyncio.gather(*(log.record_seq(T.event(i)) for i in range(300)))

    seqs = asyncio.run(main())
    assert sorted(seqs) == list(range(1, 301))
    assert log.records_written == 300
    assert log.commits < 300 // 4  # one transaction (one fsync) served many records
    log.close()
    report = verify_db(tmp_path / "audit.db", key.public_key())
    assert report.ok and report.last_seq == 300


def test_the_logs_figures_count_records_commits_and_the_records_still_waiting(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log = _log(tmp_path, key, checkpoint_every=1000)
    log.start()

    async def main() -> tuple[int, list[int]]:
        log._lock.acquire()  # the writer blocks on its next write: what was handed over waits
        try:
            tasks = [asyncio.ensure_future(log.record_seq(T.event(i))) for i in range(5)]
            await asyncio.sleep(0.05)  # the tasks hand their records over; not a timing assertion
            waiting = log.stats().pending
        finally:
            log._lock.release()
        return waiting, list(await asyncio.gather(*tasks))

    waiting, seqs = asyncio.run(main())
    assert waiting == 5 and sorted(seqs) == [1, 2, 3, 4, 5]
    log.append(T.event(5))  # the synchronous path counts too
    figures = log.stats()
    assert figures.pending == 0 and figures.records == 6
    assert 2 <= figures.commits <= 6  # one group or more, and the sync append is its own commit
    assert figures.commit_seconds > 0.0
    log.checkpoint()  # a checkpoint's transaction is not an append: the figures stay
    assert log.stats() == figures and log.commits == figures.commits + 1
    log.close()


def _writing(tmp_path: Path, key: Ed25519PrivateKey) -> tuple[AuditLog, threading.Thread]:
    """A started log with one record, and its writer thread (whose ``join`` a test may wrap)."""
    log = _log(tmp_path, key)
    log.start()
    assert log.append(T.event(0)) == 1
    assert log._thread is not None
    return log, log._thread


def test_a_record_that_arrives_while_the_log_closes_is_refused_not_left_waiting(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """Between the writer's stop and the log's closed state a record used to be taken and never
    written: its request waited for ever.  Now it is refused at once (the API answers 503)."""
    log, writer = _writing(tmp_path, key)
    outcomes: list[object] = []
    stop_writer = writer.join

    async def late() -> None:
        try:
            outcomes.append(await asyncio.wait_for(log.record_seq(T.event(1)), 2))
        except (AuditError, TimeoutError) as exc:
            outcomes.append(exc)

    def late_append() -> None:
        try:
            outcomes.append(log.append(T.event(2)))
        except AuditError as exc:
            outcomes.append(exc)

    def join_then_record(timeout: float | None = None) -> None:
        stop_writer(timeout)  # the writer has stopped; close() has not finished
        asyncio.run(late())
        sync = threading.Thread(target=late_append, daemon=True)
        sync.start()
        sync.join(2)

    writer.join = join_then_record  # type: ignore[method-assign]
    log.close()
    assert len(outcomes) == 2 and all(isinstance(o, AuditError) for o in outcomes), outcomes
    assert "closing" in str(outcomes[0])
    log.start()  # a log started again takes records again
    assert log.append(T.event(3)) == 2
    log.close()


def test_two_closes_at_once_stop_the_writer_once_and_a_new_start_writes_again(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log, writer_thread = _writing(tmp_path, key)
    errors: list[BaseException] = []
    stop_writer = writer_thread.join

    def slow_join(timeout: float | None = None) -> None:
        time.sleep(0.2)  # the second closer arrives while the first waits for the writer
        stop_writer(timeout)

    writer_thread.join = slow_join  # type: ignore[method-assign]

    def close() -> None:
        try:
            log.close()
        except BaseException as exc:  # what a second closer met is the finding
            errors.append(exc)

    closers = [threading.Thread(target=close) for _ in range(2)]
    for t in closers:
        t.start()
        time.sleep(0.05)
    for t in closers:
        t.join(10)
    assert errors == [] and not any(t.is_alive() for t in closers)
    log.start()  # no second stop marker left behind for the new writer
    seqs: list[int] = []
    writer = threading.Thread(target=lambda: seqs.append(log.append(T.event(1))), daemon=True)
    writer.start()
    writer.join(10)
    assert seqs == [2]
    log.close()


def test_one_loop_iteration_of_records_reaches_the_writer_as_one_group(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """The answers of one batch are recorded in one loop iteration: they reach the writer's queue
    as one item, so its thread wakes once for them (each wake-up pre-empted an inference thread)."""
    log = _log(tmp_path, key, checkpoint_every=1000)
    log.start()
    puts: list[int] = []
    inner = log._queue

    class Counting:
        def put(self, item: object) -> None:
            puts.append(len(item) if isinstance(item, list) else 1)
            inner.put(item)

        def get(self, timeout: float | None = None) -> object:
            return inner.get(timeout=timeout)

        def get_nowait(self) -> object:
            return inner.get_nowait()

    log._queue = Counting()  # type: ignore[assignment]

    settled: list[int] = []  # records resolved per wake-up of the event loop

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        wake = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
            if callback is audit_log._settle:
                settled.append(len(args[0]))
            return wake(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        seqs = await asyncio.gather(*(log.record_seq(T.event(i)) for i in range(20)))
        more = await asyncio.gather(*(log.record_seq(T.event(i)) for i in range(20, 25)))
        return [*seqs, *more]

    assert sorted(asyncio.run(main())) == list(range(1, 26))
    assert puts == [20, 5]
    assert settled == [20, 5]  # and the writer wakes the loop once per group, not once per record
    log.close()
    assert verify_db(tmp_path / "audit.db", key.public_key()).ok


def test_records_still_waiting_for_their_loop_iteration_are_written_at_close(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log = _log(tmp_path, key)
    log.start()

    async def main() -> list[int]:
        tasks = [asyncio.ensure_future(log.record_seq(T.event(i))) for i in range(3)]
        await asyncio.sleep(0)  # the three have queued, the hand-over to the writer has not run
        log.close()  # as a shutdown in this loop iteration would
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 10))  # lost records: a timeout

    assert sorted(asyncio.run(main())) == [1, 2, 3]
    assert verify_db(tmp_path / "audit.db", key.public_key()).last_seq == 3


def test_a_record_is_visible_to_another_connection_when_its_await_returns(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    log = _log(tmp_path, key)
    log.start()
    other = connect(tmp_path / "audit.db", read_only=True)
    missing: list[int] = []

    async def one(i: int) -> None:
        seq = await log.record_seq(T.event(i))
        if other.execute("SELECT count(*) FROM records WHERE seq = ?", (seq,)).fetchone()[0] != 1:
            missing.append(seq)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(64)))
        await log.record(T.event(999))  # the protocol method returns None

    asyncio.run(main())
    assert missing == []
    assert other.execute("SELECT count(*) FROM records").fetchone()[0] == 65
    other.close()
    log.close()


def test_record_before_start_names_the_fix(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = _log(tmp_path, key)
    with pytest.raises(AuditError, match="start"):
        asyncio.run(log.record(T.event()))


def test_sync_append_works_with_and_without_the_writer_thread(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = _log(tmp_path, key)
    assert [log.append(T.event(i)) for i in range(3)] == [1, 2, 3]
    log.start()
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(log.append(T.event(0)))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(4, 12))
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append(T.event())


def test_checkpoint_every_n_records_and_at_close(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = _log(tmp_path, key, checkpoint_every=5)
    for i in range(12):
        log.append(T.event(i))
    # size 0: the empty log, signed before its first record (so every record follows a signed pace)
    assert [c.size for c in _checkpoints(tmp_path / "audit.db")] == [0, 5, 10]
    log.close()
    cps = _checkpoints(tmp_path / "audit.db")
    assert [c.size for c in cps] == [0, 5, 10, 12]
    assert cps[-1].head_hash == T.records(tmp_path / "audit.db")[-1].leaf_hash


def test_idle_timer_checkpoints_even_without_new_records(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    log = _log(tmp_path, key, checkpoint_interval_s=600, clock=clock)
    log.append(T.event())
    assert log.maybe_checkpoint() is None
    clock.advance(seconds=599)
    assert log.maybe_checkpoint() is None
    clock.advance(seconds=2)
    first = log.maybe_checkpoint()
    assert first is not None and first.size == 1
    assert log.maybe_checkpoint() is None
    clock.advance(minutes=10)
    second = log.maybe_checkpoint()  # idle: same size, later time
    assert second is not None and second.size == 1 and second.created_at > first.created_at
    log.close()
    assert verify_db(tmp_path / "audit.db", key.public_key()).ok


def test_the_writer_thread_runs_the_idle_timer(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    written = threading.Event()
    log = _log(
        tmp_path, key, checkpoint_interval_s=60, clock=clock, idle_poll_s=0.01, on_checkpoint=lambda cp: written.set()
    )
    log.start()
    log.append(T.event())
    written.wait(timeout=30)  # the checkpoint of the empty log, signed with the first record
    written.clear()
    assert not written.is_set()
    clock.advance(seconds=61)
    assert written.wait(timeout=30), "the idle timer did not checkpoint"
    log.close()


def test_prune_refuses_inside_min_retention_unless_forced(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    log = _log(tmp_path, key, clock=clock)
    for i in range(3):
        log.append(T.event(i))
    clock.advance(days=300)
    for i in range(3):
        log.append(T.event(i))
    with pytest.raises(AuditError, match="min_retention_days"):
        log.prune(clock.now - timedelta(days=100), min_retention_days=183)
    assert len(T.records(tmp_path / "audit.db")) == 6
    result = log.prune(clock.now - timedelta(days=200), min_retention_days=183)
    assert (result.pruned, result.last_pruned_seq) == (3, 3)
    assert result.checkpoint is not None and result.checkpoint.kind == "prune"
    assert log.prune(clock.now - timedelta(days=200), min_retention_days=183).pruned == 0
    forced = log.prune(clock.now + timedelta(seconds=1), min_retention_days=183, force=True)
    assert forced.pruned == 3 and forced.last_pruned_seq == 6
    assert log.append(T.event(7)) == 7  # the chain continues from the anchor
    log.close()
    report = verify_db(tmp_path / "audit.db", key.public_key())
    assert report.ok, report.problems
    assert (report.first_seq, report.last_seq) == (7, 7)


def test_digest_is_hmac_under_a_rotating_key(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    log = _log(tmp_path, key, digest_key_days=30, clock=clock)
    data = b"patient 4711: chest pain"
    d1 = log.digest(data)
    assert d1 == log.digest(data)
    assert d1.hexdigest != hashlib.sha256(data).hexdigest()  # canary: never a plain SHA-256
    assert len(d1.hexdigest) == 64
    key_file = tmp_path / "keys" / "digest" / f"{d1.key_id}.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    clock.advance(days=31)
    d2 = log.digest(data)
    assert d2.key_id != d1.key_id and d2.hexdigest != d1.hexdigest
    # the old key is kept: an auditor holding the candidate input recomputes the old digest
    assert log.keyring.digest_with(d1.key_id, data) == d1
    assert log.keyring.key_ids() == sorted([d1.key_id, d2.key_id])


def test_canary_no_payload_field_and_no_plain_text_in_the_database(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    assert not {"payload", "body", "text", "input", "output", "secret"} & set(AuditEvent.__struct_fields__)
    with pytest.raises(TypeError):
        AuditEvent(payload="x", **msgspec.structs.asdict(T.event()))  # type: ignore[call-arg]
    secret_text = "CANARY-Jane-Doe-diagnosis-F32.1"
    log = _log(tmp_path, key)
    d = log.digest(secret_text.encode())
    log.append(T.event(input_digest=d.hexdigest, digest_key_id=d.key_id))
    log.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*"))
    assert secret_text.encode() not in blob
    assert hashlib.sha256(secret_text.encode()).hexdigest().encode() not in blob
    assert d.hexdigest.encode() in blob


def test_two_logs_in_one_process_extend_one_chain(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    a, b = _log(tmp_path, key, checkpoint_every=3), _log(tmp_path, key, checkpoint_every=3)
    for i in range(10):
        (a if i % 2 else b).append(T.event(i))
    a.close()
    b.close()
    assert verify_db(tmp_path / "audit.db", key.public_key()).ok


def test_query_filters_and_pages_by_seq(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    clock = T.FakeClock()
    log = _log(tmp_path, key, clock=clock)
    for i in range(10):
        clock.advance(seconds=1)
        log.append(
            T.event(i, event="inference" if i % 2 else "auth_failure", outcome="success" if i % 2 else "failure")
        )
    page1 = log.query(event="inference", limit=3)
    assert [r.seq for r in page1] == [2, 4, 6]
    page2 = log.query(event="inference", after_seq=page1[-1].seq, limit=3)
    assert [r.seq for r in page2] == [8, 10]
    assert [r.seq for r in log.query(outcome="failure", request_id="req-4")] == [5]
    recs = log.query(limit=100)
    window = log.query(since=recs[2].recorded_at, until=recs[5].recorded_at)
    assert [r.seq for r in window] == [3, 4, 5]
    assert log.query(actor="nobody") == []
    assert [r.seq for r in log.tail(2)] == [9, 10]
    # "which version ran?", "was this body sent?": the version and the input digest are filters too
    log.append(T.event(10, model_version="2", input_digest="ef" * 32))
    assert [r.seq for r in log.query(model_name="minilm", model_version="2")] == [11]
    assert [r.seq for r in log.query(input_digest="ef" * 32)] == [11]
    log.close()


def test_public_surface_is_pinned() -> None:
    import appliance.audit as audit

    assert sorted(audit.__all__) == [
        "AuditLog",
        "AuditRecord",
        "Checkpoint",
        "ExportSummary",
        "PruneResult",
        "VerifyReport",
        "canonical_bytes",
        "export_jsonl",
        "leaf_hash",
        "merkle_proof",
        "merkle_root",
        "verify_db",
        "verify_export",
        "verify_proof",
    ]
    for name in audit.__all__:
        assert getattr(audit, name) is not None


def test_query_by_client_certificate(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = _log(tmp_path, key)
    mine, other = "ab" * 32, "cd" * 32
    for i, fingerprint in enumerate([mine, None, other, mine]):
        details = {"n": str(i)} if fingerprint is None else {"client_cert_sha256": fingerprint, "client_cert": "CN=x"}
        log.append(T.event(i, details=details))
    assert [r.seq for r in log.query(client_cert_sha256=mine)] == [1, 4]
    assert [r.seq for r in log.query(client_cert_sha256=other, request_id="req-2")] == [3]
    assert log.query(client_cert_sha256="ef" * 32) == []
    log.close()
    # a details column that is not JSON (tampered) is reported by verify; it does not break the query
    conn = connect(tmp_path / "audit.db")
    conn.execute("DROP TRIGGER records_no_update")
    conn.execute("UPDATE records SET details = 'not json' WHERE seq = 2")
    conn.close()
    log = _log(tmp_path, key)
    assert [r.seq for r in log.query(client_cert_sha256=mine)] == [1, 4]
    log.close()


def test_a_slow_read_does_not_hold_up_the_writer(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filtered read of a big log scans it; requests wait for their records meanwhile unless
    reads have their own connection (WAL: readers and the writer do not block each other)."""
    log = _log(tmp_path, key)
    log.append(T.event(0))
    entered, release = threading.Event(), threading.Event()
    real = audit_log.query_records

    def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(audit_log, "query_records", slow)
    found: list[Any] = []
    reader = threading.Thread(target=lambda: found.extend(log.query(limit=10)))
    reader.start()
    assert entered.wait(10)
    written = threading.Event()
    writer = threading.Thread(target=lambda: (log.append(T.event(1)), written.set()))
    writer.start()
    try:
        assert written.wait(10), "the append waited for the read"
    finally:
        release.set()
        reader.join(10)
        writer.join(10)
    assert [r.seq for r in found] in ([1], [1, 2])
    assert [r.seq for r in log.query(limit=10)] == [1, 2]
    log.close()


def test_read_only_opens_take_paths_with_uri_characters(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """A '#' or '?' in a folder name ended the ``file:`` URI (and dropped ``mode=ro``)."""
    folder = tmp_path / "a#b?c"
    folder.mkdir()
    log = _log(folder, key)
    log.append(T.event(1))
    assert [r.seq for r in log.query(limit=5)] == [1]  # the read connection
    log.close()
    conn = connect(folder / "audit.db", read_only=True)
    assert conn.execute("SELECT count(*) FROM records").fetchone() == (1,)
    conn.close()
    assert not (tmp_path / "a").exists()  # nothing made where the URI was cut
