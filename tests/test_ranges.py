"""HTTP byte ranges of the receiver's downloads."""

from __future__ import annotations

import pytest

from mt5backupd.receiver.ranges import RangeNotSatisfiable, parse_range


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
