"""The receiver's assembly and lifecycle: the app (middleware, routes per protocol, the
partial-upload expiry), the hardened runner, TLS, and ``serve`` until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from loguru import logger

from mt5backupd import __version__
from mt5backupd.config import Config, ReceiverConfig
from mt5backupd.errors import ConfigError
from mt5backupd.receiver import routes_admin, routes_legacy, routes_uploads
from mt5backupd.receiver.auth import TokenStore
from mt5backupd.receiver.bodies import BODY_IDLE_TIMEOUT_S, READ_BUFSIZE
from mt5backupd.receiver.context import (
    BODY_IDLE_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NOISE_KEY,
    STARTED_KEY,
    STORAGE_KEY,
    TOKENS_KEY,
)
from mt5backupd.receiver.metrics import ReceiverMetrics
from mt5backupd.receiver.middleware import errors_and_auth
from mt5backupd.receiver.noise import NoiseLog
from mt5backupd.receiver.protocol import HardenedRunner
from mt5backupd.receiver.storage import Storage, StorageError
from mt5backupd.receiver.storage.api import FilesystemBackend, StorageBackend
from mt5backupd.sdnotify import SystemdNotifier
from mt5backupd.webapp import start_site

MAX_EXPIRY_INTERVAL_S = 600.0


async def _expire_loop(app: web.Application) -> AsyncIterator[None]:
    storage = app[STORAGE_KEY]
    interval_s = min(MAX_EXPIRY_INTERVAL_S, max(1.0, storage.partial_ttl_s / 4))

    async def loop() -> None:
        while True:
            try:
                removed = await storage.expire_partials()
                if removed:
                    logger.info("expired {} idle partial uploads", removed)
            except (OSError, StorageError) as exc:
                logger.warning("partial upload expiry failed: {}", exc)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad round
                logger.error("partial upload expiry failed ({}): {}", exc.__class__.__name__,
                             exc)
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_backend(cfg: ReceiverConfig, metrics: ReceiverMetrics) -> StorageBackend:
    """The configured storage backend, not yet started (``await backend.start()``)."""
    if cfg.storage.backend == "s3":
        from mt5backupd.receiver.s3store import S3Storage  # aiobotocore: imported only here

        return S3Storage(cfg.storage, max_upload_bytes=cfg.max_upload_bytes,
                         partial_ttl_s=cfg.partial_ttl_s, on_bytes=metrics.bytes_received.inc,
                         on_request=metrics.storage_request)
    return FilesystemBackend(Storage(
        cfg.data_dir,
        max_upload_bytes=cfg.max_upload_bytes,
        min_free_bytes=cfg.min_free_bytes,
        partial_ttl_s=cfg.partial_ttl_s,
        on_bytes=metrics.bytes_received.inc,
    ))


async def _close_storage(app: web.Application) -> None:
    await app[STORAGE_KEY].close()


def make_app(cfg: ReceiverConfig, tokens: TokenStore,
             metrics: ReceiverMetrics | None = None, *,
             body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S) -> web.Application:
    metrics = metrics or ReceiverMetrics()
    storage = make_backend(cfg, metrics)
    metrics.watch_storage(storage.usage, storage.partial_count)
    app = web.Application(middlewares=[errors_and_auth])
    app[STORAGE_KEY] = storage
    app[TOKENS_KEY] = tokens
    app[METRICS_KEY] = metrics
    app[CONFIG_KEY] = cfg
    app[STARTED_KEY] = time.monotonic()
    app[BODY_IDLE_KEY] = body_idle_timeout_s
    app[NOISE_KEY] = NoiseLog(metrics)
    app.cleanup_ctx.append(_expire_loop)
    app.on_cleanup.append(_close_storage)
    routes_admin.add_routes(app.router)
    routes_uploads.add_routes(app.router)
    routes_legacy.add_routes(app.router)
    return app


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
    ctx = ssl_context(cfg)  # before the runner: a bad key leaves nothing to clean up
    # the store's preflight (an S3 bucket reachable and writable): a ConfigError, exit 4
    await app[STORAGE_KEY].start()
    # aiohttp's keep-alive timer also runs from the moment a connection opens and only closes
    # a connection that is waiting for request headers: exactly the header timeout.
    runner = HardenedRunner(app, read_bufsize=READ_BUFSIZE, access_log=None,
                            keepalive_timeout=cfg.header_timeout_s)
    await runner.setup()
    bound = await start_site(runner, cfg.listen_host, cfg.listen_port,
                             config_section="receiver", ssl_context=ctx,
                             reuse_address=True)
    return RunningReceiver(bound.url, runner, app)


async def serve(config: Config) -> None:
    """Run the receiver until SIGTERM/SIGINT."""
    tokens = open_tokens(config)
    running = await start_receiver(config.receiver, tokens)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = config.receiver.storage
    where = (f"s3 bucket {store.bucket} at {store.endpoint_url or 'AWS'}"
             if store.backend == "s3" else f"data_dir {config.receiver.data_dir}")
    logger.info("receiver {} listening on {} ({}, {} tokens)", __version__, running.url,
                where, len(tokens.entries))
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
