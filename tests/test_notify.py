"""Run notifications: webhooks and pings."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from aiohttp import web

from mt5backupd.config import NotifyConfig
from mt5backupd.daemon.jobs import DAEMON_JOBS
from mt5backupd.daemon.service import Daemon
from tests.backup_fixtures import BackupSetup


async def test_failure_notifications_reach_webhook_and_ping(backup_setup: BackupSetup) -> None:
    """A failed run posts a JSON event to the webhook and pings start then fail; a dead
    notification URL is logged, never fatal."""
    received: list[tuple[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json() if request.body_exists and request.can_read_body else None
        received.append((request.path, body))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    try:
        cfg = dataclasses.replace(
            backup_setup.with_(database={"dbname": "no_such_database"}),
            notify=NotifyConfig(webhook_urls=(f"{base}/hook", "http://127.0.0.1:1/dead"),
                                ping_url=f"{base}/ping/abc123"))
        daemon = Daemon(cfg, None, None, dict(DAEMON_JOBS))
        await daemon._run_job("database")
        paths = [p for p, _ in received]
        assert paths[0] == "/ping/abc123/start"
        assert "/ping/abc123/fail" in paths
        event = next(body for p, body in received if p == "/hook")
        assert event["ok"] is False
        assert event["job"] == "database"
        assert "no_such_database" in event["error"]
        received.clear()
        ok_cfg = dataclasses.replace(backup_setup.cfg, notify=NotifyConfig(
            webhook_urls=(f"{base}/hook",), ping_url=f"{base}/ping/abc123", on_success=True))
        daemon.cfg = ok_cfg
        await daemon._run_job("database")
        paths = [p for p, _ in received]
        assert paths == ["/ping/abc123/start", "/ping/abc123", "/hook"] or sorted(paths) == sorted(
            ["/ping/abc123/start", "/ping/abc123", "/hook"])
        assert next(body for p, body in received if p == "/hook")["ok"] is True
    finally:
        await runner.cleanup()
    await asyncio.sleep(0)  # one turn of the loop so closed client connections are finalised
