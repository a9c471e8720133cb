"""HTTP layer of the receiver: routes, auth, error mapping. Storage does the file work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mt5backupd import __version__
from mt5backupd.config import Config, ReceiverConfig
from mt5backupd.errors import ConfigError
from mt5backupd.names import (
    SIDECAR_SUFFIX,
    InvalidName,
    is_sha256_hex,
    validate_backup_id,
    validate_kind,
)
from mt5backupd.receiver.auth import Principal, TokenStore
from mt5backupd.receiver.metrics import ReceiverMetrics
from mt5backupd.receiver.ranges import (
    RangeMalformed,
    RangeNotSatisfiable,
    parse_offset,
    parse_range,
)
from mt5backupd.receiver.storage import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InsufficientStorage,
    InvalidId,
    NotFound,
    OffsetMismatch,
    RequestTimeout,
    SizeMismatch,
    Storage,
    StorageError,
    TempUpload,
    TooLarge,
    UploadBusy,
)
from mt5backupd.records import UploadSession, sidecar_line
from mt5backupd.retention import Policy
from mt5backupd.sdnotify import Notifier as SystemdNotifier

READ_BUFSIZE = 1024 * 1024
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
PUBLIC_PATHS = frozenset({"/health", "/metrics"})

STORAGE_KEY = web.AppKey("storage", Storage)
TOKENS_KEY = web.AppKey("tokens", TokenStore)
METRICS_KEY = web.AppKey("metrics", ReceiverMetrics)
CONFIG_KEY = web.AppKey("config", ReceiverConfig)
STARTED_KEY = web.AppKey("started", float)
BODY_IDLE_KEY = web.AppKey("body_idle_timeout_s", float)
PRINCIPAL_KEY = web.RequestKey("principal", Principal)

_STATUS: dict[type[StorageError], int] = {
    NotFound: 404,
    Conflict: 409,
    InvalidId: 400,
    BadRequest: 400,
    UploadBusy: 409,
    OffsetMismatch: 409,
    TooLarge: 413,
    InsufficientStorage: 507,
    ChecksumMismatch: 422,
    SizeMismatch: 422,
    RequestTimeout: 408,
}


class Forbidden(StorageError):
    reason = "forbidden"


_STATUS[Forbidden] = 403


def _error(status: int, reason: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": reason, "message": message, **extra}, status=status)


class LogBudget:
    """At most ``lines`` log lines per ``window_s`` for one kind of noise a stranger can cause
    (malformed requests, clients that go away); the rest are only counted, and the count rides
    on the next line allowed. Pure: the caller passes the clock."""

    def __init__(self, lines: int, window_s: float) -> None:
        self.lines = lines
        self.window_s = window_s
        self._window_start = float("-inf")
        self._used = 0
        self._suppressed = 0

    def take(self, now: float) -> int | None:
        """None: stay silent. Otherwise log, mentioning the returned number of lines dropped
        since the last one."""
        if now - self._window_start >= self.window_s:
            self._window_start = now
            self._used = 0
        if self._used >= self.lines:
            self._suppressed += 1
            return None
        self._used += 1
        dropped, self._suppressed = self._suppressed, 0
        return dropped


NOISE_LINES_PER_WINDOW = 10
NOISE_WINDOW_S = 60.0
MAX_LOGGED_CHARS = 120


@dataclass
class NoiseLog:
    """The receiver's rate-limited INFO lines for what strangers and flaky networks cause."""

    metrics: ReceiverMetrics
    malformed: LogBudget = field(
        default_factory=lambda: LogBudget(NOISE_LINES_PER_WINDOW, NOISE_WINDOW_S))
    gone: LogBudget = field(
        default_factory=lambda: LogBudget(NOISE_LINES_PER_WINDOW, NOISE_WINDOW_S))

    def info(self, budget: LogBudget, message: str, *args: Any) -> None:
        dropped = budget.take(time.monotonic())
        if dropped is None:
            return
        suffix = f" ({dropped} similar lines suppressed)" if dropped else ""
        logger.opt(exception=None).info(message + suffix, *args)


NOISE_KEY = web.AppKey("noise", NoiseLog)


def _short(text: object) -> str:
    """A client-controlled value cut to a size fit for a log line (paths can be 8 KiB)."""
    value = str(text)
    return value if len(value) <= MAX_LOGGED_CHARS else value[:MAX_LOGGED_CHARS] + "..."


@web.middleware
async def _errors_and_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    if request.path not in PUBLIC_PATHS:
        principal = request.app[TOKENS_KEY].authenticate(request.headers.get("Authorization"))
        if principal is None:
            metrics.rejections.labels(reason="unauthorized").inc()
            resp = _error(401, "unauthorized", "missing or invalid bearer token")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="mt5backupd"'
            return resp
        request[PRINCIPAL_KEY] = principal
    try:
        return await handler(request)
    except StorageError as exc:
        status = next((code for cls, code in _STATUS.items() if type(exc) is cls), 400)
        metrics.rejections.labels(reason=exc.reason).inc()
        extra: dict[str, Any] = {}
        headers: dict[str, str] = {}
        if isinstance(exc, OffsetMismatch):
            extra["offset"] = exc.current
            headers["Upload-Offset"] = str(exc.current)
        logger.bind(client=_client_name(request)).info(
            "{} {} refused: {} ({})", _short(request.method), _short(request.path), exc.reason,
            _short(exc),
        )
        resp = _error(status, exc.reason, str(exc), **extra)
        resp.headers.update(headers)
        if isinstance(exc, RequestTimeout):
            resp.force_close()  # the rest of the body may never come: do not wait for it
        return resp
    except RequestPayloadError:
        # The body's framing is broken (bad chunked encoding, a bad compressed stream).
        metrics.rejections.labels(reason="bad_request").inc()
        resp = _error(400, "bad_request", "the request body is malformed")
        resp.force_close()
        return resp
    except ConnectionError:
        # The client went away (reset, closed mid-body or mid-download): nothing is wrong here,
        # and what an upload received is kept. One line, no traceback; the answer below is
        # never read (aiohttp notices the closed transport and drops it quietly).
        request.app[NOISE_KEY].info(
            request.app[NOISE_KEY].gone, "client {} went away during {} {}", request.remote,
            _short(request.method), _short(request.path))
        resp = web.Response(status=400)
        resp.force_close()
        return resp


def _client_name(request: web.Request) -> str:
    principal = request.get(PRINCIPAL_KEY)
    return principal.name if principal else "-"


def _principal(request: web.Request) -> Principal:
    return request[PRINCIPAL_KEY]


def _target_client(request: web.Request) -> str:
    """The namespace a request acts on: the token's own, or ``?client=`` for an admin."""
    principal = _principal(request)
    wanted = request.query.get("client")
    if wanted is None or wanted == principal.name:
        return principal.name
    if not principal.admin:
        raise Forbidden("a client token acts only on its own backups")
    return wanted


def _require_admin(request: web.Request) -> Principal:
    principal = _principal(request)
    if not principal.admin:
        raise Forbidden("this needs an admin token")
    return principal


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        async with _body_wait(request):
            body = await request.json()
    except (ValueError, RecursionError):
        # JSONDecodeError, UnicodeDecodeError, an integer past int()'s digit limit, nesting
        # deeper than the recursion limit: all just bad JSON from the client.
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _opt_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be an integer")
    return value


def _sha_param(value: Any, what: str) -> str:
    if not isinstance(value, str) or not is_sha256_hex(value.strip().lower()):
        raise BadRequest(f"{what} must be 64 hex digits")
    return value.strip().lower()


BODY_IDLE_TIMEOUT_S = 120.0


def _body_timeout(request: web.Request) -> RequestTimeout:
    return RequestTimeout(f"no request body data for {request.app[BODY_IDLE_KEY]:g} s")


@contextlib.asynccontextmanager
async def _body_wait(request: web.Request) -> AsyncIterator[None]:
    """One wait for body data, bounded by the body idle timeout (408 when it passes)."""
    try:
        async with asyncio.timeout(request.app[BODY_IDLE_KEY]):
            yield
    except TimeoutError:
        raise _body_timeout(request) from None


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The body as it arrives. A client silent for the body idle timeout (a half-open TCP
    connection, a stalled sender) ends the request with 408, so it cannot hold its upload's
    lock for hours."""
    idle_s = request.app[BODY_IDLE_KEY]
    while True:
        # asyncio.timeout inline, not wait_for: no extra task or context manager object per
        # chunk on the ingest path
        try:
            async with asyncio.timeout(idle_s):
                chunk = await request.content.readany()
        except TimeoutError:
            raise _body_timeout(request) from None
        if not chunk:
            return
        yield chunk


MAX_FIELD_BYTES = 64 * 1024


async def _field_text(request: web.Request, part: BodyPartReader) -> str:
    """A small form field, read with a bound (a text field is never a reason to buffer MBs)."""
    data = bytearray()
    while True:
        async with _body_wait(request):
            chunk = await part.read_chunk(8192)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise BadRequest(f"form field {part.name!r} is larger than {MAX_FIELD_BYTES} bytes")
    return data.decode(errors="replace")


async def _part_chunks(request: web.Request, part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        async with _body_wait(request):
            chunk = await part.read_chunk(READ_BUFSIZE)
        if not chunk:
            return
        yield chunk


# ---------------------------------------------------------------- public


async def health(request: web.Request) -> web.Response:
    storage = request.app[STORAGE_KEY]
    _used, free = await asyncio.get_running_loop().run_in_executor(None, storage.usage)
    return web.json_response({
        "status": "ok",
        "version": __version__,
        "uptime_s": round(time.monotonic() - request.app[STARTED_KEY], 3),
        "storage_free_bytes": free,
    })


async def metrics_endpoint(request: web.Request) -> web.Response:
    registry = request.app[METRICS_KEY].registry
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def whoami(request: web.Request) -> web.Response:
    """The authenticated no-op clients use as a preflight: proves the token before any work."""
    principal = _principal(request)
    return web.json_response({"client": principal.name, "admin": principal.admin})


# ---------------------------------------------------------------- resumable uploads


async def create_upload(request: web.Request) -> web.Response:
    body = await _json_body(request)
    name = body.get("name")
    kind = body.get("kind", "database")
    if not isinstance(name, str) or not isinstance(kind, str):
        raise BadRequest("name and kind must be strings")
    sess = await request.app[STORAGE_KEY].create_session(
        _principal(request).name, name, kind, _opt_int(body.get("size"), "size"),
        body.get("metadata"),
    )
    location = f"/api/v1/uploads/{sess.uid}"
    logger.bind(client=sess.client).info("upload {} started for {} ({})", sess.uid, name, kind)
    return web.json_response(
        UploadSession(sess.uid, 0, location).to_json(),
        status=201,
        headers={"Location": location, "Upload-Offset": "0"},
    )


async def upload_status(request: web.Request) -> web.Response:
    info = request.app[STORAGE_KEY].session_info(_principal(request).name,
                                                 request.match_info["uid"])
    headers = {"Upload-Offset": str(info["offset"]), "Cache-Control": "no-store"}
    if info["expected_size"] is not None:
        headers["Upload-Length"] = str(info["expected_size"])
    if request.method == "HEAD":
        return web.Response(status=200, headers=headers)
    return web.json_response(info, headers=headers)


async def append_upload(request: web.Request) -> web.Response:
    wanted = parse_offset(request.headers.get("Upload-Offset"))
    if wanted is None:
        raise BadRequest("Upload-Offset header (a non-negative integer in ASCII digits) is "
                         "required")
    m = request.app[METRICS_KEY]
    with m.uploads_in_flight.track_inprogress():
        offset = await request.app[STORAGE_KEY].append(
            _principal(request).name, request.match_info["uid"], wanted,
            _body_chunks(request), request.content_length,
        )
    return web.Response(status=204, headers={"Upload-Offset": str(offset)})


async def commit_upload(request: web.Request) -> web.Response:
    body = await _json_body(request)
    sha256 = _sha_param(body.get("sha256"), "sha256")
    size = _opt_int(body.get("size"), "size")
    if size is None:
        raise BadRequest("size is required")
    client = _principal(request).name
    record = await request.app[STORAGE_KEY].commit(client, request.match_info["uid"], sha256, size)
    _committed(request, record.kind, record.id, record.size)
    return web.json_response(record.to_json(), status=201)


async def abort_upload(request: web.Request) -> web.Response:
    await request.app[STORAGE_KEY].abort(_principal(request).name, request.match_info["uid"])
    return web.Response(status=204)


def _committed(request: web.Request, kind: str, backup_id: str, size: int) -> None:
    request.app[METRICS_KEY].commits.labels(kind=kind).inc()
    client = _principal(request).name
    logger.bind(client=client).info("committed {} ({} bytes, {})", backup_id, size, kind)
    retention = request.app[CONFIG_KEY].retention
    if retention.auto:
        policy = Policy(retention.keep_last, retention.keep_daily, retention.keep_weekly,
                        retention.keep_monthly)
        for removed in request.app[STORAGE_KEY].prune(client, policy):
            logger.bind(client=client).info("retention removed {}", removed.id)


# ---------------------------------------------------------------- legacy REST


def _default_name() -> str:
    return datetime.now(UTC).strftime("upload-%Y%m%d-%H%M%S.dump")


def _check_name(name: str | None) -> None:
    if name is not None:
        try:
            validate_backup_id(name)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None


def _check_kind(kind: str) -> None:
    try:
        validate_kind(kind)
    except InvalidName as exc:
        raise InvalidId(str(exc)) from None


async def legacy_upload(request: web.Request) -> web.Response:
    """``curl -F file=@x.dump`` (multipart) or a raw body; optional sha256 verified.

    Everything known before the body (name, kind, declared sha256 from the URL, the headers
    or form fields that precede the file) is checked before a byte of it is stored: a bad
    name must not cost the receiver a 1 GB write first."""
    storage = request.app[STORAGE_KEY]
    client = _principal(request).name
    name = request.query.get("name") or request.headers.get("X-Backup-Name")
    kind = request.query.get("kind", "database")
    raw_sha = request.headers.get("X-Content-SHA256") or request.query.get("sha256")
    _check_name(name)
    _check_kind(kind)
    expected = _sha_param(raw_sha, "sha256") if raw_sha else None
    metadata: Any = None
    temp: TempUpload | None = None
    m = request.app[METRICS_KEY]
    try:
        with m.uploads_in_flight.track_inprogress():
            if request.content_type.startswith("multipart/"):
                try:
                    temp, name, kind, expected, metadata = await _legacy_multipart(
                        request, client, name, kind, expected)
                except ValueError as exc:  # aiohttp's multipart parser: a broken body
                    raise BadRequest(f"malformed multipart body ({_short(exc)})") from None
            else:
                temp = await storage.receive_temp(client, _body_chunks(request),
                                                  request.content_length)
        final, temp = temp, None
        record = await storage.publish_temp(final, name or _default_name(), kind, metadata,
                                            expected)
    finally:
        if temp is not None:
            storage.discard_temp(temp)
    _committed(request, record.kind, record.id, record.size)
    return web.json_response({"status": "ok", **record.to_json()})


async def _legacy_multipart(
    request: web.Request, client: str, name: str | None, kind: str, expected: str | None,
) -> tuple[TempUpload, str | None, str, str | None, Any]:
    """Read a multipart one-shot upload; each field is checked as it arrives, so fields sent
    before the file refuse the upload before its bytes are stored."""
    storage = request.app[STORAGE_KEY]
    metadata: Any = None
    temp: TempUpload | None = None
    try:
        reader = await request.multipart()
        while True:
            async with _body_wait(request):
                part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart is not supported")
            if part.name == "file":
                if temp is not None:
                    raise BadRequest("only one file field per upload")
                name = name or part.filename
                _check_name(name)
                temp = await storage.receive_temp(client, _part_chunks(request, part), None)
            elif part.name in ("sha256", "checksum"):
                # Accept the bare hash or a whole `sha256sum` line.
                raw_sha = ((await _field_text(request, part)).split() or [""])[0]
                expected = _sha_param(raw_sha, "sha256") if raw_sha else None
            elif part.name == "name":
                name = (await _field_text(request, part)).strip()
                _check_name(name)
            elif part.name == "kind":
                kind = (await _field_text(request, part)).strip()
                _check_kind(kind)
            elif part.name == "metadata":
                try:
                    metadata = json.loads(await _field_text(request, part))
                except (ValueError, RecursionError):
                    raise BadRequest("metadata field is not valid JSON") from None
            else:
                async with _body_wait(request):
                    await part.release()
        if temp is None:
            raise BadRequest("multipart upload without a 'file' field")
    except BaseException:
        if temp is not None:
            storage.discard_temp(temp)
        raise
    return temp, name, kind, expected, metadata


async def list_backups(request: web.Request) -> web.Response:
    storage = request.app[STORAGE_KEY]
    principal = _principal(request)
    if principal.admin and "client" not in request.query:
        clients = storage.clients()
    else:
        clients = [_target_client(request)]
    records = [r.to_json() for c in clients for r in storage.list_backups(c)]
    return web.json_response({"backups": records, "count": len(records)})


async def download(request: web.Request) -> web.StreamResponse:
    storage = request.app[STORAGE_KEY]
    client = _target_client(request)
    raw_id = request.match_info["id"]
    if raw_id.endswith(SIDECAR_SUFFIX):
        record = storage.get(client, raw_id.removesuffix(SIDECAR_SUFFIX))
        return web.Response(text=sidecar_line(record.sha256, record.id),
                            headers={"X-Content-SHA256": record.sha256})
    record, fh = storage.open_data(client, raw_id)
    try:
        etag = f'"{record.sha256}"'
        headers = {
            "ETag": etag,
            "X-Content-SHA256": record.sha256,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{record.id}"',
        }
        if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
            return web.Response(status=304, headers=headers)
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            range_header = None  # the representation changed: send it whole
        try:
            span = parse_range(range_header, record.size)
        except RangeNotSatisfiable:
            return web.Response(status=416, headers={**headers,
                                                     "Content-Range": f"bytes */{record.size}"})
        except RangeMalformed:
            raise BadRequest("Range: positions must be ASCII digits (bytes=FIRST-LAST)") from None
        start, end = span if span is not None else (0, record.size - 1)
        length = max(0, end - start + 1)
        resp = web.StreamResponse(status=206 if span else 200, headers=headers)
        if span:
            resp.headers["Content-Range"] = f"bytes {start}-{end}/{record.size}"
        resp.content_length = length
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, fh.seek, start)
        remaining = length
        while remaining > 0:
            block = await loop.run_in_executor(None, fh.read, min(DOWNLOAD_CHUNK_BYTES, remaining))
            if not block:
                # The file on disk is shorter than its record (truncated by someone or a
                # failing disk). The promised Content-Length can never be met: close now, so
                # the client fails at once instead of waiting for bytes until its timeout.
                logger.bind(client=client).error(
                    "backup {} is truncated on disk ({} bytes short of its {}-byte record); "
                    "download closed", record.id, remaining, record.size)
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write(block)
            remaining -= len(block)
        await resp.write_eof()
        return resp
    finally:
        fh.close()


# ---------------------------------------------------------------- admin


async def delete_backup(request: web.Request) -> web.Response:
    admin = _require_admin(request)
    client = _target_client(request)
    record = request.app[STORAGE_KEY].delete(client, request.match_info["id"])
    logger.bind(client=client).warning("admin {} deleted backup {}", admin.name, record.id)
    return web.json_response({"deleted": record.to_json()})


async def prune(request: web.Request) -> web.Response:
    admin = _require_admin(request)
    body = await _json_body(request)
    cfg = request.app[CONFIG_KEY].retention
    keys = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")
    given = {k: _opt_int(body.get(k), k) for k in keys if k in body}
    policy = Policy(**{k: v or 0 for k, v in given.items()}) if given else Policy(
        cfg.keep_last, cfg.keep_daily, cfg.keep_weekly, cfg.keep_monthly)
    try:
        policy.validate()
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    dry_run = bool(body.get("dry_run", False))
    storage = request.app[STORAGE_KEY]
    wanted = body.get("client")
    clients = [wanted] if isinstance(wanted, str) else storage.clients()
    removed = [r.to_json() for c in clients for r in storage.prune(c, policy, dry_run=dry_run)]
    logger.info("admin {} pruned {} backups (dry_run={})", admin.name, len(removed), dry_run)
    return web.json_response({"removed": removed, "count": len(removed), "dry_run": dry_run})


# ---------------------------------------------------------------- assembly


async def _expire_loop(app: web.Application) -> AsyncIterator[None]:
    storage = app[STORAGE_KEY]
    interval_s = min(600.0, max(1.0, storage.partial_ttl_s / 4))

    async def loop() -> None:
        while True:
            try:
                removed = storage.expire_partials()
                if removed:
                    logger.info("expired {} idle partial uploads", removed)
            except OSError as exc:
                logger.warning("partial upload expiry failed: {}", exc)
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(cfg: ReceiverConfig, tokens: TokenStore,
             metrics: ReceiverMetrics | None = None, *,
             body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S) -> web.Application:
    metrics = metrics or ReceiverMetrics()
    storage = Storage(
        cfg.data_dir,
        max_upload_bytes=cfg.max_upload_bytes,
        min_free_bytes=cfg.min_free_bytes,
        partial_ttl_s=cfg.partial_ttl_s,
        on_bytes=metrics.bytes_received.inc,
    )
    metrics.watch_storage(storage.usage, storage.partial_count)
    app = web.Application(middlewares=[_errors_and_auth])
    app[STORAGE_KEY] = storage
    app[TOKENS_KEY] = tokens
    app[METRICS_KEY] = metrics
    app[CONFIG_KEY] = cfg
    app[STARTED_KEY] = time.monotonic()
    app[BODY_IDLE_KEY] = body_idle_timeout_s
    app[NOISE_KEY] = NoiseLog(metrics)
    app.cleanup_ctx.append(_expire_loop)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/api/v1/whoami", whoami)
    r.add_post("/api/v1/uploads", create_upload)
    r.add_route("HEAD", "/api/v1/uploads/{uid}", upload_status)
    r.add_get("/api/v1/uploads/{uid}", upload_status, allow_head=False)
    r.add_patch("/api/v1/uploads/{uid}", append_upload)
    r.add_post("/api/v1/uploads/{uid}/commit", commit_upload)
    r.add_delete("/api/v1/uploads/{uid}", abort_upload)
    r.add_post("/api/backup/upload", legacy_upload)
    r.add_get("/api/backup/list", list_backups)
    r.add_get("/api/backup/download/{id}", download)
    r.add_delete("/api/backup/{id}", delete_backup)
    r.add_post("/api/admin/prune", prune)
    return app


GENERIC_400_BODY = "400 Bad Request: the request is not valid HTTP\n"


class _HardenedHandler(RequestHandler):
    """aiohttp's connection protocol, except for requests its parser refuses: its own error
    path logs the exception (whose message quotes the offending header, a token included) at
    ERROR with a traceback and echoes it in the 400 body. Here: one rate-limited INFO line with
    the peer and the kind of error, and a body that says nothing about the request."""

    __slots__ = ("_noise",)

    def __init__(self, manager: web.Server, noise: NoiseLog, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._noise = noise

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        self._noise.metrics.rejections.labels(reason="malformed_request").inc()
        self._noise.info(self._noise.malformed, "malformed request from {} refused ({})",
                         request.remote, type(exc).__name__)
        resp = web.Response(status=400, text=GENERIC_400_BODY)
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After the answer, aiohttp drains an unread body; a broken one (bad gzip, bad
        # chunking) raises there and lands here as "Unhandled exception" with a traceback at
        # ERROR. It is the client's broken body, not our fault: one rate-limited INFO line.
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError | RequestPayloadError):
            self._noise.info(self._noise.malformed, "malformed request body refused ({})",
                             type(exc).__name__)
            return
        super().log_exception(*args, **kw)


class _HardenedServer(web.Server):
    """Builds _HardenedHandler connections (web.Server hard-codes RequestHandler)."""

    noise: NoiseLog

    def __call__(self) -> RequestHandler:
        return _HardenedHandler(self, self.noise, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same object, same state; only __call__ (the protocol factory) differs.
        server.__class__ = _HardenedServer
        cast(_HardenedServer, server).noise = self.app[NOISE_KEY]
        return server


def ssl_context(cfg: ReceiverConfig) -> ssl.SSLContext | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[receiver] tls_cert/tls_key ({cfg.tls_cert}, {cfg.tls_key}): "
                          f"cannot load: {exc}") from None
    return ctx


@dataclass
class RunningReceiver:
    url: str
    runner: web.AppRunner
    app: web.Application

    async def close(self) -> None:
        await self.runner.cleanup()


def open_tokens(config: Config) -> TokenStore:
    tokens = TokenStore(config.receiver.tokens_file, config.legacy_receiver_token)
    if not tokens.entries:
        raise ConfigError(
            f"{config.receiver.tokens_file}: no tokens; create one with "
            "`mt5backupd receiver token add NAME` (or set BACKUP_API_TOKEN)"
        )
    return tokens


async def start_receiver(
    cfg: ReceiverConfig,
    tokens: TokenStore,
    *,
    metrics: ReceiverMetrics | None = None,
    body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S,
) -> RunningReceiver:
    """Start serving on cfg.listen_host:cfg.listen_port (port 0 picks a free one)."""
    app = make_app(cfg, tokens, metrics, body_idle_timeout_s=body_idle_timeout_s)
    # aiohttp's keep-alive timer also runs from the moment a connection opens and only closes
    # a connection that is waiting for request headers: exactly the header timeout.
    runner = _Runner(app, read_bufsize=READ_BUFSIZE, access_log=None,
                     keepalive_timeout=cfg.header_timeout_s)
    await runner.setup()
    ctx = ssl_context(cfg)
    site = web.TCPSite(runner, cfg.listen_host, cfg.listen_port, ssl_context=ctx,
                       reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"[receiver] listen {cfg.listen_host}:{cfg.listen_port}: {exc.strerror}"
                          ) from None
    port = cfg.listen_port
    for sock in getattr(site._server, "sockets", None) or []:  # port 0: read the one picked
        port = sock.getsockname()[1]
        break
    host = cfg.listen_host
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
    if ":" in shown:
        shown = f"[{shown}]"
    url = f"{'https' if ctx else 'http'}://{shown}:{port}"
    return RunningReceiver(url, runner, app)


async def serve(config: Config) -> None:
    """Run the receiver until SIGTERM/SIGINT."""
    tokens = open_tokens(config)
    running = await start_receiver(config.receiver, tokens)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("receiver {} listening on {} (data_dir {}, {} tokens)", __version__, running.url,
                config.receiver.data_dir, len(tokens.entries))
    systemd = SystemdNotifier()
    systemd.send("READY=1", f"STATUS=listening on {running.url}")
    try:
        await stop.wait()
    finally:
        systemd.send("STOPPING=1")
        logger.info("receiver stopping")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await running.close()
