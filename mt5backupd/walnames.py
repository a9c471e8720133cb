"""WAL segment names, LSNs and the object names WAL is shipped under (pure, no I/O).

A segment file is named by 24 hex digits: 8 for the timeline, then the segment number split in
a "log" and a "seg" half of 8 digits each (the log half counts 2^32 bytes of WAL). A finished
segment is shipped as ``<segment>.wal.zst``; a snapshot of the growing one as
``<segment>-p<bytes>.wal.zst``, where ``bytes`` is how far the WAL in it reaches: receiver ids
are append-only, so each snapshot needs a name of its own, and the offset orders them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
SEGMENT_RE = re.compile(r"[0-9A-F]{24}")
OBJECT_SUFFIX = ".wal.zst"
_OBJECT_RE = re.compile(r"(?P<seg>[0-9A-F]{24})(?:-p(?P<upto>\d+))?\.wal\.zst(?P<age>\.age)?")


def parse_lsn(text: str) -> int:
    """``0/2000028`` -> 33554472. ValueError for anything else."""
    high, sep, low = text.strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_name(timeline: int, lsn: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> str:
    """The segment file holding ``lsn`` on ``timeline``."""
    number = lsn // segment_bytes
    per_log = 0x100000000 // segment_bytes
    return f"{timeline:08X}{number // per_log:08X}{number % per_log:08X}"


def segment_number(name: str, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> tuple[int, int]:
    """(timeline, segment number) of a segment name."""
    if not SEGMENT_RE.fullmatch(name):
        raise ValueError(f"not a WAL segment name: {name!r}")
    per_log = 0x100000000 // segment_bytes
    return int(name[:8], 16), int(name[8:16], 16) * per_log + int(name[16:], 16)


def next_segment(name: str, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> str:
    timeline, number = segment_number(name, segment_bytes)
    return segment_name(timeline, (number + 1) * segment_bytes, segment_bytes)


@dataclass(frozen=True)
class WalObject:
    """A shipped WAL object: a whole segment (``upto`` None) or a snapshot of a growing one."""

    segment: str
    upto: int | None  # bytes of the segment the snapshot holds; None: the finished segment
    encrypted: bool

    @property
    def partial(self) -> bool:
        return self.upto is not None


def object_name(segment: str, upto: int | None = None) -> str:
    """The id a segment (or a snapshot of it up to ``upto`` bytes) is shipped under, before
    the ``.age`` an encrypted one gets."""
    return f"{segment}{'' if upto is None else f'-p{upto}'}{OBJECT_SUFFIX}"


def parse_object(name: str) -> WalObject | None:
    """The WAL object ``name`` names; None when it is not one."""
    m = _OBJECT_RE.fullmatch(name)
    if m is None:
        return None
    upto = m.group("upto")
    return WalObject(m.group("seg"), int(upto) if upto is not None else None,
                     m.group("age") is not None)


def data_end(block: bytes, page_bytes: int = 8192) -> int:
    """How far a growing segment holds WAL: pg_receivewal pads its ``.partial`` file with
    zeros to the full segment size, so the end is just after the last byte that is not zero
    (found page by page from the end; a few inserts grow the WAL by less than a page, and
    each must make a new snapshot)."""
    end = len(block)
    zero = bytes(page_bytes)
    while end > 0:
        start = max(0, end - page_bytes)
        if block[start:end] != zero[: end - start]:
            return len(block[start:end].rstrip(b"\0")) + start
        end = start
    return 0
