"""Who can reach the API, and on what terms: refusals checked before anything loads.

A server on a loopback address is reached only from this machine; on any other
address every client on the network reaches it.  There, API keys must be on
(else every client is admin) and the traffic must be HTTPS (else keys and
request data cross the network in clear text) unless the operator declares
that a TLS proxy in front of the box terminates it (``allow_plaintext``).
"""

from __future__ import annotations

import ipaddress

from appliance.settings import Settings
from appliance.tls import TlsPlan, plan_tls
from runtime.errors import ConfigError

__all__ = ["check_auth_off_is_loopback", "check_exposure", "check_plaintext", "is_loopback"]


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (a name other than localhost may resolve anywhere)."""
    name = host.strip().removeprefix("[").removesuffix("]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _source(settings: Settings, name: str) -> str:
    return settings.sources.get(name, "default")


def check_auth_off_is_loopback(settings: Settings) -> None:
    """Refuse to serve without API keys on an address other machines reach: every client would be admin."""
    if settings.auth or is_loopback(settings.host):
        return
    raise ConfigError(
        f"auth is off ({_source(settings, 'auth')}) and host is {settings.host!r} "
        f"({_source(settings, 'host')}), not a loopback address: every client that reaches it "
        "would have every scope (admin). Keep auth on and give clients keys (`inferbox keys create`), "
        "or serve on 127.0.0.1 / ::1 / localhost to test without keys"
    )


def check_plaintext(settings: Settings, plan: TlsPlan | None) -> None:
    """Refuse plain HTTP on an address other machines reach, unless a TLS proxy in front is declared."""
    if plan is not None or settings.allow_plaintext or is_loopback(settings.host):
        return
    raise ConfigError(
        f"host is {settings.host!r} ({_source(settings, 'host')}), not a loopback address, and TLS is off: "
        "API keys and request data would cross the network in clear text. Set tls_cert and tls_key "
        "(PEM files; docs/operations.md, 'Serving the network over HTTPS'), or, when a TLS proxy in front "
        "of this box terminates HTTPS, set allow_plaintext = true"
    )


def check_exposure(settings: Settings) -> TlsPlan | None:
    """Everything serve refuses about who can reach it and how (serve, doctor and install ask
    the same); returns the checked TLS files, or None for plain HTTP."""
    check_auth_off_is_loopback(settings)
    plan = plan_tls(settings)
    check_plaintext(settings, plan)
    return plan
