"""Resumable uploads: create, append at an offset, commit (verify, then publish), abort, and
expire the idle ones. One lock per upload: one connection writes it at a time.

An upload lives as ``partial/<client>/<uid>.data`` (its offset is the file size) and
``<uid>.json`` (its description), so it survives a restart; the hash state is then rebuilt
from disk on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import stat
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Any

from mt5backupd.fsutil import atomic_write_json, is_disk_full
from mt5backupd.receiver.storage.errors import (
    BadEntry,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InsufficientStorage,
    NotFound,
    OffsetMismatch,
    SizeMismatch,
    TooLarge,
    UploadBusy,
)
from mt5backupd.receiver.storage.layout import open_regular, read_small_json, real_subdirs
from mt5backupd.receiver.storage.publish import (
    Publisher,
    check_metadata,
    check_name_and_kind,
    now_iso,
)
from mt5backupd.receiver.storage.writer import WRITE_CHUNK_BYTES, ChunkWriter, feed_from_client
from mt5backupd.records import BackupRecord

ABORT_WAIT_S = 30.0


@dataclass
class UploadSession:
    uid: str
    client: str
    name: str
    kind: str
    expected_size: int | None
    metadata: dict[str, Any]
    created: str
    offset: int = 0
    hasher: Any = None  # hashlib sha256 over bytes [0, offset); None = re-hash from disk
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def to_json(self) -> dict[str, Any]:
        return {
            "upload_id": self.uid,
            "name": self.name,
            "kind": self.kind,
            "expected_size": self.expected_size,
            "metadata": self.metadata,
            "created": self.created,
        }


class Sessions:
    def __init__(self, publisher: Publisher, *, partial_ttl_s: float) -> None:
        self.publisher = publisher
        self.layout = publisher.layout
        self.partial_ttl_s = partial_ttl_s
        self._sessions: dict[tuple[str, str], UploadSession] = {}

    @property
    def max_upload_bytes(self) -> int:
        return self.publisher.max_upload_bytes

    async def create(
        self,
        client: str,
        name: str,
        kind: str,
        expected_size: int | None,
        metadata: Any,
    ) -> UploadSession:
        check_name_and_kind(name, kind)
        metadata = check_metadata(metadata)
        if expected_size is not None:
            if expected_size < 0:
                raise BadRequest("size must be >= 0")
            if expected_size > self.max_upload_bytes:
                raise TooLarge(f"size {expected_size} exceeds max_upload_bytes "
                               f"{self.max_upload_bytes}")
            self.layout.check_free(expected_size)
        if self.layout.backup_dir(client, name).exists():
            raise Conflict(f"backup {name!r} already exists")
        uid = secrets.token_hex(16)
        data_path, meta_path = self.layout.partial_paths(client, uid)
        data_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        sess = UploadSession(uid, client, name, kind, expected_size, metadata, now_iso(),
                             hasher=hashlib.sha256())
        fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        atomic_write_json(meta_path, sess.to_json())
        self._sessions[(client, uid)] = sess
        return sess

    def _get(self, client: str, uid: str) -> UploadSession:
        data_path, meta_path = self.layout.partial_paths(client, uid)
        key = (client, uid)
        sess = self._sessions.get(key)
        if sess is not None:
            if data_path.exists():
                return sess
            self._sessions.pop(key, None)  # expired or removed underneath us
            raise NotFound(f"upload {uid} not found")
        try:
            info = read_small_json(meta_path)
            st = os.lstat(data_path)
            if not stat.S_ISREG(st.st_mode):
                raise BadEntry("upload data is not a regular file")
            expected = info.get("expected_size")
            sess = UploadSession(uid, client, str(info["name"]), str(info["kind"]),
                                 expected if isinstance(expected, int) else None,
                                 check_metadata(info.get("metadata")), str(info["created"]),
                                 offset=st.st_size, hasher=None)
        except FileNotFoundError:
            raise NotFound(f"upload {uid} not found") from None
        except (BadEntry, BadRequest, KeyError, AttributeError) as exc:
            self.layout.warn_once(f"partial/{client}/{uid}", str(exc) or type(exc).__name__)
            raise NotFound(f"upload {uid} not found") from None
        # After a restart the hash is rebuilt from disk on first use (see _ensure_hasher).
        self._sessions[key] = sess
        return sess

    async def _ensure_hasher(self, sess: UploadSession) -> None:
        if sess.hasher is not None:
            return
        data_path, _ = self.layout.partial_paths(sess.client, sess.uid)

        def rehash() -> tuple[Any, int]:
            h = hashlib.sha256()
            n = 0
            with os.fdopen(open_regular(data_path), "rb") as fh:
                while block := fh.read(WRITE_CHUNK_BYTES):
                    h.update(block)
                    n += len(block)
            return h, n

        sess.hasher, sess.offset = await asyncio.get_running_loop().run_in_executor(None, rehash)

    def info(self, client: str, uid: str) -> dict[str, Any]:
        sess = self._get(client, uid)
        if sess.hasher is None:  # the file size is the offset; no need to re-hash to answer
            data_path, _ = self.layout.partial_paths(client, uid)
            sess.offset = os.lstat(data_path).st_size
        return {**sess.to_json(), "offset": sess.offset}

    def _upload_limit(self, sess: UploadSession) -> int:
        if sess.expected_size is not None:
            return min(sess.expected_size, self.max_upload_bytes)
        return self.max_upload_bytes

    async def append(
        self,
        client: str,
        uid: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        content_length: int | None,
    ) -> int:
        """Append the body at ``offset``; return the new offset.

        If the client goes away mid-body, what arrived is kept (tus semantics) and the error is
        re-raised. A size or space refusal removes the whole upload: its data is worthless and
        the space is what is short.
        """
        sess = self._get(client, uid)
        if sess.lock.locked():
            raise UploadBusy(f"upload {uid} is receiving data on another connection")
        async with sess.lock:
            await self._ensure_hasher(sess)
            if offset != sess.offset:
                raise OffsetMismatch(offset, sess.offset)
            limit = self._upload_limit(sess)
            if content_length is not None and offset + content_length > limit:
                await self._discard(sess)
                raise TooLarge(f"upload would reach {offset + content_length} bytes, over {limit}")
            try:
                self.layout.check_free(content_length or 0)
            except InsufficientStorage:
                await self._discard(sess)
                raise
            data_path, _ = self.layout.partial_paths(client, uid)
            fd = os.open(data_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            writer = ChunkWriter(fd, sess.hasher, sess.offset, limit,
                                 on_bytes=self.publisher.on_bytes,
                                 check_free=self.layout.check_free)
            source_error: BaseException | None = None
            try:
                source_error = await feed_from_client(chunks, writer.feed)
                await writer.finish()
            except BaseException as exc:
                await writer.drain_quietly()
                os.close(fd)
                fd = -1
                if isinstance(exc, TooLarge | InsufficientStorage) or (
                    isinstance(exc, OSError) and is_disk_full(exc)
                ):
                    await self._discard(sess)
                    if isinstance(exc, OSError):
                        raise InsufficientStorage("receiver disk full") from None
                    raise
                # Unknown failure: cut back to the last fully written batch; the hash may have run
                # ahead of the write, so it is rebuilt from disk on next use.
                with contextlib.suppress(OSError):
                    os.truncate(data_path, writer.offset)
                sess.offset = writer.offset
                sess.hasher = None
                raise
            finally:
                if fd >= 0:
                    os.close(fd)
            sess.offset = writer.offset
            os.utime(data_path)  # activity keeps the session alive for partial_ttl_s
            if source_error is not None:
                raise source_error
            return sess.offset

    async def commit(self, client: str, uid: str, sha256: str, size: int) -> BackupRecord:
        sess = self._get(client, uid)
        if sess.lock.locked():
            raise UploadBusy(f"upload {uid} is receiving data on another connection")
        async with sess.lock:
            await self._ensure_hasher(sess)
            actual_sha = sess.hasher.hexdigest()
            if size != sess.offset:
                await self._discard(sess)
                raise SizeMismatch(size, sess.offset)
            if sha256.lower() != actual_sha:
                await self._discard(sess)
                raise ChecksumMismatch(sha256.lower(), actual_sha)
            data_path, meta_path = self.layout.partial_paths(client, uid)
            record = await self.publisher.publish(client, data_path, sess.name, sess.kind,
                                                  sess.offset, actual_sha, sess.metadata)
            with contextlib.suppress(FileNotFoundError):
                meta_path.unlink()
            self._sessions.pop((client, uid), None)
            return record

    async def abort(self, client: str, uid: str) -> None:
        """Remove an upload. A PATCH still finishing (its client just went away) is waited for,
        so its last write cannot recreate what was removed."""
        sess = self._get(client, uid)
        try:
            await asyncio.wait_for(sess.lock.acquire(), ABORT_WAIT_S)
        except TimeoutError:
            raise UploadBusy(f"upload {uid} is still receiving data on another connection"
                             ) from None
        try:
            await self._discard(sess)
        finally:
            sess.lock.release()

    async def _discard(self, sess: UploadSession) -> None:
        data_path, meta_path = self.layout.partial_paths(sess.client, sess.uid)
        for path in (meta_path, data_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._sessions.pop((sess.client, sess.uid), None)

    def expire(self, now: float | None = None) -> int:
        """Remove uploads idle for longer than partial_ttl_s; return how many."""
        now = time.time() if now is None else now
        removed = 0
        for client_dir in real_subdirs(self.layout.root / "partial"):
            for orphan in client_dir.glob("*.json"):  # a description whose data is gone
                if not orphan.with_suffix(".data").exists():
                    with contextlib.suppress(FileNotFoundError):
                        orphan.unlink()
            for path in client_dir.glob("*.data"):
                uid = path.name.removesuffix(".data")
                sess = self._sessions.get((client_dir.name, uid))
                if sess is not None and sess.lock.locked():
                    continue
                try:
                    idle_s = now - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if idle_s > self.partial_ttl_s:
                    for victim in (path, path.with_suffix(".json")):
                        with contextlib.suppress(FileNotFoundError):
                            victim.unlink()
                    self._sessions.pop((client_dir.name, uid), None)
                    removed += 1
        return removed
