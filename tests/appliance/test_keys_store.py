"""The SQLite key store: hashes only, constant-time compare, scopes, expiry, revocation."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.keys import KeyStore, parse_expiry
from runtime.errors import AuthError, InputError

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> KeyStore:
    s = KeyStore(tmp_path / "state.db", clock=clock)
    yield s
    s.close()


def test_create_and_verify(store: KeyStore) -> None:
    rec, secret = store.create(["infer", "audit:read"], name="app team")
    assert secret.startswith(f"ibx_{rec.id}_") and len(secret) == 4 + 12 + 1 + 43
    p = store.verify(secret)
    assert p.key_id == rec.id and p.scopes == ("infer", "audit:read")
    assert [r.id for r in store.list()] == [rec.id]
    assert store.list()[0].name == "app team"


def test_only_the_hash_is_stored(store: KeyStore, tmp_path: Path) -> None:
    _, secret = store.create(["infer"])
    dump = "\n".join(sqlite3.connect(tmp_path / "state.db").iterdump())
    assert secret not in dump
    assert secret.split("_", 2)[2] not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump


def test_wal_mode(store: KeyStore, tmp_path: Path) -> None:
    mode = sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


@pytest.mark.parametrize("bad", ["", "nonsense", "ibx_000000000000_" + "A" * 43, "Bearer x"])
def test_unknown_keys_are_refused(store: KeyStore, bad: str) -> None:
    store.create(["infer"])
    with pytest.raises(AuthError, match="not valid"):
        store.verify(bad)


def test_a_wrong_secret_for_a_real_id_is_refused(store: KeyStore) -> None:
    rec, secret = store.create(["infer"])
    wrong = f"ibx_{rec.id}_" + ("B" * 43 if not secret.endswith("B" * 43) else "C" * 43)
    with pytest.raises(AuthError, match="not valid"):
        store.verify(wrong)


def test_revoke(store: KeyStore) -> None:
    rec, secret = store.create(["infer"])
    revoked = store.revoke(rec.id)
    assert revoked.revoked_at is not None and revoked.state(T0) == "revoked"
    with pytest.raises(AuthError, match="revoked"):
        store.verify(secret)
    assert store.revoke(rec.id).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(InputError, match="does not exist"):
        store.revoke("000000000000")


def test_expiry(store: KeyStore, clock: Clock) -> None:
    rec, secret = store.create(["infer"], expires=T0 + timedelta(days=1))
    assert store.verify(secret).key_id == rec.id
    clock.now = T0 + timedelta(days=1)
    with pytest.raises(AuthError, match="expired"):
        store.verify(secret)
    with pytest.raises(InputError, match="past"):
        store.create(["infer"], expires=T0)


def test_scopes(store: KeyStore) -> None:
    rec, _ = store.create(["infer"], model="minilm")
    assert rec.scopes == ("infer:minilm",)
    rec, _ = store.create(["infer:a", "models:admin", "infer:a"])
    assert rec.scopes == ("infer:a", "models:admin")
    for bad in (["root"], [], ["infer:../x"]):
        with pytest.raises(InputError, match="scope"):
            store.create(bad)
    with pytest.raises(InputError, match="--model"):
        store.create(["audit:read"], model="minilm")


def test_rate_limit_is_carried(store: KeyStore) -> None:
    _, secret = store.create(["infer"], rate_limit_per_minute=7)
    assert store.verify(secret).rate_limit_per_minute == 7


def test_two_stores_share_one_database(tmp_path: Path) -> None:
    a = KeyStore(tmp_path / "state.db")
    b = KeyStore(tmp_path / "state.db")
    rec, secret = a.create(["infer"])
    assert b.verify(secret).key_id == rec.id
    b.revoke(rec.id)
    with pytest.raises(AuthError):
        a.verify(secret)
    a.close()
    b.close()


def test_parse_expiry() -> None:
    assert parse_expiry("2027-01-02") == datetime(2027, 1, 2, tzinfo=UTC)
    assert parse_expiry("2027-01-02T03:04:05+01:00").utcoffset() == timedelta(hours=1)
    with pytest.raises(InputError, match="expires"):
        parse_expiry("next tuesday")


def test_a_first_key_is_made_once_though_two_starts_both_found_the_store_empty(tmp_path: Path) -> None:
    """Two servers first started at once on one home each counted no key and each made a first admin key."""
    from appliance.keys import FirstKeyExistsError

    one, two = KeyStore(tmp_path / "state.db"), KeyStore(tmp_path / "state.db")
    try:
        assert one.count() == two.count() == 0  # both look before either creates
        one.create(["keys:admin"], first=True)
        with pytest.raises(FirstKeyExistsError):
            two.create(["keys:admin"], first=True)
        assert two.count() == 1
        two.create(["infer"])  # an ordinary key is not first
        assert one.count() == 2
    finally:
        one.close()
        two.close()
