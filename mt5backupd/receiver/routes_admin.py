"""Service and admin routes: /health and /metrics (public), whoami (any token), and the admin
token's delete and prune. Removal is blocking filesystem work: it runs in a worker thread."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mt5backupd import __version__
from mt5backupd.receiver.bodies import json_body, opt_int
from mt5backupd.receiver.context import (
    CONFIG_KEY,
    METRICS_KEY,
    STARTED_KEY,
    STORAGE_KEY,
    principal,
    require_admin,
    target_client,
)
from mt5backupd.receiver.storage import BadRequest
from mt5backupd.records import BackupRecord
from mt5backupd.retention import Policy

RETENTION_KEYS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")


async def health(request: web.Request) -> web.Response:
    state = await request.app[STORAGE_KEY].health()
    healthy = state.get("state") == "ok"
    return web.json_response({
        "status": "ok" if healthy else "degraded",
        "version": __version__,
        "uptime_s": round(time.monotonic() - request.app[STARTED_KEY], 3),
        "storage_free_bytes": state.get("free_bytes"),
        "storage": state,
    }, status=200 if healthy else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    registry = request.app[METRICS_KEY].registry
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def whoami(request: web.Request) -> web.Response:
    """The authenticated no-op clients use as a preflight: proves the token before any work."""
    caller = principal(request)
    return web.json_response({"client": caller.name, "admin": caller.admin})


async def delete_backup(request: web.Request) -> web.Response:
    admin = require_admin(request)
    client = target_client(request)
    record = await request.app[STORAGE_KEY].delete(client, request.match_info["id"])
    logger.bind(client=client).warning("admin {} deleted backup {}", admin.name, record.id)
    return web.json_response({"deleted": record.to_json()})


async def prune(request: web.Request) -> web.Response:
    admin = require_admin(request)
    body = await json_body(request)
    cfg = request.app[CONFIG_KEY].retention
    given = {k: opt_int(body.get(k), k) for k in RETENTION_KEYS if k in body}
    policy = Policy(**{k: v or 0 for k, v in given.items()}) if given else Policy(
        cfg.keep_last, cfg.keep_daily, cfg.keep_weekly, cfg.keep_monthly)
    try:
        policy.validate()
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    dry_run = bool(body.get("dry_run", False))
    storage = request.app[STORAGE_KEY]
    wanted = body.get("client")

    clients = [wanted] if isinstance(wanted, str) else await storage.clients()
    removed: list[BackupRecord] = []
    locked: list[BackupRecord] = []
    for client in clients:
        pruned = await storage.prune(client, policy, dry_run=dry_run)
        removed += pruned.removed
        locked += pruned.locked
    logger.info("admin {} pruned {} backups (dry_run={}; {} kept under object lock)",
                admin.name, len(removed), dry_run, len(locked))
    return web.json_response({"removed": [r.to_json() for r in removed], "count": len(removed),
                              "dry_run": dry_run, "locked": [r.to_json() for r in locked]})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/health", health)
    router.add_get("/metrics", metrics_endpoint)
    router.add_get("/api/v1/whoami", whoami)
    router.add_delete("/api/backup/{id}", delete_backup)
    router.add_post("/api/admin/prune", prune)
