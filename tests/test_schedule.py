"""Schedules: crontab translation, next and missed fire times, time zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mt5backupd.daemon.schedule import crontab_weekdays, make_trigger, missed_fire, next_fire


def test_system_timezone_keeps_dst_rules(tmp_path: Path) -> None:
    """The system zone comes from $TZ or the /etc/localtime link as a real zone (with DST),
    not as today's fixed offset."""
    from zoneinfo import ZoneInfo

    from mt5backupd.daemon.schedule import make_trigger, system_timezone

    assert system_timezone({"TZ": "Europe/Athens"}) == ZoneInfo("Europe/Athens")
    link = tmp_path / "localtime"
    link.symlink_to("/usr/share/zoneinfo/America/New_York")
    assert system_timezone({}, link) == ZoneInfo("America/New_York")
    trigger = make_trigger("0 3 * * *", system_timezone({"TZ": "Europe/Athens"}))
    winter = datetime(2026, 1, 10, 12, tzinfo=UTC)
    summer = datetime(2026, 7, 10, 12, tzinfo=UTC)
    # 03:00 Athens is 01:00 UTC in winter and 00:00 UTC in summer
    assert trigger.get_next_fire_time(None, winter).astimezone(UTC).hour == 1
    assert trigger.get_next_fire_time(None, summer).astimezone(UTC).hour == 0


UTC_NOW = datetime(2026, 11, 25, 3, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("field", "expected"),
    [("*", "*"), ("0", "sun"), ("7", "sun"), ("1-5", "mon,tue,wed,thu,fri"),
     ("0,6", "sun,sat"), ("*/2", "sun,tue,thu,sat"), ("mon-fri", "mon-fri"),
     ("5-7", "fri,sat,sun")],
)
def test_crontab_weekdays(field: str, expected: str) -> None:
    """Crontab weekday numbers (0/7 = Sunday) are translated for APScheduler (0 = Monday)."""
    assert crontab_weekdays(field) == expected


@pytest.mark.parametrize(
    ("expr", "tz", "now", "expected"),
    [
        ("0 3 * * *", "UTC", UTC_NOW, datetime(2026, 11, 26, 3, 0, tzinfo=UTC)),
        # 03:00 in Athens is 01:00 UTC
        ("0 3 * * *", "Europe/Athens", UTC_NOW, datetime(2026, 11, 26, 1, 0, tzinfo=UTC)),
        ("0 4 * * 0", "UTC", UTC_NOW, datetime(2026, 11, 29, 4, 0, tzinfo=UTC)),  # a Sunday
        ("*/10 * * * * *", "UTC", UTC_NOW, datetime(2026, 11, 25, 3, 0, 30, tzinfo=UTC)),
    ],
)
def test_next_fire(expr: str, tz: str, now: datetime, expected: datetime) -> None:
    """Next run times honour the operator's time zone and crontab's Sunday = 0."""
    fire = next_fire(make_trigger(expr, tz), now)
    assert fire is not None
    assert fire == expected


@pytest.mark.parametrize(
    ("last_run", "grace_s", "missed"),
    [
        (None, 3600, True),  # never ran, 03:00 passed 30 s ago
        (UTC_NOW - timedelta(days=1), 3600, True),  # yesterday's run does not cover today
        (UTC_NOW - timedelta(seconds=20), 3600, False),  # today's ran already
        (None, 10, False),  # outside the grace period: wait for the next one
    ],
)
def test_missed_fire(last_run: datetime | None, grace_s: float, missed: bool) -> None:
    """A run missed while down is made up once, only within misfire_grace_s."""
    fire = missed_fire(make_trigger("0 3 * * *", "UTC"), UTC_NOW, last_run, grace_s)
    assert (fire is not None) is missed
