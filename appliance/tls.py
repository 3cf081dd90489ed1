"""HTTPS for the API: check the operator's certificate and key, and refuse plain HTTP on a network address.

API keys travel as ``Authorization: Bearer`` headers and requests carry the
data the appliance exists to keep private, so a server that other machines
reach speaks TLS: ``tls_cert`` + ``tls_key`` (PEM), and optionally
``tls_client_ca`` to require client certificates signed by that CA (mutual
TLS, on top of the API keys).  Plain HTTP stays the default on a loopback
address; on any other address it is refused unless ``allow_plaintext`` says a
TLS proxy in front of the box terminates it.

Everything is checked before the model loads, so a wrong path or a key that
does not match its certificate is one clear message, not a uvicorn traceback
after a minute of loading.  The context is built the way uvicorn builds it
(:func:`ssl_options` passes the same files), with TLS 1.2 as the floor.
"""

from __future__ import annotations

import hashlib
import ssl
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.settings import Settings
from runtime.errors import ConfigError

__all__ = [
    "CIPHERS",
    "EXPIRY_WARNING_DAYS",
    "CertificateInfo",
    "TlsPlan",
    "expiry_warning",
    "plan_tls",
    "ssl_options",
    "validity_problem",
]

#: forward-secret AEAD suites for TLS 1.2 (TLS 1.3's suites are all of that kind and not set here)
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
#: ``doctor`` and the start-up log warn when the certificate expires within this many days
EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class CertificateInfo:
    """What the operator (and the audit log) needs to know about the served certificate."""

    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    sha256: str  #: fingerprint of the leaf certificate (DER)
    names: tuple[str, ...]  #: subject alternative names (DNS and IP)

    def days_left(self, now: datetime | None = None) -> float:
        moment = now or datetime.now(UTC)
        return (self.not_after - moment).total_seconds() / 86400


@dataclass(frozen=True)
class TlsPlan:
    """Checked TLS files: what :func:`ssl_options` hands to uvicorn."""

    cert: Path
    key: Path
    client_ca: Path | None
    certificate: CertificateInfo

    @property
    def mode(self) -> str:
        """``tls`` or ``mutual-tls`` (client certificates required)."""
        return "mutual-tls" if self.client_ca is not None else "tls"


def _source(settings: Settings, name: str) -> str:
    return settings.sources.get(name, "default")


def plan_tls(settings: Settings) -> TlsPlan | None:
    """Check the TLS settings; None when TLS is off.  Raises :class:`ConfigError` naming every problem."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError(
                f"tls_client_ca is set ({_source(settings, 'tls_client_ca')}) but tls_cert and tls_key are not: "
                "client certificates need HTTPS; set tls_cert and tls_key too"
            )
        return None
    if cert is None or key is None:
        given, missing = ("tls_cert", "tls_key") if cert is not None else ("tls_key", "tls_cert")
        raise ConfigError(
            f"{given} is set ({_source(settings, given)}) but {missing} is not: HTTPS needs both the "
            "certificate (PEM, with its chain) and its private key (PEM)"
        )
    problems = [p for p in (_readable(cert, "tls_cert"), _readable(key, "tls_key")) if p]
    if client_ca is not None and (p := _readable(client_ca, "tls_client_ca")):
        problems.append(p)
    if not problems and (p := _key_exposed(key, "tls_key")):
        problems.append(p)
    if not problems and cert != key and _holds_private_key(cert) and (p := _key_exposed(cert, "tls_cert")):
        problems.append(p)
    if problems:
        raise ConfigError(problems)
    server_context(cert, key, client_ca)
    return TlsPlan(cert=cert, key=key, client_ca=client_ca, certificate=certificate_info(cert))


def _readable(path: Path, name: str) -> str | None:
    try:
        with path.open("rb") as fh:
            head = fh.read(1 << 16)
    except IsADirectoryError:
        return f"{name}: {path} is a folder; give the PEM file"
    except FileNotFoundError:
        return f"{name}: {path} does not exist"
    except PermissionError:
        return (
            f"{name}: {path} cannot be read by this user; the service user must read it "
            "(for the key: chgrp inferbox and chmod 0640, see docs/operations.md)"
        )
    except OSError as exc:
        return f"{name}: {path} cannot be read: {exc.strerror}"
    if b"-----BEGIN " not in head:
        return f"{name}: {path} is not PEM (no -----BEGIN line); convert DER with `openssl x509 -inform der`"
    return None


def _key_exposed(key: Path, name: str) -> str | None:
    mode = key.stat().st_mode
    if mode & stat.S_IROTH or mode & stat.S_IWOTH or mode & stat.S_IWGRP:
        return (
            f"{name}: {key} has mode {stat.S_IMODE(mode):04o} and holds a private key: other users can read or "
            f"change it; chmod 0600 (or 0640 with the service's group) {key}"
        )
    return None


def _holds_private_key(path: Path) -> bool:
    """A PEM file with the key in it too (certificate and key concatenated)."""
    try:
        return b"PRIVATE KEY-----" in path.read_bytes()
    except OSError:
        return False


def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The server's context, as uvicorn builds it from :func:`ssl_options` (used to check, and by tests)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    except _EncryptedKeyError:
        raise ConfigError(
            f"tls_key: {key} is encrypted with a passphrase, which a service cannot type; write it unencrypted "
            f"with owner-only permissions: openssl pkey -in {key} -out NEW.key && chmod 0600 NEW.key"
        ) from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc).upper():
            raise ConfigError(f"tls_key: {key} is not the private key of tls_cert's certificate ({cert})") from None
        raise ConfigError(f"tls_cert {cert} / tls_key {key}: OpenSSL refused them ({exc.reason or exc})") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except ssl.SSLError as exc:
            raise ConfigError(f"tls_client_ca: {client_ca}: OpenSSL refused it ({exc.reason or exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _EncryptedKeyError(Exception):
    """Raised by the password callback: the key wants a passphrase."""


def _no_password() -> str:
    raise _EncryptedKeyError


def certificate_info(cert: Path) -> CertificateInfo:
    """The leaf certificate of ``cert`` (the first PEM block)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except ValueError as exc:
        raise ConfigError(f"tls_cert: {cert} holds no readable certificate ({exc})") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(
            [str(n) for n in san.get_values_for_type(x509.DNSName)]
            + [str(n) for n in san.get_values_for_type(x509.IPAddress)]
        )
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        sha256=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        names=names,
    )


def validity_problem(path: Path, cert: CertificateInfo, now: datetime | None = None) -> str | None:
    """Why clients refuse ``cert`` (the file ``path``) now: expired or not valid yet; None when current."""
    moment = now or datetime.now(UTC)
    if cert.days_left(moment) < 0:
        return f"the TLS certificate {path} expired on {cert.not_after.date()}: clients will refuse it"
    if cert.not_before > moment:
        return (
            f"the TLS certificate {path} is not valid before {cert.not_before.isoformat()}: clients will refuse "
            "it until then (or this box's clock is wrong)"
        )
    return None


def expiry_warning(path: Path, cert: CertificateInfo, now: datetime | None = None) -> str | None:
    """The warning for a current certificate that expires within :data:`EXPIRY_WARNING_DAYS`; else None."""
    days = cert.days_left(now)
    if 0 <= days < EXPIRY_WARNING_DAYS:
        return (
            f"the TLS certificate {path} expires in {days:.0f} days ({cert.not_after.date()}): renew it, then "
            "systemctl reload inferbox-api"
        )
    return None


def ssl_options(plan: TlsPlan | None) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` (empty without TLS).

    With mutual TLS, ``http`` is :class:`appliance.client_cert.ClientCertificateProtocol`, so each
    request's scope carries the client's certificate (ASGI's TLS extension).
    """
    if plan is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(plan.cert),
        "ssl_keyfile": str(plan.key),
        "ssl_ciphers": CIPHERS,
    }
    if plan.client_ca is not None:
        from appliance.client_cert import PROTOCOL

        options["ssl_ca_certs"] = str(plan.client_ca)
        options["ssl_cert_reqs"] = int(ssl.CERT_REQUIRED)
        options["http"] = PROTOCOL  # passes the client's certificate on to the audit records
    return options
