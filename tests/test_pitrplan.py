"""The PITR plan (pure): the window, the base before a target, the WAL chain and its gaps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mt5backupd.ops.pitrplan import (
    BaseRef,
    PitrRefused,
    WalRef,
    choose_base,
    parse_target,
    wal_chain,
    window,
)

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SEG = ["000000010000000000000003", "000000010000000000000004", "000000010000000000000005",
       "000000010000000000000006"]


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def wal(segment: str, minutes: float, upto: int | None = None) -> WalRef:
    return WalRef(f"{segment}{'' if upto is None else f'-p{upto}'}.wal.zst", "0" * 64, segment,
                  upto, at(minutes))


BASES = [BaseRef("base-a.tar.zst", "0" * 64, at(0)), BaseRef("base-b.tar.zst", "0" * 64, at(30))]
CHAIN = [wal(SEG[0], 10), wal(SEG[1], 20), wal(SEG[2], 40), wal(SEG[3], 45, upto=800),
         wal(SEG[3], 50, upto=4000)]


@pytest.mark.parametrize(("text", "expected", "assumed"), [
    ("2026-11-29T12:00:00", T0, True),
    ("2026-11-29 14:00:00+02:00", T0, False),
    ("2026-11-29T12:00:00Z", T0, False),
])
def test_parse_target(text: str, expected: datetime, assumed: bool) -> None:
    """With a zone it is converted; without one UTC is assumed (and said)."""
    assert parse_target(text) == (expected, assumed)


def test_parse_target_refuses_junk() -> None:
    """Not a timestamp: one line naming the option."""
    with pytest.raises(PitrRefused, match="--to-time 'yesterday'"):
        parse_target("yesterday")


def test_window_and_base_choice() -> None:
    """The window runs from the oldest base's end to the newest WAL; the base chosen is the
    newest one ready at the target; outside the window is refused, naming it."""
    win = window(BASES, CHAIN)
    assert win is not None and (win.earliest, win.latest) == (at(0), at(50))
    assert choose_base(BASES, CHAIN, at(25)).id == "base-a.tar.zst"
    assert choose_base(BASES, CHAIN, at(35)).id == "base-b.tar.zst"
    assert choose_base(BASES, CHAIN, None).id == "base-b.tar.zst"
    with pytest.raises(PitrRefused, match=r"outside the recoverable window "
                                          r"2026-11-29 12:00:00 \.\. 2026-11-29 12:50:00 \(UTC\)"):
        choose_base(BASES, CHAIN, at(51))
    with pytest.raises(PitrRefused, match="no base backups"):
        choose_base([], CHAIN, None)


def test_chain_to_the_end_ends_with_the_newest_snapshot() -> None:
    """Without a target: every whole segment, then the furthest snapshot of the growing one."""
    chain = wal_chain(SEG[0], SEG[0], CHAIN, None)
    assert [w.id for w in chain] == [f"{SEG[0]}.wal.zst", f"{SEG[1]}.wal.zst",
                                     f"{SEG[2]}.wal.zst", f"{SEG[3]}-p4000.wal.zst"]


def test_chain_to_a_target_stops_once_past_it() -> None:
    """With a target, the chain stops at the first segment received after it."""
    assert [w.segment for w in wal_chain(SEG[0], SEG[0], CHAIN, at(15))] == SEG[:2]


def test_a_gap_is_reported_not_papered_over() -> None:
    """A missing segment: a target beyond it, or a restore to the end, is refused naming it;
    a target before it still works."""
    holed = [w for w in CHAIN if w.segment != SEG[1]]
    with pytest.raises(PitrRefused, match=f"segment {SEG[1]} is missing.*at most "
                                          "2026-11-29 12:10:00"):
        wal_chain(SEG[0], SEG[0], holed, at(30))
    with pytest.raises(PitrRefused, match=f"segment {SEG[1]} is missing, but newer WAL"):
        wal_chain(SEG[0], SEG[0], holed, None)
    assert [w.segment for w in wal_chain(SEG[0], SEG[0], holed, at(5))] == [SEG[0]]
    with pytest.raises(PitrRefused, match=f"the base needs WAL up to {SEG[2]}"):
        wal_chain(SEG[0], SEG[2], holed, at(45))


def test_a_segment_shipped_only_in_part_before_newer_wal_is_a_gap() -> None:
    """A snapshot of segment N whose whole copy is missing, with N+1 onwards shipped: a restore
    to the end is refused (not cut short at the old snapshot); a target inside it still works."""
    partly = [w for w in CHAIN if w.segment != SEG[1]] + [wal(SEG[1], 15, upto=100)]
    with pytest.raises(PitrRefused, match=f"segment {SEG[1]} was shipped only in part, "
                                          "but newer WAL"):
        wal_chain(SEG[0], SEG[0], partly, None)
    assert [w.segment for w in wal_chain(SEG[0], SEG[0], partly, at(12))] == SEG[:2]


@pytest.mark.parametrize(("segment_bytes", "after"), [
    (16 * 1024**2, "0000000100000000000000FF"),  # 256 segments of 16 MiB per 4 GiB log
    (64 * 1024**2, "00000001000000000000003F"),  # 64 of 64 MiB (initdb --wal-segsize=64)
    (1024**3, "000000010000000000000003"),  # 4 of 1 GiB
])
def test_chain_crosses_a_log_boundary_at_the_cluster_segment_size(segment_bytes: int,
                                                                  after: str) -> None:
    """The segment after the last of a 4 GiB log is the next log's first, whatever the
    segment size: a chain over that boundary has no gap."""
    first_of_next = "000000010000000100000000"
    segments = [after, first_of_next]
    chain = wal_chain(after, first_of_next, [wal(s, 10 + i) for i, s in enumerate(segments)],
                      None, segment_bytes)
    assert [w.segment for w in chain] == segments
