"""`mt5backupd run` as a real subprocess, for tests where signals and systemd matter."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mt5backupd.testkit.pghost import free_port
from tests.backup_fixtures import BackupSetup


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


@dataclass
class DaemonProcess:
    config_path: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, text: str) -> None:
        """Write the daemon's config, listening on this harness's port."""
        self.config_path.write_text(
            text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{self.port}"'))

    async def start(self, timeout_s: float = 20.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MT5BACKUPD"))}
        env.update(self.env)
        self.log_path = self.config_path.with_suffix(".log")
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mt5backupd", "run", "--config", str(self.config_path),
            stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                await self.get("/status")
                return
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.1)
        await self.stop()  # never leave a daemon behind a failed test
        raise RuntimeError(f"daemon not up: {self.log()[-3000:]}")

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
