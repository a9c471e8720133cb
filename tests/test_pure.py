"""Table tests of the pure logic: names, retention, HTTP ranges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mt5backupd.names import InvalidName, validate_backup_id, validate_client_name
from mt5backupd.receiver.ranges import RangeNotSatisfiable, parse_range
from mt5backupd.retention import Item, Policy, select_keep, select_remove

HOSTILE_IDS = [
    "../../etc/passwd",
    "..",
    ".",
    "",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    ".hidden",
    "a..b",
    "x" * 201,
    "%2e%2e%2fetc",
    "name with space",
    "tab\tname",
    "newline\nname",
    "x.dump.sha256",
    "ü.dump",
]


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_hostile_backup_ids_refused(value: str) -> None:
    """Every traversal, separator, NUL, hidden, over-long or reserved id is refused."""
    with pytest.raises(InvalidName):
        validate_backup_id(value)


@pytest.mark.parametrize(
    "value",
    ["mt5_trading-20261125-030000.dump", "mt5_trading-20261125-030000.dump.zst", "A+b_c-1.tar.zst",
     "x" * 200],
)
def test_ordinary_backup_ids_accepted(value: str) -> None:
    """Legacy and new backup file names are valid ids and come back unchanged."""
    assert validate_backup_id(value) == value


@pytest.mark.parametrize("value", ["Alice", "-x", "", "a" * 65, "a/b", "a.b"])
def test_bad_client_names_refused(value: str) -> None:
    """Client names double as directory names: lowercase, short, no dots or separators."""
    with pytest.raises(InvalidName):
        validate_client_name(value)


T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


def daily(n: int) -> list[Item]:
    return [Item(f"b{i:03d}", T0 - timedelta(days=i)) for i in range(n)]


@pytest.mark.parametrize(
    ("items", "policy", "expected_keep"),
    [
        (daily(10), Policy(keep_last=3), {"b000", "b001", "b002"}),
        (daily(10), Policy(keep_daily=2), {"b000", "b001"}),
        # 60 daily backups, weekly 3 -> the newest of each of the last 3 ISO weeks.
        (daily(60), Policy(keep_weekly=3), {"b000", "b003", "b010"}),
        # monthly 2 -> newest of November and the newest of October.
        (daily(60), Policy(keep_monthly=2), {"b000", "b025"}),
        # tiers combine as a union
        (daily(10), Policy(keep_last=1, keep_daily=3), {"b000", "b001", "b002"}),
        # several backups on one day: daily keeps the newest of that day only
        ([Item("late", T0), Item("early", T0 - timedelta(hours=2)),
          Item("yday", T0 - timedelta(days=1))], Policy(keep_daily=2), {"late", "yday"}),
        # the newest always stays, even when a tier would pick nothing new
        (daily(1), Policy(keep_monthly=1), {"b000"}),
        ([], Policy(keep_last=1), set()),
    ],
)
def test_select_keep(items: list[Item], policy: Policy, expected_keep: set[str]) -> None:
    """Retention keeps exactly the newest of each period per tier, plus the newest overall."""
    assert select_keep(items, policy) == expected_keep


def test_select_remove_oldest_first_and_never_newest() -> None:
    """Removal lists oldest first and never names the newest backup."""
    removed = select_remove(daily(5), Policy(keep_last=2))
    assert removed == ["b004", "b003", "b002"]
    assert "b000" not in removed


@pytest.mark.parametrize("policy", [Policy(), Policy(keep_last=-1)])
def test_empty_or_negative_policy_refused(policy: Policy) -> None:
    """An empty policy is refused instead of being read as "delete everything"."""
    with pytest.raises(ValueError, match="retention"):
        select_keep(daily(3), policy)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-500", 100, (0, 99)),
        ("bytes=50-500", 100, (50, 99)),
        ("bytes=0-0", 1, (0, 0)),
        ("bytes=5-2", 100, None),  # invalid -> whole body
        ("bytes=0-1,5-6", 100, None),  # multi-range -> whole body
        ("items=0-1", 100, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    """Single byte ranges are honoured; anything else falls back to the whole body."""
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100),
                                              ("bytes=-5", 0)])
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    """A range wholly outside the body is a 416, not a silent full download."""
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)
