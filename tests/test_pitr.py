"""Point-in-time recovery against the real programs: pg_basebackup and pg_receivewal on a
wal_level=replica cluster, our receiver, restore to a second, and PostgreSQL started on it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mt5backupd.backup import spool
from mt5backupd.backup.run import run_base
from mt5backupd.config import Config, LocalConfig, RemoteConfig, WalConfig
from mt5backupd.errors import ConfigError
from mt5backupd.testkit.pgcluster import PgCluster
from tests.backup_fixtures import database_config, write_token
from tests.receiver_harness import Receiver

DB = "trades"


@dataclass
class Pitr:
    pg: PgCluster
    cfg: Config
    receiver: Receiver


@pytest.fixture
async def pitr(pitr_cluster: PgCluster, receiver: Receiver,
               tmp_path: Path) -> AsyncIterator[Pitr]:
    pg = pitr_cluster
    pg.drop_database(DB)
    pg.create_database(DB)
    pg.psql("CREATE TABLE deals (id serial PRIMARY KEY, note text, "
            "committed timestamptz DEFAULT clock_timestamp())", DB)
    token_file = write_token(tmp_path / "remote-token", receiver.tokens.alice)
    cfg = Config(
        database=database_config(pg, DB),
        local=LocalConfig(dir=tmp_path / "backups", keep=3),
        remote=RemoteConfig(url=receiver.url, token_file=token_file, retry_delay_s=0.2,
                            max_retries=5, timeout_s=10.0),
        wal=WalConfig(enabled=True, slot="mt5test", max_lag_s=1.0,
                      pg_receivewal=str(pg.bin_dir / "pg_receivewal"),
                      pg_basebackup=str(pg.bin_dir / "pg_basebackup")),
    )
    yield Pitr(pg, cfg, receiver)


async def test_base_backup_ships_with_its_wal_range(pitr: Pitr) -> None:
    """`--job base`: pg_basebackup's tar goes through zstd, the spool and the receiver, and the
    manifest records the WAL range the backup needs (from its backup_manifest)."""
    result = await run_base(pitr.cfg)
    assert result.ok and result.exit_code == 0, result.error
    assert result.id.startswith("base-") and result.id.endswith(".tar.zst")
    [manifest] = spool.load_manifests(pitr.cfg.local.dir, "base")
    wal = manifest.extra["wal"]
    assert wal["timeline"] == 1 and wal["segment_bytes"] == 16 * 1024 * 1024
    assert wal["start_segment"] <= wal["end_segment"]
    assert manifest.upload.state == "uploaded"
    remote = json.loads((pitr.receiver.cfg.data_dir / "backups" / "alice" / result.id /
                         "meta.json").read_text())
    assert remote["kind"] == "base" and remote["sha256"] == manifest.sha256


async def test_base_backup_refused_without_wal(pitr: Pitr) -> None:
    """A base backup alone cannot be restored: without [wal] enabled the job refuses."""
    cfg = dataclasses.replace(pitr.cfg, wal=WalConfig(enabled=False))
    with pytest.raises(ConfigError, match=r"\[wal\] enabled is false"):
        await run_base(cfg)
