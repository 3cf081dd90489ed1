"""Keys bound to a client certificate: stored, carried to the principal, enforced by the authenticator."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from api.auth import Authenticator, RateLimiter
from appliance.cli import main
from appliance.keys import KeyStore, certificate_sha256
from appliance.tls import certificate_info
from runtime.errors import AuthError, InputError


def _authenticator(store: KeyStore) -> Authenticator:
    return Authenticator(store, enabled=True, default_rate=0, limiter=RateLimiter(time.monotonic))


def test_a_bound_key_works_only_with_its_certificate(tmp_path: Path, tls_files: Any) -> None:
    store = KeyStore(tmp_path / "state.db")
    fingerprint = certificate_sha256(tls_files.client_cert)
    assert fingerprint == certificate_info(tls_files.client_cert).sha256
    bound, bound_secret = store.create(["infer"], client_cert_sha256=fingerprint)
    _, free_secret = store.create(["infer"])
    assert bound.client_cert_sha256 == fingerprint and store.get(bound.id).client_cert_sha256 == fingerprint
    auth = _authenticator(store)

    assert auth.principal(f"Bearer {bound_secret}", fingerprint).key_id == bound.id
    with pytest.raises(AuthError, match="presented another"):
        auth.principal(f"Bearer {bound_secret}", "0" * 64)
    with pytest.raises(AuthError, match="presented none"):
        auth.principal(f"Bearer {bound_secret}", None)
    # a key without a binding works with or without a certificate
    assert auth.principal(f"Bearer {free_secret}", None).client_cert_sha256 is None
    assert auth.principal(f"Bearer {free_secret}", fingerprint).client_cert_sha256 is None


def test_a_fingerprint_must_be_sha256_hex(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "state.db")
    for bad in ("ABCD", "g" * 64, "A" * 64, ""):
        with pytest.raises(InputError, match="client_cert_sha256"):
            store.create(["infer"], client_cert_sha256=bad)


def test_certificate_files_pem_der_and_not_a_certificate(tmp_path: Path, tls_files: Any) -> None:
    import ssl

    der = tmp_path / "client.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(tls_files.client_cert.read_text()))
    assert certificate_sha256(der) == certificate_sha256(tls_files.client_cert)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(InputError, match="holds no certificate"):
        certificate_sha256(junk)
    with pytest.raises(InputError, match="cannot read"):
        certificate_sha256(tmp_path / "missing.pem")


def test_a_key_table_from_before_the_binding_gets_the_column(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.execute(
        """CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', scopes TEXT NOT NULL,
        key_sha256 TEXT NOT NULL, created_at TEXT NOT NULL, expires_at TEXT, revoked_at TEXT,
        rate_limit_per_minute INTEGER NOT NULL DEFAULT 0)"""
    )
    conn.execute(
        "INSERT INTO api_keys VALUES ('0123456789ab', 'old', '[\"infer\"]', 'x', '2026-01-01T00:00:00.000000Z', "
        "NULL, NULL, 0)"
    )
    conn.commit()
    conn.close()
    store = KeyStore(db)
    (old,) = store.list()
    assert old.id == "0123456789ab" and old.client_cert_sha256 is None
    record, _ = store.create(["infer"], client_cert_sha256="ab" * 32)
    assert store.get(record.id).client_cert_sha256 == "ab" * 32


def test_cli_binds_lists_and_warns_without_mutual_tls(tmp_path: Path, tls_files: Any) -> None:
    env = {"INFERBOX_HOME": str(tmp_path), "INFERBOX_AUDIT": "false"}
    runner = CliRunner()
    args = ["keys", "create", "--scope", "infer", "--client-cert", str(tls_files.client_cert), "--json"]
    made = runner.invoke(main, args, env=env, catch_exceptions=False)
    assert made.exit_code == 0, made.output
    assert "set no tls_client_ca" in made.stderr
    key = json.loads(made.stdout)
    fingerprint = certificate_info(tls_files.client_cert).sha256
    assert KeyStore(tmp_path / "state.db").verify(key["key"]).client_cert_sha256 == fingerprint
    listed = runner.invoke(main, ["keys", "list", "--json"], env=env, catch_exceptions=False)
    assert json.loads(listed.stdout)[0]["client_cert_sha256"] == fingerprint
    text = runner.invoke(main, ["keys", "list"], env=env, catch_exceptions=False)
    assert f"cert {fingerprint[:16]}" in text.stdout
    # with mutual TLS configured: no warning
    mutual = {**env, "INFERBOX_TLS_CLIENT_CA": str(tls_files.ca)}
    again = runner.invoke(main, args, env=mutual, catch_exceptions=False)
    assert again.exit_code == 0 and "set no tls_client_ca" not in again.stderr
    # a file that is no certificate is named, and no key is made
    junk = tmp_path / "junk.pem"
    junk.write_text("no")
    bad = runner.invoke(main, [*args[:-1], "--client-cert", str(junk)], env=env)
    assert bad.exit_code != 0 and "holds no certificate" in bad.output
    assert len(KeyStore(tmp_path / "state.db").list()) == 2


def test_a_bound_keys_stored_hash_is_not_its_secrets_so_older_code_refuses_it(tmp_path: Path) -> None:
    import hashlib

    store = KeyStore(tmp_path / "state.db")
    bound, bound_secret = store.create(["infer"], client_cert_sha256="ab" * 32)
    free, free_secret = store.create(["infer"])
    stored = dict(sqlite3.connect(tmp_path / "state.db").execute("SELECT id, key_sha256 FROM api_keys").fetchall())
    assert stored[free.id] == hashlib.sha256(free_secret.encode()).hexdigest()
    assert stored[bound.id] != hashlib.sha256(bound_secret.encode()).hexdigest()  # what a release before checks
    assert store.verify(bound_secret).key_id == bound.id


def test_a_bundle_or_a_ca_certificate_is_not_a_client_certificate(tmp_path: Path, tls_files: Any) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(tls_files.client_cert.read_text() + tls_files.ca.read_text())
    with pytest.raises(InputError, match="holds 2 certificates"):
        certificate_sha256(bundle)
    with pytest.raises(InputError, match="is a CA certificate"):
        certificate_sha256(tls_files.ca)


def test_doctor_warns_of_bound_keys_a_server_without_mutual_tls_refuses(tmp_path: Path, tls_factory: Any) -> None:
    from appliance.commands.doctor import server_report
    from appliance.settings import load_settings

    tls_files = tls_factory(server_days=90)  # no expiry warning beside the one looked for
    base = {"home": str(tmp_path), "tls_cert": str(tls_files.cert), "tls_key": str(tls_files.key)}
    plain = load_settings(base, environ={})
    assert server_report(plain)["warning"] is None  # no state database yet: nothing to say
    store = KeyStore(tmp_path / "state.db")
    store.create(["infer"])
    assert server_report(plain)["warning"] is None  # no bound key
    bound, _ = store.create(["infer"], client_cert_sha256="ab" * 32)
    store.close()
    warning = server_report(plain)["warning"]
    assert warning is not None and bound.id in warning and "tls_client_ca" in warning
    mutual = load_settings({**base, "tls_client_ca": str(tls_files.ca)}, environ={})
    assert server_report(mutual)["warning"] is None
    revoked = KeyStore(tmp_path / "state.db")
    revoked.revoke(bound.id)
    revoked.close()
    assert server_report(plain)["warning"] is None  # a revoked key is no loss


def test_doctor_reports_an_unreadable_key_table_instead_of_failing(tmp_path: Path, tls_factory: Any) -> None:
    from appliance.commands.doctor import server_report
    from appliance.settings import load_settings

    files = tls_factory(server_days=90)
    (tmp_path / "state.db").write_bytes(b"not a database, " * 100)
    settings = load_settings(
        {"home": str(tmp_path), "tls_cert": str(files.cert), "tls_key": str(files.key)}, environ={}
    )
    report = server_report(settings)
    assert report["problem"] is None and "could not be read" in (report["warning"] or "")
    assert (tmp_path / "state.db").read_bytes() == b"not a database, " * 100  # doctor wrote nothing
