"""The signing key a new box creates comes with its public half, which auditors need."""

from __future__ import annotations

import stat
from pathlib import Path

from appliance.server import ensure_signing_key
from appliance.settings import load_settings
from runtime.signing import load_private_key, load_public_key, public_key_pem


def test_first_start_writes_the_public_key_beside_the_private_one(tmp_path: Path) -> None:
    settings = load_settings({"home": str(tmp_path / "home")}, environ={})
    ensure_signing_key(settings)
    key = settings.signing_key
    pub = key.with_name("signing.key.pub")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert public_key_pem(load_public_key(pub)) == public_key_pem(load_private_key(key))
    before = pub.read_bytes()
    ensure_signing_key(settings)  # an existing key is kept, and so is its public half
    assert pub.read_bytes() == before
