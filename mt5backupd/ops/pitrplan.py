"""What a point-in-time restore needs (pure): the recoverable window, the base backup that
precedes a target, and the WAL chain from that base up to the target, gaps reported.

Times are UTC. A base backup is restorable from its end (``ready``: recovery is consistent once
the WAL up to its end LSN is replayed) on; the newest WAL object is restorable up to when it was
read (``time``). Each segment is a whole shipped segment or, for the newest, a snapshot of the
growing one; a chain that misses a segment stops there, and a target beyond it is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mt5backupd.errors import EXIT_USAGE, Mt5BackupError
from mt5backupd.walnames import DEFAULT_SEGMENT_BYTES, next_segment

MTIME_SLACK = timedelta(seconds=1)


class PitrRefused(Mt5BackupError):
    """The restore cannot reach what was asked (outside the window, a gap, a non-empty dir)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class BaseRef:
    id: str
    sha256: str
    ready: datetime  # the earliest time a restore from it can stop at


@dataclass(frozen=True)
class WalRef:
    id: str
    sha256: str
    segment: str
    upto: int | None  # None: the whole segment
    time: datetime  # the WAL in it was received by then


@dataclass(frozen=True)
class Window:
    earliest: datetime
    latest: datetime

    def text(self) -> str:
        return f"{_fmt(self.earliest)} .. {_fmt(self.latest)} (UTC)"


def _fmt(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_target(text: str) -> tuple[datetime, bool]:
    """(the time, whether UTC was assumed): ISO 8601 with or without a zone (``Z`` too)."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise PitrRefused(f"--to-time {text!r} is not a timestamp (use e.g. "
                          "2026-11-29T12:00:00 or 2026-11-29 14:00:00+02:00)") from None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC), True
    return when.astimezone(UTC), False


def window(bases: Sequence[BaseRef], wal: Sequence[WalRef]) -> Window | None:
    """Earliest: the oldest base's end; latest: the newest WAL read (None: nothing to restore)."""
    if not bases or not wal:
        return None
    earliest = min(b.ready for b in bases)
    latest = max(max(w.time for w in wal), earliest)
    return Window(earliest, latest)


def choose_base(bases: Sequence[BaseRef], wal: Sequence[WalRef],
                target: datetime | None) -> BaseRef:
    """The newest base backup ready at ``target`` (or the newest of all), refusing a target
    outside the window and naming the window."""
    win = window(bases, wal)
    if win is None:
        what = "base backups" if not bases else "shipped WAL"
        raise PitrRefused(f"nothing to restore to a point in time: no {what} (take one with "
                          "`mt5backupd --run-now --job base` while [wal] is enabled)")
    if target is not None and not win.earliest <= target <= win.latest:
        raise PitrRefused(f"target {_fmt(target)} UTC is outside the recoverable window "
                          f"{win.text()}")
    ready = [b for b in bases if target is None or b.ready <= target]
    return max(ready, key=lambda b: b.ready)


def wal_chain(start_segment: str, end_segment: str, wal: Sequence[WalRef],
              target: datetime | None,
              segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> list[WalRef]:
    """The WAL objects to replay from ``start_segment``: whole segments in order, the last
    maybe a snapshot; up to the first that reaches ``target`` (or as far as it goes). A gap
    before the base's ``end_segment`` or before the target is refused, naming the segment.
    ``segment_bytes``: the cluster's WAL segment size (initdb --wal-segsize), which decides
    the name of the segment after each one."""
    whole = {w.segment: w for w in wal if w.upto is None}
    snapshots: dict[str, WalRef] = {}
    for w in wal:
        if w.upto is not None and (w.segment not in snapshots
                                   or w.upto > (snapshots[w.segment].upto or 0)):
            snapshots[w.segment] = w
    newest = max((w.segment for w in wal), default="")
    chain: list[WalRef] = []
    segment = start_segment
    while True:
        obj = whole.get(segment) or snapshots.get(segment)
        if obj is None:
            break
        chain.append(obj)
        # past the target by more than the mtime granularity: the WAL of T is all in hand
        if obj.upto is not None or (target is not None and obj.time > target + MTIME_SLACK):
            break
        segment = next_segment(segment, segment_bytes)
    reached = chain[-1].segment if chain else ""
    if reached < end_segment:
        raise PitrRefused(f"the WAL chain of this base backup has a gap: segment {segment} is "
                          f"missing (the base needs WAL up to {end_segment})")
    last_time = chain[-1].time
    if target is not None and last_time < target:
        raise PitrRefused(f"the WAL chain has a gap: segment {segment} is missing; from this "
                          f"base the target can be at most {_fmt(last_time)} UTC")
    if target is None and newest > reached:
        # also when the chain ends at a snapshot: a partly shipped segment with newer WAL
        # after it is a gap, never "the end of the shipped WAL"
        what = "was shipped only in part" if chain[-1].upto is not None else "is missing"
        raise PitrRefused(f"the WAL chain has a gap: segment {segment} {what}, but newer "
                          f"WAL exists (up to {newest}); restore with --to-time at most "
                          f"{_fmt(last_time)} UTC, or find the missing segment")
    return chain
