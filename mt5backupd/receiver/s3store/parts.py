"""The ingest path to S3: received chunks go into a two-slot ring in a scratch file on local
disk (scratch.py), one part per slot. A full slot is uploaded from the file while the next part
is received into the other slot: receive and upload overlap. The write and the whole-stream
SHA-256 (and an incremental MD5 where Content-MD5 is needed) run in worker threads, pipelined
with the network read, about 1 MiB at a time.

Only when both slots are busy (the store is slower than the client) does the handler stop
reading (TCP backpressure), so per upload the scratch disk holds at most two parts and memory a
batch or two of chunks, whatever the part size.

Order and durability: parts are uploaded one at a time, in order. Once part N is acknowledged
its slot is free and part N+1's upload may start, while ``on_part(parts, hash_state)`` (the
session saves its state there) runs for part N: the parts list and the hash state handed over
are snapshots as of part N's end, so a saved state never covers bytes past the saved parts. The
saves are chained (at most one in flight), so part N+1's state is never saved before part N's:
the durable offset only ever counts acknowledged parts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mt5backupd.receiver.s3store.conn import PART_SHA256, Bucket
from mt5backupd.receiver.s3store.hashstate import ResumableSha256
from mt5backupd.receiver.s3store.scratch import ScratchFile
from mt5backupd.receiver.storage.errors import TooLarge

MIN_PART_BYTES = 5 * 1024**2  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on part numbers
BATCH_BYTES = 1024 * 1024  # what goes to the worker threads at once
SLOTS = 2


@dataclass
class Part:
    number: int
    etag: str
    size: int


async def upload_part(bucket: Bucket, key: str, upload_id: str, number: int, body: Any,
                      md5: str | None) -> str:
    """One UploadPart; returns its ETag. The part is checked on arrival by the store against
    its SHA-256 in the signed ``X-Amz-Content-SHA256`` header (botocore signs the payload when
    there is no Content-MD5); ``md5`` (Content-MD5) where the store requires it: on parts of
    an upload created with Object Lock parameters."""
    extra: dict[str, Any] = {"ContentMD5": md5} if md5 is not None else {}
    resp = await bucket.call("upload_part", "upload_part", Key=key, UploadId=upload_id,
                             PartNumber=number, Body=body, **extra)
    return str(resp["ETag"])


def _md5_b64(h: Any) -> str:
    return base64.b64encode(h.digest()).decode()


class PartWriter:
    """Feeds one multipart upload within one request. ``offset`` counts the bytes in
    acknowledged parts; ``received`` every byte fed (and preloaded). Call ``close()`` whatever
    happens: it stops what is still in flight and removes the scratch file."""

    def __init__(self, bucket: Bucket, key: str, upload_id: str, *, part_size: int,
                 hasher: ResumableSha256, limit: int, offset: int,
                 on_bytes: Callable[[int], None], parts: list[Part] | None = None,
                 scratch_dir: Path | None = None, content_md5: bool = False,
                 on_part: Callable[[list[Part], bytes], Awaitable[None]] | None = None
                 ) -> None:
        self.bucket = bucket
        self.key = key
        self.upload_id = upload_id
        self.part_size = part_size
        self.hasher = hasher
        self.limit = limit
        self.offset = offset
        self.on_bytes = on_bytes
        self.parts = list(parts) if parts is not None else []  # ours: saves get snapshots
        self.on_part = on_part
        self._scratch_dir = scratch_dir
        self._scratch: ScratchFile | None = None
        self._received = offset
        self._next_number = self.parts[-1].number + 1 if self.parts else 1
        self._slot = 0  # the slot being filled; the other one may be on its way to the store
        self._fill = 0  # bytes of the filling slot handed to the writer thread
        self._with_md5 = content_md5
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._part_sha256 = hashlib.sha256()  # of the filling slot as received (conn.PART_SHA256)
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._pending: list[asyncio.Future[None]] = []  # one batch's write+sha256 (and md5)
        self._upload: asyncio.Task[None] | None = None  # the part on its way to the store
        self._saving: asyncio.Task[None] | None = None  # the state save of the part before

    @property
    def received(self) -> int:
        return self._received

    @property
    def pending_bytes(self) -> int:
        """Bytes of the slot being filled (not yet sealed as a part)."""
        return self._fill + self._batch_bytes

    # ---- receiving ----

    def preload(self, tail: bytes) -> None:
        """Start from a session's stored tail (hashed and written with the first batch)."""
        if tail:
            self._batch.append(tail)
            self._batch_bytes += len(tail)
            self._received += len(tail)

    async def feed(self, chunk: bytes) -> None:
        if self._received + len(chunk) > self.limit:
            raise TooLarge(f"upload exceeds {self.limit} bytes")
        self._received += len(chunk)
        self.on_bytes(len(chunk))
        while chunk:
            self._raise_failed_upload()
            room = self.part_size - self._fill - self._batch_bytes
            piece, chunk = (chunk, b"") if len(chunk) <= room else (chunk[:room], chunk[room:])
            self._batch.append(piece)
            self._batch_bytes += len(piece)
            if self.pending_bytes >= self.part_size:
                await self._seal()
            elif self._batch_bytes >= BATCH_BYTES:
                await self._dispatch()

    def _open(self) -> ScratchFile:
        if self._scratch is None:
            self._scratch = ScratchFile(self._scratch_dir)
        return self._scratch

    async def _settle_batch(self) -> None:
        """Wait for the batch in the worker threads; both end before anything else happens,
        even when one fails."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        await asyncio.wait(pending)
        for future in pending:
            error = future.exception()
            if error is not None:
                raise error

    async def _dispatch(self) -> None:
        await self._settle_batch()
        if not self._batch:
            return
        scratch = self._open()
        chunks, self._batch = self._batch, []
        at = self._slot * self.part_size + self._fill
        self._fill += self._batch_bytes
        self._batch_bytes = 0
        md5, hasher, part_hash = self._md5, self.hasher, self._part_sha256

        def write_and_hash() -> None:
            scratch.write(chunks, at)
            for chunk in chunks:
                hasher.update(chunk)
                part_hash.update(chunk)

        def digest() -> None:
            for chunk in chunks:
                md5.update(chunk)

        loop = asyncio.get_running_loop()
        self._pending = [loop.run_in_executor(None, write_and_hash)]
        if self._with_md5:
            self._pending.append(loop.run_in_executor(None, digest))

    async def _seal(self) -> None:
        """The filling slot becomes the next part: its upload starts once the previous part is
        acknowledged (the only wait that stops the reading), and the other slot fills."""
        await self._dispatch()
        await self._settle_batch()
        number = self._next_number
        if number > MAX_PARTS:
            raise TooLarge(f"upload needs more than {MAX_PARTS} parts of {self.part_size} bytes")
        size, snapshot = self._fill, self.hasher.state()
        md5 = _md5_b64(self._md5) if self._with_md5 else None
        sha256 = self._part_sha256.hexdigest()
        await self._wait_upload()
        self._upload = asyncio.create_task(self._send(self._slot, size, md5, number, snapshot,
                                                      sha256))
        self._next_number += 1
        self._slot = (self._slot + 1) % SLOTS
        self._fill = 0
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._part_sha256 = hashlib.sha256()

    async def _send(self, slot: int, size: int, md5: str | None, number: int, snapshot: bytes,
                    sha256: str) -> None:
        body: Any = self._open().body(slot * self.part_size, size) if size else b""
        PART_SHA256.set(sha256)  # this task's own context: checked when botocore sends it
        etag = await upload_part(self.bucket, self.key, self.upload_id, number, body, md5)
        self.parts.append(Part(number, etag, size))
        parts = list(self.parts)
        await self._wait_save()  # the part before first: saves in order, one at a time
        self._saving = asyncio.create_task(self._save(parts, snapshot, size))

    async def _save(self, parts: list[Part], snapshot: bytes, size: int) -> None:
        if self.on_part is not None:
            await self.on_part(parts, snapshot)
        self.offset += size

    def _raise_failed_upload(self) -> None:
        """A part upload or state save that failed ends the request now: no point reading
        more."""
        for name in ("_upload", "_saving"):
            task = getattr(self, name)
            if task is not None and task.done():
                setattr(self, name, None)
                task.result()

    async def _wait_upload(self) -> None:
        if self._upload is not None:
            upload, self._upload = self._upload, None
            await upload

    async def _wait_save(self) -> None:
        saving = self._saving
        if saving is not None:
            # shielded and left in place until it is done: a cancelled waiter (close() stopping
            # the upload that waits here) leaves it running, and close() still finds it
            await asyncio.shield(saving)
            if self._saving is saving:
                self._saving = None

    # ---- the end of a request ----

    async def drain(self) -> None:
        """Everything received is in the scratch file and hashed, and the part on its way is
        acknowledged (its state saved); what is left is ``pending_bytes`` in the filling slot."""
        await self._dispatch()
        await self._settle_batch()
        await self._wait_upload()
        await self._wait_save()

    async def flush(self) -> None:
        """Upload the filling slot as the next part and wait for it and its state (the caller
        knows it may: at least MIN_PART_BYTES, or the last part)."""
        await self._seal()
        await self._wait_upload()
        await self._wait_save()

    async def read_pending(self) -> bytes:
        """The filling slot's bytes (after ``drain``; the caller keeps them small: a tail)."""
        if not self._fill:
            return b""
        return await asyncio.to_thread(self._open().read, self._slot * self.part_size,
                                       self._fill)

    async def close(self) -> None:
        """Stop an upload still in flight (its part is simply not acknowledged), let the state
        save of the last acknowledged part finish (a short conditional PUT, shielded: cut
        short, the durable offset would fall a part behind the store), let the worker threads
        end, remove the scratch file once nothing uses it any more."""
        pending, self._pending = self._pending, []
        upload, self._upload = self._upload, None
        try:
            if upload is not None:
                upload.cancel()
                try:
                    with contextlib.suppress(Exception):  # the request failed already
                        await upload
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # we are cancelled ourselves, not just the upload
            saving, self._saving = self._saving, None  # the newest: an upload may have ended
            if saving is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(saving)
            if pending:
                await asyncio.shield(asyncio.wait(pending))
        finally:
            scratch, self._scratch = self._scratch, None
            running: list[asyncio.Future[Any]] = [f for f in pending if not f.done()]
            if upload is not None and not upload.done():
                running.append(upload)  # cancelled, but still between its awaits
            if scratch is not None and running:
                # cancelled while a thread still writes or the upload still reads: close once
                # they end, never under them (a reused descriptor number would take the I/O)
                asyncio.gather(*running, return_exceptions=True).add_done_callback(
                    lambda _f: scratch.close())
            elif scratch is not None:
                scratch.close()
