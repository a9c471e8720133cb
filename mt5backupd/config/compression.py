"""The ``[database] compression`` spec: ``zstd:LEVEL``, ``gzip:LEVEL`` or ``none``."""

from __future__ import annotations

from dataclasses import dataclass

COMPRESSION_KINDS = ("zstd", "gzip", "none")
# Measured (docs/benchmarks.md): on a 1 GB MT5-like database zstd level 1 in the pump thread is
# as fast as any level (the pump keeps up with pg_dump), and on this data smaller than levels 2-4.
DEFAULT_COMPRESSION = "zstd:1"


@dataclass(frozen=True)
class Compression:
    """``zstd:LEVEL`` (pg_dump -Z0, compressed in-process), ``gzip:LEVEL`` (pg_dump's own -Z),
    or ``none``."""

    kind: str
    level: int

    @property
    def suffix(self) -> str:
        return ".dump.zst" if self.kind == "zstd" else ".dump"

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.level}"


def parse_compression(value: str) -> Compression:
    """Parse ``zstd:3`` / ``gzip:6`` / ``none``; ValueError names what is wrong."""
    kind, _, level_s = value.strip().lower().partition(":")
    if kind not in COMPRESSION_KINDS:
        raise ValueError(f"must be zstd:LEVEL, gzip:LEVEL or none; got {value!r}")
    if kind == "none":
        if level_s:
            raise ValueError("none takes no level")
        return Compression("none", 0)
    default_level = 3 if kind == "zstd" else 6
    if not level_s:
        return Compression(kind, default_level)
    if not level_s.isdigit():
        raise ValueError(f"level must be a number; got {level_s!r}")
    level = int(level_s)
    low, high = (1, 19) if kind == "zstd" else (1, 9)
    if not low <= level <= high:
        raise ValueError(f"{kind} level must be {low}..{high}; got {level}")
    return Compression(kind, level)
