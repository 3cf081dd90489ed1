"""One model package as one tar file, to carry it from the box that exported it to the box that serves it.

The archive holds ``<name>/<version>/manifest.json``, ``manifest.sig`` when the package is
signed, and every file the manifest lists, nothing else: regular files with fixed owner,
mode and time, so packing the same package twice gives the same bytes.  Packing reads each
file once, hashing it as it goes into the tar, and stops if it no longer matches the
manifest it verified.  Unpacking trusts nothing: only regular files and folders under one
``<name>/<version>/`` prefix, no link, device, sparse member or ``..``, no member larger
than the archive; the folder it fills is then verified by the package reader
(:func:`runtime.package.read_package`), which is the spec of what a package is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from appliance.hashio import HashingReader, HashingWriter, write_new
from appliance.tarlimits import SmallHeaders
from runtime.durable import fsync_dir, publish_new
from runtime.errors import PackageError, UnsafePathError
from runtime.package import MANIFEST, SIGNATURE, Package, check_model_name, check_rel_path

__all__ = ["Packed", "Unpacked", "pack_package", "unpack_package"]

_CHUNK = 1 << 20
_VERSION_DIGITS = frozenset("0123456789")


@dataclass(frozen=True)
class Packed:
    path: Path
    sha256: str  #: of the tar file
    size: int


@dataclass(frozen=True)
class Unpacked:
    name: str  #: the folder names in the archive (the manifest must say the same)
    version: int
    sha256: str  #: of the tar file
    size: int


def _info(arcname: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    import io

    tar.addfile(_info(arcname, len(data)), io.BytesIO(data))


def pack_package(
    package: Package,
    out: Path,
    *,
    before_publish: Callable[[Packed], None] | None = None,
    publish_failed: Callable[[Packed, BaseException], None] | None = None,
) -> Packed:
    """Write ``package`` (already verified) to the new file ``out``; never replaces a file.

    The tar is written beside ``out`` under a temporary name, fsynced, and given the name
    ``out`` only when whole and after ``before_publish`` (the CLI's durable audit record):
    a failed or interrupted pack leaves no ``out``; ``publish_failed`` hears of a failure
    after ``before_publish``.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise PackageError(f"{out} already exists; name another file with --out, or move that one away", str(out))
    prefix = f"{package.name}/{package.version}"
    fd, partial_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    partial = Path(partial_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = HashingWriter(raw)
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                manifest_bytes = _read_small(package.path / MANIFEST)
                if hashlib.sha256(manifest_bytes).hexdigest() != package.sha256:
                    raise PackageError(
                        f"{package.path / MANIFEST} changed after it was verified; run the command again",
                        str(package.path),
                    )
                _add_bytes(tar, f"{prefix}/{MANIFEST}", manifest_bytes)
                sig = package.path / SIGNATURE
                if sig.exists() or sig.is_symlink():
                    _add_bytes(tar, f"{prefix}/{SIGNATURE}", _read_small(sig))
                for entry in package.manifest.files:
                    _add_file(tar, f"{prefix}/{entry.path}", package.path / entry.path, entry.bytes, entry.sha256)
            raw.flush()
            os.fsync(raw.fileno())
        packed = Packed(out, writer.hash.hexdigest(), writer.size)
        if before_publish is not None:
            before_publish(packed)
        try:
            publish_new(partial, out)  # a USB disk formatted vfat or exFAT has no hard links: renamed there
            fsync_dir(out.parent)
        except BaseException as exc:
            if publish_failed is not None:
                publish_failed(packed, exc)
            if isinstance(exc, FileExistsError):
                raise PackageError(f"{out} appeared while packing; name another file with --out", str(out)) from None
            raise
        return packed
    finally:
        partial.unlink(missing_ok=True)


def _read_small(path: Path) -> bytes:
    from runtime.package import _open_nofollow

    fd = _open_nofollow(path, path.name)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _add_file(tar: tarfile.TarFile, arcname: str, path: Path, size: int, sha256: str) -> None:
    from runtime.package import _open_nofollow

    fd = _open_nofollow(path, arcname)
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise PackageError(f"{path} changed after it was verified; run the command again", str(path))
        reader = HashingReader(f, limit=size)
        tar.addfile(_info(arcname, size), reader)
    if reader.hash.hexdigest() != sha256 or reader.size != size:
        raise PackageError(f"{path} changed while it was packed; run the command again", str(path))


def unpack_package(archive: Path, dest: Path) -> Unpacked:
    """Extract the package tar ``archive`` into the empty folder ``dest`` (see the module docstring).

    Raises :class:`PackageError` naming the member and why; ``dest`` is then left for the
    caller to remove.  The package itself is not verified here: the caller reads ``dest``
    with :func:`runtime.package.read_package`.
    """
    try:
        raw = open(archive, "rb")  # noqa: SIM115 - closed below, after the trailing blocks are hashed
    except OSError as exc:
        raise PackageError(f"cannot read {archive} ({exc.strerror})", str(archive)) from exc
    prefix: tuple[str, str] | None = None
    with raw:
        budget = os.fstat(raw.fileno()).st_size  # no member can unpack to more than the archive holds
        free = shutil.disk_usage(dest).free
        if free < budget:
            raise PackageError(
                f"importing {archive} needs {budget / 1e6:.0f} MB free in {dest} and has {free / 1e6:.0f} MB; "
                "free space in the repository's filesystem",
                str(dest),
            )
        reader = HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|", tarinfo=SmallHeaders) as tar:  # type: ignore[call-overload]
                for member in tar:
                    name, version, rel = _split(member.name, archive)
                    if prefix is None:
                        prefix = (name, version)
                    elif prefix != (name, version):
                        raise PackageError(
                            f"{archive} holds more than one package ({'/'.join(prefix)} and {name}/{version}); "
                            "pack one package per file with `inferbox models pack`",
                            str(archive),
                        )
                    if member.isdir():
                        if rel:
                            (dest / rel).mkdir(parents=True, exist_ok=True, mode=0o755)
                        continue
                    if member.issparse():
                        raise PackageError(f"{archive}: member {member.name!r} is a sparse file: not a package")
                    if not member.isreg():
                        kind = "link" if member.issym() or member.islnk() else "special file"
                        raise UnsafePathError(
                            f"{archive}: member {member.name!r} is a {kind}; packages hold regular files only",
                            member.name,
                        )
                    if not rel:
                        raise PackageError(f"{archive}: member {member.name!r} is not inside a package folder")
                    budget -= member.size
                    if budget < 0:
                        raise PackageError(
                            f"{archive}: member {member.name!r} says it is {member.size} bytes, more than the "
                            "archive holds: damaged or not a package",
                            str(archive),
                        )
                    source = tar.extractfile(member)
                    assert source is not None  # a regular member always has data
                    _write_member(source, dest, rel, member.size, archive)
            while reader.read(_CHUNK):  # the end-of-archive blocks count in the archive's hash
                pass
        except (tarfile.TarError, EOFError, ValueError) as exc:  # a damaged header can raise ValueError
            raise PackageError(
                f"{archive} is not a whole tar archive ({exc}): it is damaged or truncated; copy it again",
                str(archive),
            ) from exc
    if prefix is None:
        raise PackageError(f"{archive} is empty: not a package made by `inferbox models pack`", str(archive))
    return Unpacked(prefix[0], int(prefix[1]), reader.hash.hexdigest(), reader.size)


def _split(member: str, archive: Path) -> tuple[str, str, str]:
    """``<name>/<version>/<rel>`` -> (name, version, rel); rel is "" for the folders themselves."""
    clean = member.rstrip("/")
    if "\\" in clean or "\x00" in clean or clean.startswith("/"):
        raise UnsafePathError(f"{archive}: member {member!r} has an absolute path, a backslash or NUL", member)
    parts = clean.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"{archive}: member {member!r} has an empty, '.' or '..' component", member)
    if len(parts) < 2 or not parts[1] or not set(parts[1]) <= _VERSION_DIGITS or parts[1].startswith("0"):
        raise PackageError(
            f"{archive}: member {member!r} is not under <model name>/<version>/: not a package made by "
            "`inferbox models pack` (a package folder can be imported as it is)",
            str(archive),
        )
    check_model_name(parts[0])
    rel = "/".join(parts[2:])
    if rel:
        check_rel_path(rel, str(archive))
    return parts[0], parts[1], str(PurePosixPath(rel)) if rel else ""


def _write_member(source: IO[bytes], dest: Path, rel: str, size: int, archive: Path) -> None:
    target = dest / rel
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        write_new(source, target, size, mode=0o644)
    except FileExistsError:
        raise PackageError(f"{archive}: member {rel!r} appears twice: damaged or not a package") from None
    except (NotADirectoryError, IsADirectoryError):
        raise PackageError(f"{archive}: member {rel!r} clashes with another member's path") from None
    except EOFError:
        raise PackageError(f"{archive} ends inside {rel}: it is truncated; copy it again", str(archive)) from None
