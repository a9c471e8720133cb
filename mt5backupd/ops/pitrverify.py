"""`mt5backupd verify --pitr`: restore the newest base backup and all shipped WAL (local copies)
into a scratch data directory, start a scratch PostgreSQL on it (its own socket directory, no
TCP, a free port), check that recovery reaches the newest shipped WAL, promotes and answers
queries, then stop it and remove everything. The result goes into the base backup's manifest
(``extra.verify``) and the run records, like `verify`.

The scratch server runs as the invoking user; as root it runs as ``postgres`` (PostgreSQL
refuses root), in a directory under the system temp dir that account can reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from loguru import logger

from mt5backupd.backup import spool
from mt5backupd.config import Config
from mt5backupd.errors import Mt5BackupError
from mt5backupd.ops.pitr import restore_pitr
from mt5backupd.ops.verify import VerifyOutcome
from mt5backupd.walnames import segment_number

SERVER_ACCOUNT = "postgres"
PROMOTE_TIMEOUT_S = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server(argv: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_ACCOUNT, "--", *argv] if os.geteuid() == 0 else argv


def _hand_over(root: Path) -> None:
    """As root: the scratch tree to the server account (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(SERVER_ACCOUNT)
    for path in (root, *root.rglob("*")):
        os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _pg_ctl(cfg: Config) -> str:
    """pg_ctl beside the configured pg_basebackup (the same installation and major)."""
    found = shutil.which(cfg.wal.pg_basebackup)
    if found is None:
        raise Mt5BackupError(f"[wal] pg_basebackup {cfg.wal.pg_basebackup!r} not found")
    return str(Path(found).resolve().parent / "pg_ctl")


def _scratch_settings(port: int, sock: Path) -> str:
    return ("\n# mt5backupd verify --pitr: a private scratch server\n"
            f"port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{sock}'\n"
            "archive_mode = off\nhot_standby = on\nlogging_collector = off\n")


async def verify_pitr(cfg: Config, identity_files: Sequence[Path] = ()) -> VerifyOutcome:
    t0 = time.monotonic()
    parent = Path(tempfile.gettempdir()) if os.geteuid() == 0 else cfg.local.dir
    parent.mkdir(parents=True, exist_ok=True)
    pg_ctl = _pg_ctl(cfg)  # before the scratch dir: a missing pg_ctl leaves nothing behind
    scratch = Path(tempfile.mkdtemp(prefix="mt5backupd-pitr-verify-", dir=parent))
    data, sock, log = scratch / "data", scratch / "sock", scratch / "server.log"
    outcome = VerifyOutcome(id="", passed=False, checked_at=datetime.now(UTC).isoformat())
    started = False
    try:
        restored = await restore_pitr(cfg, "latest", data, to_time=None, source="local",
                                      identity_files=identity_files)
        outcome.id = restored.base
        sock.mkdir(mode=0o700)
        port = _free_port()
        with (data / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
            conf.write(_scratch_settings(port, sock))
        # the socket directory is private (0700): trust on it lets only us in
        (data / "pg_hba.conf").write_text("local all all trust\n", encoding="utf-8")
        _hand_over(scratch)
        started = True  # from here a stop is due, even if this task is cancelled mid-start
        res = await asyncio.to_thread(subprocess.run, _as_server(
            [pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "120", "start"]),
            capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise Mt5BackupError(f"scratch PostgreSQL did not start: {_log_tail(log)}")
        outcome.tables, replay = await _until_promoted(cfg, sock, port)
        outcome.restore_s = time.monotonic() - t0
        _timeline, last = segment_number(restored.last_segment, restored.segment_bytes)
        reached = replay // restored.segment_bytes
        if reached < last:
            outcome.reasons.append(f"recovery stopped in segment {reached:X}, before the "
                                   f"newest shipped WAL ({restored.last_segment})")
        outcome.passed = not outcome.reasons
    except Mt5BackupError as exc:
        outcome.reasons.append(str(exc))
    finally:
        if started:
            await asyncio.to_thread(subprocess.run, _as_server(
                [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    outcome.restore_s = outcome.restore_s or time.monotonic() - t0
    _record(cfg, outcome)
    logger.info("verify --pitr {}: {}", outcome.id, outcome.result)
    return outcome


async def _until_promoted(cfg: Config, sock: Path, port: int) -> tuple[int, int]:
    """Wait for the end of recovery and the promotion; (user tables, last replayed LSN)."""
    deadline = time.monotonic() + PROMOTE_TIMEOUT_S
    user = cfg.database.user or SERVER_ACCOUNT
    while True:
        try:
            conn: Any = await asyncpg.connect(host=str(sock), port=port, user=user,
                                              database=cfg.database.dbname, timeout=10)
            try:
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    replay = await conn.fetchval(
                        "SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn")
                    tables = await conn.fetchval(
                        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON "
                        "n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN "
                        "('pg_catalog', 'information_schema')")
                    return int(tables), int(replay or 0)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise Mt5BackupError(f"scratch PostgreSQL never answered: {exc}") from None
        if time.monotonic() > deadline:
            raise Mt5BackupError("recovery did not end (no promotion) within "
                                 f"{PROMOTE_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.2)


def _log_tail(log: Path) -> str:
    """The server's FATAL line (why it stopped), else its last line."""
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").strip().splitlines()
        fatal = [line for line in lines if "FATAL" in line or "PANIC" in line]
        return (fatal or lines or ["empty server log"])[-1]
    return "no server log"


def _record(cfg: Config, outcome: VerifyOutcome) -> None:
    """Into the base backup's manifest, like `verify` does for a dump."""
    for manifest in spool.load_manifests(cfg.local.dir, "base"):
        if manifest.id == outcome.id:
            manifest.extra["verify"] = {**outcome.to_json(), "pitr": True}
            spool.save_manifest(cfg.local.dir, manifest)
