"""A private copy of the package files a process opens, made from the bytes it verified.

:func:`runtime.package.read_package` hashes every file, then closes it; the
backends, the tokenizer and the sample reader open the files again by path,
later (the hardware probe, the selection and the stream sessions come in
between).  Whoever can write the repository could swap a file in that gap and
have an unsigned model served under the signed package's identity, the
``package_sha256`` the audit log records.

:class:`VerifiedCopy` closes the gap: the first time a file is needed it is
read once, hashed *while* it is copied into a private folder
(``<cache>/verified/<package sha256>/``, mode 0700), checked against the
manifest, and renamed into place; every open then goes to the copy.  A file
changed after the package was signed fails with an :class:`IntegrityError`
instead of being served.  Only the files actually opened are copied (the chosen
variant, the tokenizer, the samples), and the loader leaves their hashing to
the copy (``Repository.open(verify_hashes=False)`` still checks the signature,
listing, sizes and paths of the whole package): a file is read once, and a
variant never used is never hashed at load (``inferbox doctor`` checks them all).  A copy already made for the same
package (the same manifest sha256) is reused: it lives in the service's own
folder, written only after its hash matched; copies no load has used for 30
days are removed.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import IntegrityError, UnsafePathError
from runtime.manifest import Manifest
from runtime.package import Package, _open_nofollow, check_rel_path

__all__ = ["STALE_S", "VerifiedCopy", "remove_unused"]

_CHUNK = 1 << 20


@dataclass
class VerifiedCopy:
    """Paths inside a private copy of ``source``; files are copied (and checked) on first use."""

    source: Package
    root: Path  #: the private folder holding this package's copied files
    _done: set[str] = field(default_factory=set)
    _temporary: bool = False
    #: ONNX file -> the files its external data lives in (read once: the file may be gigabytes)
    _external: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def under(cls, source: Package, cache_dir: Path | None) -> VerifiedCopy:
        """A copy under ``cache_dir/verified/`` (the service's own cache), else in a private temporary folder."""
        if cache_dir is None:
            return cls(source, Path(tempfile.mkdtemp(prefix=f"inferbox-{source.name}-")), _temporary=True)
        base = Path(cache_dir) / "verified"
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(base, 0o700)
        root = base / source.sha256
        root.mkdir(exist_ok=True, mode=0o700)
        os.utime(root)  # in use: kept by the sweep below
        remove_unused(base, keep=root)
        return cls(source, root)

    @property
    def temporary(self) -> bool:
        """A private temporary folder (no cache folder given): remove it with :meth:`close`."""
        return self._temporary

    @property
    def manifest(self) -> Manifest:
        return self.source.manifest

    @property
    def sha256(self) -> str:
        return self.source.sha256

    @property
    def path(self) -> Path:
        """The copy's root; only files passed to :meth:`files` (or a method built on it) exist there."""
        return self.root

    def package(self) -> Package:
        """``source`` with its path moved to the copy (files still copied on use through this object)."""
        return Package(path=self.root, manifest=self.manifest, sha256=self.sha256, signed_by=self.source.signed_by)

    def files(self, rels: Iterable[str]) -> Path:
        """Make sure each listed file ``rel`` is in the copy; returns the copy's root."""
        for rel in rels:
            if rel not in self._done:
                self._copy(rel)
                self._done.add(rel)
        return self.root

    def variant_file(self, variant_id: str) -> Path:
        """The file a backend opens for ``variant_id``, with the variant's other files and external data beside it."""
        variant = self.manifest.variant(variant_id)
        self.files(variant.files)
        first = variant.files[0]
        if first.endswith(".onnx"):
            if first not in self._external:
                self._external[first] = _external_data(self.root, first)
            self.files(self._external[first])
        return self.root / self.manifest.file(first).path

    def folder(self, rel_dir: str) -> Path:
        """Every listed file under ``rel_dir/`` (a tokenizer folder), copied; returns the folder in the copy."""
        prefix = rel_dir.rstrip("/") + "/"
        self.files(f.path for f in self.manifest.files if f.path.startswith(prefix))
        return self.root / rel_dir

    def file(self, rel: str) -> Path:
        self.files([rel])
        return self.root / rel

    def close(self) -> None:
        """Remove a temporary copy (a copy in the cache is kept for the next load of the same package)."""
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def _copy(self, rel: str) -> None:
        check_rel_path(rel, "package file")
        entry = self.manifest.file(rel)  # ManifestError when not listed
        dest = self.root / rel
        if dest.is_file() and not dest.is_symlink() and dest.stat().st_size == entry.bytes:
            return  # copied (and checked) by an earlier load of this very package
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        src_path = self.source.path / rel
        src = _open_nofollow(src_path, rel)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
        digest = hashlib.sha256()
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                size = 0
                while chunk := os.read(src, _CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view) :]
            finally:
                os.close(out)
            actual = digest.hexdigest()
            if size != entry.bytes or actual != entry.sha256:
                raise IntegrityError(
                    f"{src_path}: sha256 {actual} does not match the manifest's {entry.sha256}: the file changed "
                    "(after the package was signed, or while it was being loaded); not served: re-copy the "
                    "package, and find who writes the model repository",
                    rel,
                )
            os.replace(tmp, dest)
        finally:
            os.close(src)
            tmp.unlink(missing_ok=True)


#: a copy no load has used for this long is removed (the package was replaced or deleted)
STALE_S = 30 * 24 * 3600


def remove_unused(base: Path, *, keep: Path, older_than_s: float = STALE_S, suffix: str | None = None) -> None:
    """Remove the folders in ``base`` no load has touched for ``older_than_s`` (and, with ``suffix``, the
    files of that suffix): a later load makes them again.  ``keep``, the one in use now, and links stay;
    a process still mapping a removed file keeps it (it is unlinked, not truncated)."""
    import time

    cutoff = time.time() - older_than_s
    for entry in base.iterdir():
        try:
            if entry == keep or entry.is_symlink() or entry.stat().st_mtime >= cutoff:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif suffix is not None and entry.suffix == suffix:
                entry.unlink(missing_ok=True)
        except OSError:
            continue


def _external_data(root: Path, rel: str) -> list[str]:
    """Listed files the (already copied and checked) ONNX file ``rel`` keeps its tensors in."""
    data = (root / rel).read_bytes()
    if b"location" not in data:  # see runtime.package.check_onnx_external_data
        return []
    import onnx

    from runtime.package import onnx_tensors

    model = onnx.load_model_from_string(data)
    base = posixpath.dirname(rel)
    out: list[str] = []
    for tensor in onnx_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = posixpath.normpath(posixpath.join(base, location))
        if target.startswith("../") or target == "..":
            raise UnsafePathError(f"{rel}: external data location {location!r} leaves the package", rel)
        if target not in out:
            out.append(target)
    return out
