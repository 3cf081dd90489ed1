"""Which public keys a log's checkpoints may be signed with (verify, ship, prune, backup)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["trusted_keys"]


def trusted_keys(signing_key: Path, keys_dir: Path, paths: Sequence[Path] = ()) -> list[Ed25519PublicKey]:
    """The public keys given (``--public-key``), else ``signing_key``'s and those in ``<keys_dir>/retired/``."""
    from runtime import signing

    if paths:
        return [signing.load_public_key(p) for p in paths]
    if not signing_key.exists() and not signing_key.is_symlink():
        # off the box (an auditor's machine): a new key would verify nothing; the log's public key is needed
        raise ConfigError(
            f"no signing key here ({signing_key}) to take the public key from: pass the log's public key "
            "with --public-key FILE (on the appliance: `inferbox audit public-key > signing.key.pub`; after a "
            "rotation, one --public-key per key)"
        )
    keys = [signing.load_private_key(signing_key).public_key()]
    retired = keys_dir / "retired"
    if retired.is_dir():
        keys.extend(signing.load_public_key(p) for p in sorted(retired.glob("*.pub")))
    return keys
