"""The key a running writer signs checkpoints with: its key file's, read again once it is replaced.

``inferbox signing-key create --force`` replaces the key file and then records
the rotation (``signing_key_rotate``).  A writer (the API, a batch worker) asks
:meth:`Signer.current` inside the write transaction that signs, so a checkpoint
that covers the rotation record is always signed with the new key: that
record committed after the file was replaced, and the transaction sees it only
after it committed.  The verifier holds the log to that
(:mod:`appliance.audit.rotation`): a retired key signs nothing from its
rotation on, so its private key (in every backup taken before) cannot vouch for
records written after it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runtime import signing
from runtime.errors import ConfigError

__all__ = ["Signer"]

log = logging.getLogger(__name__)

_Identity = tuple[int, int, int, int, int]


def _identity(path: Path) -> _Identity:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _identity_or_none(path: Path) -> _Identity | None:
    try:
        return _identity(path)
    except OSError:
        return None


class Signer:
    """``key``, read from ``path`` (None: a key given in memory, never read again)."""

    def __init__(self, key: Ed25519PrivateKey, path: Path | None = None, seen: _Identity | None = None) -> None:
        self._key = key
        self._path = path
        self._lock = threading.Lock()
        #: the identity of the file ``key`` was read from (None: read again at the first :meth:`current`)
        self._seen = seen

    @classmethod
    def read(cls, path: Path) -> Signer:
        """The key in ``path``, with the identity of the file it was read from: the file is looked at
        before and after the read, again until both agree (a rotation in between left a writer holding
        the old key beside the new file's identity, and it never read the key again)."""
        for _ in range(10):
            before = _identity_or_none(path)
            key = signing.load_private_key(path)
            if before is not None and _identity_or_none(path) == before:
                return cls(key, path, before)
        return cls(key, path, None)  # still changing: current() reads it again before it signs

    @property
    def key_id(self) -> str:
        """The id of the key the next checkpoint is signed with (as of the last :meth:`current`)."""
        return signing.key_id(self._key)

    def current(self) -> Ed25519PrivateKey:
        """The key to sign with now: the key file's when it was replaced since it was read.

        A replacement that cannot be read (its mode, a damaged file) leaves the
        key in use, with an error in the service log each time: the verifier will
        refuse the checkpoints that key signs after its rotation, and the log line
        says why they were signed so.
        """
        path = self._path
        if path is None:
            return self._key
        with self._lock:
            try:
                now = _identity(path)
            except OSError as exc:
                log.error(
                    "the signing key %s cannot be read (%s): audit checkpoints are signed with the key read before "
                    "(%s)",
                    path,
                    exc.strerror,
                    signing.key_id(self._key),
                )
                return self._key
            if now == self._seen:
                return self._key
            try:
                key = signing.load_private_key(path)
            except ConfigError as exc:
                log.error(
                    "the signing key %s was replaced but cannot be loaded (%s): audit checkpoints are signed with "
                    "the key read before (%s), and if it was retired `inferbox audit verify` will refuse them",
                    path,
                    exc,
                    signing.key_id(self._key),
                )
                return self._key
            old, new = signing.key_id(self._key), signing.key_id(key)
            if new != old:
                log.warning(
                    "the signing key %s was replaced: audit checkpoints are signed with key %s (was %s)", path, new, old
                )
            self._key, self._seen = key, now
            return key
