"""The [database] compression spec."""

from __future__ import annotations

import pytest

from mt5backupd.config import (
    Compression,
    parse_compression,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("zstd:3", Compression("zstd", 3)), ("zstd", Compression("zstd", 3)),
     ("gzip:9", Compression("gzip", 9)), ("GZIP:1", Compression("gzip", 1)),
     ("none", Compression("none", 0))],
)
def test_parse_compression(value: str, expected: Compression) -> None:
    """zstd:LEVEL, gzip:LEVEL and none are accepted (levels default sensibly)."""
    assert parse_compression(value) == expected


@pytest.mark.parametrize("value", ["lz4", "zstd:0", "zstd:20", "gzip:10", "none:1", "zstd:x"])
def test_bad_compression_refused(value: str) -> None:
    """Unknown methods and out-of-range levels are refused."""
    with pytest.raises(ValueError):
        parse_compression(value)
