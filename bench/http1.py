"""A lean HTTP/1.1 client on asyncio streams, for the open loop.

At 300 requests/s on the 2-core test box httpx took 1.6-4.1 ms of CPU a
request and this client 0.27-0.31 ms (three rounds each, the same server).  An
appliance that is its own only machine (no network out) runs its load test
beside the server, where httpx would take half a core or more from what it
measures.  This client does what the load test needs and nothing more: POST a
body over kept-alive connections, plain or TLS (the caller's
:class:`ssl.SSLContext`: its CAs and client certificate), and read the answer's
status and body (``Content-Length``, chunked, or up to the connection's close).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["TRANSPORT_ERRORS", "Answer", "Pool"]

#: what a failed exchange raises (a refused or dropped connection, a garbled or late answer)
TRANSPORT_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError)

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class Pool:
    """Kept-alive connections to one server; :meth:`post` takes an idle one or opens another."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 120.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        self.timeout = timeout
        fields = {"Host": parts.netloc, "Content-Type": "application/json", **headers}
        for name, value in fields.items():
            if any(c in f"{name}{value}" for c in "\r\n"):
                raise ValueError(f"header {name}: a line break cannot be sent")
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fields.items()).encode("latin-1")
        self._idle: list[_Conn] = []
        self.opened = 0

    async def post(self, path: str, body: bytes) -> Answer:
        """``POST path`` with ``body``; raises one of :data:`TRANSPORT_ERRORS` when no answer came."""
        conn = self._idle.pop() if self._idle else None
        if conn is None:
            async with asyncio.timeout(self.timeout):
                conn = await asyncio.open_connection(
                    self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None
                )
            self.opened += 1
        reader, writer = conn
        try:
            async with asyncio.timeout(self.timeout):
                writer.write(
                    b"POST " + path.encode("ascii") + b" HTTP/1.1\r\n" + self._head
                    + b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
                )  # fmt: skip
                await writer.drain()
                status, length, chunked, close = _head(await reader.readuntil(b"\r\n\r\n"))
                if chunked:
                    data = await _chunks(reader)
                elif length is not None:
                    data = await reader.readexactly(length)
                else:  # no length: the body ends with the connection
                    data, close = await reader.read(), True
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self._idle.append(conn)
        return Answer(status, data)

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()


def _head(raw: bytes) -> tuple[int, int | None, bool, bool]:
    """(status, Content-Length, chunked, the server closes) of an answer's head."""
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    status = int(rest[:3])
    length: int | None = None
    chunked = False
    close = version == "HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            close = "close" in value if version != "HTTP/1.0" else "keep-alive" not in value
    return status, length, chunked, close


async def _chunks(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])
