"""Durability on POSIX file systems: a rename or a new file is durable only once its folder is fsynced."""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["fsync_dir", "publish_new", "write_all"]

#: a filesystem without hard links answers link() with one of these (vfat / exFAT disks, some SMB and NAS shares)
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS})


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the file descriptor ``fd``: ``os.write`` may write less than it is given
    (at a full disk's edge the first call returns short, the next raises), and a short key file would be
    published whole."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_new(partial: Path, final: Path) -> None:
    """Give the finished file ``partial`` the name ``final`` in the same folder, never over a file that exists.

    A hard link is atomic and fails if ``final`` exists (``FileExistsError``); on a filesystem
    without hard links (a USB disk formatted vfat or exFAT, some network shares) the file is
    renamed after checking that ``final`` does not exist (another writer could slip in between:
    such folders are not shared by writers of one name).  ``partial`` is gone afterwards.
    """
    try:
        os.link(partial, final)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if final.exists() or final.is_symlink():
            raise FileExistsError(errno.EEXIST, "file exists", str(final)) from exc
        os.rename(partial, final)
    else:
        os.unlink(partial)
