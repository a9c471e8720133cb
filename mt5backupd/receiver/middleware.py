"""The one middleware: bearer-token authentication, then every refusal turned into its HTTP
answer (status by the refusal's type hierarchy, a JSON body, a counted rejection)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from loguru import logger

from mt5backupd.receiver.auth import Forbidden
from mt5backupd.receiver.context import (
    METRICS_KEY,
    NOISE_KEY,
    PRINCIPAL_KEY,
    TOKENS_KEY,
    client_name,
)
from mt5backupd.receiver.noise import short
from mt5backupd.receiver.storage import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InsufficientStorage,
    NotFound,
    OffsetMismatch,
    RequestTimeout,
    SizeMismatch,
    StorageError,
    StoreUnavailable,
    TooLarge,
    UploadBusy,
)

PUBLIC_PATHS = frozenset({"/health", "/metrics"})
RETRY_AFTER_S = 5  # what a 503 for an unreachable object store asks the client to wait

# Looked up along the refusal's MRO, so a subclass takes its nearest listed ancestor's status
# (InvalidId is a BadRequest: 400) and a new StorageError without a row of its own is a 400.
STATUS_BY_TYPE: dict[type[Exception], int] = {
    Forbidden: 403,
    BadRequest: 400,
    NotFound: 404,
    RequestTimeout: 408,
    Conflict: 409,
    UploadBusy: 409,
    OffsetMismatch: 409,
    TooLarge: 413,
    ChecksumMismatch: 422,
    SizeMismatch: 422,
    InsufficientStorage: 507,
    StoreUnavailable: 503,
    StorageError: 400,  # a refusal of the request as sent
}
Refusal = StorageError | Forbidden


def http_status(exc: BaseException) -> int:
    """The HTTP status for a refusal: its own type's row, else its nearest ancestor's; 500 for
    anything that is not a refusal at all. Pure."""
    for cls in type(exc).__mro__:
        status = STATUS_BY_TYPE.get(cls)
        if status is not None:
            return status
    return 500


# aiohttp's own refusals (no route, a method the route lacks, a body over client_max_size)
# answer in the same JSON as ours; other 4xx of aiohttp's count as bad requests
AIOHTTP_REASONS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def error_response(status: int, reason: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": reason, "message": message, **extra}, status=status)


def _refused(request: web.Request, exc: Refusal) -> web.Response:
    request.app[METRICS_KEY].rejections.labels(reason=exc.reason).inc()
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if isinstance(exc, OffsetMismatch):
        extra["offset"] = exc.current
        headers["Upload-Offset"] = str(exc.current)
    logger.bind(client=client_name(request)).info(
        "{} {} refused: {} ({})", short(request.method), short(request.path), exc.reason,
        short(exc),
    )
    resp = error_response(http_status(exc), exc.reason, str(exc), **extra)
    resp.headers.update(headers)
    if isinstance(exc, StoreUnavailable):
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    if isinstance(exc, RequestTimeout):
        resp.force_close()  # the rest of the body may never come: do not wait for it
    return resp


@web.middleware
async def errors_and_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    if request.path not in PUBLIC_PATHS:
        principal = request.app[TOKENS_KEY].authenticate(request.headers.get("Authorization"))
        if principal is None:
            metrics.rejections.labels(reason="unauthorized").inc()
            resp = error_response(401, "unauthorized", "missing or invalid bearer token")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="mt5backupd"'
            return resp
        request[PRINCIPAL_KEY] = principal
    try:
        return await handler(request)
    except (StorageError, Forbidden) as exc:
        return _refused(request, exc)
    except web.HTTPException as exc:
        if not 400 <= exc.status < 500:
            raise
        reason = AIOHTTP_REASONS.get(exc.status, "bad_request")
        metrics.rejections.labels(reason=reason).inc()
        logger.bind(client=client_name(request)).info(
            "{} {} refused: {} ({})", short(request.method), short(request.path), reason,
            short(exc.text or exc.reason))
        resp = error_response(exc.status, reason, exc.text or exc.reason)
        for name, value in exc.headers.items():  # Allow of a 405, and whatever else it says
            if name.lower() not in ("content-type", "content-length"):
                resp.headers[name] = value
        return resp
    except RequestPayloadError:
        # The body's framing is broken (bad chunked encoding, a bad compressed stream).
        metrics.rejections.labels(reason="bad_request").inc()
        resp = error_response(400, "bad_request", "the request body is malformed")
        resp.force_close()
        return resp
    except ConnectionError:
        # The client went away (reset, closed mid-body or mid-download): nothing is wrong here,
        # and what an upload received is kept. One line, no traceback; the answer below is
        # never read (aiohttp notices the closed transport and drops it quietly).
        noise = request.app[NOISE_KEY]
        noise.info(noise.gone, "client {} went away during {} {}", request.remote,
                   short(request.method), short(request.path))
        resp = web.Response(status=400)
        resp.force_close()
        return resp
