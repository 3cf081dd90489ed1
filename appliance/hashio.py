"""File objects that hash and count the bytes passing through them (archives: backups, model packs)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import IO

__all__ = ["HashingReader", "HashingWriter", "write_new"]

_CHUNK = 1 << 20


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


def write_new(source: IO[bytes], dest: Path, size: int | None = None, *, mode: int = 0o600) -> str:
    """Copy ``size`` bytes of ``source`` (all of it when None) into the new file ``dest``: never over a file
    that exists (``FileExistsError``), never through a link, fsynced.  Returns its SHA-256; ``EOFError``
    when ``source`` ends before ``size`` bytes (the file written so far stays for the caller to remove)."""
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        left = size
        while left is None or left:
            chunk = source.read(_CHUNK if left is None else min(_CHUNK, left))
            if not chunk:
                if left is None:
                    break
                raise EOFError(f"{dest.name}: the source ended {left} bytes early")
            digest.update(chunk)
            out.write(chunk)
            if left is not None:
                left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()
