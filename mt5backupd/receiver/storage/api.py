"""The storage interface the HTTP layer uses, whatever holds the bytes: the filesystem
(``FilesystemBackend`` around ``Storage``) or an S3-compatible bucket
(``mt5backupd.receiver.s3store.S3Storage``). Both keep the same promises, checked by one
conformance suite (tests/test_storage_conformance.py): sessions and offsets, commit verified by
sha256 and size, append-only names, per-client namespaces, partial uploads never listed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from mt5backupd.receiver.storage import Storage, TempUpload
from mt5backupd.records import BackupRecord
from mt5backupd.retention import Policy

DOWNLOAD_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SessionRef:
    uid: str
    client: str


@dataclass
class Pruned:
    """What a prune removed (or would remove), and what it had to keep because the store holds
    it under Object Lock retention."""

    removed: list[BackupRecord] = field(default_factory=list)
    locked: list[BackupRecord] = field(default_factory=list)


class DataReader(Protocol):
    """A committed backup's bytes, opened: read a span as it streams, then close."""

    def chunks(self, start: int, length: int) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class StorageBackend(Protocol):
    """What the routes call. Refusals are ``StorageError`` subclasses (the middleware maps them
    to statuses); an unreachable store is ``StoreUnavailable`` (503), never a 500."""

    name: str
    partial_ttl_s: float

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create_session(self, client: str, name: str, kind: str,
                             expected_size: int | None, metadata: Any) -> SessionRef: ...

    async def session_info(self, client: str, uid: str) -> dict[str, Any]: ...

    async def append(self, client: str, uid: str, offset: int, chunks: AsyncIterable[bytes],
                     content_length: int | None) -> int: ...

    async def commit(self, client: str, uid: str, sha256: str, size: int) -> BackupRecord: ...

    async def abort(self, client: str, uid: str) -> None: ...

    async def receive_temp(self, client: str, chunks: AsyncIterable[bytes],
                           content_length: int | None) -> Any: ...

    async def publish_temp(self, temp: Any, name: str, kind: str, metadata: Any,
                           expected_sha256: str | None) -> BackupRecord: ...

    async def discard_temp(self, temp: Any) -> None: ...

    async def get(self, client: str, backup_id: str) -> BackupRecord: ...

    async def clients(self) -> list[str]: ...

    async def list_backups(self, client: str) -> list[BackupRecord]: ...

    async def open_data(self, client: str, backup_id: str) -> tuple[BackupRecord, DataReader]: ...

    async def delete(self, client: str, backup_id: str) -> BackupRecord: ...

    async def prune(self, client: str, policy: Policy, *, dry_run: bool = False) -> Pruned: ...

    def usage(self) -> tuple[int, int | None]: ...

    def partial_count(self) -> int: ...

    async def expire_partials(self, now: float | None = None) -> int:
        """Remove sessions idle past partial_ttl_s at ``now`` (default: the clock); how many."""
        ...

    async def health(self) -> dict[str, Any]: ...


class FileReader:
    """A data file opened with the layout's safety rules, read in a worker thread."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh

    async def chunks(self, start: int, length: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._fh.seek, start)
        remaining = length
        while remaining > 0:
            block = await loop.run_in_executor(None, self._fh.read,
                                               min(DOWNLOAD_CHUNK_BYTES, remaining))
            if not block:
                return  # shorter on disk than its record: the caller sees it end early
            remaining -= len(block)
            yield block

    async def close(self) -> None:
        self._fh.close()


class FilesystemBackend:
    """``Storage`` (data_dir on one filesystem) behind the async interface. Its behaviour is
    Storage's own; blocking removals run in a worker thread as they always did."""

    name = "filesystem"

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.partial_ttl_s = storage.partial_ttl_s

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def create_session(self, client: str, name: str, kind: str,
                             expected_size: int | None, metadata: Any) -> SessionRef:
        sess = await self.storage.create_session(client, name, kind, expected_size, metadata)
        return SessionRef(sess.uid, sess.client)

    async def session_info(self, client: str, uid: str) -> dict[str, Any]:
        return self.storage.session_info(client, uid)

    async def append(self, client: str, uid: str, offset: int, chunks: AsyncIterable[bytes],
                     content_length: int | None) -> int:
        return await self.storage.append(client, uid, offset, chunks, content_length)

    async def commit(self, client: str, uid: str, sha256: str, size: int) -> BackupRecord:
        return await self.storage.commit(client, uid, sha256, size)

    async def abort(self, client: str, uid: str) -> None:
        await self.storage.abort(client, uid)

    async def receive_temp(self, client: str, chunks: AsyncIterable[bytes],
                           content_length: int | None) -> TempUpload:
        return await self.storage.receive_temp(client, chunks, content_length)

    async def publish_temp(self, temp: Any, name: str, kind: str, metadata: Any,
                           expected_sha256: str | None) -> BackupRecord:
        return await self.storage.publish_temp(temp, name, kind, metadata, expected_sha256)

    async def discard_temp(self, temp: Any) -> None:
        self.storage.discard_temp(temp)

    async def get(self, client: str, backup_id: str) -> BackupRecord:
        return self.storage.get(client, backup_id)

    async def clients(self) -> list[str]:
        return self.storage.clients()

    async def list_backups(self, client: str) -> list[BackupRecord]:
        return self.storage.list_backups(client)

    async def open_data(self, client: str, backup_id: str) -> tuple[BackupRecord, DataReader]:
        record, fh = self.storage.open_data(client, backup_id)
        return record, FileReader(fh)

    async def delete(self, client: str, backup_id: str) -> BackupRecord:
        return await asyncio.to_thread(self.storage.delete, client, backup_id)

    async def prune(self, client: str, policy: Policy, *, dry_run: bool = False) -> Pruned:
        removed = await asyncio.to_thread(self.storage.prune, client, policy, dry_run=dry_run)
        return Pruned(removed=removed)

    def usage(self) -> tuple[int, int | None]:
        return self.storage.usage()

    def partial_count(self) -> int:
        return self.storage.partial_count()

    async def expire_partials(self, now: float | None = None) -> int:
        return self.storage.expire_partials(now)

    async def health(self) -> dict[str, Any]:
        _used, free = await asyncio.to_thread(self.storage.usage)
        return {"backend": self.name, "state": "ok", "free_bytes": free}
