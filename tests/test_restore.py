"""`mt5backupd restore` and `list`: real backups, real receiver, real pg_restore."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mt5backupd.backup.run import run_backup
from mt5backupd.config import parse_compression
from mt5backupd.errors import EXIT_USAGE, EXIT_VERIFY, ChecksumMismatchError
from mt5backupd.ops.listing import local_entries, remote_entries
from mt5backupd.ops.restore import RestoreRefused, restore
from mt5backupd.testkit.dbcontent import table_checksums, table_row_counts
from tests.backup_fixtures import BackupSetup, config_toml


async def same_contents(setup: BackupSetup, copy: str) -> None:
    pg = setup.pg
    assert await table_row_counts(pg.dsn(copy)) == await table_row_counts(pg.dsn(setup.dbname))
    assert await table_checksums(pg.dsn(copy)) == await table_checksums(pg.dsn(setup.dbname))


async def test_restore_latest_from_remote_round_trip(backup_setup: BackupSetup) -> None:
    """backup, then `restore latest --from remote --target-db copy --create`: equal contents."""
    result = await run_backup(backup_setup.cfg)
    assert result.ok
    restored = await restore(backup_setup.cfg, "latest", "copy_remote", source="remote",
                             create=True)
    assert restored.created
    assert restored.sha256 == result.sha256
    await same_contents(backup_setup, "copy_remote")
    # restoring again over the existing copy cleans and replaces it
    again = await restore(backup_setup.cfg, result.id, "copy_remote", source="remote")
    assert not again.created
    await same_contents(backup_setup, "copy_remote")
    backup_setup.pg.drop_database("copy_remote")
    assert not any((backup_setup.cfg.local.dir / ".restore").iterdir())


@pytest.mark.parametrize("compression", ["zstd:1", "gzip:6"])
async def test_local_parallel_restore(backup_setup: BackupSetup, compression: str) -> None:
    """A local backup restores with --jobs 2 (a zstd archive is decompressed for it first)."""
    cfg = backup_setup.with_(database={"compression": parse_compression(compression)})
    result = await run_backup(cfg)
    assert result.ok
    copy = f"copy_j2_{compression.replace(':', '')}"
    restored = await restore(cfg, "latest", copy, create=True, jobs=2)
    assert restored.id == result.id
    await same_contents(backup_setup, copy)
    backup_setup.pg.drop_database(copy)
    assert not list((cfg.local.dir / ".restore").glob("*")) if (
        cfg.local.dir / ".restore").exists() else True


async def test_flipped_byte_on_receiver_refused_before_pg_restore(
        backup_setup: BackupSetup) -> None:
    """A byte flipped in the receiver's stored file: the restore names expected and actual
    sha256 and stops before pg_restore (the target database is never even created)."""
    result = await run_backup(backup_setup.cfg)
    assert result.file is not None
    stored = next((backup_setup.receiver.cfg.data_dir / "backups").rglob(
        f"{result.file.name}/data"))
    os.chmod(stored, 0o640)
    blob = bytearray(stored.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    stored.write_bytes(bytes(blob))
    with pytest.raises(ChecksumMismatchError) as err:
        await restore(backup_setup.cfg, "latest", "never_created", source="remote", create=True)
    assert result.sha256 in str(err.value)
    assert err.value.exit_code == EXIT_VERIFY
    exists = backup_setup.pg.psql("SELECT count(*) FROM pg_database WHERE datname = "
                                  "'never_created'").strip()
    assert exists == "0"


async def test_restore_into_source_refused_without_force(backup_setup: BackupSetup) -> None:
    """The configured source database is never overwritten without --force."""
    assert (await run_backup(backup_setup.cfg)).ok
    with pytest.raises(RestoreRefused, match="needs --force") as err:
        await restore(backup_setup.cfg, "latest", backup_setup.dbname)
    assert err.value.exit_code == EXIT_USAGE
    with pytest.raises(RestoreRefused, match="add --create"):
        await restore(backup_setup.cfg, "latest", "absent_db")


async def test_list_local_remote_and_cli(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """`list` shows id, size, sha256, created and upload state, locally and on the receiver;
    the CLI restore prints a summary and exits 0."""
    result = await run_backup(backup_setup.cfg)
    local = local_entries(backup_setup.cfg)
    assert [(e.id, e.upload, e.sha256) for e in local] == [(result.id, "uploaded",
                                                             result.sha256)]
    remote = await remote_entries(backup_setup.cfg)
    assert result.file is not None
    assert [(e.file, e.sha256) for e in remote] == [(result.file.name, result.sha256)]
    toml = tmp_path / "c.toml"
    toml.write_text(config_toml(backup_setup))
    out = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "mt5backupd", "list", "--remote", "--json", "--config", str(toml)],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["sha256"] == result.sha256
    out = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "mt5backupd", "restore", "latest", "--target-db", "cli_copy",
        "--create", "--config", str(toml)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "verified before restoring" in out.stdout
    await same_contents(backup_setup, "cli_copy")
    backup_setup.pg.drop_database("cli_copy")
