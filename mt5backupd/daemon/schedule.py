"""Schedules (pure): cron expressions in the operator's time zone, next and missed fire times."""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from mt5backupd.config.loader import ScheduleChecks


def system_timezone(env: dict[str, str] | None = None,
                    localtime: Path = Path("/etc/localtime")) -> tzinfo:
    """The system's zone *with its DST rules* ($TZ, else the /etc/localtime link).

    ``datetime.now().astimezone()`` would give today's fixed offset, and a daemon started in
    winter would then run the 03:00 backup at 04:00 all summer.
    """
    env = dict(os.environ) if env is None else env
    names = [env.get("TZ", "").removeprefix(":")]
    with contextlib.suppress(OSError):
        target = os.readlink(localtime)
        if "zoneinfo/" in target:
            names.append(target.split("zoneinfo/", 1)[1])
    for name in names:
        if name:
            with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
                return ZoneInfo(name)
    local = datetime.now().astimezone().tzinfo  # last resort: a fixed offset
    assert local is not None
    return local


def resolve_timezone(name: str) -> tzinfo:
    """IANA name -> tzinfo; "" -> the system's zone."""
    if not name:
        return system_timezone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use an IANA name like Europe/Athens)"
                         ) from None


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def crontab_weekdays(field: str) -> str:
    """Crontab's weekday field (0 or 7 = Sunday) in APScheduler's terms.

    APScheduler 3 numbers weekdays from Monday = 0 and its ``from_crontab`` does not convert, so
    "0 4 * * 0" would run on Mondays; numeric parts are therefore spelled out as day names.
    """
    if field == "*" or not any(ch.isdigit() for ch in field):
        return field
    parts = []
    for token in field.split(","):
        base, _, step_s = token.partition("/")
        step = int(step_s) if step_s else 1
        if base == "*":
            low, high = 0, 6
        elif base.isdigit():
            low = high = int(base)
            if step_s:
                high = 6
        elif "-" in base and all(p.isdigit() for p in base.split("-", 1)):
            low, high = (int(p) for p in base.split("-", 1))
        else:
            if step_s:
                raise ValueError(f"unsupported weekday term {token!r}")
            parts.append(base)  # a name (mon, tue-fri): same meaning in both systems
            continue
        if not (0 <= low <= 7 and 0 <= high <= 7 and low <= high and step >= 1):
            raise ValueError(f"weekday term {token!r} out of range 0-7")
        parts.extend(_DAY_NAMES[day % 7] for day in range(low, high + 1, step))
    return ",".join(dict.fromkeys(parts))


def make_trigger(expr: str, timezone: str | tzinfo) -> CronTrigger:
    """A crontab expression: five fields (minute hour day month weekday) or, as an extension,
    six with seconds first (for tests and sub-minute schedules)."""
    tz = resolve_timezone(timezone) if isinstance(timezone, str) else timezone
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"expected 5 cron fields (minute hour day month weekday), got {expr!r}")
    second = fields.pop(0) if len(fields) == 6 else "0"
    minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=crontab_weekdays(weekday), timezone=tz)
    except ValueError as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None


def next_fire(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The first scheduled time at or after ``now``."""
    fire: datetime | None = trigger.get_next_fire_time(None, now)
    return fire


def missed_fire(trigger: CronTrigger, now: datetime, last_run: datetime | None,
                grace_s: float) -> datetime | None:
    """The latest scheduled time within the last ``grace_s`` seconds that no run has covered
    (``last_run`` is when the job last started), or None. Used at start-up to make up a run
    missed while the daemon was down, once."""
    fire = trigger.get_next_fire_time(None, now - timedelta(seconds=grace_s))
    latest: datetime | None = None
    while fire is not None and fire <= now:
        latest = fire
        fire = trigger.get_next_fire_time(latest, latest + timedelta(seconds=1))
    if latest is None or (last_run is not None and last_run >= latest):
        return None
    return latest


# What the CLI and the daemon hand to load_config, so a bad cron or zone is refused at load.
SCHEDULE_CHECKS = ScheduleChecks(timezone=resolve_timezone, cron=make_trigger)
