"""``inferbox models remove``: take one version out of the repository, recorded first, gone at once.

``before_remove`` (the CLI's durable ``model_remove`` audit record) runs first; the version
folder is then renamed into a private staging folder of the repository (one atomic step: a
server loading the model sees the version whole or not at all) and deleted there.  A removal
killed half-way leaves only that staging folder, which the next export or import removes.
A server already serving the version keeps serving its private verified copy
(:mod:`runtime.verified`) until it unloads it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.durable import fsync_dir
from runtime.errors import ModelNotFoundError, PackageError
from runtime.package import (
    check_model_name,
    discard_staging,
    list_versions,
    model_lock,
    read_manifest_bytes,
    staging_dir,
)

if TYPE_CHECKING:
    from appliance.settings import Settings

__all__ = ["Removed", "remove_package"]


@dataclass(frozen=True)
class Removed:
    name: str
    version: int
    path: Path
    #: the package's identity (SHA-256 of its manifest); "" when the manifest could not be read
    sha256: str
    #: the versions of the model left in the repository
    remaining: list[int]


def remove_package(
    settings: Settings, name: str, version: int, *, before_remove: Callable[[Removed], None] | None = None
) -> Removed:
    repository = settings.repository
    check_model_name(name)
    with model_lock(repository, name):  # no import or export of this model between the record and the removal
        versions = list_versions(repository, name)
        if version not in versions:
            have = ", ".join(map(str, versions)) if versions else "none"
            raise ModelNotFoundError(
                f"{name} version {version} is not in the repository {repository} (versions of {name}: {have}); "
                "`inferbox models list` shows what is there"
            )
        path = repository / name / str(version)
        if path.is_symlink():
            raise PackageError(f"{path} is a symlink, not a package folder; remove the link by hand", path=str(path))
        try:
            sha256 = hashlib.sha256(read_manifest_bytes(path)).hexdigest()
        except PackageError:
            sha256 = ""  # a broken package can still be removed; the record says its identity was unreadable
        removed = Removed(name, version, path, sha256, [v for v in versions if v != version])
        if before_remove is not None:
            before_remove(removed)
        trash = staging_dir(repository)
        try:
            os.rename(path, trash / "removed")
            fsync_dir(path.parent)
        finally:
            discard_staging(trash)
        if not removed.remaining:  # the model's folder, now empty (under the lock: an import may be placing one)
            try:
                path.parent.rmdir()
                fsync_dir(repository)
            except OSError:
                pass  # something else lives there; leave it
    return removed
