"""Read (and verify) or write one model package: ``<repository>/<name>/<version>/``.

Reading trusts nothing in the folder until it has checked it, in this order:

1. ``manifest.json`` is a regular file (no symlink, one link) and a valid manifest
   (:class:`~runtime.errors.ManifestError`);
2. with a public key: ``manifest.sig`` verifies over the exact manifest bytes
   (:class:`~runtime.errors.SignatureError`);
3. every listed path is a plain relative POSIX path (no ``..``, ``/``-prefix,
   backslash, NUL) and every path the manifest names is listed
   (:class:`~runtime.errors.UnsafePathError` / ``ManifestError``);
4. the folder holds no symlink, hard link or special file anywhere
   (``UnsafePathError``), exactly the listed files, and no directory without
   a file (:class:`~runtime.errors.IntegrityError`);
5. sizes and sha256 match (``IntegrityError``);
6. every ONNX file's external-data locations stay inside the package and
   name listed files (``UnsafePathError``; CVE-2022-25882, CVE-2024-27318).

Writing (:func:`finalize_package`) lays a staged folder out under
``<repository>/.staging/``, lists and hashes its files, writes (and signs) the
manifest, verifies the result with the same reader, and renames the folder into
place: a version appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from runtime.durable import fsync_dir, write_all
from runtime.errors import IntegrityError, ManifestError, PackageError, SignatureError, UnsafePathError
from runtime.manifest import FileEntry, Manifest, decode_manifest, encode_manifest
from runtime.signing import key_id, sign, verify

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from onnx import AttributeProto, GraphProto, ModelProto, TensorProto

__all__ = [
    "LOCKS",
    "MANIFEST",
    "SIGNATURE",
    "STAGING",
    "Package",
    "check_model_name",
    "check_new_model_name",
    "check_onnx_external_data",
    "check_rel_path",
    "clean_stale_staging",
    "discard_staging",
    "finalize_package",
    "list_versions",
    "model_lock",
    "next_version",
    "onnx_tensors",
    "place_staged",
    "read_manifest_bytes",
    "read_package",
    "read_signature",
    "resign",
    "sha256_file",
    "staging_dir",
    "work_dir",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
#: folder under the repository where packages are assembled before the rename
STAGING = ".staging"
#: folder under the repository holding each model's lock file (``model-<name>.lock``)
LOCKS = ".locks"
_CHUNK = 1 << 20
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


@dataclass(frozen=True)
class Package:
    """A verified package on disk. ``sha256`` (of manifest.json's bytes) is its identity."""

    path: Path
    manifest: Manifest
    sha256: str
    #: key id of the public key the signature was verified with; None when not verified
    signed_by: str | None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def file_path(self, rel: str) -> Path:
        """Absolute path of a listed file (ManifestError if not listed)."""
        return self.path / self.manifest.file(rel).path

    def variant_path(self, variant_id: str) -> Path:
        """Path of the file a backend opens for this variant (``files[0]``)."""
        return self.file_path(self.manifest.variant(variant_id).files[0])


# --------------------------------------------------------------------------- reading


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed (does not follow a final symlink)."""
    fd = _open_nofollow(Path(path), str(path))
    with os.fdopen(fd, "rb") as f:
        return _hash_stream(f.fileno())


def read_package(path: Path, *, public_key: Ed25519PublicKey | None = None, verify_hashes: bool = True) -> Package:
    """Verify the package folder at ``path`` and return it (see the module docstring)."""
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise ManifestError(f"package folder {path} does not exist", path=str(path)) from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"package folder {path} is a symlink; copy the package instead", path=str(path))
    if not stat.S_ISDIR(st.st_mode):
        raise ManifestError(f"{path} is not a package folder", path=str(path))

    data = _read_manifest_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    signed_by: str | None = None
    if public_key is not None:
        signature = _read_signature(path)
        verify(public_key, data, signature, what=f"{path / SIGNATURE}")
        signed_by = key_id(public_key)
    manifest = decode_manifest(data, where=str(path / MANIFEST))

    listed = _check_listing(path, manifest)
    _check_tree(path, listed)
    for entry in manifest.files:
        _check_file(path, entry, verify_hashes=verify_hashes)
    for rel in _onnx_files(manifest):
        check_onnx_external_data(path, rel, set(listed))
    return Package(path=path, manifest=manifest, sha256=digest, signed_by=signed_by)


def check_rel_path(rel: str, where: str) -> None:
    """Refuse anything but a plain relative POSIX path with no ``.``/``..``/empty parts."""
    bad = None
    if not rel:
        bad = "is empty"
    elif "\x00" in rel:
        bad = "contains NUL"
    elif "\\" in rel:
        bad = "contains a backslash (use / )"
    elif rel.startswith("/"):
        bad = "is absolute"
    elif any(part in ("", ".", "..") for part in rel.split("/")):
        bad = "has an empty, '.' or '..' component"
    if bad is not None:
        raise UnsafePathError(f"{where}: path {rel!r} {bad}; package paths are relative POSIX paths inside it", rel)


def check_onnx_external_data(package: Path, rel: str, listed: set[str]) -> None:
    """Every EXTERNAL tensor of the ONNX file ``rel`` must point at a listed file inside ``package``.

    A tensor points at external data through an entry whose key is ``location``, and protobuf
    stores a string's bytes as they are: a file without the bytes ``location`` has no external
    data, and only its top-level structure is checked.  Only the others are parsed with
    ``onnx``, whose import alone took 1.0-1.5 s of the server's 2.6 s cold start on an AVX2 box.
    """
    where = str(package / rel)
    fd = _open_nofollow(package / rel, rel)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    if b"location" not in data:
        if (GRAPH_FIELD, 2) not in _top_level_fields(data):
            raise IntegrityError(f"{where} is not a readable ONNX model (no graph); re-export the package", rel)
        return
    import onnx

    try:
        model = onnx.load_model_from_string(data)  # never follows external data
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX model
        raise IntegrityError(f"{where} is not a readable ONNX model ({exc}); re-export the package", rel) from exc
    base = posixpath.dirname(rel)
    for tensor in onnx_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        what = f"{where}: tensor {tensor.name!r} external data location {location!r}"
        if not location or "\x00" in location or "\\" in location:
            raise UnsafePathError(f"{what} is empty or has NUL/backslash; re-export the model", rel)
        if location.startswith("/") or posixpath.isabs(location) or os.path.isabs(location):
            raise UnsafePathError(f"{what} is absolute; it must be a file inside the package", rel)
        if ".." in location.split("/"):
            raise UnsafePathError(f"{what} has a '..' component; it must be a file inside the package", rel)
        target = posixpath.normpath(posixpath.join(base, location))
        if target == ".." or target.startswith("../") or target.startswith("/"):
            raise UnsafePathError(f"{what} leaves the package", rel)
        full = package / target
        if full.is_symlink() or any(p.is_symlink() for p in _parents_inside(package, target)):
            raise UnsafePathError(f"{what} goes through a symlink; the package must hold the file itself", rel)
        if target not in listed:
            raise UnsafePathError(f"{what} is not a file listed in the manifest", rel)
        resolved = full.resolve()
        if not resolved.is_relative_to(package.resolve()):
            raise UnsafePathError(f"{what} resolves outside the package ({resolved})", rel)


#: ModelProto.graph's field number (onnx.proto)
GRAPH_FIELD = 7


def _top_level_fields(data: bytes) -> set[tuple[int, int]]:
    """(field number, wire type) of every top-level field of a protobuf message; empty when
    ``data`` is not a well-formed message (a bad key or wire type, a length past the end)."""
    fields: set[tuple[int, int]] = set()
    pos, end = 0, len(data)

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ValueError("truncated varint")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    try:
        while pos < end:
            key = varint()
            number, wire = key >> 3, key & 7
            if number < 1:
                raise ValueError("field number 0")
            if wire == 0:
                varint()
            elif wire == 1:
                pos += 8
            elif wire == 2:
                length = varint()  # not `pos += varint()`: that adds to pos as it was before the call
                pos += length
            elif wire == 5:
                pos += 4
            else:  # 3 / 4 (groups) are not in ONNX; 6 / 7 do not exist
                raise ValueError(f"wire type {wire}")
            if pos > end:
                raise ValueError("field past the end")
            fields.add((number, wire))
    except ValueError:
        return set()
    return fields


def _parents_inside(package: Path, target: str) -> Iterator[Path]:
    parts = target.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield package.joinpath(*parts[:i])


def onnx_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Initializers, sparse initializers and tensor attributes, in graphs, subgraphs and functions."""
    yield from _graph_tensors(model.graph)
    for info in model.training_info:
        yield from _graph_tensors(info.initialization)
        yield from _graph_tensors(info.algorithm)
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                yield from _attribute_tensors(attribute)


def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            yield from _attribute_tensors(attribute)


def _attribute_tensors(attribute: AttributeProto) -> Iterator[TensorProto]:
    if attribute.HasField("t"):
        yield attribute.t
    yield from attribute.tensors
    if attribute.HasField("sparse_tensor"):
        yield attribute.sparse_tensor.values
        yield attribute.sparse_tensor.indices
    for sparse in attribute.sparse_tensors:
        yield sparse.values
        yield sparse.indices
    if attribute.HasField("g"):
        yield from _graph_tensors(attribute.g)
    for sub in attribute.graphs:
        yield from _graph_tensors(sub)


def _open_nofollow(path: Path, rel: str) -> int:
    """Open a regular file read-only, refusing a symlink, a hard link or a special file.

    The open never waits: ``O_NONBLOCK`` makes a FIFO (or a device) named like a package
    file open at once instead of blocking until a writer appears, which would hang the
    repository index, doctor and serve on one bad folder.  ``fstat`` then refuses anything
    but a regular file before a byte is read, and the descriptor is made blocking again.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing file listed in the manifest; re-export the package", rel) from None
    except OSError as exc:
        if path.is_symlink():
            raise UnsafePathError(f"{path} is a symlink; packages hold regular files only", rel) from exc
        raise IntegrityError(f"{path}: cannot open it: {exc.strerror}", rel) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePathError(f"{path} is not a regular file; packages hold regular files only", rel)
    if st.st_nlink > 1:
        os.close(fd)
        raise UnsafePathError(f"{path} is a hard link ({st.st_nlink} names); copy the file so the package owns it", rel)
    if _NONBLOCK:
        os.set_blocking(fd, True)
    return fd


def _hash_stream(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _read_manifest_bytes(package: Path) -> bytes:
    path = package / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise ManifestError(
            f"{path} is missing: {package} is not a model package (export one with `inferbox export`)",
            path=str(path),
        )
    fd = _open_nofollow(path, MANIFEST)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read_manifest_bytes(package: Path) -> bytes:
    """The exact bytes of ``package``'s manifest (what its sha256 and signature cover); no checks beyond a
    regular file."""
    return _read_manifest_bytes(Path(package))


def read_signature(package: Path) -> bytes | None:
    """``package``'s ``manifest.sig`` (regular file, at most 4 KiB read), or None when it has none."""
    package = Path(package)
    if not (package / SIGNATURE).exists() and not (package / SIGNATURE).is_symlink():
        return None
    return _read_signature(package)


def _read_signature(package: Path) -> bytes:
    path = package / SIGNATURE
    if not path.exists() and not path.is_symlink():
        raise SignatureError(
            f"{path} is missing: the repository requires signed packages (public_key is set); "
            "export with a signing key, or unset public_key to accept unsigned packages",
            path=str(path),
        )
    fd = _open_nofollow(path, SIGNATURE)
    with os.fdopen(fd, "rb") as f:
        return f.read(4096)


def _check_listing(package: Path, manifest: Manifest) -> list[str]:
    """Safe, unique listed paths; every path the manifest refers to is listed."""
    where = str(package / MANIFEST)
    listed: list[str] = []
    seen: set[str] = set()
    for entry in manifest.files:
        check_rel_path(entry.path, where)
        if entry.path in (MANIFEST, SIGNATURE):
            raise ManifestError(f"{where}: files must not list {entry.path}", path=entry.path)
        if entry.path in seen:
            raise ManifestError(f"{where}: {entry.path} is listed twice", path=entry.path)
        seen.add(entry.path)
        listed.append(entry.path)
    # a file cannot also be a directory of another listed file
    dirs = {posixpath.dirname(p) for p in listed}
    for p in listed:
        if p in dirs:
            raise ManifestError(f"{where}: {p} is listed as a file and used as a folder", path=p)
    for variant in manifest.variants:
        if not variant.files:
            raise ManifestError(f"{where}: variant {variant.id!r} lists no files", path=where)
        for rel in variant.files:
            check_rel_path(rel, f"{where} variant {variant.id!r}")
            if rel not in seen:
                raise ManifestError(f"{where}: variant {variant.id!r} file {rel} is not in files", path=rel)
    if manifest.samples is not None:
        check_rel_path(manifest.samples, f"{where} samples")
        if manifest.samples not in seen:
            raise ManifestError(f"{where}: samples file {manifest.samples} is not in files", path=manifest.samples)
    if manifest.text is not None:
        tok = manifest.text.tokenizer_dir
        check_rel_path(tok, f"{where} text.tokenizer_dir")
        if not any(p.startswith(tok + "/") for p in seen):
            raise ManifestError(f"{where}: text.tokenizer_dir {tok!r} holds no listed file", path=tok)
    return listed


def _check_tree(package: Path, listed: list[str]) -> None:
    """Walk without following links: only regular single-link files and the listed ones."""
    expected = set(listed)
    found: set[str] = set()

    def walk(folder: Path, prefix: str) -> int:
        count = 0
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            full = folder / entry.name
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(f"{full} is a symlink; packages hold regular files only", rel)
            if stat.S_ISDIR(st.st_mode):
                if walk(full, rel + "/") == 0 and not any(p.startswith(rel + "/") for p in expected):
                    raise IntegrityError(
                        f"{full} is an extra directory with no listed file; remove it (packages hold "
                        "exactly the files in their manifest)",
                        rel,
                    )
                count += 1
                continue
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"{full} is not a regular file; packages hold regular files only", rel)
            if st.st_nlink > 1:
                raise UnsafePathError(
                    f"{full} is a hard link ({st.st_nlink} names); copy the file so the package owns it", rel
                )
            if not prefix and entry.name in (MANIFEST, SIGNATURE):
                continue
            if rel not in expected:
                raise IntegrityError(
                    f"{full}: extra file not listed in the manifest; remove it or re-export the package", rel
                )
            found.add(rel)
            count += 1
        return count

    walk(package, "")
    missing = sorted(expected - found)
    if missing:
        raise IntegrityError(
            f"{package}: missing {', '.join(missing)} (listed in the manifest); re-export or re-copy the package",
            missing[0],
        )


def _check_file(package: Path, entry: FileEntry, *, verify_hashes: bool) -> None:
    full = package / entry.path
    fd = _open_nofollow(full, entry.path)
    try:
        size = os.fstat(fd).st_size
        if size != entry.bytes:
            raise IntegrityError(
                f"{full} is {size} bytes, the manifest says {entry.bytes}: the file changed; re-copy the package",
                entry.path,
            )
        if verify_hashes:
            actual = _hash_stream(fd)
            if actual != entry.sha256:
                raise IntegrityError(
                    f"{full}: sha256 {actual} does not match the manifest's {entry.sha256}: the file changed; "
                    "re-copy the package",
                    entry.path,
                )
    finally:
        os.close(fd)


def _onnx_files(manifest: Manifest) -> list[str]:
    files = {f.path for f in manifest.files if f.path.endswith(".onnx")}
    files.update(v.files[0] for v in manifest.variants if v.format == "onnx")
    return sorted(files)


# --------------------------------------------------------------------------- versions


def list_versions(repository: Path, name: str) -> list[int]:
    """Integer version folders of ``name`` (symlinks included, so that opening them fails loudly)."""
    folder = Path(repository) / name
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.is_dir(follow_symlinks=False) or e.is_symlink()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError as exc:
        raise PackageError(
            f"{folder}: cannot list its versions ({exc.strerror}); make it readable by the user that runs inferbox "
            f"(on an installed box: sudo chown -R inferbox: {folder})",
            path=str(folder),
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # a name no folder can have: no such model (it was a 500)
            return []
        raise
    return sorted(int(n) for n in names if _VERSION_RE.fullmatch(n))


def next_version(repository: Path, name: str) -> int:
    versions = list_versions(repository, name)
    return versions[-1] + 1 if versions else 1


def check_model_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ManifestError(
            f"model name {name!r} is not usable as a folder name; use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit)",
            path=name,
        )


#: names a new package may not take: ``GET /v2/models/stats`` is every model's statistics (Triton's
#: route), so a model called that would lose its metadata route
RESERVED_NAMES = frozenset({"stats"})


def check_new_model_name(name: str) -> None:
    """:func:`check_model_name`, and not a name the API's routes take (for a package being published)."""
    check_model_name(name)
    if name.lower() in RESERVED_NAMES:
        raise ManifestError(
            f"model name {name!r} is taken by the API (GET /v2/models/{name} lists every model's statistics); "
            "choose another name (--name)",
            path=name,
        )


# --------------------------------------------------------------------------- writing


#: staging folder -> the descriptor of its flock'ed owner lock, for as long as this process builds it
_STAGING_LOCKS: dict[Path, int] = {}
#: a staging folder without its lock file (made by an older inferbox) counts as stale after this long
STALE_UNLOCKED_S = 24 * 3600
_STAGING_RETRIES = 100


def _lock_path(staging: Path) -> Path:
    return staging.with_name(staging.name + ".lock")


def staging_dir(repository: Path) -> Path:
    """A fresh, private folder under ``<repository>/.staging`` (same filesystem: the final rename is atomic).

    Its owner holds an ``flock`` on ``<folder>.lock`` beside it until :func:`finalize_package` or
    :func:`discard_staging` ends it (or the process dies, which releases it): a folder whose lock
    anyone can take has no live owner, and :func:`clean_stale_staging` removes it.  The lock file
    is made and locked before the folder exists, so a live export's folder always has a held lock.
    """
    import fcntl

    root = Path(repository) / STAGING
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _ in range(_STAGING_RETRIES):
        fd, name = tempfile.mkstemp(prefix="pkg-", suffix=".lock", dir=root)
        lock = Path(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # a cleaner may have taken and removed the lock file between mkstemp and flock
            if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                raise BlockingIOError
            staging = lock.with_name(lock.name[: -len(".lock")])
            staging.mkdir(mode=0o700)
        except (BlockingIOError, FileNotFoundError, FileExistsError):
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            lock.unlink(missing_ok=True)
            raise
        _STAGING_LOCKS[staging] = fd
        return staging
    raise PackageError(f"could not make a staging folder in {root}; check that folder", path=str(root))


def work_dir(staging: Path) -> Path:
    """A scratch folder for the export building ``staging`` (the toolchain's intermediate files), beside it
    as ``<staging>.work``: :func:`clean_stale_staging` removes it with its owner's folder.  In the system's
    temporary folder, an export killed there left it for ever (nothing knew whose it was)."""
    work = staging.with_name(staging.name + ".work")
    work.mkdir(mode=0o700, exist_ok=True)
    return work


def discard_staging(staging: Path) -> None:
    """Remove a staging folder and end its owner lock (a failed or finished export)."""
    staging = Path(staging)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(staging.with_name(staging.name + ".work"), ignore_errors=True)
    _release_staging(staging)


def _release_staging(staging: Path) -> None:
    fd = _STAGING_LOCKS.pop(staging, None)
    if fd is not None:
        _lock_path(staging).unlink(missing_ok=True)
        os.close(fd)


def clean_stale_staging(repository: Path, *, now: float | None = None) -> list[str]:
    """Remove the staging folders of exports that died (killed, out of memory, power loss):
    those whose lock file nobody holds, lock files without a folder, and folders without a lock
    file (an older inferbox's) untouched for :data:`STALE_UNLOCKED_S`.  Returns the names removed."""
    import fcntl
    import time

    root = Path(repository) / STAGING
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    removed: list[str] = []
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith("pkg-") or entry.is_symlink():
            continue
        if entry.name.endswith(".lock"):
            folder = entry.with_name(entry.name[: -len(".lock")])
            if Path(folder) in _STAGING_LOCKS:
                continue
            try:
                fd = os.open(entry, os.O_RDWR | _NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a live export
                os.close(fd)
                continue
            try:
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
                work = folder.with_name(folder.name + ".work")
                if work.is_dir() and not work.is_symlink():
                    shutil.rmtree(work, ignore_errors=True)
                    removed.append(work.name)
                entry.unlink(missing_ok=True)
            finally:
                os.close(fd)
        elif entry.name.endswith(".work") and entry.is_dir():
            owner = entry.with_name(entry.name[: -len(".work")])
            # its owner's lock lives as long as the export: none means the export ended or died
            if not _lock_path(owner).exists() and owner not in _STAGING_LOCKS:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        elif entry.is_dir() and not _lock_path(entry).exists() and entry not in _STAGING_LOCKS:
            try:
                age = now - entry.stat().st_mtime
            except OSError:
                continue
            if age > STALE_UNLOCKED_S:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
    for name in removed:
        log.info("removed the stale staging folder %s", root / name)
    return removed


def finalize_package(
    staging: Path,
    manifest: Manifest,
    repository: Path,
    *,
    signing_key: Ed25519PrivateKey | None = None,
    next_free: bool = False,
    before_publish: Callable[[Manifest], None] | None = None,
) -> Package:
    """List, hash, write (and sign) the manifest, verify, then rename ``staging`` to ``<repository>/<name>/<version>``.

    ``manifest.files`` is replaced by the files found in ``staging`` (sorted by path);
    empty folders are removed first.  With ``next_free`` (no ``--version`` given) the version
    is the next free one when the folder is renamed, ``manifest.version`` at least: another
    export of the same model that lands first takes its number and this one the next.  A
    taken version otherwise is a :class:`~runtime.errors.PackageError` naming ``--version``.
    ``before_publish`` is called with the manifest under the model's lock, before the version
    appears (what it checks of the other versions holds when it does); it may raise.
    On any failure ``staging`` is removed and no version appears.
    """
    staging = Path(staging)
    repository = Path(repository)
    try:
        check_new_model_name(manifest.name)
        if manifest.version < 1:
            raise ManifestError(f"version {manifest.version} is not usable; pass --version N with N >= 1")
        if next_free:
            manifest = msgspec.structs.replace(
                manifest, version=max(manifest.version, next_version(repository, manifest.name))
            )
        target = repository / manifest.name / str(manifest.version)
        if target.exists() or target.is_symlink():
            raise PackageError(
                f"{manifest.name} version {manifest.version} already exists at {target}; pass --version "
                f"{next_version(repository, manifest.name)} (the next free one) or remove that folder first",
                path=str(target),
            )
        for name in (MANIFEST, SIGNATURE):
            if (staging / name).exists() or (staging / name).is_symlink():
                raise PackageError(f"{staging / name} exists in the staging folder; finalize_package writes it")
        _prune_empty_dirs(staging)
        entries = _file_entries(staging)
        with model_lock(repository, manifest.name):
            if before_publish is not None:
                before_publish(manifest)
            manifest, target, data = _publish(staging, manifest, repository, entries, signing_key, next_free)
        fsync_dir(target.parent)
        fsync_dir(repository)
    except BaseException:
        discard_staging(staging)
        raise
    _release_staging(staging)
    log.info("package %s/%s written to %s (%d files)", manifest.name, manifest.version, target, len(entries))
    return Package(
        path=target,
        manifest=manifest,
        sha256=hashlib.sha256(data).hexdigest(),
        signed_by=key_id(signing_key) if signing_key is not None else None,
    )


def _publish(
    staging: Path,
    manifest: Manifest,
    repository: Path,
    entries: list[FileEntry],
    signing_key: Ed25519PrivateKey | None,
    next_free: bool,
) -> tuple[Manifest, Path, bytes]:
    """Write (and sign) the manifest and rename ``staging`` into place; the next free version when taken
    and ``next_free``.  Returns the manifest, the folder and the manifest's bytes."""
    target = repository / manifest.name / str(manifest.version)
    for _ in range(_STAGING_RETRIES):
        manifest = msgspec.structs.replace(manifest, files=entries)
        data = encode_manifest(manifest)
        _write_new(staging / MANIFEST, data)
        public_key = None
        if signing_key is not None:
            _write_new(staging / SIGNATURE, sign(signing_key, data))
            public_key = signing_key.public_key()
        # the reader is the spec: a package that would not load is never published
        read_package(staging, public_key=public_key, verify_hashes=False)
        if _move_into_place(staging, target):
            break
        if not next_free:  # lost a race with another writer of this version
            raise PackageError(
                f"{target} appeared while writing (another export of {manifest.name}?); pass --version "
                f"{next_version(repository, manifest.name)} (the next free one) or leave --version out",
                path=str(target),
            )
        # another export took this version first: take the next free one (manifest and
        # signature name the version, so both are written again)
        (staging / MANIFEST).unlink()
        (staging / SIGNATURE).unlink(missing_ok=True)
        version = max(manifest.version + 1, next_version(repository, manifest.name))
        log.info("%s version %s was taken while writing; trying %s", manifest.name, manifest.version, version)
        manifest = msgspec.structs.replace(manifest, version=version)
        target = repository / manifest.name / str(version)
    else:
        raise PackageError(
            f"no free version of {manifest.name} after {_STAGING_RETRIES} tries; pass --version N",
            path=str(target),
        )
    return manifest, target, data


def resign(folder: Path, signing_key: Ed25519PrivateKey) -> None:
    """Replace ``folder``'s ``manifest.sig`` with ``signing_key``'s signature of its manifest (atomically).

    The manifest's bytes, and so the package's identity, do not change: an imported package
    keeps its sha256 and is signed by the box that verified its publisher's signature.
    """
    folder = Path(folder)
    data = _read_manifest_bytes(folder)
    # the new signature is written beside the folder, never under a name a package could list
    fd, name = tempfile.mkstemp(prefix=".sig-", dir=folder.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(sign(signing_key, data))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, 0o644)
        os.replace(name, folder / SIGNATURE)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    fsync_dir(folder)


@contextmanager
def model_lock(repository: Path, name: str) -> Iterator[None]:
    """Hold ``name``'s lock in the repository while a version of it is checked, recorded and placed or
    removed (import, remove, export): the audit record names what really happened, not what a
    concurrent writer of the same version did in between."""
    import fcntl

    check_model_name(name)
    root = Path(repository) / LOCKS
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    # read-only is enough for flock, and 0644 lets every user of the repository (root running a
    # command, the service user exporting) take the lock whoever made the file
    fd = os.open(root / f"model-{name}.lock", os.O_RDONLY | os.O_CREAT | _NOFOLLOW, 0o644)
    try:
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, 0o644)  # the CLI's umask is 077
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def place_staged(staging: Path, repository: Path, name: str, version: int) -> Path:
    """Rename the verified staging folder to ``<repository>/<name>/<version>`` (never over one
    that exists) and end its owner lock; the caller removes ``staging`` if this raises."""
    staging = Path(staging)
    repository = Path(repository)
    check_model_name(name)
    if version < 1:
        raise ManifestError(f"version {version} is not usable (versions are 1 or more)", path=str(staging))
    target = repository / name / str(version)
    if not _move_into_place(staging, target):
        raise PackageError(
            f"{target} appeared meanwhile (another import or export of {name}?); check it with "
            "`inferbox models list --verify`",
            path=str(target),
        )
    fsync_dir(target.parent)
    fsync_dir(repository)
    _release_staging(staging)
    return target


def _move_into_place(staging: Path, target: Path) -> bool:
    """fsync the staged tree, give it the model folder's permissions (staging is private, 0700) and rename
    it to ``target``; False when ``target`` is taken."""
    for folder, _dirs, _files in os.walk(staging, topdown=False):
        fsync_dir(Path(folder))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(staging, stat.S_IMODE(target.parent.stat().st_mode))
    return _rename_into_place(staging, target)


def _rename_into_place(staging: Path, target: Path) -> bool:
    """Rename ``staging`` to ``target``; False when ``target`` is taken (exists, or another
    writer renamed there first: ENOTEMPTY / EEXIST).  Other failures (disk full) propagate."""
    import errno

    if target.exists() or target.is_symlink():
        return False
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


def _prune_empty_dirs(staging: Path) -> None:
    """Remove folders holding no file (bottom-up), so the reader's "no empty folder" rule holds."""
    for folder, _dirs, _files in os.walk(staging, topdown=False):
        path = Path(folder)
        if path != staging and not any(path.iterdir()):
            log.debug("removing empty folder %s from the package", path)
            path.rmdir()


def _file_entries(staging: Path) -> list[FileEntry]:
    out: list[FileEntry] = []
    for folder, dirs, files in os.walk(staging):
        base = Path(folder)
        for d in dirs:
            if (base / d).is_symlink():
                raise UnsafePathError(f"{base / d} is a symlink; copy the files into the package", str(base / d))
        for name in files:
            full = base / name
            rel = full.relative_to(staging).as_posix()
            check_rel_path(rel, str(staging))
            fd = _open_nofollow(full, rel)  # refuses symlinks and hard links
            try:
                size = os.fstat(fd).st_size
                digest = _hash_stream(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            out.append(FileEntry(path=rel, sha256=digest, bytes=size))
    out.sort(key=lambda e: e.path)
    return out


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
