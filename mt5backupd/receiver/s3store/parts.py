"""The ingest path to S3: received chunks gathered into parts of ``part_size`` bytes, each
uploaded (with Content-MD5) while the whole-stream SHA-256 runs in a worker thread.

Memory per upload is bounded by one part: a chunk is split at the part boundary (no copy of
the part), and while a part is on its way the next chunk is not read, so a fast client waits
(TCP backpressure) instead of filling memory.
"""

from __future__ import annotations

import asyncio
import ctypes
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mt5backupd.receiver.s3store.conn import Bucket, content_md5
from mt5backupd.receiver.s3store.hashstate import ResumableSha256
from mt5backupd.receiver.storage.errors import TooLarge

MIN_PART_BYTES = 5 * 1024**2  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on part numbers


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_mmap_threshold(threshold_bytes: int = 4 * 1024 * 1024) -> bool:
    """Have glibc serve part buffers (>= 5 MiB) with their own mmap, returned to the system
    when an upload ends. mt5backupd.tuning sets the threshold to 32 MiB and keeps freed heap for
    the filesystem path's 1 MiB buffers; part buffers from that heap would stay in the RSS after
    their uploads, several parts' worth over time. 4 MiB keeps the 1 MiB body chunks on the
    heap as tuned. False where there is no glibc."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


class PartBody(io.RawIOBase):
    """A part's buffer as a file, without a copy: aiohttp then sends it 64 KiB at a time. As
    bytes it would be written whole, and Python 3.11's transport copies whatever the socket
    does not take at once: up to a second part's worth of memory per upload."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._view = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._view[self._pos:self._pos + len(buffer)]
        n = len(chunk)
        memoryview(buffer)[:n] = chunk
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return len(self._view)



@dataclass
class Part:
    number: int
    etag: str
    size: int


@dataclass
class PartWriter:
    """Feeds one multipart upload. ``offset`` counts bytes in uploaded parts (and the hash);
    ``buf`` holds what is received but not yet in a part. ``on_part`` runs after each part
    (the session saves its state there)."""

    bucket: Bucket
    key: str
    upload_id: str
    part_size: int
    hasher: ResumableSha256
    limit: int
    offset: int
    on_bytes: Callable[[int], None]
    parts: list[Part] = field(default_factory=list)
    on_part: Callable[[], Awaitable[None]] | None = None
    # one part's buffer, allocated once at its full size and reused (no growth, no copies)
    _buf: bytearray | None = None
    _fill: int = 0

    @property
    def buffered(self) -> memoryview:
        """The bytes received but not yet in a part."""
        return memoryview(self._buf or b"")[:self._fill]

    @property
    def received(self) -> int:
        return self.offset + self._fill

    def _put(self, data: memoryview | bytes) -> int:
        if self._buf is None:
            self._buf = bytearray(self.part_size)
        n = min(len(data), self.part_size - self._fill)
        self._buf[self._fill:self._fill + n] = data[:n]
        self._fill += n
        return n

    def preload(self, tail: bytes) -> None:
        """Start from a session's stored tail."""
        self._put(tail)

    async def feed(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.limit:
            raise TooLarge(f"upload exceeds {self.limit} bytes")
        self.on_bytes(len(chunk))
        view = memoryview(chunk)
        while view:
            view = view[self._put(view):]
            if self._fill >= self.part_size:
                await self.flush()

    async def flush(self) -> None:
        """Upload what is buffered as the next part (the caller knows it may: at least
        MIN_PART_BYTES, or the last part)."""
        data = self.buffered
        number = self.parts[-1].number + 1 if self.parts else 1
        if number > MAX_PARTS:
            raise TooLarge(f"upload needs more than {MAX_PARTS} parts of {self.part_size} bytes")
        hashing = asyncio.create_task(asyncio.to_thread(self.hasher.update, data))
        try:
            md5 = await asyncio.to_thread(content_md5, data)
            body = PartBody(data)
            try:
                resp = await self.bucket.call("upload_part", "upload_part", Key=self.key,
                                              UploadId=self.upload_id, PartNumber=number,
                                              Body=body, ContentMD5=md5)
            finally:
                body.close()
        finally:
            await hashing  # the thread uses ``data``; never leave it running behind us
        self.parts.append(Part(number, str(resp["ETag"]), len(data)))
        self.offset += len(data)
        self._fill = 0
        if self.on_part is not None:
            await self.on_part()
