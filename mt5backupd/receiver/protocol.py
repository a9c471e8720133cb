"""aiohttp's connection protocol, hardened for requests its parser refuses: no traceback at
ERROR, no echo of the offending header (a token may be in it), one rate-limited INFO line."""

from __future__ import annotations

from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from mt5backupd.receiver.context import NOISE_KEY
from mt5backupd.receiver.noise import NoiseLog

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


class HardenedRunner(web.AppRunner):
    """An AppRunner whose connections use the hardened protocol (the app's NoiseLog)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same object, same state; only __call__ (the protocol factory) differs.
        server.__class__ = _HardenedServer
        cast(_HardenedServer, server).noise = self.app[NOISE_KEY]
        return server
