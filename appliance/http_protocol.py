"""uvicorn's HTTP protocol with a deadline for a request's headers (``header_timeout_s``).

uvicorn times out nothing before a request's headers are in: a connection that sends nothing, or
a few bytes of its headers and then nothing (one more byte now and then: "slowloris"), stays open
for as long as the client likes, holding a file descriptor and a place among the connections.  A
few hundred such clients, none sending a whole request, leave the API answering no one.  Its
keep-alive timeout does not help: it runs only after an answer, and any byte stops it.

:class:`HeaderDeadlineProtocol` (uvicorn's httptools protocol, which ``serve`` passes as uvicorn's
``http`` option) gives each connection ``header_timeout_s`` from when it opens, and from each
answer sent on it, to get a request's headers in.  A request whose headers began but did not end
in time is answered 408 (``Connection: close``); a connection that sent nothing is closed
unanswered, as a keep-alive connection that went quiet is.  Between the headers and the answer
other limits hold: ``body_timeout_s`` (the body) and ``request_timeout_s`` (the batch queue).
"""

from __future__ import annotations

import asyncio
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
    """uvicorn's httptools protocol; a request's headers must arrive within ``header_timeout_s``."""

    _deadline: asyncio.TimerHandle | None = None
    _in_headers = False  # a request's first bytes are in, its headers not yet all

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._header_timeout = float(getattr(config, HEADER_TIMEOUT_ATTRIBUTE, DEFAULT_HEADER_TIMEOUT_S))

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._arm()  # already armed, unless the request was pipelined behind one being answered

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline and not self.transport.is_closing():
            self._arm()  # the next request's headers (uvicorn's keep-alive timer ends at the first byte)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self._header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm()  # an answer is being made (a pipelined request began behind it): look again later
            return
        if not self._in_headers:
            self.transport.close()  # nothing sent since it opened (or since the last answer)
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning(
            "%s sent part of a request's headers and not the rest within %g s (header_timeout_s): answered 408",
            client,
            self._header_timeout,
        )
        message = (
            f'{{"error": "the request\'s headers did not arrive in full within {self._header_timeout:g} s '
            '(header_timeout_s); send them at once"}'
        ).encode()
        head = [b"HTTP/1.1 408 Request Timeout\r\n"]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(message))
        head.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(head) + message)
        self.transport.close()
