"""The ingest path: received chunks appended to a file and hashed, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

from mt5backupd.fsutil import is_disk_full
from mt5backupd.receiver.storage.errors import InsufficientStorage, TooLarge

WRITE_CHUNK_BYTES = 1024 * 1024
FREE_CHECK_EVERY_BYTES = 64 * 1024 * 1024

BytesCallback = Callable[[int], None]


class ChunkWriter:
    """Appends to ``fd`` while hashing, off the event loop, pipelined with the network read.

    Received chunks are collected as they are (no copy on the event loop); every ~1 MiB the batch
    goes to two worker threads at once, one ``writev`` and one ``sha256.update`` (both release
    the GIL), while the loop reads the next batch. ``offset`` advances only after a batch is
    fully written; after a failure the caller truncates the file back to ``offset`` and drops
    the hash state (it is rebuilt from disk), so the state is exact again.

    ``on_bytes`` hears of every batch written (the metrics); ``check_free`` runs every
    FREE_CHECK_EVERY_BYTES in the writing thread and raises to stop a disk filling up.
    """

    def __init__(self, fd: int, hasher: Any, offset: int, limit: int, *,
                 on_bytes: BytesCallback, check_free: Callable[[int], None]) -> None:
        self._fd = fd
        self._hasher = hasher
        self.offset = offset
        self._limit = limit
        self._on_bytes = on_bytes
        self._check_free = check_free
        self._received = offset
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._pending: list[asyncio.Future[None]] = []  # the write and the hash of one batch
        self._pending_bytes = 0
        self._since_free_check = 0

    async def feed(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self._limit:
            raise TooLarge(f"upload exceeds {self._limit} bytes")
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= WRITE_CHUNK_BYTES:
            await self._dispatch()

    async def _settle(self) -> None:
        """Wait for the batch in flight; both threads end before anything else happens, even
        when one of them fails (the other may still be using the fd)."""
        if not self._pending:
            return
        await asyncio.wait(self._pending)
        pending, self._pending = self._pending, []
        for future in pending:
            error = future.exception()
            if error is not None:
                raise error
        self.offset += self._pending_bytes
        self._on_bytes(self._pending_bytes)
        self._pending_bytes = 0

    async def _dispatch(self) -> None:
        await self._settle()
        if self._chunks:
            chunks, self._chunks = self._chunks, []
            self._pending_bytes, self._buffered = self._buffered, 0
            loop = asyncio.get_running_loop()
            self._pending = [loop.run_in_executor(None, self._write, chunks),
                             loop.run_in_executor(None, self._hash, chunks)]

    def _write(self, chunks: list[bytes]) -> None:
        total = sum(len(c) for c in chunks)
        try:
            written = os.writev(self._fd, chunks)
            if written < total:  # a short writev: finish byte-exactly
                rest = memoryview(b"".join(chunks))[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        except OSError as exc:
            if is_disk_full(exc):
                raise InsufficientStorage("receiver disk full") from None
            raise
        self._since_free_check += total
        if self._since_free_check >= FREE_CHECK_EVERY_BYTES:
            self._since_free_check = 0
            self._check_free(0)

    def _hash(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hasher.update(chunk)

    async def finish(self) -> None:
        """Write what is buffered and make it durable."""
        await self._dispatch()
        await self._settle()
        await asyncio.get_running_loop().run_in_executor(None, os.fsync, self._fd)

    async def drain_quietly(self) -> None:
        """After a failure or a cancel: let in-flight threads end before the fd is closed and
        the file truncated, so nothing is written behind our back."""
        if self._pending:
            with contextlib.suppress(BaseException):
                await asyncio.shield(asyncio.wait(self._pending))
            self._pending = []


async def feed_from_client(chunks: AsyncIterable[bytes],
                           feed: Callable[[bytes], Awaitable[None]]) -> Exception | None:
    """Feed the client's body to ``feed``. A failure of the client's stream (it went away, a
    timeout) ends the loop and is returned, not raised: what arrived is kept (tus semantics)
    and the caller re-raises it after settling; a failure of ``feed`` propagates."""
    iterator = chunks.__aiter__()
    while True:
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as exc:  # noqa: BLE001 - any failure of the client stream: keep what arrived
            return exc
        await feed(chunk)
