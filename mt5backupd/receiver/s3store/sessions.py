"""Resumable uploads as S3 multipart uploads, their state kept in the bucket so that any
replica continues any upload (``sessions/<client>/<uid>/state.json``): the S3 upload id, the
parts with their ETags, the SHA-256 state over them (see hashstate), and the tail, the bytes
past the last part (< 5 MiB) stored as a small object between requests.

Every state write is conditional on the ETag read (If-Match), so two replicas writing one
upload cannot both move it on: the loser's request ends with 409 upload_busy and its client
asks for the offset again. Within a request, bytes not yet in an acknowledged part are in a
scratch file (at most two parts, see parts); the durable offset, the one ``HEAD`` reports on
every replica, is acknowledged parts + tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from loguru import logger

from mt5backupd.receiver.s3store.conn import Bucket, content_md5
from mt5backupd.receiver.s3store.hashstate import HashStateError, ResumableSha256
from mt5backupd.receiver.s3store.parts import MAX_PARTS, MIN_PART_BYTES, Part, PartWriter
from mt5backupd.receiver.storage.errors import (
    BadRequest,
    NotFound,
    OffsetMismatch,
    StoreUnavailable,
    TooLarge,
    UploadBusy,
)
from mt5backupd.receiver.storage.publish import check_metadata, check_name_and_kind, now_iso
from mt5backupd.receiver.storage.writer import feed_from_client

ABORT_WAIT_S = 30.0
STATE_VERSION = 1


@dataclass
class State:
    uid: str
    client: str
    name: str
    kind: str
    expected_size: int | None
    metadata: dict[str, Any]
    created: str
    upload_id: str  # S3's
    key: str  # the data object the upload completes into
    parts: list[Part] = field(default_factory=list)
    hash_state: bytes = b""
    tail_key: str | None = None
    tail_size: int = 0
    etag: str = ""  # of state.json as read: the next write is conditional on it
    sha256: str | None = None  # set once verified at commit (lets a retry finish the commit)
    part_md5: bool = False  # created with Object Lock parameters: parts need Content-MD5

    @property
    def parts_bytes(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def offset(self) -> int:
        return self.parts_bytes + self.tail_size

    def public(self) -> dict[str, Any]:
        return {"upload_id": self.uid, "name": self.name, "kind": self.kind,
                "expected_size": self.expected_size, "metadata": self.metadata,
                "created": self.created}

    def to_json(self) -> dict[str, Any]:
        return {**self.public(), "version": STATE_VERSION, "client": self.client,
                "s3_upload_id": self.upload_id, "key": self.key,
                "parts": [[p.number, p.etag, p.size] for p in self.parts],
                "hash_state": self.hash_state.hex(), "tail_key": self.tail_key,
                "tail_size": self.tail_size, "sha256": self.sha256, "part_md5": self.part_md5,
                "updated": time.time()}

    @classmethod
    def from_json(cls, data: Any, client: str, uid: str, etag: str) -> State:
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError("not a session state of this version")
        if data["client"] != client or data["upload_id"] != uid:
            raise ValueError("state names another upload")
        expected = data.get("expected_size")
        return cls(uid, client, str(data["name"]), str(data["kind"]),
                   expected if isinstance(expected, int) else None,
                   check_metadata(data.get("metadata")), str(data["created"]),
                   str(data["s3_upload_id"]), str(data["key"]),
                   [Part(int(n), str(e), int(s)) for n, e, s in data["parts"]],
                   bytes.fromhex(data["hash_state"]), data.get("tail_key"),
                   int(data.get("tail_size", 0)), etag, data.get("sha256"),
                   bool(data.get("part_md5", True)))


class UploadLocks:
    """This replica's per-upload locks (one request at a time per upload), each kept only while
    a request holds or waits for it: uploads that end on another replica, or are only looked at
    by expiry, leave nothing behind."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def busy(self, client: str, uid: str) -> bool:
        entry = self._held.get((client, uid))
        return entry is not None and entry[0].locked()

    @contextlib.asynccontextmanager
    async def hold(self, client: str, uid: str, *, busy_message: str,
                   wait_s: float = 0.0) -> AsyncIterator[None]:
        """The upload's lock; UploadBusy(busy_message) when another request holds it (after
        waiting ``wait_s`` for it)."""
        key = (client, uid)
        lock, users = self._held.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        if lock.locked() and wait_s <= 0:
            raise UploadBusy(busy_message)
        self._held[key] = (lock, users + 1)
        try:
            try:
                await asyncio.wait_for(lock.acquire(), wait_s or None)
            except TimeoutError:
                raise UploadBusy(busy_message) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._held[key]
            if users > 1:
                self._held[key] = (lock, users - 1)
            else:
                del self._held[key]


class Sessions:
    def __init__(self, bucket: Bucket, *, part_size: int, max_upload_bytes: int,
                 partial_ttl_s: float, lock_args: Any, on_bytes: Any,
                 scratch_dir: Path | None = None) -> None:
        self.bucket = bucket
        self.keys = bucket.keys
        self.part_size = part_size
        self.max_upload_bytes = min(max_upload_bytes, part_size * MAX_PARTS)
        self.partial_ttl_s = partial_ttl_s
        self.lock_args = lock_args  # () -> Object Lock parameters for a new object
        self.on_bytes = on_bytes
        self.scratch_dir = scratch_dir
        self.locks = UploadLocks()

    # ---- state in the bucket ----

    async def load(self, client: str, uid: str) -> State:
        key = self.keys.session_state(client, uid)
        try:
            resp = await self.bucket.call("get", "get_object", Key=key,
                                          expect=("NoSuchKey", "404"))
            raw = await resp["Body"].read()
        except ClientError:
            raise NotFound(f"upload {uid} not found") from None
        try:
            return State.from_json(json.loads(raw), client, uid, str(resp["ETag"]))
        except (ValueError, KeyError, TypeError, BadRequest) as exc:
            logger.warning("skipping session {}: {}", key, exc)
            raise NotFound(f"upload {uid} not found") from None

    async def save(self, st: State, *, create: bool = False) -> None:
        body = json.dumps(st.to_json()).encode()
        cond: dict[str, Any] = {"IfNoneMatch": "*"} if create else {"IfMatch": st.etag}
        try:
            resp = await self.bucket.call(
                "put", "put_object", Key=self.keys.session_state(st.client, st.uid), Body=body,
                ContentType="application/json", ContentMD5=content_md5(body),
                expect=("PreconditionFailed", "ConditionalRequestConflict"), **cond)
        except ClientError:
            raise UploadBusy(f"upload {st.uid} was changed by another request") from None
        st.etag = str(resp["ETag"])

    def hasher(self, st: State) -> ResumableSha256:
        if not st.hash_state:
            return ResumableSha256()
        try:
            return ResumableSha256.from_state(st.hash_state, st.parts_bytes)
        except HashStateError as exc:
            logger.warning("upload {}: {}", st.uid, exc)
            raise NotFound(f"upload {st.uid} not found") from None

    async def read_tail(self, st: State) -> bytes:
        if not st.tail_key or not st.tail_size:
            return b""
        try:
            resp = await self.bucket.call("get", "get_object", Key=st.tail_key,
                                          expect=("NoSuchKey", "404"))
            data: bytes = await resp["Body"].read()
        except ClientError:
            data = b""
        if len(data) != st.tail_size:
            logger.warning("upload {}: its tail object is missing or damaged", st.uid)
            raise NotFound(f"upload {st.uid} not found")
        return data

    # ---- the operations ----

    async def create(self, client: str, name: str, kind: str, expected_size: int | None,
                     metadata: Any) -> State:
        check_name_and_kind(name, kind)
        metadata = check_metadata(metadata)
        if expected_size is not None:
            if expected_size < 0:
                raise BadRequest("size must be >= 0")
            if expected_size > self.max_upload_bytes:
                raise TooLarge(f"size {expected_size} exceeds the limit "
                               f"{self.max_upload_bytes} (max_upload_bytes, or "
                               f"{MAX_PARTS} parts of part_size_bytes)")
        uid = secrets.token_hex(16)
        key = self.keys.data(client, name)
        lock = self.lock_args()
        mpu = await self.bucket.call("create_multipart", "create_multipart_upload", Key=key,
                                     ContentType="application/octet-stream", **lock)
        st = State(uid, client, name, kind, expected_size, metadata, now_iso(),
                   str(mpu["UploadId"]), key, hash_state=ResumableSha256().state(),
                   part_md5=bool(lock))
        await self.save(st, create=True)
        return st

    def limit(self, st: State) -> int:
        if st.expected_size is not None:
            return min(st.expected_size, self.max_upload_bytes)
        return self.max_upload_bytes

    async def append(self, client: str, uid: str, offset: int, chunks: AsyncIterable[bytes],
                     content_length: int | None, discard: Any) -> int:
        async with self.locks.hold(
                client, uid, busy_message=f"upload {uid} is receiving data on another connection"):
            st = await self.load(client, uid)
            if offset != st.offset:
                raise OffsetMismatch(offset, st.offset)
            limit = self.limit(st)
            if content_length is not None and offset + content_length > limit:
                await discard(st)
                raise TooLarge(f"upload would reach {offset + content_length} bytes, over {limit}")
            old_tail = st.tail_key
            writer = PartWriter(self.bucket, st.key, st.upload_id, part_size=self.part_size,
                                hasher=self.hasher(st), limit=limit, offset=st.parts_bytes,
                                on_bytes=self.on_bytes, parts=st.parts,
                                scratch_dir=self.scratch_dir, content_md5=st.part_md5)

            async def part_done(parts: list[Part], hash_state: bytes) -> None:
                # both as of this part's end, not of what came since
                st.parts, st.hash_state = parts, hash_state
                st.tail_key, st.tail_size = None, 0  # a stored tail is now inside a part
                await self.save(st)

            writer.on_part = part_done
            source_error: BaseException | None = None
            try:
                writer.preload(await self.read_tail(st))
                source_error = await feed_from_client(chunks, writer.feed)
                await self._settle(st, writer)
            except TooLarge:
                await writer.close()
                await discard(st)
                raise
            finally:
                await writer.close()
            if old_tail and old_tail != st.tail_key:
                await self._delete_quietly(old_tail)
            if source_error is not None:
                raise source_error
            return st.offset

    async def _settle(self, st: State, writer: PartWriter) -> None:
        """At the end of a request (also when the client went away): the part on its way is
        acknowledged, then what is left in the scratch file becomes durable, as a part when it
        may be one, else as the session's tail object."""
        await writer.drain()
        pending = writer.pending_bytes
        if pending >= MIN_PART_BYTES:
            await writer.flush()
        elif pending and pending != st.tail_size:
            data = await writer.read_pending()
            key = self.keys.session_tail(st.client, st.uid, secrets.token_hex(8))
            await self.bucket.call("put", "put_object", Key=key, Body=data,
                                   ContentMD5=content_md5(data))
            st.tail_key, st.tail_size = key, len(data)
            await self.save(st)

    async def _delete_quietly(self, key: str) -> None:
        try:
            await self.bucket.call("delete", "delete_object", Key=key)
        except StoreUnavailable:
            logger.info("could not remove {} now; expiry removes it later", key)

    async def remove(self, st: State) -> None:
        """Abort the multipart upload on S3 (not just forget it) and remove the state."""
        with contextlib.suppress(ClientError):  # completed or aborted already
            await self.bucket.call("abort_multipart", "abort_multipart_upload", Key=st.key,
                                   UploadId=st.upload_id, expect=("NoSuchUpload", "404"))
        if st.tail_key:
            await self._delete_quietly(st.tail_key)
        await self._delete_quietly(self.keys.session_state(st.client, st.uid))
