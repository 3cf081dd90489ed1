"""Reading a tar nobody vouched for yet (a backup, a model package) without letting its headers take the memory.

Python's ``tarfile`` reads a GNU long-name block or a pax extended header whole into memory
before it looks at the member it describes: a 10 GB "archive" whose first member is a 10 GB
long name costs 20 GB of memory before any check can refuse it.  No file inferbox writes has a
header block near :data:`MAX_HEADER_BYTES`.
"""

from __future__ import annotations

import tarfile
from typing import Any

__all__ = ["MAX_HEADER_BYTES", "SmallHeaders"]

#: the largest long-name or pax header block read (a path of 64 KiB is not a path inferbox writes)
MAX_HEADER_BYTES = 1 << 16

_HEADER_TYPES = frozenset(
    {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
)


class SmallHeaders(tarfile.TarInfo):
    """``tarfile.open(..., tarinfo=SmallHeaders)``: a header block over :data:`MAX_HEADER_BYTES`, or a sparse
    member of any kind (whose map tarfile reads into memory whole, from the member's data for GNU sparse 1.0),
    is a ReadError before it is read."""

    def _proc_member(self, tarfile_: Any) -> Any:
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise tarfile.ReadError(f"a {self.size}-byte header block, far over what a real archive holds")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.ReadError("a sparse member: not an archive inferbox wrote")
        return super()._proc_member(tarfile_)  # type: ignore[misc]

    def _proc_gnusparse_00(self, *args: Any) -> Any:
        raise tarfile.ReadError("a sparse member: not an archive inferbox wrote")

    def _proc_gnusparse_01(self, *args: Any) -> Any:
        raise tarfile.ReadError("a sparse member: not an archive inferbox wrote")

    def _proc_gnusparse_10(self, *args: Any) -> Any:
        raise tarfile.ReadError("a sparse member: not an archive inferbox wrote")
