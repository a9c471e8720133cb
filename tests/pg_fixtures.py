"""Real-PostgreSQL fixtures: one throwaway cluster per test session, one fresh database per test.

Load with ``pytest_plugins = ["tests.pg_fixtures"]`` (root conftest or a test module) so every
test module shares the same fixture definitions and therefore the same session cluster.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.sampledata import generate

SAMPLE_DB_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """A started PostgreSQL cluster shared by the whole session; stopped and deleted at the end."""
    with PgCluster.create(tmp_path_factory.mktemp("pg")) as pg:
        yield pg


@pytest.fixture
async def sample_db(pg_cluster: PgCluster) -> AsyncIterator[str]:
    """Name of a fresh database holding ~2 MB of MT5 sample data; dropped after the test."""
    name = f"mt5_{secrets.token_hex(6)}"
    pg_cluster.create_database(name)
    try:
        await generate(pg_cluster.dsn(name), target_bytes=SAMPLE_DB_BYTES)
        yield name
    finally:
        pg_cluster.drop_database(name)


def live_processes_mentioning(text: str) -> list[int]:
    """PIDs of non-zombie processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if text in cmdline and stat[stat.rfind(")") + 2] not in "ZX":
            pids.append(int(entry.name))
    return pids


def process_gone(pid: int) -> bool:
    """Gone or a zombie (dead; this container's PID 1 does not always reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture(scope="module")
def pitr_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """A started cluster set up for streaming replication (wal_level=replica, senders, slots),
    private to one test module: PITR tests switch WAL, create slots and read the server's
    history, which must not leak into other tests' cluster."""
    with PgCluster.create(tmp_path_factory.mktemp("pgrepl"), replication=True) as pg:
        yield pg
