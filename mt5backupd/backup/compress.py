"""Byte pumps between pipes and files, with zstd done in-process (multi-threaded, off the loop).

pg_dump's own gzip is single-threaded and is where most of a backup's time goes (design.md); zstd
with worker threads keeps up with pg_dump -Z0 on two cores at a similar size.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol, cast

import zstandard

from mt5backupd.config import Compression

READ_BYTES = 1024 * 1024
BATCH_BYTES = 256 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Writable(Protocol):
    """A sink that writes all of ``data`` (or raises) and returns its length."""

    def write(self, data: bytes | bytearray, /) -> int: ...


# where a pump reads: a pipe's fd, or read(n) (a pipe's early bytes, drained to a file first)
ReadSource = int | Callable[[int], bytes]


def read_batches(source: ReadSource, on_read: Callable[[int], None] | None = None,
                 batch_bytes: int = BATCH_BYTES) -> Iterator[bytearray]:
    """Blocking: the pipe's bytes in batches of ``batch_bytes`` (the last may be shorter).

    A pipe read returns whatever is there, which for pg_dump is ~10 KiB at a time even with a
    1 MiB pipe; batching cuts the downstream calls (zstd, hash, write, upload wake-ups) ~20x.
    """
    read = source if callable(source) else functools.partial(os.read, source)
    while True:
        batch = bytearray()
        while len(batch) < batch_bytes:
            chunk = read(batch_bytes - len(batch))
            if not chunk:
                if batch:
                    yield batch
                return
            batch += chunk
            if on_read:
                on_read(len(chunk))
        yield batch


def pump(
    source: ReadSource,
    sink: Writable,
    compression: Compression,
    threads: int,
    on_read: Callable[[int], None] | None = None,
    inspect: Callable[[bytearray], None] | None = None,
) -> int:
    """Blocking (run it in a thread): read ``source`` to EOF, compress per ``compression``
    (zstd only: gzip is pg_dump's own -Z), write to ``sink``. Returns the raw bytes read.
    ``inspect`` sees every raw batch first (the archive parser that counts rows)."""
    raw = 0
    if compression.kind == "zstd":
        # write_checksum: each frame carries a checksum, so any later decoder (restore,
        # `zstd -t`) detects corruption of the stored file.
        cctx = zstandard.ZstdCompressor(level=compression.level, threads=threads,
                                        write_checksum=True)
        # The stream writer only ever calls sink.write(); it needs no other file method.
        target = cast("IO[bytes]", sink)
        with cctx.stream_writer(target, write_size=READ_BYTES, closefd=False) as writer:
            for batch in read_batches(source, on_read):
                raw += len(batch)
                if inspect is not None:
                    inspect(batch)
                writer.write(batch)
        return raw
    for batch in read_batches(source, on_read):
        raw += len(batch)
        if inspect is not None:
            inspect(batch)
        sink.write(batch)
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
