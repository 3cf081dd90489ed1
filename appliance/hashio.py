"""File objects that hash and count the bytes passing through them (archives: backups, model packs)."""

from __future__ import annotations

import hashlib
from typing import IO

__all__ = ["HashingReader", "HashingWriter"]


class HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class HashingReader:
    """Hashes and counts what is read from ``raw``; with ``limit``, reads at most that many bytes
    (a member being archived: tarfile stops at its size; unpacking reads the whole archive)."""

    def __init__(self, raw: IO[bytes], limit: int | None = None) -> None:
        self.raw = raw
        self.left = limit
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if self.left is not None:
            n = self.left if n < 0 else min(n, self.left)
        data = self.raw.read(n)
        if self.left is not None:
            self.left -= len(data)
        self.hash.update(data)
        self.size += len(data)
        return data
