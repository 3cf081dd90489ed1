"""``inferbox models list``: every version in the repository, whether the server would load it, who signed it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.models.trust import box_keys, signer
from runtime.errors import PackageError
from runtime.package import read_manifest_bytes, read_package
from runtime.repository import Repository

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.settings import Settings

__all__ = ["Listed", "absent", "list_packages"]


@dataclass(frozen=True)
class Listed:
    name: str
    version: int
    path: Path
    #: the server would load it (listing, sizes, signature as ``public_key`` requires; hashes with ``verify``)
    ok: bool
    problem: str
    #: SHA-256 of the manifest: the package's identity, as the audit log records it ("" when unreadable)
    sha256: str
    #: "this box (<key id>)", "key <key id>", "unknown key", "unsigned", or "" when unreadable
    signed: str
    task: str = ""
    size: int = 0
    #: variants that passed their accuracy gate somewhere (the others cannot be chosen)
    kept: list[str] = field(default_factory=list)
    created_at: str = ""
    source: str = ""


def list_packages(settings: Settings, *, verify: bool = False) -> list[Listed]:
    """Every integer version folder of every model, never raising for one bad package."""
    from appliance.server import public_key_of
    from runtime.signing import key_id

    repo = Repository(settings.repository, public_key=public_key_of(settings))
    keys = box_keys(settings)
    own = key_id(keys[0]) if settings.signing_key.exists() and keys else None
    out: list[Listed] = []
    for folder in repo.folders():
        name, version, path = folder.name, folder.version, folder.path
        if folder.error is not None:  # an unreadable model folder: one broken row, the others still listed
            out.append(Listed(name, 0, path, ok=False, problem=str(folder.error), sha256="", signed=""))
            continue
        problem = ""
        try:
            repo.open(name, version, verify_hashes=verify)
        except PackageError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot read it: {exc}"
        out.append(_describe(name, version, path, problem, keys, own))
    return out


def _describe(
    name: str, version: int, path: Path, problem: str, keys: Sequence[Ed25519PublicKey], own: str | None
) -> Listed:
    from runtime.signing import key_id

    try:
        sha256 = hashlib.sha256(read_manifest_bytes(path)).hexdigest()
        manifest = read_package(path, verify_hashes=False).manifest
    except (PackageError, OSError) as exc:
        return Listed(name, version, path, ok=False, problem=problem or str(exc), sha256="", signed="")
    try:
        key = signer(path, keys)
        signed = "unsigned" if key is None else f"this box ({own})" if key_id(key) == own else f"key {key_id(key)}"
    except PackageError:
        signed = "unknown key"
    return Listed(
        name,
        version,
        path,
        ok=not problem,
        problem=problem,
        sha256=sha256,
        signed=signed,
        task=manifest.task,
        size=sum(f.bytes for f in manifest.files),
        kept=[v.id for v in manifest.variants if any(a.passed for a in v.accuracy)],
        created_at=manifest.provenance.created_at,
        source=f"{manifest.provenance.source_kind}: {manifest.provenance.source}",
    )


def absent(repository: Path, model: str, version: int | None = None) -> str | None:
    """What a command that names ``model`` (a batch job, a key for it) should warn of when the
    repository does not hold it (``version`` of it): "model 'x' is not in the repository R (models:
    ...)"; None when it does, or when the repository cannot be read (nothing to hint)."""
    repo = Repository(repository)
    try:
        known = repo.versions(model)
        have = "versions " + ", ".join(map(str, known)) if known else "models: " + (", ".join(repo.models()) or "none")
    except Exception:  # unreadable: no hint, what runs later says what is wrong
        return None
    if known and (version is None or version in known):
        return None
    wanted = f"model {model!r}" + ("" if version is None else f" version {version}")
    return f"{wanted} is not in the repository {repository} ({have})"
