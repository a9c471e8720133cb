"""What every handler reaches through the request: the app's parts (typed keys) and the
authenticated principal, with the two rules of who may act on what."""

from __future__ import annotations

from aiohttp import web

from mt5backupd.config import ReceiverConfig
from mt5backupd.receiver.auth import Forbidden, Principal, TokenStore
from mt5backupd.receiver.metrics import ReceiverMetrics
from mt5backupd.receiver.noise import NoiseLog
from mt5backupd.receiver.storage.api import StorageBackend

STORAGE_KEY = web.AppKey("storage", StorageBackend)
TOKENS_KEY = web.AppKey("tokens", TokenStore)
METRICS_KEY = web.AppKey("metrics", ReceiverMetrics)
CONFIG_KEY = web.AppKey("config", ReceiverConfig)
STARTED_KEY = web.AppKey("started", float)
BODY_IDLE_KEY = web.AppKey("body_idle_timeout_s", float)
NOISE_KEY = web.AppKey("noise", NoiseLog)
PRINCIPAL_KEY = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    """The authenticated caller (the middleware set it; public paths have none)."""
    return request[PRINCIPAL_KEY]


def client_name(request: web.Request) -> str:
    """The caller's name for a log line, ``-`` before authentication."""
    found = request.get(PRINCIPAL_KEY)
    return found.name if found else "-"


def target_client(request: web.Request) -> str:
    """The namespace a request acts on: the token's own, or ``?client=`` for an admin."""
    caller = principal(request)
    wanted = request.query.get("client")
    if wanted is None or wanted == caller.name:
        return caller.name
    if not caller.admin:
        raise Forbidden("a client token acts only on its own backups")
    return wanted


def require_admin(request: web.Request) -> Principal:
    caller = principal(request)
    if not caller.admin:
        raise Forbidden("this needs an admin token")
    return caller
