"""A ready-to-run backup setup: sample database, receiver, token file, Config."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mt5backupd.config import Config, DatabaseConfig, LocalConfig, RemoteConfig
from mt5backupd.testkit.pgcluster import PgCluster
from tests.receiver_harness import Receiver


@dataclass
class BackupSetup:
    pg: PgCluster
    dbname: str
    cfg: Config
    receiver: Receiver
    token_file: Path

    def with_(self, **sections: object) -> Config:
        """A copy of the config with some fields of its sections replaced, e.g.
        ``with_(database={"compression": ...})``."""
        cfg = self.cfg
        for name, changes in sections.items():
            assert isinstance(changes, dict)
            cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name),
                                                                        **changes)})
        return cfg


def write_token(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    os.chmod(path, 0o600)
    return path


def database_config(pg: PgCluster, dbname: str) -> DatabaseConfig:
    return DatabaseConfig(host=pg.host, port=pg.port, user=pg.user, dbname=dbname,
                          pg_dump=str(pg.bin_dir / "pg_dump"),
                          pg_restore=str(pg.bin_dir / "pg_restore"), stall_timeout_s=60.0)


@pytest.fixture
async def backup_setup(pg_cluster: PgCluster, sample_db: str, receiver: Receiver,
                       tmp_path: Path) -> AsyncIterator[BackupSetup]:
    token_file = write_token(tmp_path / "remote-token", receiver.tokens.alice)
    cfg = Config(
        database=database_config(pg_cluster, sample_db),
        local=LocalConfig(dir=tmp_path / "backups", keep=3),
        remote=RemoteConfig(url=receiver.url, token_file=token_file, retry_delay_s=0.2,
                            max_retries=5, timeout_s=10.0),
    )
    yield BackupSetup(pg_cluster, sample_db, cfg, receiver, token_file)


def config_toml(setup: BackupSetup) -> str:
    db = setup.cfg.database
    return (
        f'[database]\nhost = "{db.host}"\nport = {db.port}\nuser = "{db.user}"\n'
        f'dbname = "{db.dbname}"\npg_dump = "{db.pg_dump}"\npg_restore = "{db.pg_restore}"\n'
        f'[local]\ndir = "{setup.cfg.local.dir}"\n'
        f'[remote]\nurl = "{setup.receiver.url}"\ntoken_file = "{setup.token_file}"\n'
    )
