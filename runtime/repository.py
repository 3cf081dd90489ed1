"""The model repository: ``<root>/<model-name>/<integer version>/`` package folders.

The layout matches Triton's and OVMS's model repositories.  Folders whose names
start with a dot (``.staging``) and non-integer version folders are ignored.
:meth:`Repository.open` verifies the package (hashes, and the signature when a
public key is set) and checks that its manifest names the folder it sits in, so
an old signed version cannot be replayed as a newer one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import ManifestError, ModelNotFoundError, PackageError, shown
from runtime.package import Package, list_versions, read_package

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["RepoEntry", "Repository", "VersionFolder"]


@dataclass(frozen=True)
class RepoEntry:
    """One version folder and whether it verifies (``error`` says why not)."""

    name: str
    version: int
    path: Path
    ok: bool
    error: str | None
    #: the package's identity (sha256 of manifest.json) when ``ok``
    sha256: str | None = None
    signed_by: str | None = None


@dataclass(frozen=True)
class VersionFolder:
    """One version folder to open, or (``version`` 0, ``error`` set) a model folder that cannot be listed."""

    name: str
    version: int
    path: Path
    error: OSError | PackageError | None = None


class Repository:
    def __init__(self, root: Path, public_key: Ed25519PublicKey | None = None) -> None:
        self.root = Path(root)
        self.public_key = public_key

    def __repr__(self) -> str:
        return f"Repository({str(self.root)!r}, signed={self.public_key is not None})"

    def models(self) -> list[str]:
        """Names of the models with at least one integer version folder."""
        try:
            with os.scandir(self.root) as it:
                names = [e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if self._listed(n))

    def _listed(self, name: str) -> bool:
        try:
            return bool(list_versions(self.root, name))
        except PackageError:  # unreadable: listed, so that whoever opens it is told why (not skipped unseen)
            return True

    def versions(self, name: str) -> list[int]:
        if not name or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name:
            return []
        return list_versions(self.root, name)

    def latest(self, name: str) -> int:
        versions = self.versions(name)
        if not versions:
            available = self.models()
            have = ", ".join(available) if available else "none"
            raise ModelNotFoundError(
                f"model {shown(name)} is not in the repository {self.root} (models there: {have}); "
                f"build the default model with `inferbox init`, or add one with `inferbox export`"
            )
        return versions[-1]

    def path(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def open(self, name: str, version: int | None = None, *, verify_hashes: bool = True) -> Package:
        """The verified package ``name`` at ``version`` (default: the latest).

        ``verify_hashes=False`` still checks the listing, sizes, links, paths and
        signature, but not the file contents (a fast check for listings).
        """
        if version is None:
            version = self.latest(name)
        elif version not in self.versions(name):
            known = self.versions(name)
            if not known:
                self.latest(name)  # raises the "no such model" error
            raise ModelNotFoundError(
                f"model {shown(name)} has no version {version} in {self.root} (versions: "
                f"{', '.join(map(str, known))}); omit the version for the latest, or export it with "
                f"`inferbox export --version {version}`"
            )
        path = self.path(name, version)
        package = read_package(path, public_key=self.public_key, verify_hashes=verify_hashes)
        m = package.manifest
        if m.name != name or m.version != version:
            raise ManifestError(
                f"{path}: the manifest is for {m.name} version {m.version}, but the folder says {name} version "
                f"{version}; package folders must not be renamed (export it again under the wanted name/version)",
                path=str(path),
            )
        return package

    def folders(self) -> Iterator[VersionFolder]:
        """Every version folder of every model, in order; a model folder that cannot be listed is one
        entry of version 0 with its error, so that every listing shows it and goes on.  Raises
        ``OSError`` only when the repository's own folder cannot be listed."""
        for name in self.models():
            try:
                versions = self.versions(name)
            except (OSError, PackageError) as exc:
                yield VersionFolder(name, 0, self.root / name, exc)
                continue
            for version in versions:
                yield VersionFolder(name, version, self.path(name, version))

    def entries(self, *, verify_hashes: bool = True) -> list[RepoEntry]:
        """Every version folder with its verification result. Never raises."""
        out: list[RepoEntry] = []
        try:
            folders = list(self.folders())
        except OSError:
            return out
        for folder in folders:
            name, version, path = folder.name, folder.version, folder.path
            if folder.error is not None:
                out.append(RepoEntry(name, 0, path, ok=False, error=f"{type(folder.error).__name__}: {folder.error}"))
                continue
            try:
                package = self.open(name, version, verify_hashes=verify_hashes)
            except Exception as exc:  # doctor / the repository index report it; they never crash
                out.append(RepoEntry(name, version, path, ok=False, error=f"{type(exc).__name__}: {exc}"))
            else:
                sha256, signed_by = package.sha256, package.signed_by
                out.append(RepoEntry(name, version, path, ok=True, error=None, sha256=sha256, signed_by=signed_by))
        return out
