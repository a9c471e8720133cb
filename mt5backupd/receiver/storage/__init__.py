"""Receiver storage: append-only, per-client, atomic and verified. Knows nothing of HTTP or metrics.

Layout under ``data_dir`` (one filesystem, so every publish is a rename)::

    backups/<client>/<id>/data        committed bytes (mode 0440), never modified
    backups/<client>/<id>/meta.json   id, name, kind, size, sha256, created, metadata
    partial/<client>/<upload>.data    resumable upload in progress (offset = file size)
    partial/<client>/<upload>.json    its session description
    staging/<random>/                 a backup being assembled; renamed into backups/ whole
    trash/<random>/                   a deleted backup on its way out

A backup becomes visible by one directory rename of a fully written, fsynced directory, so a
reader sees either nothing or the whole verified backup. rename(2) refuses a non-empty target,
so an existing backup can never be replaced: append-only is enforced by the filesystem itself.

Every file read under the root is opened with O_NOFOLLOW (and O_NONBLOCK, so a planted FIFO
cannot hang a request), must be a regular file and must resolve inside the root. An entry that
is not (a symlink, a foreign or corrupt ``meta.json``) is skipped when listing and logged once.

The parts: ``layout`` (paths, confinement, free space), ``reading`` (records, list, open),
``writer`` (hashing appends off the loop), ``publish`` (staging -> rename, one-shot uploads),
``sessions`` (resumable uploads), ``prune`` (delete, retention). ``Storage`` is the one
interface the HTTP layer uses.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any, BinaryIO

from mt5backupd.receiver.storage.errors import (
    BadEntry,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InsufficientStorage,
    InvalidId,
    NotFound,
    ObjectLocked,
    OffsetMismatch,
    RequestTimeout,
    SizeMismatch,
    StorageError,
    StoreUnavailable,
    TooLarge,
    UploadBusy,
)
from mt5backupd.receiver.storage.layout import Layout
from mt5backupd.receiver.storage.prune import Pruner
from mt5backupd.receiver.storage.publish import Publisher, TempUpload
from mt5backupd.receiver.storage.reading import Records
from mt5backupd.receiver.storage.sessions import Sessions, UploadSession
from mt5backupd.receiver.storage.writer import BytesCallback
from mt5backupd.records import BackupRecord
from mt5backupd.retention import Policy

__all__ = [
    "BadEntry",
    "BadRequest",
    "ChecksumMismatch",
    "Conflict",
    "InsufficientStorage",
    "InvalidId",
    "NotFound",
    "ObjectLocked",
    "OffsetMismatch",
    "RequestTimeout",
    "SizeMismatch",
    "Storage",
    "StorageError",
    "StoreUnavailable",
    "TempUpload",
    "TooLarge",
    "UploadBusy",
    "UploadSession",
]


class Storage:
    """The receiver's storage, one object: the parts composed, each method the part's own.

    ``on_bytes`` hears of every batch of bytes written (the HTTP layer counts them in its
    metrics); storage itself holds no metrics."""

    def __init__(
        self,
        root: Path,
        *,
        max_upload_bytes: int,
        min_free_bytes: int,
        partial_ttl_s: float,
        on_bytes: BytesCallback | None = None,
    ) -> None:
        self.layout = Layout(root, min_free_bytes=min_free_bytes)
        self.records = Records(self.layout)
        self.publisher = Publisher(self.records, max_upload_bytes=max_upload_bytes,
                                   on_bytes=on_bytes or (lambda _n: None))
        self.sessions = Sessions(self.publisher, partial_ttl_s=partial_ttl_s)
        self.pruner = Pruner(self.records)

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def partial_ttl_s(self) -> float:
        return self.sessions.partial_ttl_s

    # ---- space ----

    def check_free(self, needed_bytes: int) -> None:
        self.layout.check_free(needed_bytes)

    def usage(self) -> tuple[int, int]:
        return self.layout.usage()

    def partial_count(self) -> int:
        return self.layout.partial_count()

    # ---- resumable uploads ----

    async def create_session(self, client: str, name: str, kind: str,
                             expected_size: int | None, metadata: Any) -> UploadSession:
        return await self.sessions.create(client, name, kind, expected_size, metadata)

    def session_info(self, client: str, uid: str) -> dict[str, Any]:
        return self.sessions.info(client, uid)

    async def append(self, client: str, uid: str, offset: int, chunks: AsyncIterable[bytes],
                     content_length: int | None) -> int:
        return await self.sessions.append(client, uid, offset, chunks, content_length)

    async def commit(self, client: str, uid: str, sha256: str, size: int) -> BackupRecord:
        return await self.sessions.commit(client, uid, sha256, size)

    async def abort(self, client: str, uid: str) -> None:
        await self.sessions.abort(client, uid)

    def expire_partials(self, now: float | None = None) -> int:
        return self.sessions.expire(now)

    # ---- one-shot uploads ----

    async def receive_temp(self, client: str, chunks: AsyncIterable[bytes],
                           content_length: int | None) -> TempUpload:
        return await self.publisher.receive_temp(client, chunks, content_length)

    async def publish_temp(self, temp: TempUpload, name: str, kind: str, metadata: Any,
                           expected_sha256: str | None) -> BackupRecord:
        return await self.publisher.publish_temp(temp, name, kind, metadata, expected_sha256)

    def discard_temp(self, temp: TempUpload) -> None:
        self.publisher.discard_temp(temp)

    # ---- reading ----

    def get(self, client: str, backup_id: str) -> BackupRecord:
        return self.records.get(client, backup_id)

    def clients(self) -> list[str]:
        return self.records.clients()

    def list_backups(self, client: str) -> list[BackupRecord]:
        return self.records.list_backups(client)

    def open_data(self, client: str, backup_id: str) -> tuple[BackupRecord, BinaryIO]:
        return self.records.open_data(client, backup_id)

    # ---- removing (blocking: call from a worker thread on the event loop's side) ----

    def delete(self, client: str, backup_id: str) -> BackupRecord:
        return self.pruner.delete(client, backup_id)

    def prune(self, client: str, policy: Policy, *, dry_run: bool = False) -> list[BackupRecord]:
        return self.pruner.prune(client, policy, dry_run=dry_run)
