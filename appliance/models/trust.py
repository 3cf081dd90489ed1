"""Which keys a package's signature is checked against on this box, and who signed one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.settings import Settings

__all__ = ["box_keys", "signer"]


def box_keys(settings: Settings, *, retired: bool = True) -> list[Ed25519PublicKey]:
    """This box's own keys: the signing key's public half, its retired keys (unless ``retired`` is False:
    what a key rotation retired may have been stolen), and ``public_key``."""
    from appliance.audit.trust import trusted_keys
    from runtime.signing import key_id, load_private_key, load_public_key

    keys: list[Ed25519PublicKey] = []
    if settings.signing_key.exists():
        if retired:
            keys.extend(trusted_keys(settings.signing_key, settings.keys_dir))
        else:
            keys.append(load_private_key(settings.signing_key).public_key())
    if settings.public_key is not None:
        keys.append(load_public_key(settings.public_key))
    unique: dict[str, Ed25519PublicKey] = {}
    for key in keys:
        unique.setdefault(key_id(key), key)
    return list(unique.values())


def signer(folder: Path, keys: Sequence[Ed25519PublicKey]) -> Ed25519PublicKey | None:
    """The key among ``keys`` whose signature ``folder``'s ``manifest.sig`` is; None when unsigned.

    Raises :class:`SignatureError` when the package is signed but by none of ``keys``.
    """
    from runtime.package import SIGNATURE, read_manifest_bytes, read_signature
    from runtime.signing import verify

    signature = read_signature(folder)
    if signature is None:
        return None
    data = read_manifest_bytes(folder)
    for key in keys:
        try:
            verify(key, data, signature)
        except SignatureError:
            continue
        return key
    raise SignatureError(
        f"{folder / SIGNATURE} verifies with none of the {len(keys)} key(s) it was checked against: the package "
        "was changed after it was signed, or it was signed by a key this box does not know; pass the publisher's "
        "public key with --publisher-key FILE (on the box that exported it: `inferbox signing-key show`)",
        path=str(folder / SIGNATURE),
    )
