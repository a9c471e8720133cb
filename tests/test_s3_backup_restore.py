"""A whole backup through an S3-backed receiver: `--run-now` on the client, then
`restore latest --from remote` into a new database with equal row counts and contents."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mt5backupd.config import ReceiverConfig
from mt5backupd.testkit.dbcontent import table_checksums, table_row_counts
from tests.backup_fixtures import BackupSetup, config_toml
from tests.receiver_harness import receiver_config
from tests.s3_fixtures import MotoS3, s3_receiver_cfg


@pytest.fixture
def receiver_cfg(tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str]) -> ReceiverConfig:
    """The harness's receiver, on a fresh bucket (the backup_setup fixture uses it)."""
    return s3_receiver_cfg(receiver_config(tmp_path), moto_s3, moto_s3.new_bucket())


async def test_run_now_through_s3_receiver_then_restore_from_remote(
        backup_setup: BackupSetup, tmp_path: Path, moto_s3: MotoS3) -> None:
    """`--run-now` uploads through the S3-backed receiver (the object lands in the bucket);
    `restore latest --from remote` gives a database with the same rows."""
    toml = tmp_path / "c.toml"
    toml.write_text(config_toml(backup_setup))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mt5backupd", *args, "--config", str(toml)],
                              capture_output=True, text=True, timeout=120)

    run = await asyncio.to_thread(cli, "--run-now", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["upload_state"] == "uploaded"
    bucket = backup_setup.receiver.cfg.storage.bucket
    head = moto_s3.client().head_object(
        Bucket=bucket, Key=f"backups/alice/{Path(result['file']).name}/data")
    assert head["ContentLength"] == result["size"]

    restored = await asyncio.to_thread(cli, "restore", "latest", "--from", "remote",
                                       "--target-db", "copy_s3", "--create")
    assert restored.returncode == 0, restored.stderr
    pg = backup_setup.pg
    try:
        assert await table_row_counts(pg.dsn("copy_s3")) == await table_row_counts(
            pg.dsn(backup_setup.dbname))
        assert await table_checksums(pg.dsn("copy_s3")) == await table_checksums(
            pg.dsn(backup_setup.dbname))
    finally:
        pg.drop_database("copy_s3")
