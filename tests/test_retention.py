"""Retention: the receiver's keep policy and the client's local rotation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mt5backupd.retention import (
    Item,
    LocalItem,
    Policy,
    select_keep,
    select_remove,
    select_rotation,
)

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
    ("items", "keep", "removed"),
    [
        ([LocalItem(f"b{i}", T0 - timedelta(days=i), False) for i in range(5)], 3, ["b4", "b3"]),
        ([LocalItem(f"b{i}", T0 - timedelta(days=i), i == 4) for i in range(5)], 1,
         ["b3", "b2", "b1"]),
        ([LocalItem("only", T0, True)], 1, []),
        ([LocalItem("a", T0, False), LocalItem("b", T0 - timedelta(1), False)], 5, []),
    ],
)
def test_select_rotation(items: list[LocalItem], keep: int, removed: list[str]) -> None:
    """Rotation removes the oldest beyond `keep`, oldest first, and never a pending backup."""
    assert select_rotation(items, keep) == removed


def test_wal_goes_with_the_base_backups_not_by_count() -> None:
    """Per-kind policy for backups; WAL older than the oldest kept base is removed, the rest
    stays whatever keep_last says; without base backups all WAL stays."""
    from mt5backupd.retention import select_remove_by_kind

    day = datetime(2026, 11, 1, tzinfo=UTC)
    bases = [Item(f"base-{d}", day + timedelta(days=d)) for d in (0, 7, 14)]
    wal = [Item(f"wal-{h}", day + timedelta(hours=h)) for h in range(0, 24 * 15, 24)]
    doomed = select_remove_by_kind({"base": bases, "wal": wal}, Policy(keep_last=2))
    assert doomed == ["base-0", *(f"wal-{h}" for h in range(0, 24 * 7, 24))]
    assert select_remove_by_kind({"wal": wal}, Policy(keep_last=1)) == []


@pytest.mark.parametrize(("complete", "pending", "keep", "doomed"), [
    ({"b1", "b2", "b3"}, set(), 1, ["b1", "b2"]),
    ({"b1", "b2"}, set(), 1, ["b1"]),  # b3's WAL not all stored: b2 stays with it
    ({"b1"}, set(), 1, ["b2"]),
    (set(), set(), 2, ["b1"]),
    ({"b1", "b2", "b3"}, {"b1"}, 1, ["b2"]),  # pending: never rotated away
])
def test_base_rotation_keeps_the_newest_complete_chain(
        complete: set[str], pending: set[str], keep: int, doomed: list[str]) -> None:
    """Newest `keep` bases, every pending one, and the newest with a complete WAL chain stay."""
    from mt5backupd.retention import BaseItem, select_base_rotation

    day = datetime(2026, 11, 1, tzinfo=UTC)
    items = [BaseItem(f"b{n}", day + timedelta(days=7 * n), f"b{n}" in pending,
                      f"b{n}" in complete) for n in (1, 2, 3)]
    assert select_base_rotation(items, keep) == doomed
