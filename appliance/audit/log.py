"""The audit log writer: hash-chained appends with group commit and signed checkpoints.

One background thread owns the writes: callers enqueue events; the thread
drains the queue, appends everything it took in one ``BEGIN IMMEDIATE``
transaction (reading the head inside it, so the API process and the batch
worker extend one chain), commits (one fsync: WAL + ``synchronous=FULL``) and
only then resolves the callers.  A checkpoint is signed into the same
transaction before a log's first records (of the empty log: size 0) and
whenever ``checkpoint_every`` records or ``checkpoint_interval_s`` seconds have
passed since the newest checkpoint (keeping the pace that checkpoint signs when
it is stricter: another writer's); outside a write, by the idle timer every
``checkpoint_interval_s`` seconds and at :meth:`AuditLog.close`.  The verifier
holds the log to exactly this rule.

Each event is type-checked in the writer (:func:`checked_event`): a malformed
event fails alone, with an :class:`AuditError`, and never the group it came in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from api.protocols import AuditEvent, AuditStats, Digest
from appliance.audit.canonical import AuditRecord, checked_event, format_time, leaf_hash, parse_time
from appliance.audit.checkpoint import Checkpoint, Pace, sign_next
from appliance.audit.digest import DigestKeyring
from appliance.audit.prune import PruneResult, prune_prefix
from appliance.audit.schema import connect, ensure_schema, read_log_id
from appliance.audit.signer import Signer
from appliance.audit.store import (
    LastCheckpoint,
    head,
    insert_records,
    last_checkpoint,
    query_records,
    tail_records,
)
from runtime.errors import AuditError
from runtime.threads import named_thread

if TYPE_CHECKING:
    from appliance.settings import Settings

__all__ = ["AuditLog"]

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Item:
    event: AuditEvent
    future: concurrent.futures.Future[int] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    afuture: asyncio.Future[int] | None = None


_STOP = object()

#: every AuditLog of this process, for the fork hooks below
_LOGS: weakref.WeakSet[AuditLog] = weakref.WeakSet()
_FORK_HOOK: list[bool] = []  # registered once, by the first AuditLog (never at import)
#: per forking thread, the logs :func:`_before_fork` holds until its fork is done
_FORKING = threading.local()


def _before_fork() -> None:
    """No statement of a log's connections, and no digest key being made, while the process
    forks: SQLite keeps its file locks' bookkeeping in process memory, so a child forked inside
    the writer's transaction would find the write lock held for ever (every record of its would
    fail with "database is locked")."""
    held: list[AuditLog] = []
    _FORKING.held = held
    for log in list(_LOGS):
        log._hold_for_fork()
        held.append(log)


def _after_fork_in_parent() -> None:
    held: list[AuditLog] = getattr(_FORKING, "held", [])
    for log in reversed(held):
        log._release_after_fork()
    held.clear()


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: each log forgets its writer and gets
    fresh locks (one held at the fork, by the hook above or a request, would stay held for ever)."""
    held: list[AuditLog] = getattr(_FORKING, "held", [])
    for log in held:
        log._forget_parent()
    held.clear()


def _no_log_in(path: Path) -> bool:
    """No audit log at ``path`` yet: no file, or an empty one (SQLite makes the log in it)."""
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def _items(queued: object) -> list[_Item]:
    """What the writer's queue holds, one record or a group, as a list."""
    if isinstance(queued, list):
        return queued
    assert isinstance(queued, _Item)
    return [queued]


def _settle(outcomes: list[tuple[asyncio.Future[int], int | None, BaseException | None]]) -> None:
    """On the futures' loop: resolve each (future, seq, error) that nobody cancelled."""
    for fut, seq, exc in outcomes:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(seq if seq is not None else 0)


class AuditLog:
    """Implements :class:`api.protocols.AuditSink`; also ``append`` for the CLI and batch worker."""

    def __init__(
        self,
        db_path: Path,
        *,
        signing_key: Ed25519PrivateKey | Signer,
        digest_keys_dir: Path,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 600.0,
        digest_key_days: int = 30,
        clock: Callable[[], datetime] = _now,
        max_batch: int = 512,
        idle_poll_s: float = 1.0,
        on_checkpoint: Callable[[Checkpoint], None] | None = None,
    ) -> None:
        if checkpoint_every < 1 or checkpoint_interval_s <= 0:
            raise AuditError("checkpoint_every must be >= 1 and checkpoint_interval_s > 0")
        self.db_path = Path(db_path)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = timedelta(seconds=checkpoint_interval_s)
        if self.checkpoint_interval < timedelta(microseconds=1):
            raise AuditError("checkpoint_interval_s must be at least a microsecond")
        #: the pace every checkpoint of this writer signs
        self.pace = Pace.of(checkpoint_every, self.checkpoint_interval)
        self.keyring = DigestKeyring(digest_keys_dir, rotate_days=digest_key_days, clock=clock)
        #: digest keys from records this box wrote before this writer (a key this writer makes, as
        #: ``batch submit`` does before its first record, is not a sign of a lost log)
        self._keys_before = bool(self.keyring.key_ids())
        self.commits = 0  #: committed write transactions (group commit metric)
        self.records_written = 0
        #: what /metrics shows: replaced whole (never torn) after each append transaction
        self._stats = AuditStats(records=0, commits=0, commit_seconds=0.0, pending=0)
        #: records handed to the writer thread and not yet written (guarded by _handover_lock)
        self._pending = 0
        #: the key checkpoints are signed with; a :class:`Signer` read from a file (:meth:`open`) reads it
        #: again once the file is replaced (a rotation: see :mod:`appliance.audit.signer`)
        self._signer = signing_key if isinstance(signing_key, Signer) else Signer(signing_key)
        self._clock = clock
        self._max_batch = max_batch
        self._idle_poll_s = idle_poll_s
        self._on_checkpoint = on_checkpoint
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        #: reads (tail, query) have their own connection: WAL lets them read while the writer
        #: commits, so a long filtered read never holds up the records that requests wait for
        self._reader: sqlite3.Connection | None = None
        self._reader_pid = 0
        self._read_lock = threading.Lock()
        self._pid = 0
        self._inherited: list[sqlite3.Connection] = []
        self._log_id = ""
        self._opened_at = clock()
        #: the last append failed, and the records refused since it began to fail
        self._failing = False
        self._refused = 0
        #: when the append in progress began (time.monotonic), None when none is (stats(): stalled_s)
        self._writing_since: float | None = None
        #: records refused since the log opened (/metrics: a counter, kept when the log works again)
        self._refused_total = 0
        #: one item, a list of items (one event-loop iteration's records), or _STOP
        self._queue: queue.SimpleQueue[_Item | list[_Item] | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: records of the current event-loop iteration, per loop, not yet handed to the writer
        self._handover: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        self._handover_lock = threading.Lock()
        self._closed = False
        #: set (under _handover_lock) when close() begins: no record is taken after it, so none
        #: can reach the queue after the writer has stopped and wait there for ever.  Every put on
        #: the queue happens under that lock too, so none can slip in behind the stop marker
        self._closing = False
        self._close_lock = threading.Lock()
        if not _FORK_HOOK:
            os.register_at_fork(
                before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
            )
            _FORK_HOOK.append(True)
        _LOGS.add(self)

    def _hold_for_fork(self) -> None:
        """Wait for the statements and the digest key in progress (in the order reads take them)."""
        self._read_lock.acquire()
        self._lock.acquire()
        self.keyring.hold_for_fork()

    def _release_after_fork(self) -> None:
        self.keyring.release_after_fork()
        self._lock.release()
        self._read_lock.release()

    def _forget_parent(self) -> None:
        """In a forked child: not started (records go straight to the database, or to a writer
        that :meth:`start` makes here), nothing waiting, nothing counted, every lock new;
        connections are reopened by :meth:`_connection` (a connection never crosses a fork)."""
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._handover_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self.keyring.forget_parent()
        self._queue = queue.SimpleQueue()
        self._handover = {}
        self._pending = 0
        self._thread = None
        self._closing = False
        self.commits = 0
        self.records_written = 0
        self._refused_total = 0
        self._stats = AuditStats(records=0, commits=0, commit_seconds=0.0, pending=0)

    @classmethod
    def open(cls, settings: Settings, **kwargs: object) -> AuditLog:
        """The appliance's audit log (``settings.audit_db``, keys under ``settings.keys_dir``)."""
        return cls(
            settings.audit_db,
            signing_key=Signer.read(settings.signing_key),
            digest_keys_dir=settings.keys_dir / "digest",
            checkpoint_every=settings.checkpoint_every,
            checkpoint_interval_s=settings.checkpoint_minutes * 60.0,
            digest_key_days=settings.digest_key_days,
            **kwargs,  # type: ignore[arg-type]
        )

    # -- connection -------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This process's connection (a connection never crosses a fork)."""
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:
                # inherited across a fork: never use it, never close it here (keep it referenced)
                self._inherited.append(self._conn)
            fresh = _no_log_in(self.db_path)
            self._conn = connect(self.db_path)
            self._pid = os.getpid()
            ensure_schema(self._conn)
            self._log_id = read_log_id(self._conn)
            if fresh and self._keys_before:
                log.warning(
                    "the audit log %s was missing or empty, and this box has digest keys from records it wrote "
                    "before: a new log %s was started. If the old log was lost, restore it from a backup "
                    "(docs/operations.md); `inferbox audit ship` alerts while the ship folder holds the old "
                    "log's copies",
                    self.db_path,
                    self._log_id,
                )
        return self._conn

    def _read_connection(self) -> sqlite3.Connection:
        """This process's read connection (opened after the writer's, which makes the schema)."""
        if self._reader is None or self._reader_pid != os.getpid():
            if self._reader is not None:  # inherited across a fork: never used, never closed here
                self._inherited.append(self._reader)
            with self._lock:
                self._connection()
            self._reader = connect(self.db_path, read_only=True)
            self._reader_pid = os.getpid()
        return self._reader

    @property
    def log_id(self) -> str:
        with self._lock:
            self._connection()
            return self._log_id

    @property
    def signing_key_id(self) -> str:
        """The id of the key this writer signs its checkpoints with (a service's start records it)."""
        return self._signer.key_id

    # -- the AuditSink protocol -------------------------------------------

    def digest(self, data: bytes) -> Digest:
        """HMAC-SHA256 of ``data`` under the current digest key."""
        return self.keyring.digest(data)

    async def record(self, event: AuditEvent) -> None:
        """Append ``event``; return once the transaction holding it has committed."""
        await self.record_seq(event)

    async def record_seq(self, event: AuditEvent) -> int:
        if self._closed:
            raise AuditError("the audit log is closed (the service is stopping); the record was not taken")
        if self._thread is None:
            raise AuditError("the audit log is not started; call AuditLog.start() (the app lifespan does)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        # The records of one loop iteration (the answers of one inference batch) reach the
        # writer together: one wake-up of its thread per group instead of one per request.
        # At ~330 req/s it woke ~490 times a second, each time pre-empting an inference thread.
        with self._handover_lock:
            if self._closing:
                raise AuditError("the audit log is closing (the service is stopping); the record was not taken")
            pending = self._handover.setdefault(loop, [])
            pending.append(_Item(event, loop=loop, afuture=fut))
            first = len(pending) == 1
            self._pending += 1
        if first:
            loop.call_soon(self._hand_over, loop)
        return await fut

    def _hand_over(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Queue the waiting records of ``loop`` (every loop when None) as one group each."""
        with self._handover_lock:
            self._hand_over_locked(loop)

    def _hand_over_locked(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loops = [loop] if loop is not None else list(self._handover)
        for lp in loops:
            group = self._handover.pop(lp, [])
            if group:
                self._queue.put(group)  # never blocks (an unbounded queue)

    def stats(self) -> AuditStats:
        """What this writer's appends have done since it opened: records, their transactions and
        those transactions' time (one snapshot, so records over commits is a group's size), and the
        records waiting for their turn (``/metrics``).  Checkpoint and prune transactions are not
        appends and are not counted here."""
        with self._handover_lock:
            pending = self._pending
        since = self._writing_since
        stalled = max(0.0, time.monotonic() - since) if since is not None else 0.0
        return msgspec.structs.replace(
            self._stats, pending=pending, failing=self._failing, refused=self._refused_total, stalled_s=stalled
        )

    # -- synchronous API ---------------------------------------------------

    def append(self, event: AuditEvent) -> int:
        """Append ``event`` durably and return its seq (via the writer thread when started)."""
        if self._closed:
            raise AuditError("the audit log is closed")
        if self._thread is None:
            outcome = self._write_batch([event])[0]
            if isinstance(outcome, AuditError):
                raise outcome
            return outcome
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._handover_lock:
            if self._closing:
                raise AuditError("the audit log is closing (the service is stopping); the record was not taken")
            self._pending += 1
            self._queue.put(_Item(event, future=fut))
        return fut.result()

    def start(self) -> None:
        """Open the database and start the writer thread (idempotent)."""
        if self._thread is not None:
            return
        with self._lock:
            self._connection()
        self._closed = False
        with self._handover_lock:
            self._closing = False
        self._thread = named_thread(self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def close(self, *, sign: bool = True) -> None:
        """Drain the queue, write a checkpoint (clean shutdown; ``sign=False``: none, as after a rotation
        that failed: its key is being taken back) and close the database."""
        with self._close_lock:  # a second caller waits, then finds it closed
            self._close(sign)

    def _close(self, sign: bool = True) -> None:
        if self._closed:
            return
        writer = self._thread
        if writer is not None:
            with self._handover_lock:
                self._closing = True
                self._hand_over_locked()  # records of a loop iteration still running go before the stop
                self._queue.put(_STOP)
            writer.join()
            self._thread = None
        self._closed = True
        with self._read_lock:
            if self._reader is not None and self._reader_pid == os.getpid():
                self._reader.close()
            elif self._reader is not None:
                self._inherited.append(self._reader)  # another process's connection: leave it alone
            self._reader = None
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                if sign:
                    self._write_checkpoint()
                self._conn.close()
            elif self._conn is not None:
                self._inherited.append(self._conn)  # another process's connection: leave it alone
            self._conn = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checkpoints, prune, reads -----------------------------------------

    def checkpoint(self) -> Checkpoint:
        """Sign a checkpoint of the current head now."""
        with self._lock:
            return self._write_checkpoint()

    def record_rotation(self, event: AuditEvent, retires: Sequence[str]) -> int:
        """Append ``event`` (the rotation's record) and, in the same transaction, a checkpoint signed with
        the key file's key (the new one) that retires the keys ``retires`` names (format 3: see
        :mod:`appliance.audit.rotation`); its seq.  Both commit or neither does."""
        ids = ",".join(sorted({k for k in retires if k}))
        if not ids:
            raise AuditError("a rotation retires at least one key")
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                outcomes, signed = self._append_in_transaction(conn, [event])
                if isinstance(outcomes[0], AuditError):
                    raise outcomes[0]
                signed.append(self._sign_head(conn, retires=ids))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.commits += 1
            self.records_written += 1
        for cp in signed:
            self._notify(cp)
        return outcomes[0]

    def maybe_checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint if the newest is older than the interval (the idle timer calls this)."""
        with self._lock:
            conn = self._connection()
            if not self._time_due(conn):
                return None
            return self._write_checkpoint()

    def prune(
        self,
        before: datetime,
        *,
        min_retention_days: int,
        force: bool = False,
        trusted_keys: Sequence[Ed25519PublicKey] = (),
        record: Callable[[PruneResult], AuditEvent] | None = None,
    ) -> PruneResult:
        """Remove the prefix of records written before ``before``; see :func:`prune_prefix`.

        The prefix must verify first (``trusted_keys``: public keys besides this
        writer's that signed checkpoints, e.g. before a key rotation).  ``record``
        builds the event recording the prune, appended in the prune's own
        transaction: the prune and its record commit together or not at all.
        """
        with self._lock:
            conn = self._connection()
            signed: list[Checkpoint] = []

            def in_transaction(result: PruneResult) -> None:
                if record is None:
                    return
                outcomes, cps = self._append_in_transaction(conn, [record(result)])
                if isinstance(outcomes[0], AuditError):
                    raise outcomes[0]
                self.records_written += 1
                signed.extend(cps)

            result = prune_prefix(
                conn,
                log_id=self._log_id,
                key=self._signer.current,
                before=before,
                now=self._clock(),
                min_retention_days=min_retention_days,
                force=force,
                public_keys=trusted_keys,
                pace=self.pace,
                in_transaction=in_transaction,
            )
            if result.checkpoint is not None or signed or record is not None:
                self.commits += 1
            for cp in (result.checkpoint, *signed):
                if cp is not None:
                    self._notify(cp)
            return result

    def tail(self, n: int = 20) -> list[AuditRecord]:
        """The newest ``n`` records, oldest first (the caller records the read as ``audit_read``)."""
        with self._read_lock:
            return tail_records(self._read_connection(), self._log_id, n)

    def query(self, **filters: Any) -> list[AuditRecord]:
        """Filtered, paged records: see :func:`appliance.audit.store.query_records` for the filters.

        Runs on this log's read connection, beside the writer; callers on an event loop should use
        ``asyncio.to_thread``.
        The caller records the read as ``audit_read``.
        """
        with self._read_lock:
            return query_records(self._read_connection(), self._log_id, **filters)

    # -- internals ----------------------------------------------------------

    def _time_due(self, conn: sqlite3.Connection) -> bool:
        """An idle checkpoint is due: the interval has passed since the newest one, or the clock reads
        earlier than it (set back: the log goes on from a checkpoint at the clock's time)."""
        last = last_checkpoint(conn)
        since = parse_time(last.created_at) if last is not None else self._opened_at
        now = self._clock()
        return now < since or now - since >= self._pace_after(last)[1]

    def _pace_after(self, last: LastCheckpoint | None) -> tuple[int, timedelta]:
        """(every, interval) this writer keeps after ``last``: its own, or the one ``last`` signs if stricter."""
        every, interval = self.checkpoint_every, self.checkpoint_interval
        if last is not None and last.every >= 1 and last.interval_us >= 1:
            every = min(every, last.every)
            interval = min(interval, timedelta(microseconds=last.interval_us))
        return every, interval

    def _due(self, size: int, written: datetime, last: LastCheckpoint) -> bool:
        """Whether the transaction that ends at ``size``, written at ``written``, must sign a checkpoint.

        Exactly the rule the verifier holds the log to (``written`` is the
        records' ``recorded_at`` itself): ``every`` records or ``interval``
        after the newest checkpoint.
        """
        every, interval = self._pace_after(last)
        return size - last.size >= every or written - parse_time(last.created_at) >= interval

    def _notify(self, cp: Checkpoint) -> None:
        if self._on_checkpoint is not None:
            try:
                self._on_checkpoint(cp)
            except Exception:
                log.exception("on_checkpoint callback failed")

    def _write_checkpoint(self) -> Checkpoint:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cp = self._sign_head(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite rolled back already on a full disk: its error is the one to see
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        self._notify(cp)
        return cp

    def _sign_head(self, conn: sqlite3.Connection, created_at: str | None = None, retires: str = "") -> Checkpoint:
        size, head_hash = head(conn, self._log_id)
        return sign_next(
            conn,
            self._signer.current(),  # inside the write transaction: see appliance.audit.signer
            kind="checkpoint",
            log_id=self._log_id,
            size=size,
            head_hash=head_hash,
            created_at=created_at if created_at is not None else format_time(self._clock()),
            pace=self.pace,
            retires=retires,
        )

    def _write_batch(self, events: list[AuditEvent]) -> list[int | AuditError]:
        """Append ``events`` in one transaction: each one's seq, or why that one was rejected."""
        self._writing_since = time.monotonic()  # stats(): how long the requests have waited on it
        try:
            return self._write_batch_now(events)
        finally:
            self._writing_since = None

    def _write_batch_now(self, events: list[AuditEvent]) -> list[int | AuditError]:
        with self._lock:
            conn = self._connection()
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            try:
                outcomes, signed = self._append_in_transaction(conn, events)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            seconds = time.perf_counter() - started
            self.commits += 1
            written = sum(1 for o in outcomes if not isinstance(o, AuditError))
            self.records_written += written
            last = self._stats
            self._stats = msgspec.structs.replace(
                last,
                records=last.records + written,
                commits=last.commits + 1,
                commit_seconds=last.commit_seconds + seconds,
            )
        for cp in signed:
            self._notify(cp)
        return outcomes

    def _append_in_transaction(
        self, conn: sqlite3.Connection, events: list[AuditEvent]
    ) -> tuple[list[int | AuditError], list[Checkpoint]]:
        """Append ``events`` inside the caller's write transaction (and sign the checkpoints due)."""
        size, prev = head(conn, self._log_id)  # inside the write lock: no other writer moves it
        recorded_at = format_time(self._clock())
        outcomes: list[int | AuditError] = []
        records: list[AuditRecord] = []
        for given in events:
            why: str | None = None
            try:
                event = checked_event(given)
            except AuditError as exc:
                why = str(exc)
            else:
                rec = AuditRecord(
                    seq=size + 1,
                    log_id=self._log_id,
                    prev_hash=prev,
                    recorded_at=recorded_at,
                    event=event.event,
                    action=event.action,
                    actor=event.actor,
                    credential_id=event.credential_id,
                    origin=event.origin,
                    outcome=event.outcome,
                    status=event.status,
                    started_at=event.started_at,
                    ended_at=event.ended_at,
                    request_id=event.request_id,
                    model_name=event.model_name,
                    model_version=event.model_version,
                    model_sha256=event.model_sha256,
                    backend=event.backend,
                    variant=event.variant,
                    job_id=event.job_id,
                    input_digest=event.input_digest,
                    output_digest=event.output_digest,
                    digest_key_id=event.digest_key_id,
                    details=dict(event.details),
                )
                try:
                    leaf = leaf_hash(rec)
                except UnicodeEncodeError as exc:  # a lone surrogate: not storable as UTF-8
                    why = f"a field holds text that is not valid Unicode ({exc.reason})"
            if why is not None:
                outcomes.append(AuditError(f"audit event not recorded: {why}"))
                continue
            size += 1
            prev = leaf
            records.append(msgspec.structs.replace(rec, leaf_hash=leaf))
            outcomes.append(size)
        signed: list[Checkpoint] = []
        if records:
            last = last_checkpoint(conn)
            behind = last is not None and parse_time(recorded_at) < parse_time(last.created_at)
            if last is None or behind:
                # a log's first records (or a log without checkpoints): sign the head they extend
                # first (size 0 for a new log), so every record follows a signed checkpoint and its pace.
                # And the clock reading earlier than the newest checkpoint (set back: NTP stepping a
                # fast clock, a VM restored from a snapshot, a clock that was once ahead): sign the head
                # again at the clock's time, so the records are dated truly, after a checkpoint (the
                # verifier takes a record dated over the interval before the checkpoint before it for a
                # forged one: every later record failed `audit verify`, and prune, ship and backup with it)
                if last is not None:
                    log.warning(
                        "the clock reads %s, before the audit log's newest checkpoint (%s): it was set back; "
                        "a checkpoint is signed at the clock's time and the log goes on from it",
                        recorded_at,
                        last.created_at,
                    )
                genesis = self._sign_head(conn, recorded_at)
                last = LastCheckpoint(genesis.size, genesis.created_at, genesis.every, genesis.interval_us)
                signed.append(genesis)
            insert_records(conn, records)
            if self._due(size, parse_time(recorded_at), last):
                signed.append(self._sign_head(conn, recorded_at))
        return outcomes, signed

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=self._idle_poll_s)
            except queue.Empty:
                self._tick()
                continue
            items: list[_Item] = []
            if first is _STOP:
                stop = True
            else:
                items.extend(_items(first))
            while len(items) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                items.extend(_items(nxt))
            if items:
                self._flush(items)
        # anything enqueued after the stop marker was not accepted
        while True:
            try:
                late = self._queue.get_nowait()
            except queue.Empty:
                break
            if late is not _STOP:
                self._flush(_items(late))

    def _tick(self) -> None:
        if self._failing:
            # try a real write (a checkpoint of the head): the requests that would show the log works
            # again are refused while /v2/health/ready says not ready, so a load balancer sends none
            try:
                self.checkpoint()
            except Exception:
                return  # still failing: said when it began
            self._written_again()
            return
        try:
            self.maybe_checkpoint()
        except Exception:
            log.exception("audit idle checkpoint failed")

    def _written_again(self) -> None:
        if self._failing:
            log.warning("the audit log is written again; %d records were refused meanwhile", self._refused)
            self._failing, self._refused = False, 0

    def _flush(self, items: list[_Item]) -> None:
        outcomes: list[tuple[int | None, BaseException | None]]
        try:
            outcomes = [
                (None, o) if isinstance(o, AuditError) else (o, None)
                for o in self._write_batch([i.event for i in items])
            ]
        except Exception as exc:
            # said once when the log starts failing and once when it writes again, not once per
            # request (a full disk made two lines for each of 3,000 refused requests)
            if not self._failing:
                text = str(exc).lower()
                hint = (
                    f"a full disk: free space in {self.db_path.parent}"
                    if "full" in text or "no space" in text
                    else "another process holds the database (a long audit prune?)"
                    if "locked" in text or "busy" in text
                    else f"check {self.db_path} and its folder"
                )
                log.error(
                    "audit append failed: %s; every request is answered 503 and /v2/health/ready says not ready "
                    "until the log can be written again (%s)",
                    exc,
                    hint,
                )
            self._failing = True
            self._refused += len(items)
            self._refused_total += len(items)
            err = exc if isinstance(exc, AuditError) else AuditError(f"audit log {self.db_path}: append failed: {exc}")
            outcomes = [(None, err)] * len(items)
        else:
            self._written_again()
        finally:
            with self._handover_lock:
                self._pending -= len(items)
        # One wake-up per event loop for the whole group (call_soon_threadsafe writes to the
        # loop's self-pipe each time), not one per record.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], int | None, BaseException | None]]]
        by_loop = {}
        for item, (seq, error) in zip(items, outcomes, strict=True):
            if item.future is not None:
                if error is not None:
                    item.future.set_exception(error)
                else:
                    assert seq is not None
                    item.future.set_result(seq)
            elif item.loop is not None and item.afuture is not None:
                by_loop.setdefault(item.loop, []).append((item.afuture, seq, error))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, settled)
