"""The client's certificate on a mutual-TLS connection, handed to the app as ASGI's TLS extension.

With ``tls_client_ca`` every connection carries a certificate that one of the
operator's CAs signed: who is calling, vouched for by the organisation's PKI.
The audit log should say so next to the API key.  uvicorn verifies the
certificate but does not pass it on (it fills no ``scope["extensions"]["tls"]``),
so :class:`ClientCertificateProtocol` (the protocol ``serve`` uses for mutual TLS:
:class:`appliance.http_protocol.DeadlineProtocol`, uvicorn's httptools one
with a deadline for headers) reads it once per connection, after the
handshake, and adds the extension to the scope of every request on that
connection, as the ASGI TLS extension spells it (``client_cert_chain``: the
leaf in PEM; ``client_cert_name``: its subject, RFC 4514; ``tls_version``),
plus ``client_cert_sha256``, the fingerprint the audit record carries, so it
is computed once per connection rather than once per request.
"""

from __future__ import annotations

import hashlib
import ssl
from typing import Any

from appliance.http_protocol import DeadlineProtocol

__all__ = ["PROTOCOL", "ClientCertificateProtocol", "tls_extension"]

#: what ``serve`` passes as uvicorn's ``http`` option for mutual TLS (an import string, so
#: ``--workers`` processes load it too)
PROTOCOL = "appliance.client_cert:ClientCertificateProtocol"

#: ASGI's ``tls_version`` is the version's code on the wire
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def tls_extension(ssl_object: ssl.SSLObject | None) -> dict[str, Any] | None:
    """ASGI's ``tls`` extension for a connection whose peer presented a certificate, else None."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509

    try:
        name: str | None = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:  # OpenSSL verified it; a subject cryptography cannot read still has its fingerprint
        name = None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
        "client_cert_sha256": hashlib.sha256(der).hexdigest(),
    }


class ClientCertificateProtocol(DeadlineProtocol):
    """The serving protocol, with the client certificate in each request's scope."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # on a TLS transport asyncio calls this once the handshake (and the certificate check) is done
        self._tls = tls_extension(transport.get_extra_info("ssl_object"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            tls: dict[object, object] = dict(self._tls.items())  # a copy per request: the app may not share it
            tls["client_cert_chain"] = list(self._tls["client_cert_chain"])
            extensions = dict(self.scope.get("extensions") or {})  # what uvicorn may put there one day stays
            extensions["tls"] = tls
            self.scope["extensions"] = extensions
