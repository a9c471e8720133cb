"""Publish, the only way anything becomes a backup (staging dir, fsync, one rename), and the
one-shot uploads that feed it: a whole body into a temp file, then published."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mt5backupd.fsutil import atomic_write_json, fsync_dir, is_disk_full
from mt5backupd.names import InvalidName, validate_backup_id, validate_kind
from mt5backupd.receiver.storage.errors import (
    BadEntry,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InsufficientStorage,
    InvalidId,
    TooLarge,
)
from mt5backupd.receiver.storage.layout import MAX_METADATA_BYTES, ONESHOT_PREFIX
from mt5backupd.receiver.storage.reading import Records
from mt5backupd.receiver.storage.writer import BytesCallback, ChunkWriter
from mt5backupd.records import BackupRecord


@dataclass(frozen=True)
class TempUpload:
    """A one-shot upload fully received into a temp file, not yet published."""

    client: str
    path: Path
    size: int
    sha256: str


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise BadRequest("metadata must be a JSON object")
    if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        raise BadRequest(f"metadata larger than {MAX_METADATA_BYTES} bytes")
    return metadata


def check_name_and_kind(name: str, kind: str) -> None:
    try:
        validate_backup_id(name)
        validate_kind(kind)
    except InvalidName as exc:
        raise InvalidId(str(exc)) from None


class Publisher:
    def __init__(self, records: Records, *, max_upload_bytes: int,
                 on_bytes: BytesCallback) -> None:
        self.records = records
        self.layout = records.layout
        self.max_upload_bytes = max_upload_bytes
        self.on_bytes = on_bytes

    async def publish(
        self,
        client: str,
        data_src: Path,
        name: str,
        kind: str,
        size: int,
        sha256: str,
        metadata: dict[str, Any],
    ) -> BackupRecord:
        """Move ``data_src`` (fully written and verified) into a new backup ``name``. The same
        bytes under the same name again answer with the existing record (a retry)."""
        layout = self.layout
        dest = layout.backup_dir(client, name)
        try:
            existing = self.records.read(client, name)
        except BadEntry as exc:
            layout.warn_once(f"backups/{client}/{name}", str(exc))
            raise Conflict(f"backup {name!r} already exists") from None
        if existing is not None:
            if existing.sha256 == sha256 and existing.size == size:
                # A retried upload of the very same bytes: answer as if it were the first.
                with contextlib.suppress(FileNotFoundError):
                    data_src.unlink()
                return existing
            raise Conflict(f"backup {name!r} already exists with other content")
        record = BackupRecord(id=name, client=client, name=name, kind=kind, size=size,
                              sha256=sha256, created=now_iso(), metadata=metadata)

        def assemble() -> None:
            stage = layout.root / "staging" / secrets.token_hex(16)
            stage.mkdir(mode=0o750)
            moved = False
            try:
                os.rename(data_src, stage / "data")
                moved = True
                os.chmod(stage / "data", 0o440)
                fd = os.open(stage / "data", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                atomic_write_json(stage / "meta.json", record.to_json(), mode=0o440)
                fsync_dir(stage)
                dest.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
                try:
                    os.rename(stage, dest)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        raise Conflict(f"backup {name!r} already exists") from None
                    raise
                fsync_dir(dest.parent)
            except BaseException:
                if moved:  # give the data back: the upload can still be committed later
                    with contextlib.suppress(OSError):
                        os.rename(stage / "data", data_src)
                shutil.rmtree(stage, ignore_errors=True)
                raise

        try:
            await asyncio.get_running_loop().run_in_executor(None, assemble)
        except OSError as exc:
            if is_disk_full(exc):
                raise InsufficientStorage("receiver disk full") from None
            raise
        return record

    # ---- one-shot (legacy) uploads ----

    async def receive_temp(
        self, client: str, chunks: AsyncIterable[bytes], content_length: int | None
    ) -> TempUpload:
        """Stream a whole body into a temp file, hashing it; the temp is removed on any error."""
        if content_length is not None and content_length > self.max_upload_bytes:
            raise TooLarge(f"upload of {content_length} bytes exceeds max_upload_bytes "
                           f"{self.max_upload_bytes}")
        self.layout.check_free(content_length or 0)
        tmp_dir = self.layout.client_dir("partial", client)
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        path = tmp_dir / f"{ONESHOT_PREFIX}{secrets.token_hex(16)}.data"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        hasher = hashlib.sha256()
        writer = ChunkWriter(fd, hasher, 0, self.max_upload_bytes, on_bytes=self.on_bytes,
                             check_free=self.layout.check_free)
        try:
            try:
                async for chunk in chunks:
                    await writer.feed(chunk)
                await writer.finish()
            except BaseException:
                await writer.drain_quietly()
                raise
            finally:
                os.close(fd)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise InsufficientStorage("receiver disk full") from None
            raise
        return TempUpload(client, path, writer.offset, hasher.hexdigest())

    async def publish_temp(
        self,
        temp: TempUpload,
        name: str,
        kind: str,
        metadata: Any,
        expected_sha256: str | None,
    ) -> BackupRecord:
        try:
            check_name_and_kind(name, kind)
            metadata = check_metadata(metadata)
            if expected_sha256 is not None and expected_sha256.lower() != temp.sha256:
                raise ChecksumMismatch(expected_sha256.lower(), temp.sha256)
            return await self.publish(temp.client, temp.path, name, kind, temp.size,
                                      temp.sha256, metadata)
        finally:
            self.discard_temp(temp)

    def discard_temp(self, temp: TempUpload) -> None:
        with contextlib.suppress(FileNotFoundError):
            temp.path.unlink()
