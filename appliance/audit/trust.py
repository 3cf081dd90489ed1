"""What a log is held to: which public keys its checkpoints may be signed with, and the pace
checkpoints written before format 2 are held to (verify, ship, prune, backup)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.audit.checkpoint import Pace
from runtime.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from appliance.settings import Settings

__all__ = ["settings_pace", "trusted_keys"]


def settings_pace(settings: Settings, every: int | None = None, minutes: float | None = None) -> Pace:
    """The settings' checkpoint pace (``every`` / ``minutes`` override them), for checkpoints that sign none."""
    return Pace.of(every or settings.checkpoint_every, timedelta(minutes=minutes or settings.checkpoint_minutes))


def trusted_keys(signing_key: Path, keys_dir: Path, paths: Sequence[Path] = ()) -> list[Ed25519PublicKey]:
    """The public keys given (``--public-key``), else ``signing_key``'s and those in ``<keys_dir>/retired/``."""
    from runtime import signing

    if paths:
        return [key for p in paths for key in signing.load_public_keys(p)]  # a file may hold several
    if not signing_key.exists() and not signing_key.is_symlink():
        # off the box (an auditor's machine): a new key would verify nothing; the log's public key is needed
        raise ConfigError(
            f"no signing key here ({signing_key}) to take the public key from: pass the log's public key "
            "with --public-key FILE (on the appliance: `inferbox audit public-key > signing.key.pub`; after a "
            "rotation, `inferbox audit public-key --all` prints every key in one file)"
        )
    keys = [signing.load_private_key(signing_key).public_key()]
    retired = keys_dir / "retired"
    if retired.is_dir():
        keys.extend(signing.load_public_key(p) for p in sorted(retired.glob("*.pub")))
    return keys
