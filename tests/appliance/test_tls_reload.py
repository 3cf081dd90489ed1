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
    folder.mkdir()
    cert, key = folder / "server.crt", folder / "server.key"
    shutil.copy(tls_files.cert, cert)
    shutil.copy(tls_files.key, key)
    key.chmod(0o600)
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
