"""uvicorn's HTTP protocol with deadlines for what a client owes: a request's headers
(``header_timeout_s``) and the reading of its answer (``body_timeout_s``).

uvicorn times out nothing before a request's headers are in: a connection that sends nothing, or
a few bytes of its headers and then nothing (one more byte now and then: "slowloris"), stays open
for as long as the client likes, holding a file descriptor.  Enough of them (a service's open-file
limit: 1024 by default, 65536 in inferbox-api.service), none sending a whole request, leave the
server unable to accept anyone.  uvicorn's keep-alive timeout does not help: it runs only after an
answer, and any byte stops it.

:class:`DeadlineProtocol` (uvicorn's httptools protocol, which ``serve`` passes as uvicorn's
``http`` option) gives each connection ``header_timeout_s`` from when it opens, and from each
answer sent on it, to get a request's headers in.  A request whose headers began but did not end
in time is answered 408 (``Connection: close``); a connection that sent nothing is closed
unanswered, as a keep-alive connection that went quiet is.  Between the headers and the answer
other limits hold: ``body_timeout_s`` (the body) and ``request_timeout_s`` (the batch queue).  The
rest of a body the app answered before reading it (a 401 to an upload) may go on arriving for
``body_timeout_s`` after the answer (closing at once would reset the connection under the client,
which may then never read its 401); then the connection is closed.  The deadline is kept within a
quarter of ``header_timeout_s`` (at most 1 s) of its time.

The other way round, a client that stops reading its answer held the bytes waiting for it (an
answer of 16 MB, the whole of it: uvicorn writes a body at once) and its connection for ever, and
closing would wait for it to read them.  After each answer (and whenever writing pauses), the
sweep follows it to the client (:mod:`appliance.socket_progress`: the bytes the client
acknowledged): one that acknowledges nothing more for ``body_timeout_s`` (at least 1 s) is reset;
a slow reader that keeps reading is not, and neither uvicorn's keep-alive close nor the idle close
here cuts an answer still on its way (under TLS, a close cut it 30 s later).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from appliance.settings import FIELDS
from appliance.socket_progress import acknowledged, outstanding, reset

__all__ = ["PROTOCOL", "DeadlineProtocol", "closed_connections", "configure"]

#: what ``serve`` passes as uvicorn's ``http`` option (an import string, so ``--workers`` processes
#: load it too)
PROTOCOL = "appliance.http_protocol:DeadlineProtocol"

#: the attributes of uvicorn's ``Config`` that carry ``header_timeout_s`` and ``body_timeout_s`` to the
#: protocol (uvicorn hands it its config alone; they go with it to ``--workers`` processes): :func:`configure`
HEADER_TIMEOUT_ATTRIBUTE = "inferbox_header_timeout_s"
BODY_TIMEOUT_ATTRIBUTE = "inferbox_body_timeout_s"
#: what the protocol takes without :func:`configure` (uvicorn started elsewhere): the settings' defaults
DEFAULTS = {f.name: float(f.default) for f in FIELDS if f.name in ("header_timeout_s", "body_timeout_s")}
#: a client gets at least this long to read some of its answer, whatever body_timeout_s says
MIN_READ_TIMEOUT_S = 1.0
#: the most bytes a request's line and headers may take (nginx reads 4 x 8 KiB, Node 16 KiB): uvicorn's
#: httptools mode set no bound, and its parser joins a header's pieces with ``+=``, so three
#: connections each sending a 60 MB header held the event loop for 5 s (no key needed)
MAX_HEAD_BYTES = 64 * 1024

log = logging.getLogger(__name__)

#: connections this process closed on a client's account, by reason (``/metrics``:
#: ``inferbox_connections_closed_total``): ``header_timeout`` (a 408), ``read_timeout`` (a reset: the
#: client read none of its answer), ``bad_request`` (bytes that are no HTTP request), ``header_too_large``
#: (a 431: headers over :data:`MAX_HEAD_BYTES`)
_CLOSED = {"header_timeout": 0, "read_timeout": 0, "bad_request": 0, "header_too_large": 0}


def closed_connections() -> dict[str, int]:
    """How many connections this process closed on a client's account, by reason (see ``_CLOSED``)."""
    return dict(_CLOSED)


def configure(config: Any, *, header_timeout_s: float, body_timeout_s: float) -> None:
    """Hand the deadlines to :class:`DeadlineProtocol` on uvicorn's ``config`` (all it gets)."""
    setattr(config, HEADER_TIMEOUT_ATTRIBUTE, float(header_timeout_s))
    setattr(config, BODY_TIMEOUT_ATTRIBUTE, float(body_timeout_s))


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request's headers must arrive within ``header_timeout_s``, and
    a client must keep reading its answer (``body_timeout_s``).

    No timer per request: each connection notes its deadline, and one sweep per server, a few times
    per ``header_timeout_s``, expires those past it.  (Measured on an app that answers "ok", wrk
    -c32, this box: a timer armed and cancelled per request cost 17 % of uvicorn's requests per
    second, about 5 us a request; the sweep costs 4-6 %, 1-2 us, which is 0.1 to 0.3 % of a
    served inference request's time on the event loop.)
    """

    _deadline: float | None = None  # loop time by which this connection must have sent what it owes
    _answering = False  # an answer may still be on its way to the client (see _watch_reader)
    _read_deadline: float | None = None  # loop time by which the client must have read more of it
    _progress: int | None = None  # how far it had got then (bytes acknowledged, or minus those waiting)
    _begun = False  # a request's first bytes are in, its headers not yet all
    _body_pending = False  # the newest request's headers are in, its body not yet all
    _head_bytes: int | None = 0  # bytes come in since a request's head began (None: a body is coming)
    _quiet_bytes = 0  # bytes come in during a body since the last of it reached the app (trailers, extensions)
    _head_size = 0  # the request line's and header fields' bytes, as the parser hands them over
    _oversize = False  # the request's head (or trailers) went over MAX_HEAD_BYTES
    _draining = False  # refused: what the client still sends is dropped unparsed until it stops
    _refusal: tuple[bytes, str] | None = None  # an answer that waits for the answers before it

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._header_timeout = float(getattr(config, HEADER_TIMEOUT_ATTRIBUTE, DEFAULTS["header_timeout_s"]))
        self._body_timeout = float(getattr(config, BODY_TIMEOUT_ATTRIBUTE, DEFAULTS["body_timeout_s"]))
        self._read_timeout = max(MIN_READ_TIMEOUT_S, self._body_timeout)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._deadline = self.loop.time() + self._header_timeout
        _Sweep.watch(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0
        self._begun = True
        if self._deadline is None:  # pipelined behind a request being answered
            self._deadline = self.loop.time() + self._header_timeout

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with a bound on a request's head: over :data:`MAX_HEAD_BYTES` of it is a 431.

        The parser hands a header field over only once it is whole (joining its pieces with ``+=``),
        so a head is also counted as it arrives: in whole reads from where a head may begin (the end
        of the request before it), reset when the head ends; and during a body, the reads since the
        last of the body reached the app (chunked trailers and chunk extensions are no body).  A
        read that also holds a body or pipelined requests does not count against them."""
        if self._draining:
            return  # not parsed: the connection ends when the client stops or its time is up
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        elif self._body_pending:
            self._quiet_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing() or self._draining:
            return
        if (self._head_bytes or 0) > MAX_HEAD_BYTES or (self._body_pending and self._quiet_bytes > MAX_HEAD_BYTES):
            self._oversize = True
            self.send_400_response("")

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))  # trailers too: the parser calls this for them
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        """A head that arrived in one read is over the bound once parsed (the reads' count saw it end)."""
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            self._oversize = True
            raise _HeadTooLarge("the request's line and headers are too large")  # uvicorn: send_400_response

    def on_body(self, body: bytes) -> None:
        self._quiet_bytes = 0
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self._head_bytes, self._quiet_bytes = None, 0
        self._begun = False
        self._body_pending = True
        self._deadline = None  # the body is the app's (body_timeout_s), the answer the batcher's
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_bytes = 0  # the next request's head may begin here
        self._body_pending = False
        if self.cycle is not None and self.cycle.response_complete:  # answered before its body was all in
            self._deadline = self.loop.time() + self._header_timeout  # the next request's headers, from now
        super().on_message_complete()

    def on_response_complete(self) -> None:
        started_next = bool(self.pipeline)  # super() starts a request pipelined behind this one
        super().on_response_complete()
        self._answering = True  # the sweep looks whether it reached the client (a flag here: no syscall)
        if started_next or self.transport.is_closing():
            return
        if self._refusal is not None:  # the refusal of a request behind it, now in its turn
            status, error = self._refusal
            self._refusal = None
            self._answer_and_drain(status, error)
            return
        # the next request's headers, from this answer (uvicorn's keep-alive timer ends at a byte); or
        # the rest of a body the app answered early (a 401 to an upload): as long as a body may take
        self._deadline = self.loop.time() + (self._body_timeout if self._body_pending else self._header_timeout)

    def pause_writing(self) -> None:
        """More of an answer waits for the client than the transport's high-water mark."""
        super().pause_writing()
        self._answering = True

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn's idle close, not while an answer is still on its way: under TLS, closing sends
        close_notify, and asyncio cut a slow reader's download 30 s later (ssl_shutdown_timeout)."""
        if not self.transport.is_closing() and outstanding(self.transport) > 0:
            self._answering = True
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
            return
        super().timeout_keep_alive_handler()

    def send_400_response(self, msg: str) -> None:
        """Bytes that are no HTTP request: 400 in the API's error shape (uvicorn's is plain text); a
        head over :data:`MAX_HEAD_BYTES`: 431."""
        self._deadline = None
        if self._oversize:
            _CLOSED["header_too_large"] += 1
            self._refuse(
                b"431 Request Header Fields Too Large",
                f"the request's line and headers are over {MAX_HEAD_BYTES // 1024} KiB; send a shorter path or "
                "fewer or shorter headers",
            )
        else:
            _CLOSED["bad_request"] += 1
            self._refuse(b"400 Bad Request", f"not an HTTP/1.1 request the server can read: {msg}")

    def _refuse(self, status: bytes, error: str) -> None:
        """Answer a request the server cannot read, in its turn: nothing more is parsed; written now,
        or once the answers to the requests before it are out (written ahead, it would read as their
        answer, and theirs would fail); a request whose body its app is still reading is cut off."""
        self._draining = True
        answering = self.cycle is not None and not self.cycle.response_complete
        if answering and self._body_pending:  # its app waits for a body that will not come
            self.transport.close()
        elif answering or self.pipeline:
            self._refusal = (status, error)
        else:
            self._answer_and_drain(status, error)

    def _headers_late(self, now: float) -> bool:
        return self._deadline is not None and now >= self._deadline

    def _watch_reader(self, now: float) -> int | None:
        """Reset the connection if its client read none of its answer for ``body_timeout_s``: the
        bytes that waited for it; None while it reads (or has all of it)."""
        waiting = outstanding(self.transport)
        if waiting == 0 and (self.transport.is_closing() or not self.flow.write_paused):
            self._answering, self._read_deadline, self._progress = False, None, None
            self._delivered(now)
            return None
        got = acknowledged(self.transport)
        mark = got if got is not None else -waiting
        if self._progress is None or self._read_deadline is None or mark > self._progress:
            self._progress, self._read_deadline = mark, now + self._read_timeout
            return None
        if now < self._read_deadline:
            return None
        self._answering, self._read_deadline, self._deadline = False, None, None
        _CLOSED["read_timeout"] += 1
        reset(self.transport)  # close() would wait for the client to read them
        return waiting

    def _delivered(self, now: float) -> None:
        """The answer is all in: the client's time for its next request's headers, and uvicorn's
        keep-alive, count from now.  Postponed while the answer was on its way, either could fall due
        a moment after a slow reader got its last byte, and close under its next request."""
        if self.transport.is_closing() or self._begun or self._deadline is None:
            return
        self._deadline = max(self._deadline, now + self._header_timeout)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _expire(self) -> bool:
        """Close the connection (408 when a request's headers began); whether a 408 was sent."""
        if self.transport.is_closing() or self._draining:
            self._deadline = None
            self.transport.close()
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False  # an answer is being made (a request pipelined behind it began): looked at again later
        if not self._begun and outstanding(self.transport) > 0:
            # idle only once its answer is in; the watch goes on (under TLS the kernel's queue can run
            # dry for a moment while the TCP transport beneath still holds megabytes)
            self._deadline = self.loop.time() + self._header_timeout
            self._answering = True
            return False
        self._deadline = None
        if not self._begun:
            self.transport.close()  # nothing sent since it opened or since the last answer; or a body stalled
            return False
        _CLOSED["header_timeout"] += 1
        self._close_with(
            b"408 Request Timeout",
            f"the request's headers did not arrive in full within {self._header_timeout:g} s (header_timeout_s); "
            "send them at once",
        )
        return True

    def _close_with(self, status: bytes, error: str) -> None:
        """Answer ``{"error": error}`` with ``status`` and close: no request reached the app to answer it."""
        self.transport.write(self._error_answer(status, error))
        self.transport.close()

    def _answer_and_drain(self, status: bytes, error: str) -> None:
        """Answer ``{"error": error}`` with ``status`` while the client is still sending: closing with its
        bytes unread would reset the connection, and the client might never read the answer.  What it
        sends on is dropped unparsed; the connection ends when it closes, or a header time from now."""
        self.transport.write(self._error_answer(status, error))
        self._draining = True
        if not self.transport.can_write_eof():  # TLS: no half-close; the answer goes, then the connection
            self.transport.close()
            return
        self.transport.write_eof()  # the answer is all: a client reading it sees the end at once
        self._deadline = self.loop.time() + self._header_timeout

    def _error_answer(self, status: bytes, error: str) -> bytes:
        body = json.dumps({"error": error}).encode()
        head = [b"HTTP/1.1 " + status + b"\r\n"]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        head.append(b"connection: close\r\n\r\n")
        return b"".join(head) + body


class _HeadTooLarge(httptools.HttpParserError):
    """Raised from a parser callback: uvicorn answers any parser error with ``send_400_response``."""


class _Sweep:
    """A server's look at its connections every quarter ``header_timeout_s`` (at most every second,
    at least every 50 ms), while it has any: those past their deadline are expired.  One warning per
    look names the clients answered 408 (a few thousand stalled clients are a few lines a second)."""

    def __init__(self, protocol: DeadlineProtocol) -> None:
        self.loop = protocol.loop
        self.connections = protocol.connections
        self.timeout = protocol._header_timeout
        self.read_timeout = protocol._read_timeout
        self.period = max(0.05, min(1.0, self.timeout / 4))
        self.handle: asyncio.TimerHandle | None = self.loop.call_later(self.period, self.run)

    @staticmethod
    def watch(protocol: DeadlineProtocol) -> None:
        state = protocol.server_state
        sweep: _Sweep | None = getattr(state, _SWEEP_ATTRIBUTE, None)
        if sweep is None or sweep.handle is None:  # none yet, or it stopped when the last connection went
            setattr(state, _SWEEP_ATTRIBUTE, _Sweep(protocol))

    def run(self) -> None:
        self.handle = None
        now = self.loop.time()
        answered: list[str] = []
        reset: list[str] = []
        waiting = 0
        for connection in list(self.connections):
            if not isinstance(connection, DeadlineProtocol):
                continue
            try:
                if connection._answering and (dropped := connection._watch_reader(now)) is not None:
                    waiting += dropped
                    reset.append(_address(connection))
                elif connection._headers_late(now) and connection._expire():
                    answered.append(_address(connection))
            except Exception:  # one connection's failure stops no other's deadline
                log.exception("closing a connection past its deadline failed")
        if answered:
            log.warning(
                "%s sent part of a request's headers and not the rest within %g s (header_timeout_s): answered 408",
                _some(answered),
                self.timeout,
            )
        if reset:
            log.warning(
                "%s read none of its answer for %g s (body_timeout_s), %d bytes waiting: connection reset",
                _some(reset),
                self.read_timeout,
                waiting,
            )
        if self.connections:
            self.handle = self.loop.call_later(self.period, self.run)


def _address(connection: DeadlineProtocol) -> str:
    client = connection.client
    if not client:
        return "a client"
    host = f"[{client[0]}]" if ":" in client[0] else client[0]
    return f"{host}:{client[1]}"


def _some(clients: list[str]) -> str:
    """One client's address, or how many and the first three."""
    return clients[0] if len(clients) == 1 else f"{len(clients)} clients ({', '.join(clients[:3])}, ...)"


#: the attribute of uvicorn's per-server state that holds its :class:`_Sweep`
_SWEEP_ATTRIBUTE = "inferbox_header_sweep"
