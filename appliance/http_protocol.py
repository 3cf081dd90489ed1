"""uvicorn's HTTP protocol with a deadline for a request's headers (``header_timeout_s``).

uvicorn times out nothing before a request's headers are in: a connection that sends nothing, or
a few bytes of its headers and then nothing (one more byte now and then: "slowloris"), stays open
for as long as the client likes, holding a file descriptor.  Enough of them (a service's open-file
limit: 1024 by default, 65536 in inferbox-api.service), none sending a whole request, leave the
server unable to accept anyone.  uvicorn's keep-alive timeout does not help: it runs only after an
answer, and any byte stops it.

:class:`HeaderDeadlineProtocol` (uvicorn's httptools protocol, which ``serve`` passes as uvicorn's
``http`` option) gives each connection ``header_timeout_s`` from when it opens, and from each
answer sent on it, to get a request's headers in.  A request whose headers began but did not end
in time is answered 408 (``Connection: close``); a connection that sent nothing is closed
unanswered, as a keep-alive connection that went quiet is.  Between the headers and the answer
other limits hold: ``body_timeout_s`` (the body) and ``request_timeout_s`` (the batch queue).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["DEFAULT_HEADER_TIMEOUT_S", "HEADER_TIMEOUT_ATTRIBUTE", "PROTOCOL", "HeaderDeadlineProtocol"]

#: what ``serve`` passes as uvicorn's ``http`` option (an import string, so ``--workers`` processes
#: load it too)
PROTOCOL = "appliance.http_protocol:HeaderDeadlineProtocol"

#: the attribute of uvicorn's ``Config`` that carries ``header_timeout_s`` to the protocol (uvicorn
#: hands the protocol its config alone; the attribute goes with it to ``--workers`` processes)
HEADER_TIMEOUT_ATTRIBUTE = "inferbox_header_timeout_s"
DEFAULT_HEADER_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request's headers must arrive within ``header_timeout_s``.

    No timer per request: each connection notes since when it owes headers, and one sweep per
    server, a few times per ``header_timeout_s``, expires those past their deadline.  (Measured on
    an app that answers "ok", wrk -c32, this box: a timer armed and cancelled per request cost 17 %
    of uvicorn's requests per second, about 5 us a request; the sweep costs about 4 %, 1 us, which
    is 0.1 to 0.3 % of a served inference request's time on the event loop.)
    """

    _owed_since: float | None = None  # loop time since which this connection owes a request's headers
    _begun = False  # a request's first bytes are in, its headers not yet all

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._header_timeout = float(getattr(config, HEADER_TIMEOUT_ATTRIBUTE, DEFAULT_HEADER_TIMEOUT_S))

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._owed_since = self.loop.time()
        _Sweep.watch(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self._owed_since is None:  # pipelined behind a request being answered
            self._owed_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._begun = False
        self._owed_since = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._owed_since is None and not self.pipeline:
            self._owed_since = self.loop.time()  # the next request's (uvicorn's keep-alive timer ends at a byte)

    def send_400_response(self, msg: str) -> None:
        """Bytes that are no HTTP request: 400 in the API's error shape (uvicorn's is plain text)."""
        self._owed_since = None
        self._close_with(b"400 Bad Request", f"not an HTTP/1.1 request the server can read: {msg}")

    def _late(self, now: float) -> bool:
        return self._owed_since is not None and now - self._owed_since >= self._header_timeout

    def _expire(self) -> None:
        if self.transport.is_closing():
            self._owed_since = None
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # an answer is being made (a request pipelined behind it began): looked at again later
        self._owed_since = None
        if not self._begun:
            self.transport.close()  # nothing sent since it opened (or since the last answer)
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning(
            "%s sent part of a request's headers and not the rest within %g s (header_timeout_s): answered 408",
            client,
            self._header_timeout,
        )
        self._close_with(
            b"408 Request Timeout",
            f"the request's headers did not arrive in full within {self._header_timeout:g} s (header_timeout_s); "
            "send them at once",
        )

    def _close_with(self, status: bytes, error: str) -> None:
        """Answer ``{"error": error}`` with ``status`` and close: no request reached the app to answer it."""
        body = json.dumps({"error": error}).encode()
        head = [b"HTTP/1.1 " + status + b"\r\n"]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        head.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(head) + body)
        self.transport.close()


class _Sweep:
    """A server's look at its connections every quarter ``header_timeout_s`` (at most every second),
    while it has any: those that owe headers past their deadline are expired."""

    def __init__(self, protocol: HeaderDeadlineProtocol) -> None:
        self.loop = protocol.loop
        self.connections = protocol.connections
        self.period = min(1.0, protocol._header_timeout / 4)
        self.handle: asyncio.TimerHandle | None = self.loop.call_later(self.period, self.run)

    @staticmethod
    def watch(protocol: HeaderDeadlineProtocol) -> None:
        state = protocol.server_state
        sweep: _Sweep | None = getattr(state, _SWEEP_ATTRIBUTE, None)
        if sweep is None or sweep.handle is None or sweep.loop is not protocol.loop:
            setattr(state, _SWEEP_ATTRIBUTE, _Sweep(protocol))

    def run(self) -> None:
        self.handle = None
        now = self.loop.time()
        try:
            for connection in list(self.connections):
                if isinstance(connection, HeaderDeadlineProtocol) and connection._late(now):
                    connection._expire()
        finally:  # one connection's failure (logged by the loop) stops no other's deadline
            if self.connections:
                self.handle = self.loop.call_later(self.period, self.run)


#: the attribute of uvicorn's per-server state that holds its :class:`_Sweep`
_SWEEP_ATTRIBUTE = "inferbox_header_sweep"
