"""The mutual-TLS protocol reads the client's verified certificate into ASGI's TLS extension."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any

from appliance.client_cert import PROTOCOL, tls_extension
from appliance.settings import load_settings
from appliance.tls import certificate_info, plan_tls, server_context, ssl_options


def _handshake(tls_files: Any, *, client_certificate: bool) -> dict[str, Any] | None:
    """The extension the server side of a real handshake yields."""
    server = server_context(tls_files.cert, tls_files.key, tls_files.ca)
    if not client_certificate:
        server.verify_mode = ssl.CERT_OPTIONAL  # the client may come without one
    client = ssl.create_default_context(cafile=str(tls_files.ca))
    if client_certificate:
        client.load_cert_chain(str(tls_files.client_cert), str(tls_files.client_key))
    a, b = socket.socketpair()
    result: dict[str, Any] = {}

    def serve() -> None:
        with server.wrap_socket(a, server_side=True) as tls_sock:
            result["ext"] = tls_extension(tls_sock)  # type: ignore[arg-type]  # SSLSocket: the same methods
            tls_sock.sendall(b"x")

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(b, server_hostname="localhost") as tls_sock:
        assert tls_sock.recv(1) == b"x"
    thread.join(10)
    return result["ext"]


def test_the_verified_client_certificate_becomes_the_extension(tls_files: Any) -> None:
    ext = _handshake(tls_files, client_certificate=True)
    assert ext is not None
    info = certificate_info(tls_files.client_cert)
    assert ext["client_cert_name"] == info.subject == "CN=client"
    assert ext["client_cert_sha256"] == info.sha256
    assert ssl.PEM_cert_to_DER_cert(ext["client_cert_chain"][0]) == ssl.PEM_cert_to_DER_cert(
        tls_files.client_cert.read_text()
    )
    assert ext["tls_version"] in (0x0303, 0x0304)


def test_no_client_certificate_no_extension(tls_files: Any) -> None:
    assert _handshake(tls_files, client_certificate=False) is None
    assert tls_extension(None) is None  # plain HTTP


def test_mutual_tls_serves_with_the_protocol_and_plain_tls_without(tmp_path: Any, tls_files: Any) -> None:
    base = {"home": str(tmp_path), "tls_cert": str(tls_files.cert), "tls_key": str(tls_files.key)}
    plain = plan_tls(load_settings(base, environ={}))
    mutual = plan_tls(load_settings({**base, "tls_client_ca": str(tls_files.ca)}, environ={}))
    assert "http" not in ssl_options(plain)
    assert ssl_options(mutual)["http"] == PROTOCOL
    from uvicorn.importer import import_from_string

    assert import_from_string(PROTOCOL).__name__ == "ClientCertificateProtocol"


def test_a_real_uvicorn_passes_the_certificate_to_every_request_on_a_connection(tls_files: Any) -> None:
    """uvicorn with the protocol, over mutual TLS: two requests on one kept-alive connection."""
    import asyncio

    import httpx
    import uvicorn

    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(scope.get("extensions", {}).get("tls"))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    env_plan = plan_tls(
        load_settings(
            {
                "home": "/nonexistent",
                "tls_cert": str(tls_files.cert),
                "tls_key": str(tls_files.key),
                "tls_client_ca": str(tls_files.ca),
            },
            environ={},
        )
    )
    config = uvicorn.Config(app, lifespan="off", log_level="warning", **ssl_options(env_plan))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        client = ssl.create_default_context(cafile=str(tls_files.ca))
        client.load_cert_chain(str(tls_files.client_cert), str(tls_files.client_key))
        with httpx.Client(verify=client, base_url=f"https://127.0.0.1:{port}") as http:
            deadline = time.monotonic() + 60
            while not server.started:  # the server thread starting: polled, not timed
                assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
                time.sleep(0.05)
            seen.clear()
            assert http.get("/a").status_code == 200 and http.get("/b").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
    info = certificate_info(tls_files.client_cert)
    assert len(seen) == 2
    for ext in seen:
        assert ext is not None and ext["client_cert_sha256"] == info.sha256 and ext["client_cert_name"] == "CN=client"
    assert seen[0] is not seen[1]  # each request its own copy
