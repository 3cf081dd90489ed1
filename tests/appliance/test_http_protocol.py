"""``header_timeout_s``: a connection must get a request's headers in, or go.

uvicorn timed out nothing before the headers: a client that connected and sent nothing, or part of
its headers and then nothing, held its connection (a file descriptor, a place among the
connections) for as long as it liked.  A real uvicorn server on 127.0.0.1 with the protocol
``serve`` uses, and raw sockets, so that the bytes are exactly what the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from appliance.http_protocol import PROTOCOL, closed_connections, configure

TIMEOUT_S = 1.5  # long enough that the test's own stalls on a busy box do not reach it
LATER_S = 2.0  # longer than TIMEOUT_S: a slow body, a slow answer
BODY_TIMEOUT_S = 4.0  # what the rest of a body answered early may take


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the body, waits ``?sleep`` seconds, answers 200 with what it read (``?early``: 401 unread)."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["query_string"].startswith(b"big="):  # an answer of that many bytes, written at once
        size = int(scope["query_string"].removeprefix(b"big="))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % size)]})
        await send({"type": "http.response.body", "body": b"x" * size})
        return
    if scope["query_string"] == b"early":  # a 401 before the body is read, as an auth check answers
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"nope"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    query = scope["query_string"].decode()
    if query.startswith("sleep="):
        await asyncio.sleep(float(query.removeprefix("sleep=")))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def _server(options: dict[str, Any]) -> Iterator[int]:
    """uvicorn on a port of 127.0.0.1 with the protocol serve uses (``options``: more of its Config)."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))  # bound here, handed to uvicorn: no other process can take the port
    config = uvicorn.Config(_app, http=PROTOCOL, log_level="warning", **options)
    configure(config, header_timeout_s=TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.05)  # polling for start-up, not an assertion
    try:
        yield int(listening.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(30)
        listening.close()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with _server({}) as free:
        yield free


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a 30 s socket timeout fails the test)."""
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def _request(path: str, body: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


def test_a_connection_that_sends_nothing_is_closed_unanswered(port: int) -> None:
    with _connect(port) as sock:
        assert _read_until_closed(sock) == b""


@pytest.mark.parametrize("part", [b"P", b"POST / HTTP/1.1\r\nHost: t\r\n", b"\r\n"])
def test_part_of_the_headers_then_nothing_is_answered_408_naming_the_setting(
    port: int, part: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    before = closed_connections()
    with caplog.at_level(logging.WARNING, logger="appliance.http_protocol"), _connect(port) as sock:
        sock.sendall(part)
        client = sock.getsockname()
        got = _read_until_closed(sock)
    warned = [r.getMessage() for r in caplog.records if r.name == "appliance.http_protocol"]
    if part == b"\r\n":  # a blank line before a request is no request yet (RFC 9112 2.2): closed, unanswered
        assert got == b"" and not warned, (got, warned)
        assert closed_connections() == before  # an idle close is no client's fault
        return
    assert closed_connections() == {**before, "header_timeout": before["header_timeout"] + 1}
    assert warned == [
        f"{client[0]}:{client[1]} sent part of a request's headers and not the rest within 1.5 s "
        "(header_timeout_s): answered 408"
    ]
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), got
    assert b"connection: close" in head.lower() and b"content-type: application/json" in head.lower(), got
    assert json.loads(body) == {
        "error": "the request's headers did not arrive in full within 1.5 s (header_timeout_s); send them at once"
    }


def test_bytes_that_are_no_http_request_get_400_in_the_apis_error_shape(port: int) -> None:
    """uvicorn answered them in plain text; a client reading ``{"error": ...}`` got nothing to read."""
    before = closed_connections()
    with _connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost t\r\n\r\n")  # a header line without its colon
        got = _read_until_closed(sock)
    assert closed_connections() == {**before, "bad_request": before["bad_request"] + 1}
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), got
    assert json.loads(body) == {"error": "not an HTTP/1.1 request the server can read: Invalid HTTP request received."}


def test_a_slow_trickle_gets_no_more_time_than_a_stall(port: int) -> None:
    """One byte every 0.1 s: each byte used to put off nothing, and the connection lived for ever."""
    with _connect(port) as sock:
        start = time.monotonic()
        sent = 0
        try:
            for byte in b"POST / HTTP/1.1\r\nHost: t\r\nX-Long: " + b"a" * 200:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.1)
        except OSError:  # the server closed it meanwhile
            pass
        got = _read_until_closed(sock)
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert sent < 200, f"all {sent} bytes went in over {time.monotonic() - start:.1f} s"


def test_a_keep_alive_connection_has_the_same_deadline_for_its_next_request(port: int) -> None:
    with _connect(port) as sock:
        sock.sendall(_request("/", b"one"))
        first = b""
        while not first.endswith(b"one"):  # uvicorn writes the head and the body apart
            chunk = sock.recv(65536)
            assert chunk, f"closed after {first!r}"
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 "), first
        sock.sendall(b"POST / HT")  # uvicorn's keep-alive timer stops at the first byte
        got = _read_until_closed(sock)
    assert got.startswith(b"HTTP/1.1 408 "), got


def test_answers_that_take_longer_than_the_deadline_are_not_cut(port: int) -> None:
    """The deadline is for the headers: a slow body (body_timeout_s's business), a slow answer and
    a request pipelined behind a slow answer are all answered."""
    with _connect(port) as sock:
        sock.sendall(b"POST /?sleep=%g HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nab" % LATER_S)
        time.sleep(LATER_S)  # the body's rest comes late: after the headers, so no 408
        sock.sendall(b"cd")
        time.sleep(0.1)
        sock.sendall(b"ef" + _request(f"/?sleep={LATER_S:g}", b"second"))  # pipelined behind the first
        got = b""
        while got.count(b"HTTP/1.1 200 ") < 2 or not got.endswith(b"second"):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {got!r}"
            got += chunk
    assert got.count(b"HTTP/1.1 200 ") == 2 and b"abcdef" in got, got


def _answers(sock: socket.socket, count: int, last: bytes) -> bytes:
    got = b""
    while got.count(b"HTTP/1.1 ") < count or not got.endswith(last):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {got!r}"
        got += chunk
    return got


def test_after_a_pipelined_answer_the_next_request_has_its_whole_deadline(port: int) -> None:
    """The deadline started when the first answer went out, while the request pipelined behind it was
    still being answered: a keep-alive request sent soon after its answer found the connection closed."""
    with _connect(port) as sock:
        sock.sendall(_request("/", b"one") + _request(f"/?sleep={LATER_S:g}", b"two"))
        _answers(sock, 2, b"two")
        time.sleep(0.5)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\n")  # headers in two packets, well within the deadline
        time.sleep(0.3)
        sock.sendall(b"Content-Length: 5\r\n\r\nthree")
        got = _answers(sock, 1, b"three")
    assert got.startswith(b"HTTP/1.1 200 "), got


def test_a_body_answered_early_may_arrive_then_a_stalled_one_is_closed(port: int) -> None:
    """A 401 to an upload goes out before the body is read; the upload went on after it and was cut
    header_timeout_s later (the client's next bytes met a reset: it could lose its 401).  It gets
    body_timeout_s; a body that stalls after an early answer is then closed."""
    with _connect(port) as sock:
        sock.sendall(b"POST /?early HTTP/1.1\r\nHost: t\r\nContent-Length: 30\r\n\r\n")
        got = _answers(sock, 1, b"nope")
        assert got.startswith(b"HTTP/1.1 401 "), got
        for _ in range(3):  # past header_timeout_s, within body_timeout_s
            time.sleep(TIMEOUT_S / 2 + 0.2)
            sock.sendall(b"0123456789")
        sock.sendall(_request("/", b"next"))
        assert _answers(sock, 1, b"next").startswith(b"HTTP/1.1 200 ")
    with _connect(port) as sock:
        sock.sendall(b"POST /?early HTTP/1.1\r\nHost: t\r\nContent-Length: 30\r\n\r\n0123")
        start = time.monotonic()
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 401 ")
    assert time.monotonic() - start >= BODY_TIMEOUT_S - 0.5  # closed after body_timeout_s, not header_timeout_s


BIG = 16 << 20  # far more than the kernel's socket buffers hold


@pytest.fixture(scope="module", params=["plain", "tls"])
def served(request: pytest.FixtureRequest, tls_files: Any) -> Iterator[tuple[int, ssl.SSLContext | None]]:
    """The test server again, over plain TCP and over TLS (whose answers sit in a transport the
    protocol's own does not show)."""
    tls = request.param == "tls"
    options = {"ssl_certfile": str(tls_files.cert), "ssl_keyfile": str(tls_files.key)} if tls else {}
    with _server(options) as port:
        yield port, ssl.create_default_context(cafile=str(tls_files.ca)) if tls else None


def _client(port: int, tls: ssl.SSLContext | None, *, small_window: bool = True) -> socket.socket:
    sock = socket.socket()
    if small_window:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock if tls is None else tls.wrap_socket(sock, server_hostname="127.0.0.1")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "appliance.http_protocol"]


def test_a_client_that_stops_reading_its_answer_is_reset(
    served: tuple[int, ssl.SSLContext | None], caplog: pytest.LogCaptureFixture
) -> None:
    """It held the 16 MB waiting for it, and its connection, for ever: closing waits for the reader.
    (Under TLS the protocol's transport is never paused: the answer waits beneath it.)"""
    port, tls = served
    before = closed_connections()
    with caplog.at_level(logging.WARNING, logger="appliance.http_protocol"), _client(port, tls) as sock:
        sock.sendall(b"GET /?big=%d HTTP/1.1\r\nHost: t\r\n\r\n" % BIG)
        start = time.monotonic()
        while not _warnings(caplog):  # not reading
            assert time.monotonic() - start < 60, "never reset"
            time.sleep(0.1)
        reset_after = time.monotonic() - start
        got = 0
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):  # (TLS may read the reset as an end)
            while chunk := sock.recv(1 << 20):
                got += len(chunk)
    # a reset: what the kernel held went too (abort() alone left it offering the client its send queue,
    # 2.8 MB, for minutes; the client's own 4 KB window is all it may still read)
    assert got < 1 << 20, got
    assert reset_after >= BODY_TIMEOUT_S - 0.5, reset_after  # not before body_timeout_s
    (warned,) = _warnings(caplog)
    assert "read none of its answer for 4 s (body_timeout_s)" in warned and "connection reset" in warned, warned
    assert closed_connections() == {**before, "read_timeout": before["read_timeout"] + 1}


def test_a_slow_reader_that_keeps_reading_is_not_reset(
    served: tuple[int, ssl.SSLContext | None], caplog: pytest.LogCaptureFixture
) -> None:
    """body_timeout_s is for a reader that stops, not for the whole answer.  The event loop's buffer
    shrinks only in steps of a third of the kernel's send buffer (1.4 MB measured): a reader at
    200 kB/s looked idle for longer than body_timeout_s and was reset."""
    port, tls = served
    wanted = 1_400_000
    with (
        caplog.at_level(logging.WARNING, logger="appliance.http_protocol"),
        _client(port, tls, small_window=False) as sock,
    ):
        sock.sendall(b"GET /?big=%d HTTP/1.1\r\nHost: t\r\n\r\n" % BIG)
        start = time.monotonic()
        got = 0
        while got < wanted:
            chunk = sock.recv(32 << 10)
            assert chunk, f"closed after {got} bytes"
            got += len(chunk)
            time.sleep(0.16 * len(chunk) / (32 << 10))  # about 200 kB/s
        took = time.monotonic() - start
    assert took > BODY_TIMEOUT_S, took  # the test's point: reading outlasted body_timeout_s
    assert _warnings(caplog) == []


def test_a_connection_whose_answer_is_still_on_its_way_is_not_idle(served: tuple[int, ssl.SSLContext | None]) -> None:
    """Neither uvicorn's keep-alive close (5 s) nor the idle close after header_timeout_s ran while a
    slow reader was still reading: plain TCP lost the connection for its next request, TLS the rest
    of the answer 30 s later (asyncio's ssl_shutdown_timeout)."""
    port, tls = served
    size = 1_200_000
    with _client(port, tls) as sock:
        sock.sendall(b"GET /?big=%d HTTP/1.1\r\nHost: t\r\n\r\n" % size)
        start = time.monotonic()
        got = b""
        while got.count(b"x") < size:
            chunk = sock.recv(32 << 10)
            assert chunk, f"closed after {len(got)} bytes"
            got += chunk
            time.sleep(0.16 * len(chunk) / (32 << 10))  # about 200 kB/s: 6 s
        assert time.monotonic() - start > 5.0  # past uvicorn's keep-alive and header_timeout_s
        sock.sendall(_request("/", b"again"))
        assert _answers(sock, 1, b"again").startswith(b"HTTP/1.1 200 ")


def test_a_head_over_64_kib_is_answered_431_and_big_bodies_and_pipelines_are_not(port: int) -> None:
    """uvicorn's httptools mode bounded no header: three clients each sending a 60 MB header held the
    event loop for seconds (no key needed).  A head over 64 KiB is a 431; a body of any size, or many
    small requests in one read, is no head."""
    from appliance.http_protocol import MAX_HEAD_BYTES

    before = closed_connections()
    with _connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ")
        for _ in range(64):  # 1 MB: sent in full (the server reads and drops what follows its answer)
            sock.sendall(b"a" * 16384)
        sock.shutdown(socket.SHUT_WR)
        got = _read_until_closed(sock)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), got[:200]
    assert "over 64 KiB" in json.loads(body)["error"]
    assert closed_connections()["header_too_large"] == before["header_too_large"] + 1
    big = b"x" * (4 * MAX_HEAD_BYTES)
    many = _request("/", b"y") * 2000  # ~80 KB of small requests, sent at once
    with _connect(port) as sock:
        sock.sendall(_request("/", big) + many)
        want = 2001
        got = b""
        while got.count(b"HTTP/1.1 200 ") < want:
            chunk = sock.recv(1 << 20)
            assert chunk, got[-300:]
            got += chunk
    assert b" 431 " not in got and big in got


def test_a_head_over_64_kib_in_one_read_is_answered_431_too(port: int) -> None:
    """Counted only by reads, a 100 KB header that arrived whole was accepted (200), the same header
    sent in pieces refused: whether a request was refused depended on how TCP split it."""
    with _connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 100_000 + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        got = _read_until_closed(sock)
    assert got.startswith(b"HTTP/1.1 431 "), got[:200]


def test_chunked_trailers_over_64_kib_close_the_connection(port: int) -> None:
    """Trailers are headers after the body: no bound held them, and three 60 MB trailers held the event
    loop for seconds, with no key.  The request's app waits for a body that will not come: cut off."""
    before = closed_connections()["header_too_large"]
    with _connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: ")
        with contextlib.suppress(ConnectionError):  # cut off while it sends
            for _ in range(16):
                sock.sendall(b"t" * 16384)
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionError):
            got = _read_until_closed(sock)
            assert b" 200 " not in got, got[:300]
    assert closed_connections()["header_too_large"] == before + 1


def test_a_431_behind_an_answer_in_flight_is_written_after_it(port: int) -> None:
    """Written at once, the 431 for a pipelined request went out ahead of the answer to the request
    before it, which then failed (``write() after write_eof()``): the client took the 431 for its
    POST's answer while the audit log recorded a 200."""
    with _connect(port) as sock:
        sock.sendall(_request("/?sleep=0.5", b"first"))
        time.sleep(0.1)  # the first request is with its app
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ")
        for _ in range(8):
            sock.sendall(b"b" * 16384)
        got = _read_until_closed(sock)  # (no half-close: uvicorn ends a connection at the client's)
    first, _, rest = got.partition(b"\r\n\r\nfirst")
    assert first.startswith(b"HTTP/1.1 200 "), got[:300]  # the first answer, whole, first
    assert rest.startswith(b"HTTP/1.1 431 "), got[:400]
