"""Byte pumps between pipes and files, with zstd done in-process (multi-threaded, off the loop).

pg_dump's own gzip is single-threaded and is where most of a backup's time goes (design.md); zstd
with worker threads keeps up with pg_dump -Z0 on two cores at a similar size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol, cast

import zstandard

from mt5backupd.config import Compression

READ_BYTES = 1024 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Writable(Protocol):
    """A sink that writes all of ``data`` (or raises) and returns its length."""

    def write(self, data: bytes, /) -> int: ...


def pump(
    read_fd: int,
    sink: Writable,
    compression: Compression,
    threads: int,
    on_read: Callable[[int], None] | None = None,
) -> int:
    """Blocking (run it in a thread): read ``read_fd`` to EOF, compress per ``compression``
    (zstd only: gzip is pg_dump's own -Z), write to ``sink``. Returns the raw bytes read."""
    raw = 0
    if compression.kind == "zstd":
        cctx = zstandard.ZstdCompressor(level=compression.level, threads=threads)
        # The stream writer only ever calls sink.write(); it needs no other file method.
        target = cast("IO[bytes]", sink)
        with cctx.stream_writer(target, write_size=READ_BYTES, closefd=False) as writer:
            while chunk := os.read(read_fd, READ_BYTES):
                raw += len(chunk)
                writer.write(chunk)
                if on_read:
                    on_read(len(chunk))
        return raw
    while chunk := os.read(read_fd, READ_BYTES):
        raw += len(chunk)
        sink.write(chunk)
        if on_read:
            on_read(len(chunk))
    return raw


def is_zstd_file(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == ZSTD_MAGIC


def decompress_file_to_fd(path: Path, write_fd: int) -> int:
    """Blocking: write the archive's plain bytes (zstd decoded when needed) to ``write_fd``."""
    written = 0
    with path.open("rb") as src:
        stream: IO[bytes] = src
        if is_zstd_file(path):
            stream = cast("IO[bytes]", zstandard.ZstdDecompressor().stream_reader(
                src, read_size=READ_BYTES))
        while block := stream.read(READ_BYTES):
            view = memoryview(block)
            while view:
                view = view[os.write(write_fd, view):]
            written += len(block)
    return written
