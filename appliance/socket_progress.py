"""How far an answer has got to the client, from the kernel: what a server needs to tell a slow
reader from one that stopped reading.

The event loop's write buffer alone does not tell: it shrinks only when the kernel takes more,
in steps of a third of the socket's send buffer (1.4 MB measured), so a client reading 200 kB/s
looked as if it read nothing for seconds; and under TLS the answer sits in the buffer of the TCP
transport beneath, which the protocol's transport does not show.  The kernel counts the bytes the
client acknowledged (Linux ``TCP_INFO``'s ``tcpi_bytes_acked``, a count that only grows) and the
bytes it holds unacknowledged (``TIOCOUTQ``).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
from typing import Any

__all__ = ["acknowledged", "outstanding", "reset"]

try:
    import fcntl
    import termios

    _TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
except ImportError:  # pragma: no cover - not on a Unix
    _TIOCOUTQ = None

#: ``struct tcp_info``'s ``tcpi_bytes_acked`` (Linux 4.1+): 8 bytes of u8 fields, 24 u32, then the u64s
#: pacing_rate, max_pacing_rate, bytes_acked
_BYTES_ACKED_OFFSET = 120
_TCP_INFO_SIZE = 136


def _socket(transport: Any) -> Any:
    return transport.get_extra_info("socket")


def outstanding(transport: Any) -> int:
    """Bytes written and not yet acknowledged by the client: the transport's buffer and the kernel's
    send queue (under TLS, the latter stays non-zero while the TCP transport beneath has more)."""
    waiting = int(transport.get_write_buffer_size())
    sock = _socket(transport)
    if sock is not None and _TIOCOUTQ is not None:
        with contextlib.suppress(OSError, ValueError):
            waiting += struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
    return waiting


def acknowledged(transport: Any) -> int | None:
    """Bytes the client has acknowledged on this connection so far; None where the kernel does not say."""
    sock = _socket(transport)
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None or not sys.platform.startswith("linux"):  # the layout is Linux's
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_SIZE)
    except (OSError, ValueError, AttributeError):
        return None
    if len(info) < _BYTES_ACKED_OFFSET + 8:  # a kernel older than 4.1
        return None
    return int(struct.unpack_from("Q", info, _BYTES_ACKED_OFFSET)[0])


def reset(transport: Any) -> None:
    """Drop the connection and what waits for the client, in the kernel too.  ``abort()`` alone
    closes the descriptor, and the kernel goes on offering the client its send queue (2.8 MB
    measured) for minutes; with ``SO_LINGER`` 0 the close is a reset."""
    sock = _socket(transport)
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
