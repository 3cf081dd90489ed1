"""The envelope puts the mutual-TLS client's certificate (ASGI's TLS extension) in the audit record."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path
from typing import Any

from api.envelope import MAX_CERT_NAME, client_certificate, envelope
from api.metrics import Metrics
from tests.api.conftest import MemoryAudit


def _run(scope: dict[str, Any], audit: MemoryAudit) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    wrapped = envelope(app, audit=audit, metrics=Metrics(), clock=lambda: 1.0)
    asyncio.run(wrapped(scope, receive, send))
    assert sent[0]["status"] == 200


def _scope(**extensions: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/v1/models",
        "headers": [],
        "client": ("10.0.0.7", 50000),
    }
    if extensions:
        scope["extensions"] = extensions
    return scope


def test_the_client_certificate_goes_into_the_audit_record(tls_files: Any) -> None:
    pem = tls_files.client_cert.read_text()
    der = ssl.PEM_cert_to_DER_cert(pem)
    audit = MemoryAudit()
    tls = {"client_cert_chain": [pem], "client_cert_name": "CN=client", "client_cert_sha256": "ab" * 32}
    _run(_scope(tls=tls), audit)
    (event,) = audit.events
    assert event.details["client_cert"] == "CN=client"
    assert event.details["client_cert_sha256"] == "ab" * 32  # the server's, computed once per connection
    # a server that fills only the standard keys: the fingerprint comes from the PEM
    del tls["client_cert_sha256"]
    assert client_certificate(_scope(tls=tls)) == ("CN=client", hashlib.sha256(der).hexdigest())


def test_no_certificate_no_fields(tmp_path: Path) -> None:
    for scope in (_scope(), _scope(tls={"client_cert_chain": [], "client_cert_name": None}), _scope(other={})):
        audit = MemoryAudit()
        _run(scope, audit)
        (event,) = audit.events
        assert "client_cert" not in event.details and "client_cert_sha256" not in event.details


def test_a_huge_subject_is_cut_and_the_fingerprint_kept(tls_files: Any) -> None:
    pem = tls_files.client_cert.read_text()
    tls = {"client_cert_chain": [pem], "client_cert_name": "CN=" + "x" * 5000, "client_cert_sha256": "cd" * 32}
    name, sha256 = client_certificate(_scope(tls=tls)) or ("", "")
    assert len(name) == MAX_CERT_NAME and name.endswith("\u2026") and name.startswith("CN=xxx")
    assert sha256 == "cd" * 32


def _with_certificate(client: Any, holder: dict[str, Any]) -> None:
    """Give each request the TLS extension in ``holder`` (what the mutual-TLS protocol sets)."""
    inner = client.app.asgi_handler

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and holder:
            scope["extensions"] = {"tls": dict(holder)}
        await inner(scope, receive, send)

    client.app.asgi_handler = handler


def test_a_bound_key_through_the_app(tmp_path: Path, tls_files: Any, client_factory: Any, audit: MemoryAudit) -> None:
    from appliance.keys import KeyStore, certificate_sha256

    store = KeyStore(tmp_path / "state.db")
    fingerprint = certificate_sha256(tls_files.client_cert)
    bound, secret = store.create(["infer"], client_cert_sha256=fingerprint)
    client = client_factory(keys=store)
    holder: dict[str, Any] = {}
    _with_certificate(client, holder)
    headers = {"Authorization": f"Bearer {secret}"}
    pem = tls_files.client_cert.read_text()

    holder.update(client_cert_chain=[pem], client_cert_name="CN=client", client_cert_sha256=fingerprint)
    assert client.get("/v1/models", headers=headers).status_code == 200
    holder["client_cert_sha256"] = "0" * 64
    refused = client.get("/v1/models", headers=headers)
    assert refused.status_code == 401 and "bound to a client certificate" in refused.text
    holder.clear()
    assert client.get("/v1/models", headers=headers).status_code == 401
    ok, other, none = audit.events[-3:]
    assert (ok.actor, ok.details["client_cert_sha256"]) == (bound.id, fingerprint)
    for failed, presented in ((other, "0" * 64), (none, None)):
        assert failed.event == "auth_failure" and failed.details["refused_key_id"] == bound.id
        assert failed.details.get("client_cert_sha256") == presented
    # a revoked key is named in its refusal's record too; an unknown one is not
    store.revoke(bound.id)
    holder.update(client_cert_chain=[pem], client_cert_name="CN=client", client_cert_sha256=fingerprint)
    assert client.get("/v1/models", headers=headers).status_code == 401
    assert audit.events[-1].details["refused_key_id"] == bound.id
    assert client.get("/v1/models", headers={"Authorization": "Bearer ibx_0123456789ab_" + "x" * 43}).status_code == 401
    assert "refused_key_id" not in audit.events[-1].details


def test_the_audit_api_filters_by_certificate_as_openssl_prints_it(tmp_path: Path) -> None:
    from litestar.testing import TestClient

    from tests.api.conftest import audit_api_app

    app, reader = audit_api_app(tmp_path)
    printed = ":".join(["AB"] * 32)  # openssl x509 -fingerprint -sha256
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/v1/audit", params={"client_cert_sha256": printed}).status_code == 200
        assert reader.calls[-1]["client_cert_sha256"] == "ab" * 32
        assert c.get("/v1/audit").status_code == 200
        assert reader.calls[-1]["client_cert_sha256"] is None
        bad = c.get("/v1/audit", params={"client_cert_sha256": "CN=client"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "client_cert_sha256"
