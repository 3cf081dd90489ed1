"""A renewed certificate without a restart: ``systemctl reload inferbox-api`` (SIGHUP).

``serve`` builds the server's SSL context itself (uvicorn's
``ssl_context_factory``) and keeps it, so a reload can load the renewed
certificate and key into the same context: connections already open keep
theirs, new handshakes get the new one, nothing is dropped and the model stays
loaded.  The files are checked exactly as at start (:func:`plan_tls`) and then
loaded from one private copy of their bytes, so the check and the load see the
same certificate and key even if the files change meanwhile; a failed check
leaves the running certificate in place.

A certificate that clients would refuse (expired, or not valid yet) is refused
too: loading it would swap a working certificate for one no handshake accepts.
One that expires within :data:`~appliance.tls.EXPIRY_WARNING_DAYS` loads, with
a warning in the log, as at start (the start-up check is the only other time a
long-running server says so).

A certificate whose key is of another kind (RSA after ECDSA) is refused:
OpenSSL keeps one certificate per key kind, so the old one would go on serving
the clients that prefer its kind.

``tls_client_ca`` is not reloaded: OpenSSL can add CAs to a live context but
never remove one, and a CA removed from the bundle (a compromised one) must not
stay trusted.  A changed bundle is named in the outcome: a restart applies it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.settings import Settings
from appliance.tls import (
    CertificateInfo,
    TlsPlan,
    certificate_info,
    expiry_warning,
    plan_tls,
    server_context,
    validity_problem,
)
from runtime.errors import ConfigError

__all__ = ["CertificateReloader", "Reloaded"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reloaded:
    """What a reload did: the certificate before and after, and what it could not apply."""

    before: CertificateInfo
    after: CertificateInfo
    client_ca_changed: bool
    #: the new certificate expires within EXPIRY_WARNING_DAYS (logged by the reload too); else None
    expiry_warning: str | None = None


def _digest(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _write_pair(folder: Path, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(pair[0])
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pair[1])
    return cert, key


#: OpenSSL's certificate slots by the leaf's public key algorithm (RSA-PSS has its own)
_KINDS = {
    "1.2.840.113549.1.1.1": "RSA",
    "1.2.840.113549.1.1.10": "RSA-PSS",
    "1.2.840.10045.2.1": "EC",
    "1.3.101.112": "Ed25519",
    "1.3.101.113": "Ed448",
    "1.2.840.10040.4.1": "DSA",
}


def _key_kind(cert_pem: bytes) -> str:
    """The kind of the leaf certificate's key (RSA, RSA-PSS, EC, Ed25519, ...): OpenSSL's slot for it."""
    from cryptography import x509

    oid = x509.load_pem_x509_certificates(cert_pem)[0].public_key_algorithm_oid.dotted_string
    return _KINDS.get(oid, oid)


def _named(exc: ConfigError, folder: Path, plan: TlsPlan) -> ConfigError:
    """``exc`` naming the operator's files instead of the private copies the check read."""
    text = "\n".join(exc.problems)
    text = text.replace(str(folder / "cert.pem"), str(plan.cert)).replace(str(folder / "key.pem"), str(plan.key))
    return ConfigError(text)


class CertificateReloader:
    """The live context of a serving process and how to load a renewed certificate into it."""

    def __init__(self, settings: Settings, plan: TlsPlan) -> None:
        self.settings = settings
        self.plan = plan
        self._client_ca = _digest(plan.client_ca)
        self._context: ssl.SSLContext | None = None
        #: the certificate and key the live context holds, as read once (a failed load puts them
        #: back; the context is built from these very bytes, so the two never differ)
        self._pair = (plan.cert.read_bytes(), plan.key.read_bytes())
        #: a failed load that could not be undone: new handshakes fail until a restart
        self.broken = False

    def context_factory(self, _config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        """uvicorn's ``ssl_context_factory``: the context uvicorn would build, kept for reloads."""
        with tempfile.TemporaryDirectory(prefix="inferbox-tls-") as folder:
            cert, key = _write_pair(Path(folder), self._pair)
            try:
                self._context = server_context(cert, key, self.plan.client_ca)
            except ConfigError as exc:  # the files changed since start's check (a renewal during the load)
                raise _named(exc, Path(folder), self.plan) from None
            self.plan = TlsPlan(self.plan.cert, self.plan.key, self.plan.client_ca, certificate_info(cert))
        return self._context

    def _restore(self) -> None:
        """Load the running pair again: a load that failed half-way has dropped the old key."""
        assert self._context is not None
        try:
            with tempfile.TemporaryDirectory(prefix="inferbox-tls-") as folder:
                cert, key = _write_pair(Path(folder), self._pair)
                self._context.load_cert_chain(str(cert), str(key))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self.broken = True
            raise ConfigError(
                f"the renewed certificate did not load and the running one could not be put back ({exc}); "
                "new connections fail until systemctl restart inferbox-api"
            ) from None

    def reload(self) -> Reloaded:
        """Check the files again and load them into the live context; ConfigError leaves it as it was."""
        if self._context is None:
            raise ConfigError("the server has no TLS context yet; nothing to reload")
        plan = plan_tls(self.settings)
        if plan is None:  # the settings object is the one the server started with: cannot happen
            raise ConfigError("TLS is off in the settings this server started with; nothing to reload")
        pair = (plan.cert.read_bytes(), plan.key.read_bytes())
        with tempfile.TemporaryDirectory(prefix="inferbox-tls-") as folder:
            cert, key = _write_pair(Path(folder), pair)
            try:
                server_context(cert, key, None)  # this very pair belongs together (else nothing is loaded)
                after = certificate_info(cert)
            except ConfigError as exc:
                raise _named(exc, Path(folder), plan) from None
            if (problem := validity_problem(plan.cert, after)) is not None:
                # new handshakes would fail where the running certificate still works
                raise ConfigError(
                    f"{problem}, so it is not loaded; put a current certificate and its key at {plan.cert} and "
                    f"{plan.key}, then systemctl reload inferbox-api"
                )
            running, renewed = _key_kind(self._pair[0]), _key_kind(pair[0])
            if running != renewed:
                # OpenSSL keeps one certificate per key type: the old one would go on serving beside it
                raise ConfigError(
                    f"the renewed certificate has a {renewed} key and the running one a {running} key; a reload "
                    "would keep serving the old certificate to some clients: systemctl restart inferbox-api"
                )
            try:
                self._context.load_cert_chain(str(cert), str(key))
            except ssl.SSLError as exc:  # checked a moment ago on the same bytes: not expected
                self._restore()
                raise ConfigError(f"OpenSSL refused the renewed certificate: {exc.reason or exc}") from None
        self._pair, self.broken = pair, False
        before, self.plan = self.plan.certificate, TlsPlan(plan.cert, plan.key, plan.client_ca, after)
        warning = expiry_warning(plan.cert, after)
        if warning is not None:  # loaded, but due for renewal: said as at start
            log.warning("SIGHUP: %s", warning)
        return Reloaded(
            before=before,
            after=after,
            client_ca_changed=_digest(plan.client_ca) != self._client_ca,
            expiry_warning=warning,
        )
