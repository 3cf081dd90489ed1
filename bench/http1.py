"""A lean HTTP/1.1 client on asyncio streams, for the open loop.

At 300 requests/s on the 2-core test box httpx took 1.6-4.1 ms of CPU a
request and this client 0.27-0.31 ms (three rounds each, the same server).  An
appliance that is its own only machine (no network out) runs its load test
beside the server, where httpx would take half a core or more from what it
measures.

It does what the load test needs and nothing more: POST a body over kept-alive
connections, plain or TLS (the caller's :class:`ssl.SSLContext`: its CAs and
client certificate), and read the answer's status and body (``Content-Length``,
chunked, none for 1xx / 204 / 304, or up to the connection's close).  A
connection goes back to the pool only when its answer ended exactly where the
server said; one the server closed while idle (uvicorn closes them after 5 s)
is noticed and the request sent again on a fresh one.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["TRANSPORT_ERRORS", "Answer", "Pool"]

#: what a failed exchange raises (a refused or dropped connection, a garbled or late answer)
TRANSPORT_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError)
#: what a kept-alive connection the server closed while idle raises on its next request
_STALE = (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError)

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


@dataclass(frozen=True)
class _Head:
    status: int
    length: int | None
    chunked: bool
    close: bool


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
        try:
            host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{parts.hostname!r} is not a host name") from None
        self.host = host
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        self.timeout = timeout
        shown = f"[{host}]" if ":" in host else host
        fields = {
            "Host": shown if parts.port is None else f"{shown}:{parts.port}",
            "Content-Type": "application/json",
            **headers,
        }
        for name, value in fields.items():
            if any(c in f"{name}{value}" for c in "\r\n"):
                raise ValueError(f"header {name}: a line break cannot be sent")
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fields.items()).encode("latin-1")
        self._idle: list[_Conn] = []
        self.opened = 0
        #: requests sent again on a new connection: a kept-alive one closed before any answer byte
        #: (a server's idle close; or a server that read the request and closed without answering,
        #: which then saw it twice)
        self.resent = 0

    async def _open(self) -> _Conn:
        async with asyncio.timeout(self.timeout):
            conn = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None
            )
        self.opened += 1
        return conn

    def _take(self) -> _Conn | None:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()  # the server closed it while it was idle
        return None

    async def post(self, path: str, body: bytes) -> Answer:
        """``POST path`` with ``body``; raises one of :data:`TRANSPORT_ERRORS` when no answer came."""
        request = (
            b"POST " + path.encode("ascii") + b" HTTP/1.1\r\n" + self._head
            + b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
        )  # fmt: skip
        conn = self._take()
        if conn is not None:
            try:
                return await self._exchange(conn, request)
            except _STALE as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise  # an answer began: the server did answer, badly
                # closed by the server between our last answer and this request: send it again
                fresh = await self._open()
                self.resent += 1  # counted once it can go out again
                return await self._exchange(fresh, request)
        return await self._exchange(await self._open(), request)

    async def _exchange(self, conn: _Conn, request: bytes) -> Answer:
        reader, writer = conn
        try:
            async with asyncio.timeout(self.timeout):
                writer.write(request)
                await writer.drain()
                head = _head(await reader.readuntil(b"\r\n\r\n"))
                while 100 <= head.status < 200:  # 100 Continue and the like: the answer follows
                    head = _head(await reader.readuntil(b"\r\n\r\n"))
                close = head.close
                if head.status in (204, 304):
                    data = b""
                elif head.chunked:
                    data = await _chunks(reader)
                elif head.length is not None:
                    data = await reader.readexactly(head.length)
                else:  # no length: the body ends with the connection
                    data, close = await reader.read(), True
        except BaseException:
            writer.close()
            raise
        # bytes past the end the server gave would be read as the next answer: never reuse that
        if close or _buffered(reader):
            writer.close()
        else:
            self._idle.append(conn)
        return Answer(head.status, data)

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes the reader holds that no answer claimed (StreamReader has no public way to ask)."""
    return len(getattr(reader, "_buffer", b""))


def _head(raw: bytes) -> _Head:
    """The parts of an answer's head the client acts on; ValueError for what it cannot trust."""
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    status = int(rest[:3])
    lengths: set[int] = set()
    chunked = False
    connection = ""
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise ValueError("a folded header line (obsolete in HTTP/1.1)")
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            lengths.update(int(v) for v in value.split(","))
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            connection = value
    if len(lengths) > 1:
        raise ValueError(f"conflicting Content-Length values {sorted(lengths)}")
    close = "close" in connection if version == "HTTP/1.1" else "keep-alive" not in connection
    return _Head(status, lengths.pop() if lengths else None, chunked, close)


async def _chunks(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])
