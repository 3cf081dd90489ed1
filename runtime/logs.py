"""The appliance's log lines: one line a record, whatever a client put in a name or a field.

A log line repeats what a request named (a model, a file, a header's value), and a newline in it
started a line of the client's choosing in the journal (``2026-12-07 11:41:08,349 ERROR forged: audit
disabled``).  :class:`OneLineFormatter` writes every control character of a record's message as an
escape (``\\n``, ``\\x00``); a traceback the record carries keeps its lines, and only the
exception's own words (``ValueError: <what a client sent>``) are escaped.

Under systemd, with stderr connected to the journal (``JOURNAL_STREAM`` names it), each line
starts with its syslog priority (``<3>`` an error, ``<4>`` a warning, ``<6>`` info: sd-daemon(3)),
which journald reads as the entry's priority: without it every line was priority info, and
``journalctl -p err -u inferbox-api`` found none of the service's errors.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from types import TracebackType
from typing import IO

__all__ = [
    "FORMAT",
    "SHOWN_NAMES",
    "JournalFormatter",
    "OneLineFormatter",
    "configure",
    "error_prefix",
    "one_line",
    "to_journal",
]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: a logger's name as a line shows it
SHOWN_NAMES = {"uvicorn.error": "uvicorn"}

_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """``text`` with its control characters (tab aside) and Unicode line separators escaped."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose messages never span lines (:func:`one_line`)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        message, name = record.message, record.name
        record.message = one_line(message)
        # uvicorn logs its start, its stop and its INFO lines as "uvicorn.error" (serve hands uvicorn's
        # loggers to the root logger): a grep for errors found every start
        record.name = SHOWN_NAMES.get(name, name)
        try:
            return super().formatMessage(record)
        finally:
            record.message, record.name = message, name

    def format(self, record: logging.LogRecord) -> str:
        # the traceback text another handler's formatter left on the record (``exc_text``) is not
        # escaped: format it here every time, and leave the record as it was
        cached = record.exc_text
        record.exc_text = None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatException(  # noqa: N802 (logging's name)
        self, ei: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
    ) -> str:
        if ei[1] is None:
            return super().formatException(ei)
        lines: list[str] = []
        words: list[str] = []  # an exception's text, chunk by chunk (Python yields a note line by line)
        for chunk in traceback.TracebackException.from_exception(ei[1]).format(chain=True):
            # the stack's frames, its headers and the chain's and groups' separators are Python's;
            # every other chunk is an exception's text (its message, its notes, a grouped exception's
            # message), which may hold a client's newline: one line each run of them
            if _PYTHONS.fullmatch(chunk) is None:
                words.append(chunk)
                continue
            if words:
                lines.append(one_line("".join(words).rstrip("\n")) + "\n")
                words.clear()
            lines.append(chunk)
        if words:
            lines.append(one_line("".join(words).rstrip("\n")))
        return "".join(lines).rstrip("\n")


#: a chunk of :meth:`traceback.TracebackException.format` that Python writes, not an exception's text
#: (the margins ``  | `` and ``+`` are an exception group's)
_PYTHONS = re.compile(
    r"[ |+]*(?:Exception Group )?Traceback \(most recent call last\):\n"
    r"|[ |]*File \"[^\n]*\", line \d+, in [^\n]*\n(?:[ |]*    [^\n]*\n)*"
    r"|[ |]*\[Previous line repeated \d+ more times?\]\n"
    r"|[ |]*\n[ |]*(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)\n[ |]*\n"
    r"|[ |]*\+-+(?: (?:\d+|\.\.\.) -+)?\n"
    r"|[ |]*and \d+ more exceptions?\n",
)


class JournalFormatter(OneLineFormatter):
    """:class:`OneLineFormatter` with each line's syslog priority first (``<3>``), as journald reads it;
    every line of a traceback too (journald takes each line as an entry)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def _priority(level: int) -> int:
    """The syslog priority of a logging level (critical 2, error 3, warning 4, info 6, debug 7)."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    return 6 if level >= logging.INFO else 7


def to_journal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (stderr) is the journal's: ``JOURNAL_STREAM`` names its device and inode (a
    command run by hand from a service's shell inherits the variable, not the stream)."""
    named = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = named.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream if stream is not None else sys.stderr).fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def error_prefix() -> str:
    """``<3>`` (the syslog priority err) when stderr is the journal, else nothing: for a command's own
    ``error: ...`` line (a unit's fatal refusal went to the journal as info: ``journalctl -p err`` did
    not show why the unit failed)."""
    return f"<{_priority(logging.ERROR)}>" if to_journal() else ""


def configure(level: int | str) -> None:
    """The root logger at ``level``, writing one-line records to stderr (as :func:`logging.basicConfig`:
    nothing changes when the root logger has a handler already); with priorities under systemd."""
    handler = logging.StreamHandler()
    handler.setFormatter(JournalFormatter(FORMAT) if to_journal(handler.stream) else OneLineFormatter(FORMAT))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler])
