"""Notifications: JSON events to webhooks, healthchecks.io-style pings. Never fatal."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
from loguru import logger

from mt5backupd import __version__
from mt5backupd.config import NotifyConfig


class WebhookNotifier:
    """Run events to the [notify] webhooks and ping URL; failures are logged, never raised."""

    def __init__(self, cfg: NotifyConfig) -> None:
        self.cfg = cfg

    async def _post(self, url: str, payload: dict[str, Any] | None) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http, http.post(
                url, json=payload, headers={"User-Agent": f"mt5backupd/{__version__}"}
            ) as resp:
                if resp.status >= 300:
                    logger.warning("notification to {} answered HTTP {}", _safe(url), resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            logger.warning("notification to {} failed: {}", _safe(url),
                           exc.__class__.__name__)

    async def ping(self, stage: str) -> None:
        """stage: start | success | fail."""
        if not self.cfg.ping_url:
            return
        url = self.cfg.ping_url + ("" if stage == "success" else f"/{stage}")
        await self._post(url, None)

    async def event(self, payload: dict[str, Any]) -> None:
        """A run's outcome; webhooks get failures always and successes if on_success."""
        if payload.get("ok") and not self.cfg.on_success:
            return
        body = {"source": "mt5backupd", "host": socket.gethostname(), **payload}
        await asyncio.gather(*(self._post(url, body) for url in self.cfg.webhook_urls))


def _safe(url: str) -> str:
    """URLs of ping services embed their secret in the path: log scheme and host only."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/..."
