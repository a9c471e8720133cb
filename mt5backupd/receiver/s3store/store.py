"""``S3Storage``: the receiver's storage interface on an S3-compatible bucket. Stateless apart
from per-request scratch files and a cache of (immutable) records, so any number of replicas serve
one bucket; see keys (layout), sessions (resumable uploads), parts + scratch (the ingest path),
publish (commit), conn (the client, errors, preflight)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError
from loguru import logger

from mt5backupd.config.model import StorageConfig
from mt5backupd.names import InvalidName, validate_client_name
from mt5backupd.receiver.s3store import scratch
from mt5backupd.receiver.s3store.conn import Bucket, RequestCallback, content_md5, list_pages
from mt5backupd.receiver.s3store.expiry import Expiry
from mt5backupd.receiver.s3store.hashstate import ResumableSha256
from mt5backupd.receiver.s3store.health import HealthProbe
from mt5backupd.receiver.s3store.keys import RECORD_NAME
from mt5backupd.receiver.s3store.parts import Part, PartWriter, upload_part
from mt5backupd.receiver.s3store.publish import Publisher
from mt5backupd.receiver.s3store.sessions import ABORT_WAIT_S, Sessions, State
from mt5backupd.receiver.storage.api import DOWNLOAD_CHUNK_BYTES, Pruned, SessionRef
from mt5backupd.receiver.storage.errors import (
    ChecksumMismatch,
    Conflict,
    InvalidId,
    NotFound,
    ObjectLocked,
    SizeMismatch,
    TooLarge,
)
from mt5backupd.receiver.storage.publish import check_metadata, check_name_and_kind
from mt5backupd.records import BackupRecord
from mt5backupd.retention import Item, Policy, select_remove_by_kind

LIST_CONCURRENCY = 16
MAX_CACHED_RECORDS = 100_000


@dataclass(frozen=True)
class S3Temp:
    """A one-shot upload received whole into ``tmp/``, not yet published."""

    client: str
    key: str
    size: int
    sha256: str


class S3Reader:
    """A committed object, read with Range passed through; memory flat whatever the size."""

    def __init__(self, bucket: Bucket, key: str) -> None:
        self.bucket = bucket
        self.key = key

    async def chunks(self, start: int, length: int) -> AsyncIterator[bytes]:
        if length <= 0:
            return
        resp = await self.bucket.call("get", "get_object", Key=self.key,
                                      Range=f"bytes={start}-{start + length - 1}")
        body = resp["Body"]
        try:
            while True:
                try:
                    block = await body.read(DOWNLOAD_CHUNK_BYTES)
                except Exception as exc:  # noqa: BLE001 - mid-stream: the caller sees it end short
                    logger.warning("download of {} broke off: {}", self.key, type(exc).__name__)
                    return
                if not block:
                    return
                yield block
        finally:
            body.close()

    async def close(self) -> None:
        return None


class S3Storage:
    name = "s3"

    def __init__(self, cfg: StorageConfig, *, max_upload_bytes: int, partial_ttl_s: float,
                 on_bytes: Callable[[int], None], on_request: RequestCallback) -> None:
        self.cfg = cfg
        self.partial_ttl_s = partial_ttl_s
        self.bucket = Bucket(cfg, on_request)
        self.keys = self.bucket.keys
        self.publisher = Publisher(self.bucket, cfg)
        self.sessions = Sessions(self.bucket, part_size=cfg.part_size_bytes,
                                 max_upload_bytes=max_upload_bytes, partial_ttl_s=partial_ttl_s,
                                 lock_args=self.publisher.lock_args, on_bytes=on_bytes,
                                 scratch_dir=cfg.scratch_dir)
        self.on_bytes = on_bytes
        self.health_probe = HealthProbe(self.bucket)
        self._records: dict[str, BackupRecord] = {}
        self.expiry = Expiry(self.bucket, self.sessions, partial_ttl_s)

    async def start(self) -> None:
        scratch.preflight(self.cfg.scratch_dir)
        await self.bucket.open()
        try:
            await self.bucket.preflight()
        except BaseException:
            await self.bucket.close()
            raise
        await self.expiry.scan_usage_quietly()

    async def close(self) -> None:
        await self.bucket.close()

    # ---- resumable uploads ----

    async def create_session(self, client: str, name: str, kind: str,
                             expected_size: int | None, metadata: Any) -> SessionRef:
        check_name_and_kind(name, kind)
        if await self.publisher.read_record(client, name) is not None:
            raise Conflict(f"backup {name!r} already exists")
        st = await self.sessions.create(client, name, kind, expected_size, metadata)
        return SessionRef(st.uid, client)

    async def session_info(self, client: str, uid: str) -> dict[str, Any]:
        st = await self.sessions.load(client, uid)
        return {**st.public(), "offset": st.offset}

    async def append(self, client: str, uid: str, offset: int, chunks: AsyncIterable[bytes],
                     content_length: int | None) -> int:
        return await self.sessions.append(client, uid, offset, chunks, content_length,
                                          self.sessions.remove)

    async def commit(self, client: str, uid: str, sha256: str, size: int) -> BackupRecord:
        async with self.sessions.locks.hold(
                client, uid, busy_message=f"upload {uid} is receiving data on another connection"):
            st = await self.sessions.load(client, uid)
            if st.sha256 is None:  # not verified by an earlier attempt yet
                await self._verify_and_seal(st, sha256.lower(), size)
            elif (st.sha256, st.offset) != (sha256.lower(), size):
                raise SizeMismatch(size, st.offset) if size != st.offset else ChecksumMismatch(
                    sha256.lower(), st.sha256)
            assert st.sha256 is not None
            same = await self.publisher.same_or_conflict(client, st.name, st.sha256, st.offset)
            if same is not None:  # the very same bytes are there already: a retry
                await self.sessions.remove(st)
                return same
            if st.offset == 0:
                etags = await self.publisher.put_empty(st.key)
            else:
                etags = await self.publisher.complete(st.key, st.upload_id, st.parts)
            record = await self.publisher.finish(client, st.name, st.kind, st.offset,
                                                 st.sha256, st.metadata, etags)
            await self.sessions.remove(st)
            return record

    async def _verify_and_seal(self, st: State, sha256: str, size: int) -> None:
        """Check size and sha256 against what this receiver hashed itself; then the tail
        becomes the last part and the state records the verified hash, so a retry after a
        crash in the middle of the commit finishes it."""
        if size != st.offset:
            await self.sessions.remove(st)
            raise SizeMismatch(size, st.offset)
        hasher = self.sessions.hasher(st)
        tail = await self.sessions.read_tail(st)
        final = hasher.copy()
        await asyncio.to_thread(final.update, tail)
        actual = final.hexdigest()
        if sha256 != actual:
            await self.sessions.remove(st)
            raise ChecksumMismatch(sha256, actual)
        if tail:
            number = st.parts[-1].number + 1 if st.parts else 1
            md5 = await asyncio.to_thread(content_md5, tail) if st.part_md5 else None
            etag = await upload_part(self.bucket, st.key, st.upload_id, number, tail, md5)
            st.parts.append(Part(number, etag, len(tail)))
            st.hash_state = final.state()
            old_tail, st.tail_key, st.tail_size = st.tail_key, None, 0
        else:
            old_tail = None
        st.sha256 = actual
        await self.sessions.save(st)
        if old_tail:
            await self.sessions._delete_quietly(old_tail)

    async def abort(self, client: str, uid: str) -> None:
        async with self.sessions.locks.hold(
                client, uid, wait_s=ABORT_WAIT_S,
                busy_message=f"upload {uid} is still receiving data on another connection"):
            await self.sessions.remove(await self.sessions.load(client, uid))

    # ---- one-shot uploads ----

    async def receive_temp(self, client: str, chunks: AsyncIterable[bytes],
                           content_length: int | None) -> S3Temp:
        limit = self.sessions.max_upload_bytes
        if content_length is not None and content_length > limit:
            raise TooLarge(f"upload of {content_length} bytes exceeds max_upload_bytes {limit}")
        # the creation time in the name: expiry ages a one-shot upload cut short by a crash
        key = self.keys.temp(client, f"{int(time.time())}-{secrets.token_hex(16)}")
        mpu = await self.bucket.call("create_multipart", "create_multipart_upload", Key=key)
        writer = PartWriter(self.bucket, key, str(mpu["UploadId"]),
                            part_size=self.cfg.part_size_bytes, hasher=ResumableSha256(),
                            limit=limit, offset=0, on_bytes=self.on_bytes,
                            scratch_dir=self.cfg.scratch_dir)
        aborting: asyncio.Task[None] | None = None
        try:
            async for chunk in chunks:
                await writer.feed(chunk)
            await writer.drain()
            if writer.pending_bytes or not writer.parts:
                await writer.flush()
            await self.bucket.call(
                "complete_multipart", "complete_multipart_upload", Key=key,
                UploadId=writer.upload_id, MultipartUpload={"Parts": [
                    {"PartNumber": p.number, "ETag": p.etag} for p in writer.parts]})
        except BaseException:
            # a task of its own, shielded: a cancelled request (a receiver shutting down)
            # still aborts the upload; a cancel while it runs leaves it running by itself
            aborting = asyncio.create_task(self._abort_temp(writer, key))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(aborting)
            raise
        finally:
            if aborting is None:  # else the abort closes the writer, once
                await writer.close()
        return S3Temp(client, key, writer.offset, writer.hasher.hexdigest())

    async def _abort_temp(self, writer: PartWriter, key: str) -> None:
        try:
            await writer.close()  # no part still on its way when it is aborted
            await self.bucket.call("abort_multipart", "abort_multipart_upload", Key=key,
                                   UploadId=writer.upload_id, expect=("NoSuchUpload",))
        except Exception:  # noqa: BLE001 - best effort; expiry aborts what is left
            logger.info("could not abort {}; expiry will", key)

    async def publish_temp(self, temp: Any, name: str, kind: str, metadata: Any,
                           expected_sha256: str | None) -> BackupRecord:
        assert isinstance(temp, S3Temp)
        try:
            check_name_and_kind(name, kind)
            metadata = check_metadata(metadata)
            if expected_sha256 is not None and expected_sha256.lower() != temp.sha256:
                raise ChecksumMismatch(expected_sha256.lower(), temp.sha256)
            same = await self.publisher.same_or_conflict(temp.client, name, temp.sha256,
                                                         temp.size)
            if same is not None:
                return same
            etags = await self.publisher.copy_into(temp.key, temp.client, name, temp.size)
            return await self.publisher.finish(temp.client, name, kind, temp.size, temp.sha256,
                                               metadata, etags)
        finally:
            await self.discard_temp(temp)

    async def discard_temp(self, temp: Any) -> None:
        assert isinstance(temp, S3Temp)
        await self.sessions._delete_quietly(temp.key)

    # ---- reading ----

    async def get(self, client: str, backup_id: str) -> BackupRecord:
        record = None
        try:
            record = await self.publisher.read_record(client, backup_id)
        except Conflict:
            record = None
        if record is None:
            raise NotFound(f"backup {backup_id!r} not found")
        return record

    async def clients(self) -> list[str]:
        found = []
        async for page in list_pages(self.bucket, self.keys.backups, "/"):
            for common in page.get("CommonPrefixes", []):
                name = str(common["Prefix"])[len(self.keys.backups):].rstrip("/")
                try:
                    validate_client_name(name)
                except InvalidName:
                    continue
                found.append(name)
        return sorted(found)

    async def list_backups(self, client: str) -> list[BackupRecord]:
        prefix = self.keys.client_backups(client)
        ids = []
        async for page in list_pages(self.bucket, prefix):
            for obj in page.get("Contents", []):
                split = self.keys.split_backup_key(str(obj["Key"]))
                if split is not None and split[2] == RECORD_NAME:
                    ids.append(split[1])
        gate = asyncio.Semaphore(LIST_CONCURRENCY)

        async def one(backup_id: str) -> BackupRecord | None:
            key = self.keys.record(client, backup_id)
            cached = self._records.get(key)
            if cached is not None:
                return cached  # records are immutable: a name is never rewritten
            async with gate:
                try:
                    record = await self.publisher.read_record(client, backup_id)
                except (Conflict, InvalidId):
                    return None
            if record is not None and len(self._records) < MAX_CACHED_RECORDS:
                self._records[key] = record
            return record

        records = [r for r in await asyncio.gather(*(one(i) for i in ids)) if r is not None]
        return sorted(records, key=lambda r: (r.created, r.id))

    async def open_data(self, client: str, backup_id: str) -> tuple[BackupRecord, S3Reader]:
        record = await self.get(client, backup_id)
        return record, S3Reader(self.bucket, self.keys.data(client, backup_id))

    # ---- removing ----

    async def _locked_until(self, key: str) -> dt.datetime | None:
        """The retention date when the object is under Object Lock (or a legal hold) now."""
        try:
            head = await self.bucket.call("head", "head_object", Key=key, expect=("404",))
        except ClientError:
            return None
        if head.get("ObjectLockLegalHoldStatus") == "ON":
            return dt.datetime.max.replace(tzinfo=dt.UTC)
        until = head.get("ObjectLockRetainUntilDate")
        if head.get("ObjectLockMode") and isinstance(until, dt.datetime) and (
                until > dt.datetime.now(dt.UTC)):
            return until
        return None

    async def _remove(self, key: str) -> None:
        """Delete every version of ``key`` (on a versioned bucket a plain delete only hides it
        behind a marker and keeps paying for it)."""
        versions = await self.bucket.call("list", "list_object_versions", Prefix=key)
        found = [v for v in versions.get("Versions", []) + versions.get("DeleteMarkers", [])
                 if v.get("Key") == key]
        if not found:
            await self.bucket.call("delete", "delete_object", Key=key)
        for version in found:
            await self.bucket.call("delete", "delete_object", Key=key,
                                   VersionId=version["VersionId"])

    async def delete(self, client: str, backup_id: str) -> BackupRecord:
        record = await self.get(client, backup_id)
        until = await self._locked_until(self.keys.data(client, backup_id))
        if until is not None:
            raise ObjectLocked(f"backup {backup_id!r} is under object lock until "
                               f"{until.isoformat()}")
        # the record first: from then on no reader sees the backup, whatever happens next
        await self._remove(self.keys.record(client, backup_id))
        self._records.pop(self.keys.record(client, backup_id), None)
        await self._remove(self.keys.data(client, backup_id))
        return record

    async def prune(self, client: str, policy: Policy, *, dry_run: bool = False) -> Pruned:
        policy.validate()
        by_kind: dict[str, list[BackupRecord]] = {}
        for record in await self.list_backups(client):
            by_kind.setdefault(record.kind, []).append(record)
        result = Pruned()
        by_id = {r.id: r for records in by_kind.values() for r in records}
        items = {kind: [Item(r.id, r.taken_dt) for r in records]
                 for kind, records in by_kind.items()}
        for backup_id in select_remove_by_kind(items, policy):  # WAL goes with base backups
            if await self._locked_until(self.keys.data(client, backup_id)) is not None:
                result.locked.append(by_id[backup_id])
                continue
            if not dry_run:
                await self.delete(client, backup_id)
            result.removed.append(by_id[backup_id])
        return result

    # ---- housekeeping and state ----

    def usage(self) -> tuple[int, int | None]:
        return self.expiry.used_bytes, None

    def partial_count(self) -> int:
        return self.expiry.partials

    async def expire_partials(self, now: float | None = None) -> int:
        return await self.expiry.run(now)

    async def health(self) -> dict[str, Any]:
        """For the public /health: whether the bucket answers (s3store/health), nothing that
        names the bucket, the endpoint or the store's errors."""
        return {"backend": self.name, "state": await self.health_probe.state(),
                "free_bytes": None, "object_lock": bool(self.cfg.object_lock_days)}

