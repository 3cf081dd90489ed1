"""The appliance's log lines: one line a record, whatever a client put in a name or a field.

A log line repeats what a request named (a model, a file, a header's value), and a newline in it
started a line of the client's choosing in the journal (``2026-12-07 11:41:08,349 ERROR forged: audit
disabled``).  :class:`OneLineFormatter` writes every control character of a record's message as an
escape (``\\n``, ``\\x00``); a traceback the record carries keeps its lines, and only the
exception's own words (``ValueError: <what a client sent>``) are escaped.
"""

from __future__ import annotations

import logging
import traceback
from types import TracebackType

__all__ = ["FORMAT", "OneLineFormatter", "configure", "one_line"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """``text`` with its control characters (tab aside) and Unicode line separators escaped."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose messages never span lines (:func:`one_line`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        message = record.message
        record.message = one_line(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def formatException(  # noqa: N802 (logging's name)
        self, ei: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
    ) -> str:
        if ei[1] is None:
            return super().formatException(ei)
        lines: list[str] = []
        for chunk in traceback.TracebackException.from_exception(ei[1]).format(chain=True):
            # the stack's lines and the chain's separators are Python's; the rest is an exception's
            # text (its message, its notes), which may hold a client's newline
            ours = chunk.startswith(("Traceback (most recent call last):", "  ", "\n"))
            lines.append(chunk if ours else one_line(chunk.rstrip("\n")) + "\n")
        return "".join(lines).rstrip("\n")


def configure(level: int | str) -> None:
    """The root logger at ``level``, writing one-line records to stderr (as :func:`logging.basicConfig`:
    nothing changes when the root logger has a handler already)."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler])
