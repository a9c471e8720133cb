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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from loguru import logger

from mt5backupd.fsutil import atomic_write_json, free_bytes, fsync_dir, is_disk_full
from mt5backupd.names import (
    InvalidName,
    is_sha256_hex,
    validate_backup_id,
    validate_client_name,
    validate_kind,
    validate_upload_id,
)
from mt5backupd.records import BackupRecord
from mt5backupd.retention import Item, Policy, select_remove

WRITE_CHUNK_BYTES = 1024 * 1024
FREE_CHECK_EVERY_BYTES = 64 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024
# A meta.json or session description is small; a bigger one is not ours (never read it whole).
MAX_RECORD_FILE_BYTES = 4 * MAX_METADATA_BYTES + 64 * 1024
ONESHOT_PREFIX = "oneshot-"
MAX_WARNED_ENTRIES = 10_000
ABORT_WAIT_S = 30.0

BytesCallback = Callable[[int], None]


class StorageError(Exception):
    """Base of refusals; ``reason`` is a stable label (metrics, JSON error bodies)."""

    reason = "error"


class NotFound(StorageError):
    reason = "not_found"


class Conflict(StorageError):
    reason = "conflict"


class BadRequest(StorageError):
    reason = "bad_request"


class InvalidId(BadRequest):
    reason = "invalid_id"


class RequestTimeout(StorageError):
    """The client stopped sending its body (idle past the body timeout)."""

    reason = "request_timeout"


class BadEntry(Exception):
    """A file under the root that is not what the receiver wrote: a symlink, a special file,
    something outside the root, or a record that does not match its place. Never served."""


class UploadBusy(StorageError):
    reason = "upload_busy"


class OffsetMismatch(StorageError):
    reason = "offset_mismatch"

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"offset {expected} does not match the upload's current offset {current}")
        self.current = current


class TooLarge(StorageError):
    reason = "too_large"


class InsufficientStorage(StorageError):
    reason = "insufficient_storage"


class ChecksumMismatch(StorageError):
    reason = "checksum_mismatch"

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch: client said {expected}, received data is {actual}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(StorageError):
    reason = "size_mismatch"

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"size mismatch: client said {expected} bytes, received {actual}")
        self.expected = expected
        self.actual = actual


@dataclass
class _Session:
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


@dataclass(frozen=True)
class TempUpload:
    """A one-shot upload fully received into a temp file, not yet published."""

    client: str
    path: Path
    size: int
    sha256: str


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _check_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise BadRequest("metadata must be a JSON object")
    if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
        raise BadRequest(f"metadata larger than {MAX_METADATA_BYTES} bytes")
    return metadata


class _ChunkWriter:
    """Appends to ``fd`` while hashing, off the event loop, pipelined with the network read.

    Received chunks are collected as they are (no copy on the event loop); every ~1 MiB the batch
    goes to two worker threads at once, one ``writev`` and one ``sha256.update`` (both release
    the GIL), while the loop reads the next batch. ``offset`` advances only after a batch is
    fully written; after a failure the caller truncates the file back to ``offset`` and drops
    the hash state (it is rebuilt from disk), so the state is exact again.
    """

    def __init__(self, storage: Storage, fd: int, hasher: Any, offset: int, limit: int) -> None:
        self._storage = storage
        self._fd = fd
        self._hasher = hasher
        self.offset = offset
        self._limit = limit
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
        self._storage.on_bytes(self._pending_bytes)
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
            self._storage.check_free(0)

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


def open_regular(path: Path) -> int:
    """An fd for reading ``path``: never through a symlink (O_NOFOLLOW on the last component),
    never blocking on a FIFO, and only a regular file. Raises BadEntry otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP (a symlink), EACCES, ENXIO ...
        raise BadEntry(f"cannot open ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadEntry("not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small_json(path: Path) -> Any:
    """The JSON in a small regular file (meta.json, a session description); BadEntry when it is
    not one (FileNotFoundError passes through: a missing file is not a bad one)."""
    fd = open_regular(path)
    try:
        if os.fstat(fd).st_size > MAX_RECORD_FILE_BYTES:
            raise BadEntry(f"larger than {MAX_RECORD_FILE_BYTES} bytes")
        raw = os.read(fd, MAX_RECORD_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise BadEntry("not valid JSON") from None


def record_from_json(data: Any, client: str, backup_id: str) -> BackupRecord:
    """Check a meta.json against its place: a record that names another backup or another
    client (copied or planted) is foreign, and one with impossible fields is corrupt."""
    if not isinstance(data, dict):
        raise BadEntry("record is not a JSON object")
    if data.get("id") != backup_id or data.get("client") != client:
        raise BadEntry("record names another backup or client")
    size, sha256, metadata = data.get("size"), data.get("sha256"), data.get("metadata") or {}
    if (not isinstance(size, int) or isinstance(size, bool) or size < 0
            or not isinstance(sha256, str) or not is_sha256_hex(sha256)
            or not isinstance(data.get("name"), str) or not isinstance(data.get("created"), str)
            or not isinstance(data.get("kind"), str) or not isinstance(metadata, dict)):
        raise BadEntry("record has missing or invalid fields")
    try:
        validate_kind(data["kind"])
        created = datetime.fromisoformat(data["created"])
    except (InvalidName, ValueError):
        raise BadEntry("record has an invalid kind or created time") from None
    if created.tzinfo is None:
        raise BadEntry("record has a created time without a zone")
    return BackupRecord(
        id=backup_id, client=client, name=data["name"], kind=data["kind"], size=size,
        sha256=sha256, created=data["created"], metadata=metadata,
    )


class Storage:
    def __init__(
        self,
        root: Path,
        *,
        max_upload_bytes: int,
        min_free_bytes: int,
        partial_ttl_s: float,
        on_bytes: BytesCallback | None = None,
    ) -> None:
        self.root = root
        self.max_upload_bytes = max_upload_bytes
        self.min_free_bytes = min_free_bytes
        self.partial_ttl_s = partial_ttl_s
        self.on_bytes: BytesCallback = on_bytes or (lambda _n: None)
        self._sessions: dict[tuple[str, str], _Session] = {}
        for sub in ("backups", "partial", "staging", "trash"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o750)
        self._real_root = os.path.realpath(root)
        self._warned: set[tuple[str, str]] = set()
        # A crash mid-publish or mid-delete leaves these; neither is ever visible as a backup.
        for sub in ("staging", "trash"):
            for leftover in (root / sub).iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        # A one-shot upload cannot be resumed (its client got an error and sends it again), so a
        # kill -9 mid-body leaves dead bytes: remove them, like the staging dir.
        for leftover in (root / "partial").glob(f"*/{ONESHOT_PREFIX}*.data"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def warn_once(self, where: str, why: str) -> None:
        """Log a bad entry the first time it is met (a list is served often; the log stays
        readable). The set is bounded: past it, entries are simply not logged again."""
        key = (where, why)
        if key in self._warned:
            return
        if len(self._warned) < MAX_WARNED_ENTRIES:
            self._warned.add(key)
        logger.warning("skipping {} under data_dir: {}", where, why)

    # ---- paths, always validated and confined to the root ----

    def _inside(self, path: Path) -> Path:
        real = os.path.realpath(path)
        if os.path.commonpath([real, self._real_root]) != self._real_root:
            raise NotFound("not found")
        return path

    def _client_dir(self, area: str, client: str) -> Path:
        try:
            validate_client_name(client)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None
        return self._inside(self.root / area / client)

    def _backup_path(self, client: str, backup_id: str) -> Path:
        """The validated, not yet confined, path of a backup (readers check what is there)."""
        try:
            validate_client_name(client)
            validate_backup_id(backup_id)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None
        return self.root / "backups" / client / backup_id

    def _backup_dir(self, client: str, backup_id: str) -> Path:
        return self._inside(self._backup_path(client, backup_id))

    def _partial_paths(self, client: str, uid: str) -> tuple[Path, Path]:
        try:
            validate_upload_id(uid)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None
        base = self._client_dir("partial", client)
        return self._inside(base / f"{uid}.data"), self._inside(base / f"{uid}.json")

    # ---- space ----

    def check_free(self, needed_bytes: int) -> None:
        free = free_bytes(self.root)
        if free - needed_bytes < self.min_free_bytes:
            raise InsufficientStorage(
                f"receiver has {free} bytes free; {needed_bytes} more would go below "
                f"min_free_bytes={self.min_free_bytes}"
            )

    def usage(self) -> tuple[int, int]:
        """(bytes used by committed backups, bytes free on the filesystem). Only real
        directories and regular files count: a planted symlink or file never breaks /health."""
        used = 0
        for client_dir in _real_subdirs(self.root / "backups"):
            for backup in _real_subdirs(client_dir):
                with contextlib.suppress(OSError):
                    st = os.lstat(backup / "data")
                    if stat.S_ISREG(st.st_mode):
                        used += st.st_size
        return used, free_bytes(self.root)

    def partial_count(self) -> int:
        """Resumable uploads (their description) plus one-shot uploads being received or left
        by a crash, until they are swept."""
        partial = self.root / "partial"
        return (sum(1 for _ in partial.glob("*/*.json"))
                + sum(1 for _ in partial.glob(f"*/{ONESHOT_PREFIX}*.data")))

    # ---- resumable sessions ----

    async def create_session(
        self,
        client: str,
        name: str,
        kind: str,
        expected_size: int | None,
        metadata: Any,
    ) -> _Session:
        try:
            validate_backup_id(name)
            validate_kind(kind)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None
        metadata = _check_metadata(metadata)
        if expected_size is not None:
            if expected_size < 0:
                raise BadRequest("size must be >= 0")
            if expected_size > self.max_upload_bytes:
                raise TooLarge(f"size {expected_size} exceeds max_upload_bytes "
                               f"{self.max_upload_bytes}")
            self.check_free(expected_size)
        if self._backup_dir(client, name).exists():
            raise Conflict(f"backup {name!r} already exists")
        uid = secrets.token_hex(16)
        data_path, meta_path = self._partial_paths(client, uid)
        data_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        sess = _Session(uid, client, name, kind, expected_size, metadata, _now_iso(),
                        hasher=hashlib.sha256())
        fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        atomic_write_json(meta_path, sess.to_json())
        self._sessions[(client, uid)] = sess
        return sess

    def _get_session(self, client: str, uid: str) -> _Session:
        data_path, meta_path = self._partial_paths(client, uid)
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
            sess = _Session(uid, client, str(info["name"]), str(info["kind"]),
                            expected if isinstance(expected, int) else None,
                            _check_metadata(info.get("metadata")), str(info["created"]),
                            offset=st.st_size, hasher=None)
        except FileNotFoundError:
            raise NotFound(f"upload {uid} not found") from None
        except (BadEntry, BadRequest, KeyError, AttributeError) as exc:
            self.warn_once(f"partial/{client}/{uid}", str(exc) or type(exc).__name__)
            raise NotFound(f"upload {uid} not found") from None
        # After a restart the hash is rebuilt from disk on first use (see _ensure_hasher).
        self._sessions[key] = sess
        return sess

    async def _ensure_hasher(self, sess: _Session) -> None:
        if sess.hasher is not None:
            return
        data_path, _ = self._partial_paths(sess.client, sess.uid)

        def rehash() -> tuple[Any, int]:
            h = hashlib.sha256()
            n = 0
            with os.fdopen(open_regular(data_path), "rb") as fh:
                while block := fh.read(WRITE_CHUNK_BYTES):
                    h.update(block)
                    n += len(block)
            return h, n

        sess.hasher, sess.offset = await asyncio.get_running_loop().run_in_executor(None, rehash)

    def session_info(self, client: str, uid: str) -> dict[str, Any]:
        sess = self._get_session(client, uid)
        if sess.hasher is None:  # the file size is the offset; no need to re-hash to answer
            data_path, _ = self._partial_paths(client, uid)
            sess.offset = os.lstat(data_path).st_size
        return {**sess.to_json(), "offset": sess.offset}

    def _upload_limit(self, sess: _Session) -> int:
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
        sess = self._get_session(client, uid)
        if sess.lock.locked():
            raise UploadBusy(f"upload {uid} is receiving data on another connection")
        async with sess.lock:
            await self._ensure_hasher(sess)
            if offset != sess.offset:
                raise OffsetMismatch(offset, sess.offset)
            limit = self._upload_limit(sess)
            if content_length is not None and offset + content_length > limit:
                await self._discard_session(sess)
                raise TooLarge(f"upload would reach {offset + content_length} bytes, over {limit}")
            try:
                self.check_free(content_length or 0)
            except InsufficientStorage:
                await self._discard_session(sess)
                raise
            data_path, _ = self._partial_paths(client, uid)
            fd = os.open(data_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            writer = _ChunkWriter(self, fd, sess.hasher, sess.offset, limit)
            source_error: BaseException | None = None
            try:
                iterator = chunks.__aiter__()
                while True:
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    except Exception as exc:  # noqa: BLE001 - any failure of the client stream: keep what arrived
                        source_error = exc
                        break
                    await writer.feed(chunk)
                await writer.finish()
            except BaseException as exc:
                await writer.drain_quietly()
                os.close(fd)
                fd = -1
                if isinstance(exc, TooLarge | InsufficientStorage) or (
                    isinstance(exc, OSError) and is_disk_full(exc)
                ):
                    await self._discard_session(sess)
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
        sess = self._get_session(client, uid)
        if sess.lock.locked():
            raise UploadBusy(f"upload {uid} is receiving data on another connection")
        async with sess.lock:
            await self._ensure_hasher(sess)
            actual_sha = sess.hasher.hexdigest()
            if size != sess.offset:
                await self._discard_session(sess)
                raise SizeMismatch(size, sess.offset)
            if sha256.lower() != actual_sha:
                await self._discard_session(sess)
                raise ChecksumMismatch(sha256.lower(), actual_sha)
            data_path, meta_path = self._partial_paths(client, uid)
            record = await self._publish(client, data_path, sess.name, sess.kind, sess.offset,
                                         actual_sha, sess.metadata)
            with contextlib.suppress(FileNotFoundError):
                meta_path.unlink()
            self._sessions.pop((client, uid), None)
            return record

    async def abort(self, client: str, uid: str) -> None:
        """Remove an upload. A PATCH still finishing (its client just went away) is waited for,
        so its last write cannot recreate what was removed."""
        sess = self._get_session(client, uid)
        try:
            await asyncio.wait_for(sess.lock.acquire(), ABORT_WAIT_S)
        except TimeoutError:
            raise UploadBusy(f"upload {uid} is still receiving data on another connection"
                             ) from None
        try:
            await self._discard_session(sess)
        finally:
            sess.lock.release()

    async def _discard_session(self, sess: _Session) -> None:
        data_path, meta_path = self._partial_paths(sess.client, sess.uid)
        for path in (meta_path, data_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._sessions.pop((sess.client, sess.uid), None)

    # ---- one-shot (legacy) uploads ----

    async def receive_temp(
        self, client: str, chunks: AsyncIterable[bytes], content_length: int | None
    ) -> TempUpload:
        """Stream a whole body into a temp file, hashing it; the temp is removed on any error."""
        if content_length is not None and content_length > self.max_upload_bytes:
            raise TooLarge(f"upload of {content_length} bytes exceeds max_upload_bytes "
                           f"{self.max_upload_bytes}")
        self.check_free(content_length or 0)
        tmp_dir = self._client_dir("partial", client)
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        path = tmp_dir / f"{ONESHOT_PREFIX}{secrets.token_hex(16)}.data"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        hasher = hashlib.sha256()
        writer = _ChunkWriter(self, fd, hasher, 0, self.max_upload_bytes)
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
            try:
                validate_backup_id(name)
                validate_kind(kind)
            except InvalidName as exc:
                raise InvalidId(str(exc)) from None
            metadata = _check_metadata(metadata)
            if expected_sha256 is not None and expected_sha256.lower() != temp.sha256:
                raise ChecksumMismatch(expected_sha256.lower(), temp.sha256)
            return await self._publish(temp.client, temp.path, name, kind, temp.size,
                                       temp.sha256, metadata)
        finally:
            self.discard_temp(temp)

    def discard_temp(self, temp: TempUpload) -> None:
        with contextlib.suppress(FileNotFoundError):
            temp.path.unlink()

    # ---- publish: the only way anything becomes a backup ----

    async def _publish(
        self,
        client: str,
        data_src: Path,
        name: str,
        kind: str,
        size: int,
        sha256: str,
        metadata: dict[str, Any],
    ) -> BackupRecord:
        dest = self._backup_dir(client, name)
        try:
            existing = self._read_record(client, name)
        except BadEntry as exc:
            self.warn_once(f"backups/{client}/{name}", str(exc))
            raise Conflict(f"backup {name!r} already exists") from None
        if existing is not None:
            if existing.sha256 == sha256 and existing.size == size:
                # A retried upload of the very same bytes: answer as if it were the first.
                with contextlib.suppress(FileNotFoundError):
                    data_src.unlink()
                return existing
            raise Conflict(f"backup {name!r} already exists with other content")
        record = BackupRecord(name, client, name, kind, size, sha256, _now_iso(), metadata)

        def assemble() -> None:
            stage = self.root / "staging" / secrets.token_hex(16)
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

    # ---- reading ----

    def _confined(self, path: Path) -> Path:
        """``path`` if it resolves inside the root (every component, symlinks followed), else
        BadEntry: a symlinked client or backup directory leads out of data_dir."""
        try:
            return self._inside(path)
        except NotFound:
            raise BadEntry("resolves outside data_dir") from None

    def _read_record(self, client: str, backup_id: str) -> BackupRecord | None:
        """The record of a backup; None when there is none; BadEntry when what is there is not
        one of ours (a symlink, outside the root, foreign or corrupt)."""
        backup_dir = self._backup_path(client, backup_id)
        if not os.path.lexists(backup_dir):
            return None
        if os.path.islink(backup_dir):
            raise BadEntry("backup directory is a symlink")
        meta = self._confined(backup_dir / "meta.json")
        try:
            data = read_small_json(meta)
        except FileNotFoundError:
            return None
        return record_from_json(data, client, backup_id)

    def get(self, client: str, backup_id: str) -> BackupRecord:
        try:
            record = self._read_record(client, backup_id)
        except BadEntry as exc:
            self.warn_once(f"backups/{client}/{backup_id}", str(exc))
            record = None
        if record is None:
            raise NotFound(f"backup {backup_id!r} not found")
        return record

    def clients(self) -> list[str]:
        return sorted(p.name for p in _real_subdirs(self.root / "backups"))

    def list_backups(self, client: str) -> list[BackupRecord]:
        """The client's backups, oldest first. A bad entry is skipped (and logged once), never
        a failure of the whole list."""
        try:
            validate_client_name(client)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None
        base = self.root / "backups" / client
        if not os.path.lexists(base):
            return []
        if os.path.islink(base) or not base.is_dir():
            self.warn_once(f"backups/{client}", "client directory is not a real directory")
            return []
        records = []
        for entry in base.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                record = self._read_record(client, entry.name)
            except InvalidId:
                self.warn_once(f"backups/{client}/{entry.name[:100]!r}", "not a valid backup id")
                continue
            except BadEntry as exc:
                self.warn_once(f"backups/{client}/{entry.name}", str(exc))
                continue
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r.created, r.id))

    def open_data(self, client: str, backup_id: str) -> tuple[BackupRecord, BinaryIO]:
        record = self.get(client, backup_id)
        where = f"backups/{client}/{backup_id}/data"
        try:
            path = self._confined(self._backup_path(client, backup_id) / "data")
            fd = open_regular(path)
        except FileNotFoundError:
            self.warn_once(where, "record without data")
            raise NotFound(f"backup {backup_id!r} not found") from None
        except BadEntry as exc:
            self.warn_once(where, str(exc))
            raise NotFound(f"backup {backup_id!r} not found") from None
        return record, os.fdopen(fd, "rb")

    # ---- admin ----

    def delete(self, client: str, backup_id: str) -> BackupRecord:
        record = self.get(client, backup_id)
        dest = self._backup_dir(client, backup_id)
        trash = self.root / "trash" / secrets.token_hex(16)
        os.rename(dest, trash)  # disappears atomically, then is removed at leisure
        fsync_dir(dest.parent)
        shutil.rmtree(trash, ignore_errors=True)
        return record

    def prune(self, client: str, policy: Policy, *, dry_run: bool = False) -> list[BackupRecord]:
        """Apply ``policy`` to each kind of ``client``'s backups; return what was (or would be)
        removed. The newest backup of each kind always stays."""
        policy.validate()
        by_kind: dict[str, list[BackupRecord]] = {}
        for record in self.list_backups(client):
            by_kind.setdefault(record.kind, []).append(record)
        removed: list[BackupRecord] = []
        for records in by_kind.values():
            by_id = {r.id: r for r in records}
            doomed = select_remove([Item(r.id, r.taken_dt) for r in records], policy)
            for backup_id in doomed:
                if not dry_run:
                    self.delete(client, backup_id)
                removed.append(by_id[backup_id])
        return removed

    def expire_partials(self, now: float | None = None) -> int:
        """Remove uploads idle for longer than partial_ttl_s; return how many."""
        now = time.time() if now is None else now
        removed = 0
        for client_dir in _real_subdirs(self.root / "partial"):
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


def _real_subdirs(path: Path) -> list[Path]:
    """Subdirectories of ``path`` that are directories themselves, not symlinks to one (nor
    files, nor dot-entries): what the receiver created."""
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                found.append(path / entry.name)
    return found
