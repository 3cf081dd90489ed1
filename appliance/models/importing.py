"""``inferbox models import``: a package exported on another box, checked and placed in this box's repository.

The usual split: a build box (with the export toolchain) exports and signs packages with
its own key; the serving box holds only the build box's *public* key.  Import

1. copies the package (a folder, or a tar from ``inferbox models pack``) into a private
   staging folder of the repository, so what is checked is what is placed;
2. checks the signature against the publisher keys given (``--publisher-key``), else this
   box's own keys; an unsigned package needs ``allow_unsigned``;
3. reads it with the package reader, every file's sha256 included (the reader is the
   spec: a package that would not load is never placed), and checks ``expect_sha256``
   (the package's identity, the SHA-256 of its manifest) when given;
4. signs the manifest with this box's signing key when a publisher's key signed it: the
   manifest's bytes, and so the package's identity, do not change, and the server, which
   checks packages against this box's key (``public_key``), serves it.  The publisher's
   signature goes into the audit record;
5. calls ``before_publish`` (the CLI writes the ``model_import`` audit record, durable)
   and only then renames the folder into ``<repository>/<name>/<version>``.

The version is the publisher's: manifest and signature name it, so a package cannot be
renumbered here.  A version already in the repository with the same identity is reported
as already there; with another identity the import is refused.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.hashio import write_new
from appliance.models.archive import unpack_package
from appliance.models.trust import box_keys, signer
from runtime.errors import IntegrityError, ManifestError, PackageError, SignatureError
from runtime.interface import check_new_interface
from runtime.package import (
    MANIFEST,
    SIGNATURE,
    Package,
    check_new_model_name,
    clean_stale_staging,
    discard_staging,
    list_versions,
    model_lock,
    place_staged,
    read_package,
    read_signature,
    resign,
    staging_dir,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.settings import Settings

__all__ = ["Imported", "import_package"]

_VERSION = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True)
class Imported:
    package: Package  #: as placed (or as found, when ``already``)
    source: Path
    #: SHA-256 of the tar imported; None for a folder
    archive_sha256: str | None
    #: key id that signed it where it came from, or "unsigned"
    publisher: str
    #: the publisher's signature (base64) when this box signed it again, else ""
    publisher_signature: str
    #: key id of the box key that signs it now (None: left as it came)
    signed_by: str | None
    #: the identical package was already in the repository: nothing was written
    already: bool
    files: int
    size: int
    #: what the exporting machine said about itself (its timings were measured there)
    exported_on: dict[str, str] = field(default_factory=dict)


def import_package(
    settings: Settings,
    source: Path,
    *,
    publisher_keys: Sequence[Ed25519PublicKey] = (),
    expect_sha256: str | None = None,
    allow_unsigned: bool = False,
    new_interface: bool = False,
    before_publish: Callable[[Imported], None] | None = None,
) -> Imported:
    """Import the package folder or package tar ``source`` (see the module docstring).  A package whose
    interface differs from the newest version of its model here is refused unless ``new_interface``."""
    source = Path(source)
    if not source.exists():
        raise PackageError(f"{source} does not exist; pass a package folder or a file from `inferbox models pack`")
    repository = settings.repository
    repository.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(repository)
    staging = staging_dir(repository)
    try:
        imported = _stage(settings, source, staging, publisher_keys, expect_sha256, allow_unsigned)
        name, version = imported.package.name, imported.package.version
        # checked, recorded and placed under the model's lock: no other import, export or removal
        # of this model lands in between, so the record names what was placed
        with model_lock(repository, name):
            if version in list_versions(repository, name):
                already = _already_there(settings, imported, repository / name / str(version))
                discard_staging(staging)
                return already
            check_new_interface(
                repository,
                imported.package.manifest,
                allowed=new_interface,
                error=PackageError,
                what=f"version {version}",
                fix="Ask its publisher to export it under another name",
            )
            if before_publish is not None:
                before_publish(imported)
            target = place_staged(staging, repository, name, version)
    except BaseException:
        discard_staging(staging)
        raise
    return dataclasses.replace(imported, package=dataclasses.replace(imported.package, path=target))


def _stage(
    settings: Settings,
    source: Path,
    staging: Path,
    publisher_keys: Sequence[Ed25519PublicKey],
    expect_sha256: str | None,
    allow_unsigned: bool,
) -> Imported:
    from appliance.server import public_key_of
    from runtime.signing import key_id, load_private_key

    archive_sha256: str | None = None
    named: tuple[str, int] | None = None
    if source.is_dir():
        _copy_folder(source, staging)
    else:
        unpacked = unpack_package(source, staging)
        archive_sha256 = unpacked.sha256
        named = (unpacked.name, unpacked.version)

    # the box's current keys only: a retired key may be a compromised one (docs/audit.md, Key rotation)
    keys = list(publisher_keys) if publisher_keys else box_keys(settings, retired=False)
    where = f"{source}"
    try:
        publisher_key = signer(staging, keys)
    except SignatureError as exc:
        raise SignatureError(str(exc).replace(str(staging), where), path=where) from None
    if publisher_key is None and not allow_unsigned:
        raise SignatureError(
            f"{source} is not signed (no {SIGNATURE}): nothing proves who made it; export it with a signing key "
            "on the box that made it, or pass --allow-unsigned to take it on your word (the audit record says so)",
            path=where,
        )
    try:
        package = read_package(staging, public_key=publisher_key, verify_hashes=True)
    except PackageError as exc:
        raise type(exc)(f"{source} is not a whole package: {str(exc).replace(str(staging), where)}") from None
    name, version = package.name, package.version
    check_new_model_name(name)  # the manifest names the folder it goes to: no '..', '/' or absolute path
    if version < 1:
        raise ManifestError(f"{source}: version {version} is not usable (versions are 1 or more)", path=where)
    if named is not None and named != (name, version):
        raise ManifestError(
            f"{source}: its folder says {named[0]}/{named[1]} but its manifest is for {name} version {version}: "
            "package folders must not be renamed; pack the package again with `inferbox models pack`",
            path=where,
        )
    if expect_sha256 is not None and package.sha256 != expect_sha256.strip().lower():
        raise IntegrityError(
            f"{source} is package {package.sha256}, not the expected {expect_sha256.strip().lower()}: it is another "
            "package (or another version of it); check which file you were given",
            path=where,
        )
    files = len(package.manifest.files)
    size = sum(f.bytes for f in package.manifest.files)
    publisher = key_id(publisher_key) if publisher_key is not None else "unsigned"
    found = Imported(
        package=package,
        source=source,
        archive_sha256=archive_sha256,
        publisher=publisher,
        publisher_signature="",
        signed_by=None,
        already=False,
        files=files,
        size=size,
        exported_on=dict(package.manifest.provenance.machine),
    )

    publisher_signature = ""
    signed_by: str | None = publisher if publisher_key is not None else None
    required = public_key_of(settings)  # what `serve` checks packages against (None: nothing)
    box_key = load_private_key(settings.signing_key) if settings.signing_key.exists() else None
    keep = publisher_key is not None and required is not None and key_id(publisher_key) == key_id(required)
    if not keep and box_key is not None and (required is None or key_id(required) == key_id(box_key)):
        signed_by = key_id(box_key)
        if publisher_key is None or key_id(publisher_key) != signed_by:
            old = read_signature(staging)
            publisher_signature = base64.b64encode(old).decode("ascii") if old is not None else ""
            resign(staging, box_key)
    elif not keep and required is not None:
        mine = f"this box's signing key is {key_id(box_key)}" if box_key else "this box has no signing key"
        raise SignatureError(
            f"the server requires packages signed by key {key_id(required)} (public_key = {settings.public_key}); "
            f"{name} version {version} is signed by {publisher} and {mine}: set public_key to this box's own "
            f"public key ({settings.signing_key}.pub) so that imports are signed for this box, or to the publisher's",
            path=where,
        )
    # it must load as `serve` will load it
    placed = read_package(staging, public_key=required, verify_hashes=False)
    return dataclasses.replace(found, package=placed, publisher_signature=publisher_signature, signed_by=signed_by)


def _already_there(settings: Settings, found: Imported, target: Path) -> Imported:
    """The version exists: the same package (verified) is a no-op, another one a refusal."""
    from appliance.server import public_key_of

    package = found.package
    try:
        existing = read_package(target, public_key=public_key_of(settings), verify_hashes=True)
    except PackageError as exc:
        raise PackageError(
            f"{package.name} version {package.version} is already in the repository ({target}) but does not verify "
            f"({exc}); remove it with `inferbox models remove {package.name} {package.version}` and import again",
            path=str(target),
        ) from None
    if existing.sha256 != package.sha256:
        raise PackageError(
            f"{package.name} version {package.version} is already in the repository as another package "
            f"({existing.sha256[:16]}..., this one is {package.sha256[:16]}...); versions are the publisher's "
            "(the signature covers them): export it under a new --version, or remove the one here first with "
            f"`inferbox models remove {package.name} {package.version}`",
            path=str(target),
        )
    return dataclasses.replace(found, package=existing, signed_by=existing.signed_by, already=True)


def _copy_folder(source: Path, staging: Path) -> None:
    """Copy the package folder ``source`` (its manifest, signature and listed files only) into ``staging``."""
    from runtime.package import _open_nofollow

    if not (source / MANIFEST).exists():
        inner = sorted(int(p.name) for p in source.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name))
        hint = (
            f"; it holds version folders ({', '.join(map(str, inner))}): pass one, e.g. {source / str(inner[-1])}"
            if inner
            else ""
        )
        raise ManifestError(f"{source} holds no {MANIFEST}: not a package folder{hint}", path=str(source))
    # the listing, sizes and paths of the source (not its hashes: the copy's are checked)
    listed = read_package(source, verify_hashes=False)
    rels = [MANIFEST] + ([SIGNATURE] if read_signature(source) is not None else [])
    rels += [f.path for f in listed.manifest.files]
    for rel in rels:
        fd = _open_nofollow(source / rel, rel)
        with os.fdopen(fd, "rb") as src:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            write_new(src, staging / rel, mode=0o644)
