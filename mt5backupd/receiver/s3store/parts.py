"""The ingest path to S3: received chunks gathered into parts of ``part_size`` bytes, each
uploaded (with Content-MD5) while the whole-stream SHA-256 runs in a worker thread.

Memory per upload is bounded by one part: a chunk is split at the part boundary (no copy of
the part), and while a part is on its way the next chunk is not read, so a fast client waits
(TCP backpressure) instead of filling memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mt5backupd.receiver.s3store.conn import Bucket, content_md5
from mt5backupd.receiver.s3store.hashstate import ResumableSha256
from mt5backupd.receiver.storage.errors import TooLarge

MIN_PART_BYTES = 5 * 1024**2  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on part numbers


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
    buf: bytearray = field(default_factory=bytearray)
    on_part: Callable[[], Awaitable[None]] | None = None

    @property
    def received(self) -> int:
        return self.offset + len(self.buf)

    async def feed(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.limit:
            raise TooLarge(f"upload exceeds {self.limit} bytes")
        self.on_bytes(len(chunk))
        view = memoryview(chunk)
        while view:
            room = self.part_size - len(self.buf)
            self.buf += view[:room]
            view = view[room:]
            if len(self.buf) >= self.part_size:
                await self.flush()

    async def flush(self) -> None:
        """Upload what is buffered as the next part (the caller knows it may: at least
        MIN_PART_BYTES, or the last part)."""
        data, self.buf = self.buf, bytearray()
        number = self.parts[-1].number + 1 if self.parts else 1
        if number > MAX_PARTS:
            raise TooLarge(f"upload needs more than {MAX_PARTS} parts of {self.part_size} bytes")
        hashing = asyncio.create_task(asyncio.to_thread(self.hasher.update, data))
        try:
            md5 = await asyncio.to_thread(content_md5, data)
            resp = await self.bucket.call("upload_part", "upload_part", Key=self.key,
                                          UploadId=self.upload_id, PartNumber=number,
                                          Body=data, ContentMD5=md5)
        finally:
            await hashing  # the thread uses ``data``; never leave it running behind us
        self.parts.append(Part(number, str(resp["ETag"]), len(data)))
        self.offset += len(data)
        if self.on_part is not None:
            await self.on_part()
