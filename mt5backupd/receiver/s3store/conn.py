"""The bucket connection: an aiobotocore client configured for S3-compatible stores, every call
timed and counted (``on_request(op, result, seconds)``), every failure to reach the store turned
into ``StoreUnavailable`` (503 with Retry-After, never a 500), and the start-up preflight."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.session import AioSession, get_session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from loguru import logger

from mt5backupd.config.model import StorageConfig
from mt5backupd.errors import ConfigError
from mt5backupd.receiver.s3store.keys import Keys
from mt5backupd.receiver.storage.errors import StoreUnavailable

RequestCallback = Callable[[str, str, float], None]
# A systemd unit's `LoadCredential=s3-credentials:/path` lands here; used when no
# credentials_file is configured (the AWS chain's environment and ~/.aws still come first).
SYSTEMD_CREDENTIAL_NAME = "s3-credentials"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 120.0  # one call, botocore's retries included
LONG_CALL_TIMEOUT_S = 900.0  # completion and server-side copy
SLOWEST_BYTES_PER_S = 128 * 1024  # part uploads get their size at this rate on top


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def error_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def content_md5(data: bytes | bytearray | memoryview) -> str:
    """Content-MD5 for a PUT: the store refuses a body damaged on the way (and Object Lock
    writes require it)."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def credentials_file(cfg: StorageConfig) -> Path | None:
    if cfg.credentials_file is not None:
        return cfg.credentials_file
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / SYSTEMD_CREDENTIAL_NAME).is_file():
        return Path(cred_dir) / SYSTEMD_CREDENTIAL_NAME
    return None


def make_session(cfg: StorageConfig) -> AioSession:
    session = get_session()
    cred_path = credentials_file(cfg)
    if cred_path is not None:
        session.set_config_variable("credentials_file", str(cred_path))
    return session


def boto_config(cfg: StorageConfig) -> BotoConfig:
    return BotoConfig(
        # Third-party stores (MinIO, Ceph, Garage, R2, B2) reject or mishandle the CRC checksums
        # newer botocore adds to every request; the receiver verifies sha256 itself.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # always sign the payload's SHA-256, whatever an AWS config file says: it is how every
        # part is checked against the bytes we received (PART_SHA256 below)
        s3={"addressing_style": cfg.addressing_style, "payload_signing_enabled": True},
        # standard mode: 3 attempts unless AWS_MAX_ATTEMPTS (or the AWS config file) says
        retries={"mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=64,
    )


# The SHA-256 of a part as received, set by the task that uploads it: botocore signs the hash of
# what it read from the scratch file, the store checks the body against that, and this check ties
# the two together, so bytes changed on the scratch disk (or sent from the wrong place) never
# become a part.
PART_SHA256: ContextVar[str | None] = ContextVar("part_sha256", default=None)


class PartChanged(StoreUnavailable):
    """A part read back for its upload is not what was received: 503, the client sends again
    from the durable offset (nothing of it was saved)."""


def check_part_payload(request: Any, **_kwargs: Any) -> None:
    expected = PART_SHA256.get()
    if expected is None:
        return
    signed = request.headers.get("X-Amz-Content-SHA256")
    if isinstance(signed, bytes):
        signed = signed.decode("ascii", "replace")
    if signed is None or signed == "UNSIGNED-PAYLOAD":
        # not a scratch problem: the client was configured not to sign payloads (SigV2, an
        # AWS config file); the parts would go unchecked, so they do not go
        logger.error("S3 part uploads are not payload-signed (X-Amz-Content-SHA256 is {}); "
                     "check the AWS config of the receiver's user (signature_version)", signed)
        raise PartChanged("receiver cannot check its part uploads (payload signing is off)")
    if signed != expected:
        logger.error("a part read back from the scratch file differs from what was received "
                     "(sha256 {} vs {}); not sent", signed, expected)
        raise PartChanged("receiver scratch data changed before its upload")


class Bucket:
    """One bucket through one client. ``call`` is the only way requests go out."""

    def __init__(self, cfg: StorageConfig, on_request: RequestCallback) -> None:
        self.cfg = cfg
        self.name = cfg.bucket
        self.keys = Keys(cfg.prefix)
        self._on_request = on_request
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    @property
    def where(self) -> str:
        return f"s3 bucket {self.name!r} at {self.cfg.endpoint_url or 'AWS'}"

    async def open(self) -> None:
        session = make_session(self.cfg)
        self._client = await self._stack.enter_async_context(session.create_client(
            "s3", endpoint_url=self.cfg.endpoint_url, region_name=self.cfg.region,
            config=boto_config(self.cfg)))
        self._client.meta.events.register("before-send.s3.UploadPart", check_part_payload)

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    def call_timeout_s(self, method: str) -> float:
        """The most one call may take, retries included: botocore's read timeout does not
        cover every wait (a store that accepts a connection and then freezes held an upload
        for 11 minutes), and a stuck call holds its upload's lock. Part uploads get time for
        their bytes at a slow 128 KiB/s on top."""
        if method in ("upload_part", "put_object"):
            return CALL_TIMEOUT_S + self.cfg.part_size_bytes / SLOWEST_BYTES_PER_S
        if method in ("complete_multipart_upload", "upload_part_copy"):
            # work on the store's side (AWS keeps the connection alive with whitespace): a
            # server-side copy of up to 1 GiB, the assembly of up to 10,000 parts
            return LONG_CALL_TIMEOUT_S
        return CALL_TIMEOUT_S

    async def call(self, op: str, method: str, *, expect: tuple[str, ...] = (),
                   timeout_s: float | None = None, **params: Any) -> Any:
        """``client.<method>(Bucket=..., **params)``. A ClientError whose code is in ``expect``
        (or a 404 when "404" is) is raised as it is, for the caller to handle; any other
        failure to get an answer, or none within ``timeout_s`` (default ``call_timeout_s``),
        is StoreUnavailable."""
        start = time.monotonic()
        result = "ok"
        try:
            # asyncio.timeout, not wait_for: the call stays in this task (3.11's wait_for runs
            # it in another and can swallow a cancel that arrives as it completes)
            async with asyncio.timeout(timeout_s if timeout_s is not None
                                       else self.call_timeout_s(method)):
                return await getattr(self._client, method)(Bucket=self.name, **params)
        except ClientError as exc:
            code = error_code(exc)
            if code in expect or (error_status(exc) == 404 and "404" in expect):
                result = "refused"
                raise
            result = "unavailable"
            logger.warning("{} {}: {} (HTTP {})", self.where, method, code, error_status(exc))
            raise StoreUnavailable(f"object store refused {op}: {code}") from None
        except (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            result = "unavailable"
            logger.warning("{} {}: {}", self.where, method, type(exc).__name__)
            raise StoreUnavailable(f"object store unreachable ({type(exc).__name__})") from None
        finally:
            self._on_request(op, result, time.monotonic() - start)

    async def preflight(self) -> None:
        """Reachable, writable with a conditional write, Object Lock enabled when configured;
        else a ConfigError (exit 4) naming the bucket and what is wrong."""
        where = f"[receiver.storage] {self.where}"
        try:
            await self.call("head", "head_bucket", expect=("404", "403", "NoSuchBucket"))
        except ClientError as exc:
            raise ConfigError(f"{where}: not accessible ({error_code(exc) or error_status(exc)})"
                              ) from None
        except StoreUnavailable as exc:
            raise ConfigError(f"{where}: {exc}") from None
        key = self.keys.preflight(secrets.token_hex(8))
        try:
            await self.call("put", "put_object", Key=key, Body=b"", IfNoneMatch="*",
                            ContentMD5=content_md5(b""))
            try:
                # the second write of the same key must be refused: commits rely on that
                with contextlib.suppress(ClientError):
                    await self.call("put", "put_object", Key=key, Body=b"", IfNoneMatch="*",
                                    ContentMD5=content_md5(b""), expect=("PreconditionFailed",))
                    raise ConfigError(f"{where}: the store ignores conditional writes "
                                      "(If-None-Match: *), which commits rely on")
            finally:
                with contextlib.suppress(StoreUnavailable):
                    await self.call("delete", "delete_object", Key=key)
        except StoreUnavailable as exc:
            raise ConfigError(f"{where}: not writable: {exc}") from None
        if self.cfg.object_lock_days:
            try:
                got = await self.call("get", "get_object_lock_configuration",
                                      expect=("ObjectLockConfigurationNotFoundError", "404"))
                enabled = got.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
            except ClientError:
                enabled = None
            except StoreUnavailable as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if enabled != "Enabled":
                raise ConfigError(f"{where}: object_lock_days = {self.cfg.object_lock_days} but "
                                  "the bucket does not have Object Lock enabled")


async def list_uploads(bucket: Bucket, prefix: str) -> AsyncIterator[Any]:
    """Every multipart upload under ``prefix``, page after page (1000 per page on AWS)."""
    args: dict[str, Any] = {"Prefix": prefix}
    while True:
        page = await bucket.call("list", "list_multipart_uploads", **args)
        for upload in page.get("Uploads", []):
            yield upload
        markers = {"KeyMarker": page.get("NextKeyMarker"),
                   "UploadIdMarker": page.get("NextUploadIdMarker")}
        if not page.get("IsTruncated") or not any(markers.values()):
            return  # (truncated without a marker to go on from: a broken store, not a loop)
        args = {"Prefix": prefix, **{k: v for k, v in markers.items() if v}}


async def list_pages(bucket: Bucket, prefix: str, delimiter: str | None = None
                     ) -> AsyncIterator[Any]:
    """Every page of ListObjectsV2 under ``prefix``."""
    token: str | None = None
    while True:
        args: dict[str, Any] = {"Prefix": prefix}
        if delimiter:
            args["Delimiter"] = delimiter
        if token:
            args["ContinuationToken"] = token
        page = await bucket.call("list", "list_objects_v2", **args)
        yield page
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")
