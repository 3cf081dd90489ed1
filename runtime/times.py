"""The one time format of every record inferbox writes: UTC ISO 8601 with microseconds and ``Z``
(``2026-12-07T20:45:15.776593Z``).  Always the same width, so two such strings order as their times
do (``isoformat()`` drops the microseconds when they are 0, and ``...:33Z`` sorts after
``...:33.5Z``)."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["ISO_FORMAT", "parse_utc_iso", "utc_iso"]

ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def utc_iso(moment: datetime | float | None = None) -> str:
    """``moment`` (an aware datetime, or a POSIX timestamp; now when ``None``) in the one format."""
    if moment is None:
        moment = datetime.now(UTC)
    elif isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, UTC)
    elif moment.tzinfo is None:
        raise ValueError("a naive datetime has no known UTC time; pass an aware one")
    return moment.astimezone(UTC).strftime(ISO_FORMAT)


def parse_utc_iso(text: str) -> datetime:
    """A time written by :func:`utc_iso`, back (aware, UTC)."""
    return datetime.strptime(text, ISO_FORMAT).replace(tzinfo=UTC)
