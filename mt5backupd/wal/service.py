"""The daemon's WAL side: pg_receivewal supervised, the shipper every ``max_lag_s`` / 2, and a
status file (``<local dir>/wal/status.json``) that /metrics reads at scrape time.

Receiving and shipping are separate tasks on purpose: a slow or absent receiver delays only the
shipper, never pg_receivewal, which keeps writing the local directory (and the slot keeps the
server's WAL for whatever is not received yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger

from mt5backupd.backup.database import connect_db
from mt5backupd.backup.remote import receiver_client
from mt5backupd.config import Config
from mt5backupd.config.secretfiles import database_password
from mt5backupd.fsutil import atomic_write_json
from mt5backupd.wal.receivewal import ReceiveWal
from mt5backupd.wal.shipper import WalShipper, received_dir, status_fields

SLOT_QUERY_INTERVAL_S = 15.0
SLOT_QUERY_TIMEOUT_S = 5.0  # a server that does not answer must not hold the status back


def status_path(cfg: Config) -> Path:
    return cfg.local.dir / "wal" / "status.json"


def _received_span(directory: Path) -> tuple[float, float]:
    """(oldest, newest) mtime of the WAL files pg_receivewal left in its directory (what is
    not shipped and tidied yet); the newest is when it last wrote WAL; (0, 0): none."""
    times = []
    with contextlib.suppress(FileNotFoundError):
        for path in directory.iterdir():
            with contextlib.suppress(FileNotFoundError):  # shipped and tidied meanwhile
                if path.is_file():
                    times.append(path.stat().st_mtime)
    return (min(times), max(times)) if times else (0.0, 0.0)


async def slot_retained_bytes(cfg: Config) -> int | None:
    """WAL the server keeps for our slot (current LSN - the slot's restart_lsn)."""
    conn = await connect_db(cfg.database, database_password(cfg.database), cfg.database.dbname)
    try:
        value = await conn.fetchval(
            "SELECT pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots "
            "WHERE slot_name = $1", cfg.wal.slot)
    finally:
        await conn.close()
    return None if value is None else int(value)


class WalService:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.receivewal = ReceiveWal(cfg, database_password(cfg.database), received_dir(cfg))
        self.shipper = WalShipper(cfg, receiver_client(cfg))
        self._tasks: list[asyncio.Task[None]] = []
        self._slot_bytes: int | None = None
        self._slot_checked = 0.0
        self._down_since: str | None = None  # when pg_receivewal was last seen stopping
        self._fields: dict[str, Any] = {}  # what the last good shipping round found
        self._round_error = ""  # why the last round failed ("" when it did not)
        self._failing_since: str | None = None  # first of the rounds failing in a row
        self._written_at = 0.0  # time.monotonic() of the last status write

    def start(self) -> None:
        logger.info("WAL streaming on: slot {}, shipping at least every {:g} s",
                    self.cfg.wal.slot, self.cfg.wal.max_lag_s)
        self._tasks = [asyncio.create_task(self.receivewal.run()),
                       asyncio.create_task(self._ship_loop()),
                       asyncio.create_task(self._status_loop())]

    async def _ship_loop(self) -> None:
        interval_s = self.cfg.wal.max_lag_s / 2
        while True:
            t0 = time.monotonic()
            try:
                self._fields = status_fields(await self.shipper.ship_round())
                self._round_error, self._failing_since = "", None
            except Exception as exc:  # noqa: BLE001 - a failed round must not end shipping
                logger.opt(exception=exc).error("WAL shipping round failed: {}", exc)
                self._round_error = f"{exc.__class__.__name__}: {exc}"
                if self._failing_since is None:
                    self._failing_since = datetime.now(UTC).isoformat()
            await self._write_status()  # what this round did, at once
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - t0)))

    async def _status_loop(self) -> None:
        """A status at least every max_lag_s / 2 (rounds write one when they end), whatever a
        shipping round is waiting on (a slow or unreachable receiver can hold one for minutes):
        an old status means this service, not the network, is stuck."""
        interval_s = self.cfg.wal.max_lag_s / 2
        while True:
            due_s = self._written_at + interval_s - time.monotonic()
            if due_s > 0:
                await asyncio.sleep(due_s)
            else:
                await self._write_status()

    async def _write_status(self) -> None:
        self._written_at = time.monotonic()
        if time.monotonic() - self._slot_checked > SLOT_QUERY_INTERVAL_S:
            self._slot_checked = time.monotonic()
            try:
                async with asyncio.timeout(SLOT_QUERY_TIMEOUT_S):
                    self._slot_bytes = await slot_retained_bytes(self.cfg)
            except Exception as exc:  # noqa: BLE001 - server down: the metric goes stale
                logger.debug("slot query failed: {}", exc)
        oldest, newest = await asyncio.to_thread(_received_span, received_dir(self.cfg))
        now = datetime.now(UTC).isoformat()
        if self.receivewal.running:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = now
        status = {"updated": now,
                  "receiver_up": self.receivewal.running,
                  "receiver_down_since": self._down_since,
                  "remote_error": self.shipper.last_error,
                  "receiver_restarts": self.receivewal.restarts,
                  "last_received": newest,
                  "oldest_received": oldest,
                  "round_error": self._round_error,
                  "round_failing_since": self._failing_since,
                  "slot_retained_bytes": self._slot_bytes,
                  "max_lag_s": self.cfg.wal.max_lag_s,
                  "remote_ok": self.shipper.receiver_ok, **self._fields}
        with contextlib.suppress(OSError):
            await asyncio.to_thread(atomic_write_json, status_path(self.cfg), status, mode=0o640)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.shipper.client is not None:
            await self.shipper.client.close()
