"""pg_receivewal as a supervised child: slot created if missing, restarted with backoff when it
dies, stopped cleanly (SIGTERM, then SIGKILL) on shutdown, its stderr in our log.

It runs with the clean child environment and the password in a private passfile
(``backup.childenv.pg_child_env``), and dies with the daemon (PR_SET_PDEATHSIG): a daemon killed
with -9 must not leave a receiver holding the slot, or its successor could not stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from pathlib import Path

from loguru import logger

from mt5backupd.backoff import backoff_delays
from mt5backupd.backup.childenv import pg_child_env
from mt5backupd.config import Config, Secret

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0
STABLE_RUN_S = 60.0  # a run this long resets the restart delay
FIRST_DELAY_S = 1.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _segment_sized(size: int) -> bool:
    # wal_segment_size is a power of two from 1 MiB to 1 GiB
    return size == 0 or (size >= 1024 * 1024 and size & (size - 1) == 0)


def repair_partials(directory: Path) -> list[str]:
    """Make the directory one pg_receivewal starts in again after a kill -9. It preallocates a
    new ``.partial`` with zeros before writing WAL into it, and refuses to start next to one
    cut short ("has N bytes, should be 0 or 16777216"): such a file holds zeros only and is
    removed; one with data (never seen, but never thrown away) is moved aside as ``.broken``."""
    repaired = []
    for path in sorted(directory.glob("*.partial")):
        size = path.stat().st_size
        if _segment_sized(size):
            continue
        with path.open("rb") as fh:
            blocks = iter(lambda: fh.read(1 << 20), b"")
            only_zeros = not any(block.strip(b"\0") for block in blocks)
        if only_zeros:
            path.unlink()
            logger.warning("removed {} ({} bytes of zeros: pg_receivewal was killed while "
                           "preallocating it)", path.name, size)
        else:
            path.rename(path.with_name(path.name + ".broken"))
            logger.error("moved {} aside as .broken: {} bytes, not a segment's size, with data",
                         path.name, size)
        repaired.append(path.name)
    return repaired


def receivewal_argv(cfg: Config, directory: Path, *, create_slot: bool) -> list[str]:
    wal = cfg.wal
    argv = [wal.pg_receivewal, f"--directory={directory}", f"--slot={wal.slot}",
            "--no-password"]
    if create_slot:
        return [*argv, "--create-slot", "--if-not-exists"]
    # --no-loop: a lost connection ends the child, and we restart it with our own backoff
    argv += ["--no-loop", "--verbose", "--status-interval=1"]
    if wal.synchronous:
        argv.append("--synchronous")
    return argv


class ReceiveWal:
    """The supervisor; ``running`` says whether a pg_receivewal is up right now."""

    def __init__(self, cfg: Config, password: Secret | None, directory: Path) -> None:
        self.cfg = cfg
        self.password = password
        self.directory = directory
        self.running = False
        self.restarts = 0
        self.last_error = ""
        self._proc: asyncio.subprocess.Process | None = None

    async def _spawn(self, argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env, preexec_fn=_die_with_parent)

    async def _log_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                line = line.removeprefix("pg_receivewal: ")
                self.last_error = line
                logger.info("pg_receivewal: {}", line)

    async def _run_once(self, env: dict[str, str]) -> int:
        await asyncio.to_thread(repair_partials, self.directory)
        # kept in _proc too, so stop() (a cancel, SIGTERM) ends it as well
        create = self._proc = await self._spawn(
            receivewal_argv(self.cfg, self.directory, create_slot=True), env)
        await self._log_stderr(create)
        if await create.wait() != 0:
            return create.returncode or 1
        self._proc = await self._spawn(
            receivewal_argv(self.cfg, self.directory, create_slot=False), env)
        self.running = True
        logger.info("pg_receivewal started (pid {}, slot {}) into {}", self._proc.pid,
                    self.cfg.wal.slot, self.directory)
        try:
            await self._log_stderr(self._proc)
            return await self._proc.wait()
        finally:
            self.running = False

    async def run(self) -> None:
        """Until cancelled: run pg_receivewal, restart it after 1 s, 2 s, 4 s ... (capped by
        ``restart_max_delay_s``; reset after a stable run)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        attempt = 0
        try:
            while True:
                started = time.monotonic()
                try:
                    with pg_child_env(self.cfg.database, self.password) as env:
                        code = await self._run_once(env)
                except FileNotFoundError:
                    code, self.last_error = 127, f"{self.cfg.wal.pg_receivewal!r} not found"
                except Exception as exc:  # noqa: BLE001 - a supervisor that dies stops WAL for good
                    code, self.last_error = 1, f"{exc.__class__.__name__}: {exc}"
                if time.monotonic() - started > STABLE_RUN_S:
                    attempt = 0
                delay = backoff_delays(attempt + 1, FIRST_DELAY_S,
                                       cap_s=self.cfg.wal.restart_max_delay_s)[-1]
                attempt += 1
                self.restarts += 1
                logger.warning("pg_receivewal exited with status {} ({}); restarting in "
                               "{:.1f} s", code, self.last_error or "no message", delay)
                await asyncio.sleep(delay)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """SIGTERM (pg_receivewal flushes and exits), SIGKILL after a grace period."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
        logger.info("pg_receivewal stopped")
