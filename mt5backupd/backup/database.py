"""The database side of a backup: connecting, the preflight, and the spec of one pg_dump run
(row counts and dump on one exported snapshot, read back with pg_restore --list)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from pyrage import x25519

from mt5backupd.backup import compress, spool
from mt5backupd.backup.dump import (
    check_dump_compatible,
    pg_child_env,
    pg_dump_argv,
    run_dump,
    server_major,
    tool_version,
)
from mt5backupd.backup.pgrestore import list_archive
from mt5backupd.backup.rowcounts import count_rows
from mt5backupd.backup.shipspec import ProduceStats, ShipSpec, check_generated_names
from mt5backupd.config import Config, DatabaseConfig, Secret
from mt5backupd.errors import ConfigError, Mt5BackupError

KIND = spool.KIND_DATABASE
SNAPSHOT_CLOSE_TIMEOUT_S = 10.0


@dataclass
class ServerInfo:
    version: str
    major: int


async def connect_db(cfg: DatabaseConfig, password: Secret | None, dbname: str) -> Any:
    """An asyncpg connection with the configured credentials; errors as one clear line."""
    where = (f"{cfg.user or 'default user'}@{cfg.host or 'default host'}:"
             f"{cfg.port or 'default port'}")
    try:
        return await asyncpg.connect(
            host=cfg.host, port=cfg.port, user=cfg.user, database=dbname,
            password=password.reveal() if password else None, timeout=15,
        )
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise ConfigError(f"[database] authentication failed for {where}: {exc}") from None
    except asyncpg.InvalidCatalogNameError:
        raise ConfigError(f"[database] dbname: database {dbname!r} does not exist on "
                          f"{where}") from None
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise Mt5BackupError(f"database unreachable ({where}): {exc}") from None


async def db_preflight(cfg: DatabaseConfig, password: Secret | None) -> ServerInfo:
    """Connect once with asyncpg: proves credentials and reads the server version."""
    conn = await connect_db(cfg, password, cfg.dbname)
    try:
        version = str(await conn.fetchval("SHOW server_version"))
        num = int(await conn.fetchval("SHOW server_version_num"))
    finally:
        await conn.close()
    return ServerInfo(version.split()[0], server_major(num))


def check_database_names(db: DatabaseConfig) -> None:
    """The backup ids made from [database] dbname must be ids the receiver accepts."""
    check_generated_names(db.dbname, db.compression.suffix, "[database] dbname")


async def database_spec(cfg: Config, password: Secret | None) -> ShipSpec:
    """Preflight of the database side, then the spec of its dump."""
    db = cfg.database
    server = await db_preflight(db, password)
    dump_major, dump_version = await tool_version(db.pg_dump, "pg_dump")
    check_dump_compatible(dump_major, server.major, db.pg_dump)
    await tool_version(db.pg_restore, "pg_restore")

    async def produce(spooled: compress.Writable) -> ProduceStats:
        def pump(read_fd: int, on_read: Callable[[int], None]) -> int:
            return compress.pump(read_fd, spooled, db.compression, db.compression_threads,
                                 on_read)

        # Counts and dump share one exported snapshot; the exporting transaction stays open
        # until pg_dump is done with it.
        conn = await connect_db(db, password, db.dbname)
        transaction = conn.transaction(isolation="repeatable_read", readonly=True)
        try:
            try:
                await transaction.start()
                snapshot = str(await conn.fetchval("SELECT pg_export_snapshot()"))
                counts = await count_rows(conn, db.exact_count_max_bytes)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                raise Mt5BackupError(f"snapshot and row counts failed: {exc}") from None
            with pg_child_env(db, password) as env:
                stats = await run_dump(pg_dump_argv(db, snapshot), env, pump,
                                       stall_timeout_s=db.stall_timeout_s)
        finally:
            # the server may be gone (that is what failed the dump): never mask the reason
            with contextlib.suppress(Exception):
                await asyncio.wait_for(transaction.rollback(), SNAPSHOT_CLOSE_TIMEOUT_S)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), SNAPSHOT_CLOSE_TIMEOUT_S)
        return ProduceStats(stats.raw_bytes, stats.duration_s,
                            {"row_counts": counts, "snapshot": snapshot})

    async def verify(path: Path, identities: Sequence[x25519.Identity]) -> None:
        await list_archive(db.pg_restore, path, identities)

    return ShipSpec(
        kind=KIND, prefix=db.dbname, suffix=db.compression.suffix,
        compression=str(db.compression), keep=cfg.local.keep, produce=produce, verify=verify,
        describe=db.dbname,
        manifest_fields={"database": db.dbname, "pg_dump_version": dump_version,
                         "server_version": server.version},
    )
