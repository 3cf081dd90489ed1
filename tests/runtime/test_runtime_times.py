"""The one time format of the records: fixed width, so strings order as their times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from runtime.times import parse_utc_iso, utc_iso


def test_a_whole_second_keeps_its_microseconds_and_strings_order_as_times() -> None:
    whole = datetime(2026, 12, 7, 20, 0, 33, tzinfo=UTC)
    assert utc_iso(whole) == "2026-12-07T20:00:33.000000Z"
    assert utc_iso(whole.timestamp()) == utc_iso(whole)
    later = whole + timedelta(microseconds=500_000)
    assert utc_iso(whole) < utc_iso(later)  # isoformat()'s "...:33Z" sorted after "...:33.5Z"
    assert parse_utc_iso(utc_iso(later)) == later


def test_another_zone_is_written_in_utc_and_a_naive_time_is_refused() -> None:
    paris = datetime(2026, 12, 7, 21, 0, tzinfo=timezone(timedelta(hours=1)))
    assert utc_iso(paris) == "2026-12-07T20:00:00.000000Z"
    with pytest.raises(ValueError, match="naive"):
        utc_iso(datetime(2026, 12, 7, 20, 0))
