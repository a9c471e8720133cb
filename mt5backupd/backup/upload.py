"""Receiver client: resumable upload that follows a growing local file, with retries.

The uploader reads the spool file behind pg_dump; it never slows the dump, it only lags. Retries
(exponential backoff with jitter) are for retryable failures only: connection errors, timeouts,
408, 429 and 5xx. After a failure it asks the receiver for its offset and continues from there.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from loguru import logger

from mt5backupd import __version__
from mt5backupd.backoff import backoff_delays, is_retryable_status
from mt5backupd.config import Secret
from mt5backupd.errors import ConfigError, Mt5BackupError
from mt5backupd.records import BackupRecord, InvalidRecord, UploadSession, find_same

CHUNK_BYTES = 1024 * 1024


class ReceiverUnavailable(Mt5BackupError):
    """Retryable: the receiver could not be reached or answered 408/429/5xx."""


class ReceiverRejected(Mt5BackupError):
    """Permanent: the receiver refused the request (4xx other than 408/429)."""

    def __init__(self, message: str, status: int, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class ReceiverAuthError(ConfigError):
    pass


NOT_TRUSTED = "receiver not trusted"


class ReceiverNotTrusted(ConfigError):
    """TLS verification of the receiver failed (unknown CA, wrong host name, expired). Not an
    outage: retrying will not help and the operator must act, so it is a config error (exit 4);
    the backup itself is still taken and kept locally, pending."""


def _not_trusted(base_url: str, exc: aiohttp.ClientConnectorCertificateError) -> ReceiverNotTrusted:
    return ReceiverNotTrusted(
        f"{NOT_TRUSTED}: TLS verification of {base_url} failed ({exc.certificate_error}); set "
        "[remote] ca_file to the CA that signed the receiver's certificate, or fix the "
        "certificate's host name")


class ReceiverBadAnswer(Mt5BackupError):
    """The receiver answered 2xx with JSON that is not the wire contract (records.py)."""


class UploadGone(Mt5BackupError):
    """The receiver no longer has the upload session (expired, aborted or discarded)."""


class OffsetConflict(Mt5BackupError):
    def __init__(self, current: int) -> None:
        super().__init__(f"receiver is at offset {current}")
        self.current = current


class ReceiverClient:
    def __init__(self, base_url: str, token: Secret | None, *, timeout_s: float,
                 ca_file: Path | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self._ssl: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                self._ssl = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"[remote] ca_file {ca_file}: cannot load: {exc}") from None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ReceiverClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"User-Agent": f"mt5backupd/{__version__}"}
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token.reveal()}"
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self, method: str, path: str, *, expect: tuple[int, ...], stream_timeout: bool = False,
        **kwargs: Any,
    ) -> tuple[int, Any, dict[str, str]]:
        timeout = (aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s,
                                         sock_read=self.timeout_s) if stream_timeout
                   else aiohttp.ClientTimeout(total=self.timeout_s))
        url = f"{self.base_url}{path}"
        try:
            async with self._http().request(method, url, timeout=timeout, ssl=self._ssl,
                                            **kwargs) as resp:
                body: Any = None
                if resp.content_type == "application/json":
                    body = await resp.json()
                else:
                    body = await resp.read()
                headers = dict(resp.headers)
                status = resp.status
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _not_trusted(self.base_url, exc) from None
        except aiohttp.ClientSSLError as exc:
            raise ReceiverRejected(f"TLS failure talking to {self.base_url}: {exc}", 0,
                                   "tls") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ReceiverUnavailable(
                f"receiver {self.base_url} unreachable: {exc.__class__.__name__}: {exc}"
            ) from None
        if status in expect:
            return status, body, headers
        reason = body.get("error", "") if isinstance(body, dict) else ""
        message = body.get("message", "") if isinstance(body, dict) else ""
        detail = f"{method} {path}: HTTP {status} {reason} {message}".strip()
        if status == 401:
            raise ReceiverAuthError(f"receiver {self.base_url} refused the token (401); check "
                                    "[remote] token_file / BACKUP_API_TOKEN")
        if status == 404 and path.startswith("/api/v1/uploads/"):
            raise UploadGone(detail)
        if status == 409 and reason == "offset_mismatch" and isinstance(body, dict):
            raise OffsetConflict(int(body["offset"]))
        if is_retryable_status(status) or (status == 409 and reason == "upload_busy"):
            # upload_busy: the receiver is still finishing a request of ours whose connection
            # broke; it goes away once the receiver notices, so wait and try again
            raise ReceiverUnavailable(f"receiver {self.base_url}: {detail}")
        raise ReceiverRejected(f"receiver {self.base_url}: {detail}", status, reason)

    async def health(self) -> dict[str, Any]:
        _s, body, _h = await self._request("GET", "/health", expect=(200,))
        if not isinstance(body, dict) or body.get("status") != "ok":
            raise ReceiverUnavailable(f"receiver {self.base_url}/health is not ok: {body!r}")
        return body

    async def whoami(self) -> dict[str, Any]:
        _s, body, _h = await self._request("GET", "/api/v1/whoami", expect=(200,))
        return dict(body)

    def _bad_answer(self, what: str, exc: InvalidRecord) -> ReceiverBadAnswer:
        return ReceiverBadAnswer(f"receiver {self.base_url} sent an invalid {what}: {exc}")

    async def create_upload(self, name: str, kind: str, size: int | None,
                            metadata: dict[str, Any]) -> UploadSession:
        payload = {"name": name, "kind": kind, "size": size, "metadata": metadata}
        _s, body, _h = await self._request("POST", "/api/v1/uploads", json=payload,
                                           expect=(201,))
        try:
            return UploadSession.from_json(body)
        except InvalidRecord as exc:
            raise self._bad_answer("upload session", exc) from None

    async def upload_offset(self, uid: str) -> int:
        _s, _b, headers = await self._request("HEAD", f"/api/v1/uploads/{uid}", expect=(200,))
        return int(headers["Upload-Offset"])

    async def append(self, uid: str, offset: int, body: AsyncIterator[bytes]) -> int:
        _s, _b, headers = await self._request(
            "PATCH", f"/api/v1/uploads/{uid}", data=body, stream_timeout=True,
            headers={"Upload-Offset": str(offset),
                     "Content-Type": "application/offset+octet-stream"},
            expect=(204,),
        )
        return int(headers["Upload-Offset"])

    async def commit(self, uid: str, sha256: str, size: int) -> BackupRecord:
        _s, body, _h = await self._request("POST", f"/api/v1/uploads/{uid}/commit",
                                           json={"sha256": sha256, "size": size}, expect=(201,))
        try:
            return BackupRecord.from_json(body)
        except InvalidRecord as exc:
            raise self._bad_answer("commit answer", exc) from None

    async def abort(self, uid: str) -> None:
        await self._request("DELETE", f"/api/v1/uploads/{uid}", expect=(204, 404))

    async def list_backups(self) -> list[BackupRecord]:
        """Every backup the receiver holds for us. A record that is not valid (its id would
        become a local file name) is left out with a warning; a list that is not a list fails."""
        _s, body, _h = await self._request("GET", "/api/backup/list", expect=(200,))
        raw = body.get("backups") if isinstance(body, dict) else None
        if not isinstance(raw, list):
            raise ReceiverBadAnswer(f"receiver {self.base_url} sent an invalid backup list: "
                                    "no 'backups' array")
        records = []
        for item in raw:
            try:
                records.append(BackupRecord.from_json(item))
            except InvalidRecord as exc:
                logger.warning("receiver {} listed an invalid backup record; ignored: {}",
                               self.base_url, exc)
        return records

    async def download(self, backup: str, dest: Path) -> str:
        """Stream backup ``backup`` into ``dest``, resuming a previous partial download
        (``dest`` + ``.part``) with a Range request; return the receiver's sha256.

        The file appears under ``dest`` only once complete; verifying its hash is the caller's
        job (it must happen before anything trusts the file).
        """
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s,
                                        sock_read=self.timeout_s)
        url = f"{self.base_url}/api/backup/download/{backup}"
        try:
            async with self._http().get(url, headers=headers, timeout=timeout,
                                        ssl=self._ssl) as resp:
                if resp.status == 416 and have:
                    part.unlink()  # our partial is longer than the file: start over
                    return await self.download(backup, dest)
                if resp.status not in (200, 206):
                    if resp.status == 401:
                        raise ReceiverAuthError(f"receiver {self.base_url} refused the token")
                    if resp.status == 404:
                        raise ReceiverRejected(f"receiver has no backup {backup!r}", 404,
                                               "not_found")
                    raise ReceiverUnavailable(f"download of {backup}: HTTP {resp.status}")
                sha256 = resp.headers.get("X-Content-SHA256", "")
                mode = "ab" if resp.status == 206 else "wb"
                with part.open(mode) as out:
                    async for block in resp.content.iter_chunked(CHUNK_BYTES):
                        out.write(block)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _not_trusted(self.base_url, exc) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ReceiverUnavailable(f"download of {backup} interrupted: {exc}") from None
        part.rename(dest)
        return sha256


class GrowingSource:
    """What the uploader follows: a file and how much of it is final so far.

    ``notify_threadsafe`` is called by the writer thread after each write; notifications are
    coalesced so a fast writer does not flood the event loop.
    """

    def __init__(self, path: Path, size_of: Callable[[], int]) -> None:
        self.path = path
        self._size_of = size_of
        self.size = 0
        self.closed = False
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._scheduled = False

    @classmethod
    def complete(cls, path: Path) -> GrowingSource:
        size = path.stat().st_size
        source = cls(path, lambda: size)
        source.close(size)
        return source

    def notify_threadsafe(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._refresh)

    def _refresh(self) -> None:
        self._scheduled = False
        self.size = self._size_of()
        self._event.set()

    def close(self, final_size: int) -> None:
        self.size = final_size
        self.closed = True
        self._event.set()

    async def wait_beyond(self, position: int) -> None:
        while self.size <= position and not self.closed:
            self._event.clear()
            await self._event.wait()


@dataclass
class UploadProgress:
    uid: str | None = None
    offset: int = 0
    retries: int = 0
    sent_bytes: int = 0
    last_error: str = ""
    resumed_at: list[int] = field(default_factory=list)  # receiver offsets resumed from
    on_retry: Callable[[], None] = field(default=lambda: None)
    on_bytes: Callable[[int], None] = field(default=lambda _n: None)
    # called with the id of each new session as soon as the receiver created it, so the caller
    # can journal it and clean it up after a crash (kill -9, power loss)
    on_session: Callable[[str], None] = field(default=lambda _uid: None)


async def _file_body(source: GrowingSource, fd: int, start: int,
                     progress: UploadProgress) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    position = start
    while True:
        await source.wait_beyond(position)
        if position >= source.size:
            return  # closed and everything sent
        length = min(CHUNK_BYTES, source.size - position)
        block = await loop.run_in_executor(None, os.pread, fd, length, position)
        if not block:
            raise OSError(f"{source.path} shrank while uploading")
        position += len(block)
        progress.sent_bytes += len(block)
        progress.on_bytes(len(block))
        yield block


async def send_following(
    client: ReceiverClient,
    source: GrowingSource,
    *,
    name: str,
    kind: str,
    metadata: dict[str, Any],
    max_retries: int,
    retry_delay_s: float,
    progress: UploadProgress,
) -> UploadProgress:
    """Send every byte of ``source`` (which may still be growing) to an upload session.

    Resumes ``progress.uid`` when set. The retry budget is per stretch without progress: a
    flaky link that keeps moving data forward is not given up on.
    """
    fd = os.open(source.path, os.O_RDONLY)  # the fd follows the file across its final rename
    delays = backoff_delays(max_retries, retry_delay_s)
    failures = conflicts = 0
    need_offset = progress.uid is not None  # resuming a recorded session: ask where it is
    try:
        while True:
            try:
                if progress.uid is None:
                    session = await client.create_upload(name, kind, None, metadata)
                    progress.uid = session.upload_id
                    progress.offset = 0
                    progress.on_session(progress.uid)
                elif need_offset:
                    offset = await client.upload_offset(progress.uid)
                    if offset > progress.offset:
                        failures = 0  # data moved forward since the last failure
                    progress.offset = offset
                    progress.resumed_at.append(offset)
                    logger.info("resuming upload {} at offset {}", progress.uid, offset)
                need_offset = False
                if source.closed and progress.offset >= source.size:
                    return progress
                progress.offset = await client.append(
                    progress.uid, progress.offset,
                    _file_body(source, fd, progress.offset, progress))
                failures = conflicts = 0
                continue
            except OffsetConflict as exc:
                progress.offset = exc.current
                conflicts += 1
                if conflicts <= 3:
                    continue  # the receiver said where it is: go on from there at once
                progress.last_error = "the receiver's offset keeps changing"
            except UploadGone:
                logger.warning("receiver lost upload {}; starting it again from 0", progress.uid)
                progress.uid = None
                progress.last_error = "the receiver lost the upload session"
            except ReceiverUnavailable as exc:
                progress.last_error = str(exc)
                need_offset = True
            failures += 1
            if failures > max_retries:
                raise ReceiverUnavailable(
                    f"upload gave up after {max_retries} retries: {progress.last_error}")
            delay_s = delays[failures - 1]
            progress.retries += 1
            progress.on_retry()
            logger.warning("upload retry {}/{} in {:.1f} s: {}", failures, max_retries, delay_s,
                           progress.last_error)
            await asyncio.sleep(delay_s)
    finally:
        os.close(fd)


async def commit_with_retries(client: ReceiverClient, progress: UploadProgress, *, name: str,
                              sha256: str, size: int, max_retries: int,
                              retry_delay_s: float) -> BackupRecord:
    """Commit; a lost response whose commit did happen is recognised by ``find_same``."""
    assert progress.uid is not None
    delays = backoff_delays(max_retries, retry_delay_s)
    for attempt in range(max_retries + 1):
        try:
            return await client.commit(progress.uid, sha256, size)
        except UploadGone:
            found = find_same(await client.list_backups(), name, sha256, size)
            if found is not None:
                return found
            raise
        except ReceiverUnavailable as exc:
            if attempt >= max_retries:
                raise
            progress.retries += 1
            progress.on_retry()
            logger.warning("commit retry {}/{}: {}", attempt + 1, max_retries, exc)
            await asyncio.sleep(delays[attempt])
    raise AssertionError("unreachable")
