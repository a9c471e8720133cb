"""Housekeeping of the bucket, run by every replica (each step is idempotent): sessions idle
past partial_ttl_s aborted on S3 and removed, multipart uploads no session owns aborted, stray
objects older than partial_ttl_s removed (``tail-*`` objects no session points at, ``tmp/``
objects of one-shot uploads a crash kept from being published or removed, data objects that
never got their record), and the usage figures (/metrics) refreshed."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from typing import Any

from botocore.exceptions import ClientError
from loguru import logger

from mt5backupd.receiver.s3store.conn import Bucket, list_pages, list_uploads
from mt5backupd.receiver.s3store.keys import DATA_NAME, RECORD_NAME
from mt5backupd.receiver.s3store.sessions import Sessions
from mt5backupd.receiver.storage.errors import Conflict, InvalidId, NotFound, StoreUnavailable


class Expiry:
    def __init__(self, bucket: Bucket, sessions: Sessions, partial_ttl_s: float) -> None:
        self.bucket = bucket
        self.keys = bucket.keys
        self.sessions = sessions
        self.partial_ttl_s = partial_ttl_s
        self.used_bytes = 0
        self.partials = 0
        self._orphans: set[str] = set()  # multipart uploads no session owned at the last scan
        self._unrecorded: set[str] = set()  # old data objects without a record, last scan

    async def run(self, now: float | None = None) -> int:
        """Abort (on S3) and remove sessions idle past partial_ttl_s, abort multipart uploads
        no session owns (a one-shot upload cut short by a crash), refresh the usage figures."""
        now = time.time() if now is None else now
        removed = 0
        live_uploads: set[str] = set()
        live_data: set[str] = set()  # data keys sessions complete into (one may be committing)
        partials = 0
        tails: list[tuple[str, float]] = []  # (key, age in seconds) of every tail object seen
        current_tails: set[str] = set()  # the ones sessions point at
        async for page in list_pages(self.bucket, self.keys.sessions):
            for obj in page.get("Contents", []):
                key = str(obj["Key"])
                parts = key[len(self.keys.sessions):].split("/")
                if len(parts) == 3 and parts[2].startswith("tail-"):
                    tails.append((key, now - obj["LastModified"].timestamp()))
                if len(parts) != 3 or parts[2] != "state.json":
                    continue
                client, uid = parts[0], parts[1]
                try:
                    st = await self.sessions.load(client, uid)
                except (Conflict, InvalidId, NotFound):  # corrupt, foreign or just removed
                    continue
                idle_s = now - obj["LastModified"].timestamp()
                if idle_s > self.partial_ttl_s and not self.sessions.locks.busy(client, uid):
                    await self.sessions.remove(st)
                    removed += 1
                else:
                    live_uploads.add(st.upload_id)
                    live_data.add(st.key)
                    if st.tail_key:
                        current_tails.add(st.tail_key)
                    partials += 1
        # a tail is written just before the state that points at it: only old ones are strays
        stray = [key for key, age_s in tails
                 if age_s > self.partial_ttl_s and key not in current_tails]
        stray += await self._old_temps(now)
        for key in stray:
            await self.sessions._delete_quietly(key)
        if stray:
            logger.info("removed {} stray objects (unreferenced tails, unpublished tmp/)",
                        len(stray))
        orphans = set()
        async for upload in list_uploads(self.bucket, self.keys.root):
            upload_id = str(upload["UploadId"])
            if upload_id in live_uploads:
                continue
            if self._orphan_expired(str(upload["Key"]), upload_id, upload.get("Initiated"), now):
                # another replica may have aborted it first (NoSuchUpload): gone either way
                with contextlib.suppress(ClientError):
                    await self.bucket.call("abort_multipart", "abort_multipart_upload",
                                           Key=upload["Key"], UploadId=upload_id,
                                           expect=("NoSuchUpload",))
                removed += 1
            else:
                orphans.add(upload_id)
        self._orphans = orphans
        self.partials = partials
        # Only what no session completes into and what the previous scan found unrecorded
        # too (a multipart object may carry its upload's start date, so "old" alone does not
        # rule out a commit between completion and record), and with no record even now.
        unrecorded = set(await self.scan_usage(now)) - live_data
        for key in sorted(unrecorded & self._unrecorded):
            if await self._has_record(key):
                continue
            try:
                await self.bucket.call("delete", "delete_object", Key=key)
                logger.warning("removed {}: a data object without a record for over "
                               "partial_ttl_s (a commit cut short, or a lost commit race)", key)
                removed += 1
            except StoreUnavailable as exc:
                logger.warning("could not remove the unrecorded data object {}: {}", key, exc)
        self._unrecorded = unrecorded
        return removed

    async def _has_record(self, data_key: str) -> bool:
        try:
            await self.bucket.call("head", "head_object",
                                   Key=data_key.removesuffix(DATA_NAME) + RECORD_NAME,
                                   expect=("404",))
        except ClientError:
            return False
        return True

    async def _old_temps(self, now: float) -> list[str]:
        """Completed one-shot uploads under ``tmp/`` older than partial_ttl_s: published or
        discarded within their request, so these are what a crash left."""
        found = []
        async for page in list_pages(self.bucket, self.keys.root + "tmp/"):
            for obj in page.get("Contents", []):
                if now - obj["LastModified"].timestamp() > self.partial_ttl_s:
                    found.append(str(obj["Key"]))
        return found

    def _orphan_expired(self, key: str, upload_id: str, initiated: Any, now: float) -> bool:
        """A multipart upload no session owns: a one-shot upload's (``tmp/``, its name tells
        its age) once older than partial_ttl_s; any other once older by its start date and
        already ownerless at the previous scan (a session is created just after its multipart
        upload, so one scan alone could catch it in between). Stores whose listing has no true
        start date (moto's) fall back to the second rule."""
        stamp = key.rsplit("/", 1)[-1].split("-", 1)[0]
        if key.startswith(self.keys.root + "tmp/") and stamp.isdigit():
            return now - int(stamp) > self.partial_ttl_s
        old = not isinstance(initiated, dt.datetime) or (
            now - initiated.timestamp() > self.partial_ttl_s)
        return old and upload_id in self._orphans

    async def scan_usage(self, now: float | None = None) -> list[str]:
        """Refresh the bytes stored; with ``now``, also return the data objects that have had
        no record for over partial_ttl_s. No reader lists them, and they keep their name from
        ever being committed (completion is conditional on nothing being there); a record is
        written seconds after its data, so only old ones are left-overs."""
        used = 0
        data_age_s: dict[str, float] = {}
        recorded: set[str] = set()
        async for page in list_pages(self.bucket, self.keys.backups):
            for obj in page.get("Contents", []):
                key = str(obj["Key"])
                split = self.keys.split_backup_key(key)  # exactly <client>/<id>/<name>
                if key.endswith("/" + DATA_NAME):
                    used += int(obj.get("Size", 0))
                    if now is not None and split is not None:
                        data_age_s[key.removesuffix(DATA_NAME)] = (
                            now - obj["LastModified"].timestamp())
                elif key.endswith("/" + RECORD_NAME) and split is not None:
                    recorded.add(key.removesuffix(RECORD_NAME))
        self.used_bytes = used
        return [folder + DATA_NAME for folder, age_s in data_age_s.items()
                if folder not in recorded and age_s > self.partial_ttl_s]

    async def scan_usage_quietly(self) -> None:
        try:
            await self.scan_usage()
        except StoreUnavailable as exc:
            logger.warning("usage scan failed: {}", exc)
