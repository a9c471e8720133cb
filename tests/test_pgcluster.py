"""The throwaway PostgreSQL cluster and the MT5 sample-data generator, against a real server."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest

from mt5backupd.testkit import dbcontent, sampledata
from mt5backupd.testkit.pgcluster import PgCluster, PgClusterError
from mt5backupd.testkit.pghost import find_bin_dir
from tests.pg_fixtures import live_processes_mentioning

SAMPLE_DB_BYTES = 2 * 1024 * 1024  # what the sample_db fixture asks generate() for


def test_bin_dir_override_must_contain_initdb(tmp_path: Path) -> None:
    """A wrong $MT5BACKUPD_PG_BINDIR is an error naming the fix, not a silent fallback."""
    with pytest.raises(PgClusterError, match="apt-get install postgresql"):
        find_bin_dir({"MT5BACKUPD_PG_BINDIR": str(tmp_path)})
    assert (find_bin_dir({}) / "initdb").is_file()


async def test_sample_db_fills_all_tables_to_about_the_target(
    pg_cluster: PgCluster, sample_db: str
) -> None:
    """generate() fills all 7 MT5 tables and lands within 2x of the requested size."""
    counts = await dbcontent.table_row_counts(pg_cluster.dsn(sample_db))
    assert set(counts) == set(sampledata.TABLES)
    assert all(n > 0 for n in counts.values()), counts
    assert counts["ticks"] > 10 * counts["bars"] > 0
    size = await dbcontent.data_bytes(pg_cluster.dsn(sample_db))
    assert SAMPLE_DB_BYTES / 2 < size < SAMPLE_DB_BYTES * 2


async def test_schema_has_keys_and_realistic_types(pg_cluster: PgCluster, sample_db: str) -> None:
    """Every table has a primary key, the trading tables have FKs and prices are numeric(18,5)."""
    out = pg_cluster.psql(
        """
        SELECT conrelid::regclass, contype, count(*) FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace AND contype IN ('p', 'f')
        GROUP BY 1, 2 ORDER BY 1, 2
        """,
        sample_db,
    )
    keys = {tuple(line.split("|")[:2]) for line in out.splitlines()}
    for table in sampledata.TABLES:
        assert (table, "p") in keys
    for table in ("ticks", "bars", "orders", "deals", "positions"):
        assert (table, "f") in keys
    bid_type = pg_cluster.psql(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'ticks'::regclass AND attname = 'bid'",
        sample_db,
    )
    assert bid_type.strip() == "numeric(18,5)"


async def test_checksums_are_stable_and_see_a_one_row_change(
    pg_cluster: PgCluster, sample_db: str
) -> None:
    """table_checksums() repeats exactly and changes when a single value changes."""
    dsn = pg_cluster.dsn(sample_db)
    first = await dbcontent.table_checksums(dsn)
    assert set(first) == set(sampledata.TABLES)
    assert await dbcontent.table_checksums(dsn) == first
    pg_cluster.psql("UPDATE deals SET swap = swap + 0.01 WHERE ticket = (SELECT min(ticket) "
                    "FROM deals)", sample_db)
    changed = await dbcontent.table_checksums(dsn)
    assert changed["deals"] != first["deals"]
    assert {k: v for k, v in changed.items() if k != "deals"} == {
        k: v for k, v in first.items() if k != "deals"
    }


async def test_generation_is_reproducible(pg_cluster: PgCluster, sample_db: str) -> None:
    """Same target and seed give row-for-row identical data, even with parallel loaders."""
    other = sample_db + "_again"
    pg_cluster.create_database(other)
    try:
        await sampledata.generate(pg_cluster.dsn(other), target_bytes=SAMPLE_DB_BYTES, parallel=3)
        assert await dbcontent.table_checksums(pg_cluster.dsn(other)) == (
            await dbcontent.table_checksums(pg_cluster.dsn(sample_db))
        )
    finally:
        pg_cluster.drop_database(other)


async def test_generate_refuses_to_overwrite_existing_tables(
    pg_cluster: PgCluster, sample_db: str
) -> None:
    """Without replace=True an existing MT5 schema is an error and is left untouched."""
    dsn = pg_cluster.dsn(sample_db)
    before = await dbcontent.table_row_counts(dsn)
    with pytest.raises(asyncpg.DuplicateTableError):
        await sampledata.generate(dsn, target_bytes=SAMPLE_DB_BYTES)
    assert await dbcontent.table_row_counts(dsn) == before


async def test_dsn_and_env_reach_the_cluster_from_asyncpg_and_psql(pg_cluster: PgCluster) -> None:
    """dsn() (TCP and socket) works for asyncpg and psql; env() works for libpq subprocesses."""
    for dsn in (pg_cluster.dsn("postgres"), pg_cluster.dsn("postgres", unix_socket=True)):
        con = await asyncpg.connect(dsn)
        try:
            assert await con.fetchval("SELECT current_user") == "postgres"
        finally:
            await con.close()
        out = subprocess.run(
            [str(pg_cluster.bin_dir / "psql"), "-XAtc", "SELECT 42", dsn],
            capture_output=True, text=True, check=True,
        )
        assert out.stdout.strip() == "42"
    env = {**os.environ, **pg_cluster.env("template1")}
    out = subprocess.run(
        [str(pg_cluster.bin_dir / "psql"), "-XAtc", "SELECT current_database()"],
        capture_output=True, text=True, env=env, check=True,
    )
    assert out.stdout.strip() == "template1"


async def test_require_password_enforces_scram_everywhere(tmp_path: Path) -> None:
    """After require_password() socket and TCP logins need the password; helpers keep working."""
    with PgCluster.create(tmp_path) as pg:
        pg.set_password("backup", "s3cret:'pw")
        pg.require_password()
        for dsn in (pg.dsn(user="backup"), pg.dsn(user="backup", unix_socket=True)):
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(dsn)
        for dsn in (pg.dsn(user="backup", password="s3cret:'pw"),
                    pg.dsn(user="backup", password="s3cret:'pw", unix_socket=True)):
            con = await asyncpg.connect(dsn)
            assert await con.fetchval("SELECT current_user") == "backup"
            await con.close()
        assert pg.psql("SELECT 1").strip() == "1"
        pg.allow_trust()
        con = await asyncpg.connect(pg.dsn(user="backup"))
        await con.close()


async def test_kill_makes_the_server_unreachable_and_stop_does_not_hang(tmp_path: Path) -> None:
    """kill() drops open sessions at once; stop() afterwards returns; start() recovers commits."""
    with PgCluster.create(tmp_path) as pg:
        pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
        con = await asyncpg.connect(pg.dsn())
        try:
            pg.kill()
            assert not pg.is_running()
            with pytest.raises((asyncpg.PostgresConnectionError, ConnectionError, OSError)):
                await con.fetchval("SELECT 1")
        finally:
            con.terminate()
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await asyncpg.connect(pg.dsn(), timeout=5)
        started = time.monotonic()
        pg.stop()
        assert time.monotonic() - started < 5
        pg.start()
        assert pg.psql("SELECT x FROM t").strip() == "7"


def test_context_exit_removes_directory_and_leaves_no_postmaster(tmp_path: Path) -> None:
    """Leaving the with-block, even by an exception, stops every process and deletes the dir."""
    with pytest.raises(RuntimeError, match="test body failed"), PgCluster.create(tmp_path) as pg:
        root, data_dir = pg.root, pg.data_dir
        assert pg.is_running()
        assert live_processes_mentioning(str(data_dir))
        raise RuntimeError("test body failed")
    assert not root.exists()
    assert live_processes_mentioning(str(data_dir)) == []
