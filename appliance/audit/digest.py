"""Rotating HMAC-SHA256 digest keys for input and output digests.

Each key is 32 random bytes in ``<keys_dir>/digest/<key id>.key`` (mode 0600),
where the key id is the UTC creation time (``20261128T141000Z``).  The newest
key is used until it is ``rotate_days`` old, then a new one is created.  Old
keys stay (for the retention period) so an auditor holding a candidate input
can recompute its digest with :meth:`DigestKeyring.digest_with`.  A plain
SHA-256 of a short input can be reversed by guessing; an HMAC under a secret
key cannot (GDPR Art. 32(1)(a) pseudonymisation).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from api.protocols import Digest
from runtime.durable import fsync_dir, write_all
from runtime.errors import AuditError

__all__ = ["KEY_BYTES", "DigestKeyring"]

log = logging.getLogger(__name__)

KEY_BYTES = 32
_NAME = re.compile(r"(\d{8}T\d{6}Z)\.key")
_FORMAT = "%Y%m%dT%H%M%SZ"


def _now() -> datetime:
    return datetime.now(UTC)


class DigestKeyring:
    def __init__(self, directory: Path, *, rotate_days: int = 30, clock: Callable[[], datetime] = _now) -> None:
        self.directory = Path(directory)
        self.rotate_days = rotate_days
        self._clock = clock
        self._lock = threading.Lock()
        self._current: tuple[str, bytes, datetime] | None = None

    def key_ids(self) -> list[str]:
        """Every key id on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(m.group(1) for p in self.directory.iterdir() if (m := _NAME.fullmatch(p.name)))

    def _read(self, key_id: str) -> bytes:
        path = self.directory / f"{key_id}.key"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise AuditError(
                f"digest key {key_id} is not in {self.directory}; restore it from backup to recompute its digests"
            ) from None
        if len(data) != KEY_BYTES:
            raise AuditError(f"digest key {path} is {len(data)} bytes, expected {KEY_BYTES}; restore it from backup")
        return data

    def _create(self, now: datetime) -> str:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_id = now.astimezone(UTC).strftime(_FORMAT)
        path = self.directory / f"{key_id}.key"
        tmp = self.directory / f".{key_id}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                write_all(fd, secrets.token_bytes(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # another process made this second's key: use it
                os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(self.directory)
        log.info("created audit digest key %s", key_id)
        return key_id

    # -- fork safety (the audit log's fork hooks) ------------------------------------------------
    def hold_for_fork(self) -> None:
        """Wait for a key being read or made, and hold off the next, until the fork is done."""
        self._lock.acquire()

    def release_after_fork(self) -> None:
        self._lock.release()

    def forget_parent(self) -> None:
        """In a forked child: a new lock (the parent's was held across the fork)."""
        self._lock = threading.Lock()

    def current(self) -> tuple[str, bytes]:
        """The key id and key to digest with now (rotating when the newest is too old)."""
        now = self._clock()
        with self._lock:
            if self._current is not None and now < self._current[2]:
                return self._current[0], self._current[1]
            ids = self.key_ids()
            newest = ids[-1] if ids else None
            created = datetime.strptime(newest, _FORMAT).replace(tzinfo=UTC) if newest else None
            if newest is None or created is None or now - created >= timedelta(days=self.rotate_days):
                newest = self._create(now)
                created = now
            key = self._read(newest)
            self._current = (newest, key, created + timedelta(days=self.rotate_days))
            return newest, key

    def digest(self, data: bytes) -> Digest:
        key_id, key = self.current()
        return Digest(key_id=key_id, hexdigest=hmac.new(key, data, hashlib.sha256).hexdigest())

    def hasher(self) -> tuple[str, hmac.HMAC]:
        """The current key id and an HMAC to feed chunk by chunk (a large file): its hexdigest is what
        :meth:`digest` gives for the same bytes."""
        key_id, key = self.current()
        return key_id, hmac.new(key, digestmod=hashlib.sha256)

    def digest_with(self, key_id: str, data: bytes) -> Digest:
        """Recompute a digest under an older key (for an auditor's candidate input)."""
        if _NAME.fullmatch(f"{key_id}.key") is None:
            raise AuditError(f"{key_id!r} is not a digest key id (expected e.g. 20261128T141000Z)")
        return Digest(key_id=key_id, hexdigest=hmac.new(self._read(key_id), data, hashlib.sha256).hexdigest())
