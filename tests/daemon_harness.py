"""`mt5backupd run` as a real subprocess, for tests where signals and systemd matter."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.backup_fixtures import BackupSetup
from tests.waits import wait_until

# A systemd notify socket or watchdog of whatever runs the tests must not reach the daemon.
_DROPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def daemon_toml(setup: BackupSetup, *, database: str, extra: str = "",
                dbname: str | None = None, pg_dump: str | None = None, port: int = 0,
                local_dir: Path | None = None, max_age_s: float = 3600.0,
                grace_s: float = 5.0, compression: str = "zstd:1") -> str:
    db = setup.cfg.database
    return (
        f'[database]\nhost = "{db.host}"\nport = {db.port}\nuser = "{db.user}"\n'
        f'dbname = "{dbname or db.dbname}"\npg_dump = "{pg_dump or db.pg_dump}"\n'
        f'pg_restore = "{db.pg_restore}"\ncompression = "{compression}"\n'
        f'[local]\ndir = "{local_dir or setup.cfg.local.dir}"\n'
        f'[remote]\nurl = "{setup.receiver.url}"\ntoken_file = "{setup.token_file}"\n'
        "retry_delay_s = 0.2\n"
        f'[schedule]\ntimezone = "UTC"\ndatabase = "{database}"\nupload_pending = ""\n'
        'verify = ""\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        f"[health]\nmax_age_s = {max_age_s}\n"
        f"[daemon]\nshutdown_grace_s = {grace_s}\n" + extra
    )


_URL_RE = re.compile(r"metrics on (https?://\S+?)/metrics")


@dataclass
class DaemonProcess:
    """One ``mt5backupd run`` process. Its config listens on port 0; the daemon reports the port
    it bound the way it reports to systemd (``READY=1`` with ``STATUS=... metrics on URL``), to
    a private notify socket this harness reads. Every notification is kept in ``notifications``
    (tests of the systemd protocol wait on them)."""

    config_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    url: str = ""
    notifications: list[str] = field(default_factory=list)
    _notify: socket.socket | None = None
    _reader: asyncio.Task[None] | None = None

    def write_config(self, text: str) -> None:
        self.config_path.write_text(text)

    def bound_config(self, path: Path) -> Path:
        """A copy of the config at ``path`` naming the port the daemon bound, as an operator's
        config would (for other commands that reach the daemon, like ``mt5backupd check``)."""
        listen = self.url.removeprefix("http://")
        path.write_text(self.config_path.read_text().replace(
            'listen = "127.0.0.1:0"', f'listen = "{listen}"'))
        return path

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start the daemon; return once it reported READY=1 (with its URL) and /status answers."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PG", "MT5BACKUPD")) and k not in _DROPPED_ENV}
        env.update(self.env)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"mt5backupd-test-daemon-{secrets.token_hex(8)}"
        self._notify.bind(b"\0" + name.encode())
        self._notify.setblocking(False)
        env["NOTIFY_SOCKET"] = "@" + name
        self.notifications = []
        self.url = ""
        self._reader = asyncio.create_task(self._read_notifications(self._notify))
        self.log_path = self.config_path.with_suffix(".log")
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mt5backupd", "run", "--config", str(self.config_path),
                stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            await wait_until(self._ready, timeout_s, "the daemon's READY=1 with its URL")
            await wait_until(self._answers, timeout_s, "the daemon's /status")
        except BaseException:
            await self.stop()  # never leave a daemon behind a failed test
            raise

    async def _read_notifications(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.notifications.append((await loop.sock_recv(sock, 4096)).decode())

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()[-3000:]}")
        for message in self.notifications:
            lines = message.split("\n")
            match = _URL_RE.search(message) if "READY=1" in lines else None
            if match:
                self.url = match.group(1)
                return True
        return False

    async def _answers(self) -> bool:
        try:
            await self.get("/status")
            return True
        except (aiohttp.ClientError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(
            f"{self.url}{path}", timeout=aiohttp.ClientTimeout(total=5)
        ) as resp:
            return resp.status, await resp.text()

    async def status(self) -> dict[str, Any]:
        _code, text = await self.get("/status")
        result: dict[str, Any] = json.loads(text)
        return result

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _code, text = await self.get("/metrics")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._close_notify()

    async def _close_notify(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._notify is not None:
            self._notify.close()
            self._notify = None
