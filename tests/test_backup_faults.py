"""Backup runs under faults: receiver killed mid-upload, slow link, local disk full."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mt5backupd.backup import spool
from mt5backupd.backup.run import run_backup
from mt5backupd.config import Config, LocalConfig, RemoteConfig, parse_compression
from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.receiverproc import ReceiverProcess
from mt5backupd.testkit.sampledata import generate
from tests.backup_fixtures import BackupSetup, database_config, write_token
from tests.diskfaults import small_tmpfs
from tests.netfaults import ThrottledProxy
from tests.receiver_harness import TokenSet
from tests.waits import wait_until


@pytest.fixture
async def bigger_db(pg_cluster: PgCluster) -> AsyncIterator[str]:
    """A fresh database of ~40 MB of MT5 data (a dump long enough to interfere with)."""
    name = f"mt5big_{secrets.token_hex(4)}"
    pg_cluster.create_database(name)
    try:
        await generate(pg_cluster.dsn(name), target_bytes=40 * 1024 * 1024)
        yield name
    finally:
        pg_cluster.drop_database(name)


async def test_receiver_killed_mid_upload_resumes(
    pg_cluster: PgCluster, bigger_db: str,
    receiver_process: tuple[ReceiverProcess, TokenSet], tmp_path: Path,
) -> None:
    """kill -9 of the receiver during the upload, restarted a moment later: the run retries,
    resumes from the receiver's offset (not from zero) and commits the same sha256."""
    proc, tokens = receiver_process
    proc.start()
    proxy = await ThrottledProxy("127.0.0.1", proc.port, 4 * 1024 * 1024).start()
    cfg = Config(
        database=dataclasses.replace(database_config(pg_cluster, bigger_db),
                                     compression=parse_compression("none")),
        local=LocalConfig(dir=tmp_path / "backups"),
        remote=RemoteConfig(url=proxy.url, token_file=write_token(tmp_path / "t", tokens.alice),
                            retry_delay_s=0.3, max_retries=8, timeout_s=5.0),
    )
    partial_root = proc.data_dir / "partial"

    def partial_files() -> list[Path]:
        return list(partial_root.rglob("*.data")) if partial_root.exists() else []

    def uploaded_4_mib() -> bool:
        files = partial_files()
        return bool(files) and files[0].stat().st_size > 4 * 1024 * 1024

    async def kill_and_restart() -> int:
        await wait_until(uploaded_4_mib, 120, "4 MiB uploaded", poll_s=0.01)
        files = partial_files()
        proc.kill9()
        # the receiver stays down a while (the outage under test): the client's upload fails
        # and has to retry, then resume from what landed on disk
        await asyncio.sleep(0.5)
        offset_on_disk = files[0].stat().st_size
        await asyncio.to_thread(proc.start)
        return offset_on_disk

    killer = asyncio.create_task(kill_and_restart())
    try:
        result = await run_backup(cfg)
        offset_at_kill = await killer
    finally:
        await proxy.close()
    assert result.ok, result.error
    assert result.upload_state == "uploaded"
    assert result.upload_retries >= 1
    # resumed from what had landed on the receiver's disk, not restarted from zero
    assert offset_at_kill > 0
    assert any(offset > 0 for offset in result.resumed_at), result.resumed_at
    async with aiohttp.ClientSession() as http, http.get(
        f"{proc.url}/api/backup/list", headers={"Authorization": f"Bearer {tokens.alice}"}
    ) as resp:
        listed = {b["id"]: b for b in (await resp.json())["backups"]}
    assert result.file is not None
    assert listed[result.file.name]["sha256"] == result.sha256


async def test_slow_receiver_does_not_lengthen_pg_dump(
    pg_cluster: PgCluster, bigger_db: str, backup_setup: BackupSetup
) -> None:
    """With the link to the receiver throttled to 2 MB/s, pg_dump takes as long as with a fast
    link (within 10%): it never waits on the network."""
    host, port = backup_setup.receiver.url.removeprefix("http://").split(":")
    proxy = await ThrottledProxy(host, int(port), 2 * 1024 * 1024).start()
    base = backup_setup.with_(database={"dbname": bigger_db})
    slow = dataclasses.replace(base, remote=dataclasses.replace(base.remote, url=proxy.url))
    fast_s, slow_s = [], []
    try:
        for _ in range(2):
            fast = await run_backup(base)
            throttled = await run_backup(slow)
            assert fast.ok and throttled.ok
            assert throttled.upload_state == "uploaded"
            fast_s.append(fast.dump_duration_s)
            slow_s.append(throttled.dump_duration_s)
            # the throttled upload really was slower than the dump
            assert throttled.duration_s > throttled.dump_duration_s + 1.0
    finally:
        await proxy.close()
    assert min(slow_s) <= min(fast_s) * 1.10 + 0.05, (fast_s, slow_s)


async def test_local_disk_full_fails_cleanly(pg_cluster: PgCluster, backup_setup: BackupSetup,
                                             bigger_db: str, tmp_path: Path) -> None:
    """A dump that fills a small tmpfs fails with a clear reason; the older backup stays
    intact and verifiable, nothing partial remains, nothing is committed remotely."""
    with small_tmpfs(tmp_path / "small", 1024 * 1024) as small:
        cfg = backup_setup.with_(local={"dir": small})
        first = await run_backup(cfg)
        assert first.ok, first.error
        big = dataclasses.replace(cfg, database=dataclasses.replace(cfg.database,
                                                                    dbname=bigger_db))
        result = await run_backup(big)
        assert not result.ok
        assert "disk full" in result.error
        assert [m.id for m in spool.load_manifests(small)] == [first.id]
        assert first.file is not None
        check = subprocess.run(["sha256sum", "-c", first.file.name + ".sha256"], cwd=small,
                               capture_output=True, text=True)
        assert check.returncode == 0
        assert not any((small / spool.PARTIAL_DIR).iterdir())
    async with aiohttp.ClientSession() as http, http.get(
        f"{backup_setup.receiver.url}/api/backup/list",
        headers=backup_setup.receiver.auth(backup_setup.receiver.tokens.alice),
    ) as resp:
        names = [b["id"] for b in (await resp.json())["backups"]]
    assert names == [first.file.name]
