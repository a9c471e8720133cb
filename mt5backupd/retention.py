"""Which backups to keep (pure): last N plus daily/weekly/monthly tiers, restic-style.

For each tier, walk the backups newest first and keep the newest one of each of the last N
distinct periods (UTC calendar day, ISO week, month) that have a backup. The newest backup is
always kept, whatever the policy, and an empty policy is refused rather than read as "keep none".
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Policy:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def validate(self) -> None:
        values = (self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly)
        if any(v < 0 for v in values):
            raise ValueError("retention counts must be >= 0")
        if not any(values):
            raise ValueError("empty retention policy: set at least one of keep_last, keep_daily, "
                             "keep_weekly, keep_monthly")


@dataclass(frozen=True)
class Item:
    id: str
    created: datetime  # timezone-aware


def _day(t: datetime) -> Hashable:
    return t.astimezone(UTC).date()


def _week(t: datetime) -> Hashable:
    iso = t.astimezone(UTC).isocalendar()
    return (iso.year, iso.week)


def _month(t: datetime) -> Hashable:
    u = t.astimezone(UTC)
    return (u.year, u.month)


def select_keep(items: Sequence[Item], policy: Policy) -> set[str]:
    """Return the ids to keep. Raises ValueError for an empty or negative policy."""
    policy.validate()
    newest_first = sorted(items, key=lambda i: (i.created, i.id), reverse=True)
    keep: set[str] = set()
    if newest_first:
        keep.add(newest_first[0].id)
    keep.update(i.id for i in newest_first[: policy.keep_last])
    tiers: list[tuple[int, Callable[[datetime], Hashable]]] = [
        (policy.keep_daily, _day),
        (policy.keep_weekly, _week),
        (policy.keep_monthly, _month),
    ]
    for count, bucket in tiers:
        seen: set[Hashable] = set()
        for item in newest_first:
            if len(seen) >= count:
                break
            key = bucket(item.created)
            if key not in seen:
                seen.add(key)
                keep.add(item.id)
    return keep


def select_remove(items: Sequence[Item], policy: Policy) -> list[str]:
    """Ids to remove, oldest first."""
    keep = select_keep(items, policy)
    return [i.id for i in sorted(items, key=lambda i: (i.created, i.id)) if i.id not in keep]


@dataclass(frozen=True)
class LocalItem:
    id: str
    created: datetime
    pending: bool  # upload not done yet: the only copy, never rotated away


def select_rotation(items: Sequence[LocalItem], keep: int) -> list[str]:
    """Local rotation: keep the newest ``keep`` backups and every pending one; oldest first."""
    if keep < 1:
        raise ValueError("keep must be >= 1")
    newest_first = sorted(items, key=lambda i: (i.created, i.id), reverse=True)
    doomed = [i for i in newest_first[keep:] if not i.pending]
    return [i.id for i in reversed(doomed)]


WAL_KIND = "wal"
BASE_KIND = "base"


def select_remove_by_kind(by_kind: Mapping[str, Sequence[Item]], policy: Policy) -> list[str]:
    """The policy per kind, except WAL: WAL objects are not backups of their own but the chain
    the base backups recover through, so they go with the base backups: a WAL object is removed
    only when it was taken before the oldest base backup that stays (each base needs WAL from
    its own start on). With no base backup, all WAL stays."""
    doomed: list[str] = []
    for kind, items in by_kind.items():
        if kind != WAL_KIND:
            doomed += select_remove(items, policy)
    gone = set(doomed)
    kept_bases = [i for i in by_kind.get(BASE_KIND, ()) if i.id not in gone]
    if kept_bases:
        oldest = min(i.created for i in kept_bases)
        doomed += [i.id for i in sorted(by_kind.get(WAL_KIND, ()), key=lambda i: i.created)
                   if i.created < oldest]
    return doomed


@dataclass(frozen=True)
class BaseItem:
    id: str
    created: datetime
    pending: bool  # upload not done yet: never rotated away
    complete: bool  # every WAL segment it needs (start to end) is stored


def select_base_rotation(items: Sequence[BaseItem], keep: int) -> list[str]:
    """Local base backups: keep the newest ``keep``, every pending one, and the newest whose WAL
    chain is complete (a new base whose WAL is not all shipped yet cannot stand in for the
    one before it); oldest first."""
    if keep < 1:
        raise ValueError("keep must be >= 1")
    newest_first = sorted(items, key=lambda i: (i.created, i.id), reverse=True)
    complete = next((i.id for i in newest_first if i.complete), None)
    doomed = [i for i in newest_first[keep:] if not i.pending and i.id != complete]
    return [i.id for i in reversed(doomed)]
