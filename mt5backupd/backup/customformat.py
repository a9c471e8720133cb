"""pg_dump's custom-format archive read as it streams past: the table of contents and the exact
number of COPY rows of every table, without buffering a table and without a query.

The layout (PostgreSQL ``src/bin/pg_dump/pg_backup_archiver.c`` ReadHead/ReadToc and
``pg_backup_custom.c``), for a dump written to a pipe:

- header: ``PGDMP``, version bytes (1.12 .. 1.16 here), int size, offset size, format (1 =
  custom), compression (an int level before 1.15, an algorithm byte from 1.15), creation date
  (7 ints), database name, server and pg_dump versions (strings);
- TOC: an int count, then per entry its dump id, fields (strings are an int length and bytes,
  -1 meaning NULL), dependencies up to a NULL, and the custom format's data offset (a flag byte:
  1 = data follows later, 3 = no data; then ``offSize`` bytes);
- data: per entry with data, a block: type byte (1 = table data, 3 = large objects), dump id,
  then chunks (int length + bytes) ending with a zero length. Large-object blocks hold
  (oid, chunks...) pairs ending with oid 0.

An int is a sign byte and ``intSize`` little-endian bytes. Table data is COPY text: a raw 0x0A
byte ends a row (COPY escapes newlines inside values as ``\\n``) and no byte is 0x00. pg_dump
up to 17 ends a table's data with a ``\\.`` line and blank lines, which are not rows: a line
that is exactly ``\\.`` can only be that marker (a value ``\\.`` would be written ``\\\\.``).

pg_dump up to 17 writes one chunk per row (a 5-byte header in front of every ~60-byte row):
walking that in Python costs ~300 ns a row, more than pg_dump takes to produce it, so runs of
such chunks are checked in bulk with numpy (``_scan_row_chunks``), exactly; anything else
(large chunks, a header with a 0x0A byte, block ends) goes through the plain walker.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"PGDMP"
FORMAT_CUSTOM = 1
BLK_DATA, BLK_BLOBS = 1, 3
OFFSET_NOT_SET, OFFSET_SET, OFFSET_NO_DATA = 1, 2, 3
MIN_MINOR, MAX_MINOR = 12, 16  # archive versions 1.12 (PostgreSQL 9.x) .. 1.16 (17, 18)
MAX_PG_DUMP_MAJOR = 18  # the newest pg_dump whose archive version (1.16) is known here
MAX_FIELD_BYTES = 1 << 30  # PostgreSQL's own limit on a field; anything larger is corruption
MAX_TOC_ENTRIES = 50_000_000
SMALL_CHUNK_BYTES = 4096  # after a chunk this small, try the bulk scan for the next ones
BULK_MIN_BYTES = 2048  # below this a numpy call costs more than the plain walker
_NL, _BACKSLASH, _DOT = 0x0A, 0x5C, 0x2E
_MARKER = b"\n\\.\n"


class FramingError(ValueError):
    """The byte stream is not a complete, well-formed custom-format archive."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"custom-format archive broken at byte {position}: {reason}")
        self.position = position
        self.reason = reason


class _NeedMore(Exception):
    pass


@dataclass
class TocEntry:
    dump_id: int
    desc: str
    namespace: str
    tag: str
    has_data: bool

    @property
    def table(self) -> str:
        return f"{self.namespace}.{self.tag}"


@dataclass
class _Table:
    rows: int = 0
    tail: bytes = b"\n"  # the last payload bytes (<= 3), to find a `\.` line across chunks
    ended: bool = False  # past the `\.` line: the rest are not rows


@dataclass
class ArchiveParser:
    """Feed every byte of the archive in order (``feed``), then ``finish``; ``rows_by_table``
    maps ``schema.table`` to its exact row count. A framing error raises ``FramingError`` with
    the byte position; after one, the parser stays failed."""

    fast: bool = True
    position: int = 0  # bytes of the archive consumed so far
    version: tuple[int, int, int] = (0, 0, 0)
    dump_version: str = ""
    toc: dict[int, TocEntry] = field(default_factory=dict)
    _buf: bytes = b""  # unconsumed bytes: the header and TOC until complete, else < 10 bytes
    _stage: str = "head"  # head, toc, data
    _int_size: int = 0
    _off_size: int = 0
    _toc_left: int = -1
    _state: str = "block"  # block, chunk, payload, oid
    _block: int = 0
    _current: _Table | None = None
    _remaining: int = 0
    _last_chunk: int = 0
    _tables: dict[int, _Table] = field(default_factory=dict)
    _seen: set[int] = field(default_factory=set)
    _error: FramingError | None = None
    _blobs: bool = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            return
        buf = self._buf + bytes(data) if self._buf else bytes(data)
        start = self.position - len(self._buf)
        try:
            pos = self._parse(buf, 0)
        except FramingError as exc:
            self._error = exc
            raise
        self._buf = buf[pos:]
        self.position = start + len(buf)

    def finish(self) -> dict[str, int]:
        """Exact rows per table; raises FramingError if the archive is cut or incomplete."""
        if self._error is not None:
            raise self._error
        at = self.position - len(self._buf)
        if self._stage != "data":
            raise FramingError(at, f"archive ends inside its {self._stage_name()}")
        if self._state != "block" or self._buf:
            raise FramingError(at, f"archive ends inside the data of dump id {self._block}")
        missing = sorted(i for i, e in self.toc.items() if e.has_data and i not in self._seen)
        if missing:
            raise FramingError(at, f"archive ends before the data of {len(missing)} entries "
                                   f"(dump ids {missing[:5]})")
        return self.rows_by_table()

    def rows_by_table(self) -> dict[str, int]:
        return {self.toc[i].table: t.rows for i, t in self._tables.items()}

    def _stage_name(self) -> str:
        return {"head": "header", "toc": "table of contents"}.get(self._stage, "data")

    # -- parsing ---------------------------------------------------------------------------

    def _parse(self, buf: bytes, pos: int) -> int:
        """Consume what can be consumed of ``buf`` from ``pos``; returns the new position."""
        base = self.position - len(self._buf)
        try:
            if self._stage == "head":
                pos = self._head(buf, pos, base)
                self._stage = "toc"
            while self._stage == "toc":
                pos = self._toc_step(buf, pos, base)
        except _NeedMore:
            return pos
        return self._data(buf, pos, base)

    def _read_int(self, buf: bytes, pos: int, base: int) -> tuple[int, int]:
        end = pos + 1 + self._int_size
        if end > len(buf):
            raise _NeedMore
        sign = buf[pos]
        if sign > 1:
            raise FramingError(base + pos, f"bad integer sign byte {sign}")
        value = int.from_bytes(buf[pos + 1:end], "little")
        return (-value if sign else value), end

    def _read_str(self, buf: bytes, pos: int, base: int) -> tuple[str | None, int]:
        length, pos = self._read_int(buf, pos, base)
        if length < 0:
            return None, pos
        if length > MAX_FIELD_BYTES:
            raise FramingError(base + pos, f"string length {length} out of range")
        if pos + length > len(buf):
            raise _NeedMore
        return buf[pos:pos + length].decode("utf-8", "replace"), pos + length

    def _head(self, buf: bytes, pos: int, base: int) -> int:
        if len(buf) < 11:
            if not MAGIC.startswith(buf[:5]):
                raise FramingError(base, "no PGDMP magic: not a custom-format archive")
            raise _NeedMore
        if buf[:5] != MAGIC:
            raise FramingError(base, "no PGDMP magic: not a custom-format archive")
        major, minor, rev = buf[5], buf[6], buf[7]
        if major != 1 or not MIN_MINOR <= minor <= MAX_MINOR:
            raise FramingError(base + 5, f"unsupported archive version {major}.{minor}")
        self.version = (major, minor, rev)
        self._int_size, self._off_size, fmt = buf[8], buf[9], buf[10]
        if not 1 <= self._int_size <= 8 or not 1 <= self._off_size <= 16:
            raise FramingError(base + 8, "integer or offset size out of range")
        if fmt != FORMAT_CUSTOM:
            raise FramingError(base + 10, f"archive format {fmt} is not custom (1)")
        pos = 11
        if minor >= 15:
            if pos >= len(buf):
                raise _NeedMore
            compression, pos = buf[pos], pos + 1
        else:
            compression, pos = self._read_int(buf, pos, base)
        if compression != 0:
            raise FramingError(base + pos - 1, "table data compressed by pg_dump itself")
        for _ in range(7):  # creation date
            _value, pos = self._read_int(buf, pos, base)
        for name in ("dbname", "server", "dump"):
            text, pos = self._read_str(buf, pos, base)
            if name == "dump":
                self.dump_version = text or ""
        count, pos = self._read_int(buf, pos, base)
        if not 0 <= count <= MAX_TOC_ENTRIES:
            raise FramingError(base + pos, f"TOC entry count {count} out of range")
        self._toc_left = count
        return pos

    def _toc_step(self, buf: bytes, pos: int, base: int) -> int:
        """One whole TOC entry (or the switch to the data stage); _NeedMore leaves ``pos``."""
        if self._toc_left == 0:
            self._stage = "data"
            return pos
        minor = self.version[1]
        start = pos
        dump_id, pos = self._read_int(buf, pos, base)
        if dump_id <= 0 or dump_id in self.toc:
            raise FramingError(base + start, f"TOC dump id {dump_id} invalid or repeated")
        _had_dumper, pos = self._read_int(buf, pos, base)
        texts: list[str | None] = []
        for _ in range(4):  # tableoid, oid, tag, desc
            text, pos = self._read_str(buf, pos, base)
            texts.append(text)
        _section, pos = self._read_int(buf, pos, base)
        for _ in range(3):  # defn, dropStmt, copyStmt
            _text, pos = self._read_str(buf, pos, base)
        namespace, pos = self._read_str(buf, pos, base)
        _tablespace, pos = self._read_str(buf, pos, base)
        if minor >= 14:
            _tableam, pos = self._read_str(buf, pos, base)
        if minor >= 16:
            _relkind, pos = self._read_int(buf, pos, base)
        for _ in range(2):  # owner, "false" (WITH OIDS)
            _text, pos = self._read_str(buf, pos, base)
        while True:  # dependencies, NULL-terminated
            dep, pos = self._read_str(buf, pos, base)
            if dep is None:
                break
        if pos + 1 + self._off_size > len(buf):
            raise _NeedMore
        flag = buf[pos]
        if flag not in (OFFSET_NOT_SET, OFFSET_SET, OFFSET_NO_DATA):
            raise FramingError(base + pos, f"bad data offset flag {flag}")
        pos += 1 + self._off_size
        self.toc[dump_id] = TocEntry(dump_id, texts[3] or "", namespace or "", texts[2] or "",
                                     flag != OFFSET_NO_DATA)
        self._toc_left -= 1
        return pos

    def _data(self, buf: bytes, pos: int, base: int) -> int:
        n = len(buf)
        isz1 = 1 + self._int_size
        while pos < n:
            state = self._state
            if state == "payload":
                take = min(self._remaining, n - pos)
                if self._current is not None and not self._current.ended:
                    _count_payload(self._current, buf, pos, pos + take)
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._state = "chunk"
                if (self.fast and self._current is not None and self._int_size == 4
                        and self._last_chunk <= SMALL_CHUNK_BYTES and not self._current.ended):
                    pos = _bulk(self._current, buf, pos)
            elif state == "block":
                if pos + 1 + isz1 > n:
                    break
                kind = buf[pos]
                dump_id, after = self._read_int(buf, pos + 1, base)
                entry = self.toc.get(dump_id)
                if kind not in (BLK_DATA, BLK_BLOBS):
                    raise FramingError(base + pos, f"unknown data block type {kind}")
                if entry is None or not entry.has_data or dump_id in self._seen:
                    raise FramingError(base + pos + 1, f"data block for dump id {dump_id}, "
                                                       "which has no data due")
                self._seen.add(dump_id)
                self._block = dump_id
                self._current = None
                if kind == BLK_DATA and entry.desc == "TABLE DATA":
                    self._current = self._tables[dump_id] = _Table()
                self._state = "chunk" if kind == BLK_DATA else "oid"
                self._blobs = kind == BLK_BLOBS
                pos = after
            elif state == "chunk":
                if pos + isz1 > n:
                    break
                length, after = self._read_int(buf, pos, base)
                if length < 0 or length > MAX_FIELD_BYTES:
                    raise FramingError(base + pos, f"chunk length {length} out of range")
                pos = after
                if length == 0:
                    self._state = "oid" if self._blobs else "block"
                else:
                    self._state, self._remaining, self._last_chunk = "payload", length, length
            else:  # oid: the next large object of a BLOBS block, 0 ends the block
                if pos + isz1 > n:
                    break
                oid, after = self._read_int(buf, pos, base)
                if oid < 0:
                    raise FramingError(base + pos, f"large object oid {oid} out of range")
                pos = after
                self._state = "chunk" if oid else "block"
        return pos


def _count_payload(table: _Table, buf: bytes, start: int, end: int) -> None:
    """Rows ended in ``buf[start:end]`` (table data bytes), stopping at a `\\.` line."""
    piece = buf[start:end]
    tail = table.tail
    if b"\\." in piece or tail[-1] == _BACKSLASH or tail.endswith(b"\\."):
        probe = tail + piece
        marker = probe.find(_MARKER)
        if marker >= 0:
            table.rows += probe.count(b"\n", len(tail), marker + 1)
            table.ended = True
            return
    table.rows += piece.count(b"\n")
    table.tail = piece[-3:] if len(piece) >= 3 else (tail + piece)[-3:]


def _bulk(table: _Table, buf: bytes, pos: int) -> int:
    """Consume the run of one-row chunks starting at ``pos`` (a chunk header) in bulk."""
    if len(buf) - pos < BULK_MIN_BYTES:
        return pos
    new_pos, rows = _scan_row_chunks(buf, pos)
    if rows:
        table.rows += rows
        table.tail = b"\n"
    return new_pos


_np: Any = None
_np_missing = False


def _numpy() -> Any:
    """numpy, imported once on first use (~60 ms); None when it is not installed, in which case
    every chunk takes the plain walker (exact too, only slower)."""
    global _np, _np_missing
    if _np is None and not _np_missing:
        try:
            import numpy
        except ImportError:
            _np_missing = True
            return None
        _np = numpy
    return _np


def preload() -> None:
    """Import numpy now (the pump calls this before pg_dump's first byte arrives)."""
    _numpy()


def _scan_row_chunks(buf: bytes, start: int) -> tuple[int, int]:
    """From ``start``, a chunk header (int size 4), the longest run of chunks that each hold
    exactly one row: ``(position after the run, rows)``. Exact, not a guess.

    A one-row chunk is ``00 L0 L1 L2 L3`` + L bytes whose only 0x0A is the last, so in a run of
    them every header starts right after a 0x0A. Candidate headers are therefore ``start`` and
    the positions after each 0x0A; candidate i is a one-row chunk when its sign byte is 0 and
    its declared end is candidate i+1. Where a length byte is itself 0x0A, candidates fall
    inside the header: that chunk is followed in Python (rare). The run stops at anything else
    (the end-of-data marker, a chunk of several rows or of part of one, the `\\.` line, the end
    of ``buf``), which the plain walker then handles.
    """
    np = _numpy()
    if np is None:
        return start, 0
    view = np.frombuffer(buf, dtype=np.uint8, offset=start)
    size = view.size
    newlines = np.flatnonzero(view == _NL)
    usable = int(np.searchsorted(newlines, size - 6, side="right"))  # whole header after it
    m = usable + 1
    if m < 2:
        return start, 0
    cand = np.empty(m, dtype=np.int64)
    cand[0] = 0
    np.add(newlines[:usable], 1, out=cand[1:])
    # the 4 length bytes after each sign byte, read in one gather from an unaligned view
    lengths_at = np.ndarray((size - 4,), dtype="<u4", buffer=buf, offset=start + 1,
                            strides=(1,))
    lengths = lengths_at[cand].astype(np.int64)
    ends = cand + 5 + lengths
    simple = (view[cand[:-1]] == 0) & (ends[:-1] == cand[1:])
    for i in np.flatnonzero(simple & (lengths[:-1] == 3)).tolist():
        if buf[start + int(cand[i]) + 5:start + int(cand[i]) + 7] == b"\\.":
            simple[i] = False  # the end-of-data line, not a row
    stops = np.flatnonzero(~simple).tolist()
    stops.append(m - 1)
    i = rows = 0
    while True:
        e = stops[bisect.bisect_left(stops, i)]
        rows += e - i  # i .. e-1 are one-row chunks, each followed by the next candidate
        i = e
        j = _jump(buf, start, cand, ends, i, m)
        if j < 0:
            break
        rows += 1
        i = j
    return start + int(cand[i]), rows


def _jump(buf: bytes, start: int, cand: Any, ends: Any, i: int, m: int) -> int:
    """The candidate after chunk i when its header holds 0x0A bytes and it is one row, else
    -1."""
    at = start + int(cand[i])
    if i >= m - 1 or buf[at] != 0:
        return -1
    j = i + 1 + buf.count(b"\n", at + 1, at + 5)
    if j >= m or int(ends[i]) != int(cand[j]) or j == i + 1:
        return -1
    if int(ends[i]) - int(cand[i]) == 8 and buf[at + 5:at + 7] == b"\\.":
        return -1
    return j
