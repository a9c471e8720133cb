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

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from mt5backupd.errors import ConfigError
from mt5backupd.fsutil import is_disk_full
from mt5backupd.receiver.storage.errors import InsufficientStorage

Buffer = bytes | bytearray | memoryview


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
        return SlotBody(self.fd, offset, size)

    def close(self) -> None:
        self._file.close()


class SlotBody(io.RawIOBase):
    """``size`` bytes of the scratch file from ``base``, as a seekable file of its own: the
    body of an UploadPart. botocore reads it to sign the payload and seeks back (and again for
    a retry); aiohttp then sends it in 256 KiB reads. No ``fileno()``: aiohttp would take the
    size of the whole file from it."""

    def __init__(self, fd: int, base: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._base = base
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:n]], self._base + self._pos)
        self._pos += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._size
