"""The S3 ingest path's scratch space: one unlinked temporary file per upload request on local
disk (``[receiver.storage] scratch_dir``), holding the bytes not yet in an uploaded part, so the
heap holds a chunk or two per upload instead of a whole part.

The file has no name from the moment it exists (``O_TMPFILE``, or created and unlinked at once
where that is missing), so it is gone when the request closes it, and a receiver killed with -9
leaves nothing behind: the kernel frees it with the process's descriptors.

A full or unwritable scratch disk is ``InsufficientStorage`` (507, like a full disk on the
filesystem backend), never a 500; the log line names the directory, the client's answer does not.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from loguru import logger

from mt5backupd.errors import ConfigError
from mt5backupd.fsutil import is_disk_full
from mt5backupd.receiver.storage.errors import InsufficientStorage

Buffer = bytes | bytearray | memoryview
FALLBACK_READ_BYTES = 1024 * 1024


def scratch_dir(configured: Path | None) -> Path:
    return configured if configured is not None else Path(tempfile.gettempdir())


def _refusal(exc: OSError, where: Path) -> InsufficientStorage:
    state = "full" if is_disk_full(exc) else "unwritable"
    logger.warning("S3 ingest scratch dir {} is {}: {}", where, state,
                   exc.strerror or type(exc).__name__)
    return InsufficientStorage(f"receiver scratch space is {state} "
                               "([receiver.storage] scratch_dir)")


def preflight(configured: Path | None) -> None:
    """At start-up: a scratch file can be created and written in the scratch dir, else exit 4
    with one line naming the key and the directory."""
    where = scratch_dir(configured)
    try:
        with tempfile.TemporaryFile(dir=where, buffering=0) as f:
            f.write(b"\0")
    except OSError as exc:
        raise ConfigError(f"[receiver.storage] scratch_dir {where}: cannot create a scratch file "
                          f"({exc.strerror or type(exc).__name__})") from None


class ScratchFile:
    """An unlinked temporary file addressed by offset (``pwrite``/``pread``: no shared file
    position, so a writer thread and an uploader's reads never disturb each other)."""

    def __init__(self, configured: Path | None) -> None:
        self.where = scratch_dir(configured)
        try:
            # closed by close(): it lives across awaits of one request
            self._file = tempfile.TemporaryFile(dir=self.where, buffering=0)  # noqa: SIM115
        except OSError as exc:
            raise _refusal(exc, self.where) from None
        self.fd = self._file.fileno()

    def write(self, chunks: Sequence[Buffer], offset: int) -> None:
        """Write ``chunks`` at ``offset``, byte-exactly (runs in a worker thread)."""
        try:
            written = os.pwritev(self.fd, chunks, offset)
            total = sum(len(c) for c in chunks)
            if written < total:  # a short write: finish it piece by piece
                rest = memoryview(b"".join(chunks))[written:]
                offset += written
                while rest:
                    n = os.pwrite(self.fd, rest, offset)
                    rest, offset = rest[n:], offset + n
        except OSError as exc:
            raise _refusal(exc, self.where) from None

    def read(self, offset: int, size: int) -> bytes:
        data = bytearray(size)
        view = memoryview(data)
        while view:
            n = os.preadv(self.fd, [view], offset)
            if n == 0:
                raise InsufficientStorage("receiver scratch file ended early")
            view, offset = view[n:], offset + n
        return bytes(data)

    def body(self, offset: int, size: int) -> SlotBody:
        return SlotBody(self._file, offset, size)

    def close(self) -> None:
        self._file.close()


class SlotBody(Payload):
    """``size`` bytes of the scratch file from ``base``: the body of an UploadPart, for both
    sides of the client. botocore reads it as a seekable file (``read``/``seek``/``tell``/
    ``len``) to sign the payload, and seeks back for a retry; aiohttp then sends it with
    ``sendfile`` from the page cache straight to the socket (one kernel copy, no Python bytes,
    no thread hop per chunk), or, where the transport cannot (TLS), in 1 MiB reads. Not an
    ``io.IOBase``: aiobotocore would wrap it and aiohttp would send it 256 KiB per thread
    hop."""

    def __init__(self, file: Any, base: int, size: int) -> None:
        super().__init__(file)
        self._file = file
        self._fd = file.fileno()
        self._base = base
        self._length = size
        self._pos = 0

    @property
    def size(self) -> int:
        return self._length

    def __len__(self) -> int:
        return self._length

    # ---- the file side, for botocore ----

    def read(self, n: int = -1) -> bytes:
        left = self._length - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._base + self._pos)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    # ---- the payload side, for aiohttp ----

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a part body is binary")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter,
                                content_length: int | None) -> None:
        count = self._length if content_length is None else min(self._length, content_length)
        if count <= 0:
            return
        transport = getattr(writer, "transport", None)
        send_headers = getattr(writer, "send_headers", None)
        if transport is not None and send_headers is not None:
            send_headers()  # aiohttp holds them back to send with the first body bytes
            await writer.drain()
            loop = asyncio.get_running_loop()
            # falls back by itself (reads and writes) where sendfile(2) cannot serve
            await loop.sendfile(transport, self._file, self._base, count)
            return
        offset = self._base
        while count > 0:
            chunk = await asyncio.to_thread(os.pread, self._fd, min(count, FALLBACK_READ_BYTES),
                                            offset)
            if not chunk:
                raise InsufficientStorage("receiver scratch file ended early")
            await writer.write(chunk)
            offset += len(chunk)
            count -= len(chunk)
