"""Fixtures shared by the appliance tests."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key (one per test module)."""
    return Ed25519PrivateKey.generate()
