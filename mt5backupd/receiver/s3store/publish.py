"""How anything becomes a backup in the bucket: the data object completed by a conditional
write (If-None-Match: *, so two replicas racing for one name can never overwrite: one wins,
the other gets 409), Object Lock retention on it, then the record written (conditionally too).
A reader lists only backups whose record exists, so a half-done publish is never visible.

A commit interrupted after the data object is complete (a crash, a lost answer) is finished
by the next attempt: the object under the name is recognised as this session's own by its
multipart ETag."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from botocore.exceptions import ClientError
from loguru import logger

from mt5backupd.config.model import StorageConfig
from mt5backupd.receiver.s3store.conn import Bucket, content_md5
from mt5backupd.receiver.s3store.keys import multipart_etag
from mt5backupd.receiver.s3store.parts import Part
from mt5backupd.receiver.storage.errors import BadEntry, Conflict, NotFound
from mt5backupd.receiver.storage.publish import now_iso
from mt5backupd.receiver.storage.reading import record_from_json
from mt5backupd.records import BackupRecord

COPY_PART_BYTES = 1024**3  # UploadPartCopy takes up to 5 GiB a part


def normal_etag(etag: str) -> str:
    """An ETag as compared: without a weak marker or quotes, lower case (stores differ)."""
    return etag.removeprefix("W/").strip('"').lower()


class Publisher:
    def __init__(self, bucket: Bucket, cfg: StorageConfig) -> None:
        self.bucket = bucket
        self.keys = bucket.keys
        self.cfg = cfg

    # ---- Object Lock ----

    def retain_until(self) -> dt.datetime | None:
        if not self.cfg.object_lock_days:
            return None
        return dt.datetime.now(dt.UTC) + dt.timedelta(days=self.cfg.object_lock_days)

    def lock_args(self) -> dict[str, Any]:
        """Object Lock parameters for a new object (multipart upload or put)."""
        until = self.retain_until()
        if until is None:
            return {}
        return {"ObjectLockMode": self.cfg.object_lock_mode,
                "ObjectLockRetainUntilDate": until}

    async def retain(self, key: str) -> None:
        """Set retention on a completed object. Asked for at creation already, but stores
        differ in applying it to multipart uploads (moto does not), so it is set again."""
        until = self.retain_until()
        if until is None:
            return
        await self.bucket.call("retention", "put_object_retention", Key=key,
                               Retention={"Mode": self.cfg.object_lock_mode,
                                          "RetainUntilDate": until})

    # ---- records ----

    async def read_record(self, client: str, backup_id: str) -> BackupRecord | None:
        key = self.keys.record(client, backup_id)
        try:
            resp = await self.bucket.call("get", "get_object", Key=key,
                                          expect=("NoSuchKey", "404"))
            raw = await resp["Body"].read()
        except ClientError:
            return None
        try:
            return record_from_json(json.loads(raw), client, backup_id)
        except (ValueError, BadEntry) as exc:
            logger.warning("skipping {}: {}", key, exc)
            raise Conflict(f"backup {backup_id!r} already exists") from None

    async def write_record(self, record: BackupRecord) -> BackupRecord:
        """Put the record unless one is there; an equal one (a retry) is answered as ours."""
        body = json.dumps(record.to_json()).encode()
        try:
            await self.bucket.call("put", "put_object",
                                   Key=self.keys.record(record.client, record.id), Body=body,
                                   ContentType="application/json", ContentMD5=content_md5(body),
                                   IfNoneMatch="*", expect=("PreconditionFailed",),
                                   **self.lock_args())
        except ClientError:
            existing = await self.read_record(record.client, record.id)
            if existing is not None and (existing.sha256, existing.size) == (record.sha256,
                                                                           record.size):
                return existing
            raise Conflict(f"backup {record.id!r} already exists with other content") from None
        return record

    async def same_or_conflict(self, client: str, name: str, sha256: str, size: int
                               ) -> BackupRecord | None:
        """None when ``name`` is free; the record when it holds these very bytes (a retried
        upload); Conflict otherwise."""
        existing = await self.read_record(client, name)
        if existing is None:
            return None
        if existing.sha256 == sha256 and existing.size == size:
            return existing
        raise Conflict(f"backup {name!r} already exists with other content")

    # ---- completing the data object ----

    async def _etag(self, key: str) -> str | None:
        try:
            head = await self.bucket.call("head", "head_object", Key=key, expect=("404",))
        except ClientError:
            return None
        return str(head["ETag"])

    async def complete(self, key: str, upload_id: str, parts: list[Part]) -> tuple[str, ...]:
        """CompleteMultipartUpload, only if nothing is under ``key`` yet, or the object there
        is this upload's own (an earlier attempt completed it). Conflict otherwise. The ETags
        that name the object this upload made: the store's answer and the one computed from
        the parts (stores differ in which one HEAD shows)."""
        ours = multipart_etag([p.etag for p in parts])
        try:
            resp = await self.bucket.call(
                "complete_multipart", "complete_multipart_upload", Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag}
                                           for p in parts]},
                IfNoneMatch="*",
                expect=("PreconditionFailed", "NoSuchUpload", "ConditionalRequestConflict",
                        "InvalidPart", "InvalidPartOrder", "404"))
        except ClientError as exc:
            if await self._still_ours(key, (ours,)):
                return (ours,)  # completed by an earlier attempt of this very session
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                raise NotFound("upload not found") from None
            raise Conflict("another upload completed this backup name first") from None
        answered = str(resp.get("ETag") or "")
        return (answered, ours) if answered else (ours,)

    async def put_empty(self, key: str) -> tuple[str, ...]:
        empty = '"d41d8cd98f00b204e9800998ecf8427e"'  # md5 of nothing (no SSE-KMS/SSE-C)
        try:
            resp = await self.bucket.call("put", "put_object", Key=key, Body=b"",
                                          ContentMD5=content_md5(b""), IfNoneMatch="*",
                                          expect=("PreconditionFailed",), **self.lock_args())
        except ClientError:
            if not await self._still_ours(key, (empty,)):
                raise Conflict("another upload completed this backup name first") from None
            return (empty,)
        answered = str(resp.get("ETag") or "")
        return (answered, empty) if answered else (empty,)

    async def _still_ours(self, key: str, etags: tuple[str, ...]) -> bool:
        """Whether the object under ``key`` is the one one of ``etags`` names; compared
        normalised: stores differ in quoting the ETag a completion answers."""
        found = normal_etag(await self._etag(key) or "")
        return bool(found) and found in {normal_etag(e) for e in etags}

    async def finish(self, client: str, name: str, kind: str, size: int, sha256: str,
                     metadata: dict[str, Any], etags: tuple[str, ...]) -> BackupRecord:
        """The data object (named by ``etags``, as our completion made it) is complete:
        retention, then the record (the commit point for readers).

        A store whose conditional completion is not atomic (moto's is not) can let two uploads
        of one name both complete, the later one's bytes winning. Whatever the interleaving, a
        record never stays naming bytes it does not describe: the data is checked to be ours
        before our record is written (else 409, no record) and after (else ours is removed,
        409); and when the name's record is another upload's while the data is ours, that
        record no longer describes the data and is removed too (409). Left then: a data
        object without a record, which no reader lists."""
        key = self.keys.data(client, name)
        if not await self._still_ours(key, etags):
            raise Conflict("another upload completed this backup name first")
        await self.retain(key)
        record = BackupRecord(id=name, client=client, name=name, kind=kind, size=size,
                              sha256=sha256, created=now_iso(), metadata=metadata)
        try:
            written = await self.write_record(record)
        except Conflict:
            if await self._still_ours(key, etags):
                await self._drop_record(client, name)
            raise
        if written is record and not await self._still_ours(key, etags):
            await self._drop_record(client, name)
            raise Conflict("another upload completed this backup name first")
        return written

    async def _drop_record(self, client: str, name: str) -> None:
        """Remove a record whose data a racing completion replaced (see ``finish``)."""
        record_key = self.keys.record(client, name)
        logger.error("backup {} of {}: two uploads completed its data (the store's conditional "
                     "completion is not atomic); its record no longer matches and is removed",
                     name, client)
        try:
            await self.bucket.call("delete", "delete_object", Key=record_key)
        except Exception:  # noqa: BLE001 - Object Lock, or the store away: say so
            logger.error("could not remove {}: remove it by hand; it names bytes the object "
                         "does not hold", record_key)

    async def copy_into(self, src: str, client: str, name: str, size: int) -> tuple[str, ...]:
        """Server-side copy of a one-shot upload's temp object to its final name, completed
        with the same conditional write as a resumable upload; the ETags naming it."""
        dest = self.keys.data(client, name)
        if size == 0:
            return await self.put_empty(dest)
        mpu = await self.bucket.call("create_multipart", "create_multipart_upload", Key=dest,
                                     ContentType="application/octet-stream", **self.lock_args())
        upload_id = str(mpu["UploadId"])
        parts: list[Part] = []
        try:
            for number, start in enumerate(range(0, size, COPY_PART_BYTES), start=1):
                end = min(size, start + COPY_PART_BYTES) - 1
                resp = await self.bucket.call("upload_part_copy", "upload_part_copy", Key=dest,
                                              UploadId=upload_id, PartNumber=number,
                                              CopySource={"Bucket": self.bucket.name, "Key": src},
                                              CopySourceRange=f"bytes={start}-{end}")
                parts.append(Part(number, str(resp["CopyPartResult"]["ETag"]), end - start + 1))
            return await self.complete(dest, upload_id, parts)
        except BaseException:
            try:
                await self.bucket.call("abort_multipart", "abort_multipart_upload", Key=dest,
                                       UploadId=upload_id, expect=("NoSuchUpload", "404"))
            except Exception:  # noqa: BLE001 - best effort; expiry aborts what is left
                logger.info("could not abort the copy upload for {}; expiry will", dest)
            raise
