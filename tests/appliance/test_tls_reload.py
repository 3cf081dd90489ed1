"""SIGHUP loads a renewed certificate into the live context; a bad one leaves the running one."""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.server import reload_certificate
from appliance.settings import Settings, load_settings
from appliance.tls import certificate_info, plan_tls
from appliance.tls_reload import CertificateReloader
from runtime.errors import ConfigError


def _served_fingerprint(context: ssl.SSLContext) -> str:
    """SHA-256 of the certificate a new handshake against ``context`` presents."""
    a, b = socket.socketpair()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE

    def serve() -> None:
        with context.wrap_socket(a, server_side=True) as tls_sock:
            tls_sock.sendall(b"x")

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(b) as tls_sock:
        der = tls_sock.getpeercert(binary_form=True)
        tls_sock.recv(1)
    thread.join(10)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def _settings(tmp_path: Path, tls_files: Any, *, client_ca: bool = False) -> Settings:
    """Settings naming copies of the test certificate (the files a renewal overwrites)."""
    folder = tmp_path / "tls"
    cert, key = tls_files.copy_server_pair(folder)
    overrides = {"home": str(tmp_path / "home"), "tls_cert": str(cert), "tls_key": str(key)}
    if client_ca:
        ca = folder / "ca.crt"
        shutil.copy(tls_files.ca, ca)
        overrides["tls_client_ca"] = str(ca)
    return load_settings(overrides, environ={})


def _renew(settings: Settings, renewed: Any) -> None:
    assert settings.tls_cert is not None and settings.tls_key is not None
    shutil.copy(renewed.cert, settings.tls_cert)
    shutil.copy(renewed.key, settings.tls_key)


def _reloader(settings: Settings) -> tuple[CertificateReloader, ssl.SSLContext]:
    plan = plan_tls(settings)
    assert plan is not None
    reloader = CertificateReloader(settings, plan)
    return reloader, reloader.context_factory(None, ssl.create_default_context)


def test_a_renewed_certificate_is_served_by_the_same_context(tmp_path: Path, tls_files: Any, tls_factory: Any) -> None:
    settings = _settings(tmp_path, tls_files)
    reloader, context = _reloader(settings)
    old = certificate_info(tls_files.cert).sha256
    assert _served_fingerprint(context) == old
    renewed = tls_factory(server_days=90)
    _renew(settings, renewed)
    assert _served_fingerprint(context) == old  # nothing changes before the reload
    done = reloader.reload()
    new = certificate_info(renewed.cert).sha256
    assert (done.before.sha256, done.after.sha256, done.client_ca_changed) == (old, new, False)
    assert _served_fingerprint(context) == new
    assert reloader.plan.certificate.sha256 == new


def test_a_bad_renewal_leaves_the_running_certificate(tmp_path: Path, tls_files: Any, tls_factory: Any) -> None:
    settings = _settings(tmp_path, tls_files)
    reloader, context = _reloader(settings)
    old = certificate_info(tls_files.cert).sha256
    assert settings.tls_cert is not None and settings.tls_key is not None
    shutil.copy(tls_factory().cert, settings.tls_cert)  # a new certificate, the old key: not a pair
    with pytest.raises(ConfigError, match="not the private key"):
        reloader.reload()
    assert _served_fingerprint(context) == old and reloader.plan.certificate.sha256 == old
    settings.tls_key.chmod(0o644)  # the permission check of the start applies too
    with pytest.raises(ConfigError, match="other users can read"):
        reloader.reload()
    assert _served_fingerprint(context) == old


def test_a_changed_client_ca_is_named_not_applied(tmp_path: Path, tls_files: Any, tls_factory: Any) -> None:
    settings = _settings(tmp_path, tls_files, client_ca=True)
    reloader, _ = _reloader(settings)
    assert reloader.reload().client_ca_changed is False
    assert settings.tls_client_ca is not None
    settings.tls_client_ca.write_bytes(tls_factory().ca.read_bytes())
    assert reloader.reload().client_ca_changed is True


class _Audit:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def append(self, event: Any) -> None:
        self.events.append(event)


def test_the_sighup_handler_logs_and_records_each_outcome(
    tmp_path: Path, tls_files: Any, tls_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.server")
    settings = _settings(tmp_path, tls_files)
    reloader, _ = _reloader(settings)
    audit = _Audit()
    renewed = tls_factory()
    _renew(settings, renewed)
    reload_certificate(reloader, audit)  # type: ignore[arg-type]
    (ok,) = audit.events
    assert (ok.event, ok.outcome) == ("tls_reload", "success")
    assert ok.details["tls_cert_sha256"] == certificate_info(renewed.cert).sha256
    assert ok.details["previous_tls_cert_sha256"] == certificate_info(tls_files.cert).sha256
    assert "reloaded the certificate" in caplog.text

    assert settings.tls_key is not None
    settings.tls_key.write_text("not a key")
    reload_certificate(reloader, audit)  # type: ignore[arg-type]
    failed = audit.events[-1]
    assert (failed.event, failed.outcome) == ("tls_reload", "failure")
    assert failed.details["tls_cert_sha256"] == certificate_info(renewed.cert).sha256  # still served
    assert failed.details["reason"] and "the running one stays" in caplog.text

    reload_certificate(None, audit)  # type: ignore[arg-type]  # plain HTTP: said, nothing recorded
    assert len(audit.events) == 2 and "no certificate to reload" in caplog.text


def _rsa_pair(folder: Path, ca: Any) -> tuple[Path, Path]:
    """An RSA server certificate (the test CA's other certificates are ECDSA)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "rsa.crt", folder / "rsa.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_a_key_of_another_kind_is_refused_as_it_would_serve_beside_the_old(tmp_path: Path, tls_files: Any) -> None:
    settings = _settings(tmp_path, tls_files)
    reloader, context = _reloader(settings)
    old = certificate_info(tls_files.cert).sha256
    extra = tmp_path / "rsa"
    extra.mkdir()
    rsa_cert, rsa_key = _rsa_pair(extra, None)
    assert settings.tls_cert is not None and settings.tls_key is not None
    shutil.copy(rsa_cert, settings.tls_cert)
    shutil.copy(rsa_key, settings.tls_key)
    with pytest.raises(ConfigError, match="RSA key and the running one a EC key"):
        reloader.reload()
    assert _served_fingerprint(context) == old


def test_a_load_that_fails_half_way_puts_the_running_pair_back(
    tmp_path: Path, tls_files: Any, tls_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, tls_files)
    reloader, context = _reloader(settings)
    old = certificate_info(tls_files.cert).sha256
    _renew(settings, tls_factory())
    real = ssl.SSLContext.load_cert_chain
    failed: list[bool] = []

    def half_way(self: ssl.SSLContext, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        if self is context and not failed:  # the renewal: its certificate goes in, then a key is refused
            failed.append(True)
            real(self, certfile, str(tls_files.key))  # OpenSSL: new certificate loaded, key mismatch
        real(self, certfile, keyfile)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", half_way)
    with pytest.raises(ConfigError, match="OpenSSL refused"):
        reloader.reload()
    monkeypatch.undo()
    assert _served_fingerprint(context) == old  # a working context, still the running certificate


def test_sighup_outside_serving_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    import os
    import signal

    from appliance.server import hold_sighup

    before = signal.getsignal(signal.SIGHUP)
    try:
        hold_sighup()
        os.kill(os.getpid(), signal.SIGHUP)  # the default action would end this test process
        assert "SIGHUP while the server is starting or stopping" in caplog.text
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_renewal_during_the_model_load_is_not_half_seen(tmp_path: Path, tls_files: Any, tls_factory: Any) -> None:
    """The files change between the start's check and uvicorn building the context: the context and
    what the reloader reports are the same certificate (the one read at the check)."""
    settings = _settings(tmp_path, tls_files)
    plan = plan_tls(settings)
    assert plan is not None
    reloader = CertificateReloader(settings, plan)
    renewed = tls_factory()
    _renew(settings, renewed)  # while the model loads
    context = reloader.context_factory(None, ssl.create_default_context)
    old, new = certificate_info(tls_files.cert).sha256, certificate_info(renewed.cert).sha256
    assert _served_fingerprint(context) == old == reloader.plan.certificate.sha256
    done = reloader.reload()
    assert (done.before.sha256, done.after.sha256) == (old, new) and _served_fingerprint(context) == new


def test_a_refused_renewal_names_the_operators_files_not_the_private_copies(
    tmp_path: Path, tls_files: Any, tls_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, tls_files)
    reloader, _ = _reloader(settings)
    assert settings.tls_cert is not None and settings.tls_key is not None
    shutil.copy(tls_factory().cert, settings.tls_cert)
    # the start's check passes on the files; the copy's check refuses (the files changed in between)
    monkeypatch.setattr("appliance.tls_reload.plan_tls", lambda s: reloader.plan)
    with pytest.raises(ConfigError) as refused:
        reloader.reload()
    text = str(refused.value)
    assert str(settings.tls_key) in text and "inferbox-tls-" not in text


def test_a_context_that_cannot_be_put_back_is_said_to_be_broken(
    tmp_path: Path,
    tls_files: Any,
    tls_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = _settings(tmp_path, tls_files)
    reloader, context = _reloader(settings)
    _renew(settings, tls_factory())
    real = ssl.SSLContext.load_cert_chain

    def never_on_the_live_one(self: ssl.SSLContext, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        if self is context:
            raise ssl.SSLError("simulated")
        real(self, certfile, keyfile)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", never_on_the_live_one)
    audit = _Audit()
    reload_certificate(reloader, audit)  # type: ignore[arg-type]
    assert reloader.broken and "could not be put back" in audit.events[-1].details["reason"]
    assert any(r.levelname == "CRITICAL" for r in caplog.records) and "the running one stays" not in caplog.text
    monkeypatch.undo()  # the next reload works: the context is whole again
    reloader.reload()
    assert not reloader.broken


def test_key_kinds_are_openssls_slots(tmp_path: Path, tls_files: Any) -> None:
    from appliance.tls_reload import _key_kind

    assert _key_kind(tls_files.cert.read_bytes()) == "EC"
    rsa_cert, _ = _rsa_pair(tmp_path, None)
    assert _key_kind(rsa_cert.read_bytes()) == "RSA"


@pytest.mark.parametrize(
    ("days", "start_days", "said"),
    [(-1, -60, "expired on"), (90, 2, "is not valid before")],
    ids=["expired", "not-valid-yet"],
)
def test_a_certificate_clients_would_refuse_is_not_loaded(
    tmp_path: Path, tls_files: Any, tls_factory: Any, days: float, start_days: float, said: str
) -> None:
    """An expired renewal was loaded and recorded as a success: every new handshake then failed."""
    settings = _settings(tmp_path, tls_files)
    reloader, context = _reloader(settings)
    old = certificate_info(tls_files.cert).sha256
    _renew(settings, tls_factory(server_days=days, server_start_days=start_days))
    with pytest.raises(ConfigError) as err:
        reloader.reload()
    text = str(err.value)
    assert said in text and str(settings.tls_cert) in text and "not loaded" in text
    assert "systemctl reload inferbox-api" in text  # the fix: a current certificate, then reload again
    assert _served_fingerprint(context) == old and reloader.plan.certificate.sha256 == old
    assert not reloader.broken


def test_sighup_with_an_expired_certificate_logs_and_records_a_failure(
    tmp_path: Path, tls_files: Any, tls_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = _settings(tmp_path, tls_files)
    reloader, context = _reloader(settings)
    audit = _Audit()
    _renew(settings, tls_factory(server_days=-1, server_start_days=-60))
    reload_certificate(reloader, audit)  # type: ignore[arg-type]
    (failed,) = audit.events
    assert (failed.event, failed.outcome) == ("tls_reload", "failure")
    assert failed.details["tls_cert_sha256"] == certificate_info(tls_files.cert).sha256  # still served
    assert "expired on" in failed.details["reason"]
    (record,) = [r for r in caplog.records if r.name == "appliance.server"]
    assert record.levelno == logging.ERROR and "the running one stays" in record.getMessage()
    assert "expired on" in record.getMessage() and "reloaded the certificate" not in caplog.text
    assert _served_fingerprint(context) == certificate_info(tls_files.cert).sha256


def test_a_reloaded_certificate_near_its_expiry_is_warned_of_as_at_start(
    tmp_path: Path, tls_files: Any, tls_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The 30-day warning was said at start only: a server up for months never warned."""
    caplog.set_level(logging.INFO)
    settings = _settings(tmp_path, tls_files)
    reloader, context = _reloader(settings)
    soon = tls_factory(server_days=10)
    _renew(settings, soon)
    reload_certificate(reloader, _Audit())  # type: ignore[arg-type]
    assert _served_fingerprint(context) == certificate_info(soon.cert).sha256  # loaded all the same
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert "expires in 10 days" in text and str(settings.tls_cert) in text and "renew it" in text
    caplog.clear()
    _renew(settings, tls_factory(server_days=90))
    assert reloader.reload().expiry_warning is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_metrics_give_the_served_certificates_expiry_and_follow_a_reload(
    tmp_path: Path, tls_files: Any, tls_factory: Any
) -> None:
    # a server up for months warned of an expiring certificate only at start and at reload: /metrics
    # gives its expiry for an alert, after each reload too
    from api.metrics import Metrics
    from appliance.server import _certificate_expiry

    settings = _settings(tmp_path, tls_files)
    reloader, _ = _reloader(settings)
    expiry = _certificate_expiry(settings, reloader)
    assert expiry() == certificate_info(tls_files.cert).not_after.timestamp()
    renewed = tls_factory(server_days=400)
    _renew(settings, renewed)
    reload_certificate(reloader, _Audit())  # type: ignore[arg-type]
    assert expiry() == certificate_info(renewed.cert).not_after.timestamp()
    line = f"inferbox_tls_certificate_expiry_timestamp_seconds {int(expiry())}"
    assert line in Metrics(certificate_expiry=expiry).render({}, []).splitlines()
    # a worker of --workers N (no reloader) gives the certificate it started with; plain HTTP gives none
    assert _certificate_expiry(settings, None)() == certificate_info(renewed.cert).not_after.timestamp()
    plain = load_settings({"home": tmp_path / "plain"})
    assert _certificate_expiry(plain, None)() is None
    assert "tls_certificate" not in Metrics(certificate_expiry=_certificate_expiry(plain, None)).render({}, [])
