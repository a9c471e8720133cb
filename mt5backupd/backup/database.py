"""The database side of a backup: connecting, the preflight, and the spec of one pg_dump run
(read back with pg_restore --list).

Row counts come from the dump stream itself (``customformat``): exact for every table, from
pg_dump's own snapshot, no query on the server. Only when pg_dump compresses its own output
(``gzip:N``), or is newer than the archive versions the parser knows, are they counted in an
exported snapshot shared with pg_dump, as before (``rowcounts.count_rows``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from loguru import logger
from pyrage import x25519

from mt5backupd.backup import compress, customformat, spool
from mt5backupd.backup.childenv import pg_child_env, pg_dump_argv
from mt5backupd.backup.dump import check_dump_compatible, run_dump, server_major
from mt5backupd.backup.pgrestore import list_archive
from mt5backupd.backup.rowcounts import count_rows, exact_counts, table_estimates
from mt5backupd.backup.runstart import RunStart
from mt5backupd.backup.shipspec import ProduceStats, ShipSpec
from mt5backupd.backup.toolcache import cached_tool_version
from mt5backupd.backup.toolproc import SpawnedDump
from mt5backupd.config import Config, DatabaseConfig, Secret
from mt5backupd.errors import ConfigError, Mt5BackupError

KIND = spool.KIND_DATABASE
SNAPSHOT_CLOSE_TIMEOUT_S = 10.0
SOURCE_STREAM, SOURCE_SNAPSHOT = "stream", "snapshot"  # the manifest's row_counts_source


@dataclass
class ServerInfo:
    version: str
    major: int
    tables: dict[str, int]  # every user table and its estimated rows, to check the dump against


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
    """Connect once with asyncpg: proves credentials, reads the server version and the list of
    tables (catalog queries only)."""
    conn = await connect_db(cfg, password, cfg.dbname)
    try:
        version = str(await conn.fetchval("SHOW server_version"))
        num = int(await conn.fetchval("SHOW server_version_num"))
        tables = await table_estimates(conn)
    finally:
        await conn.close()
    return ServerInfo(version.split()[0], server_major(num), tables)


def counts_from_stream(db: DatabaseConfig, dump_major: int) -> bool:
    """Whether this run's row counts can be read from the dump stream: pg_dump writes
    uncompressed custom format (we compress after it) in an archive version the parser knows."""
    return db.compression.kind != "gzip" and dump_major <= customformat.MAX_PG_DUMP_MAJOR


async def _first_error(*aws: Any) -> list[Any]:
    """Await concurrently; every one finishes, then the first failure (in argument order) is
    raised, so the reported reason does not depend on which step was faster."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)


async def database_spec(cfg: Config, start: RunStart) -> ShipSpec:
    """Preflight of the database side (connection and tool versions at once), then the spec
    of its dump (which pumps the pg_dump ``start`` began, when it did)."""
    db, password = cfg.database, start.password
    server, (dump_major, dump_version), _restore = await _first_error(
        db_preflight(db, password),
        cached_tool_version(db.pg_dump, "pg_dump", cfg.local.dir),
        cached_tool_version(db.pg_restore, "pg_restore", cfg.local.dir))
    check_dump_compatible(dump_major, server.major, db.pg_dump)
    from_stream = counts_from_stream(db, dump_major)
    if not from_stream:  # a pg_dump newer than the parser: never two dumps at once
        await start.drop_dump()

    async def produce(spooled: compress.Writable) -> ProduceStats:
        if from_stream:
            spawned = await start.take_dump(pg_dump_argv(db))
            try:
                return await _produce_counting_stream(db, password, spooled, server.tables,
                                                      spawned)
            except BaseException:
                if spawned is not None:  # run_dump ends it, unless it failed before getting it
                    await spawned.stop()
                raise
        return await _produce_in_snapshot(db, password, spooled)

    async def verify(path: Path, identities: Sequence[x25519.Identity]) -> None:
        await list_archive(db.pg_restore, path, identities)

    return ShipSpec(
        kind=KIND, prefix=db.dbname, suffix=db.compression.suffix,
        compression=str(db.compression), keep=cfg.local.keep, produce=produce, verify=verify,
        describe=db.dbname,
        manifest_fields={"database": db.dbname, "pg_dump_version": dump_version,
                         "server_version": server.version},
        began=start.began,
    )


async def _produce_counting_stream(db: DatabaseConfig, password: Secret | None,
                                   spooled: compress.Writable, tables: dict[str, int],
                                   spawned: SpawnedDump | None) -> ProduceStats:
    """pg_dump with its own snapshot; the pump counts every table's rows as the bytes pass."""
    parser = customformat.ArchiveParser()

    def pump(source: compress.ReadSource, on_read: Callable[[int], None]) -> int:
        customformat.preload()  # while pg_dump reads the catalogs, before its first byte
        return compress.pump(source, spooled, db.compression, db.compression_threads,
                             on_read, inspect=parser.feed)

    try:
        if spawned is not None:  # started with its own passfile (backup/runstart)
            stats = await run_dump(pg_dump_argv(db), {}, pump,
                                   stall_timeout_s=db.stall_timeout_s, spawned=spawned)
        else:
            with pg_child_env(db, password) as env:
                stats = await run_dump(pg_dump_argv(db), env, pump,
                                       stall_timeout_s=db.stall_timeout_s)
        counts = parser.finish()
    except customformat.FramingError as exc:
        raise Mt5BackupError(f"pg_dump's output is not a complete custom-format archive, "
                             f"no row counts: {exc}") from None
    row_counts, missing = exact_counts(counts, tables)
    for table in missing:
        logger.warning("table {} has no data in the dump (pg_dump left it out, or it was "
                       "dropped during the run); its estimate is recorded", table)
    return ProduceStats(stats.raw_bytes, stats.duration_s,
                        {"row_counts": row_counts, "row_counts_source": SOURCE_STREAM})


async def _produce_in_snapshot(db: DatabaseConfig, password: Secret | None,
                               spooled: compress.Writable) -> ProduceStats:
    """pg_dump compresses (gzip:N), so its stream holds no readable rows: counts and dump
    share one exported snapshot; the exporting transaction stays open until pg_dump is done."""
    def pump(source: compress.ReadSource, on_read: Callable[[int], None]) -> int:
        return compress.pump(source, spooled, db.compression, db.compression_threads, on_read)

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
                        {"row_counts": counts, "snapshot": snapshot,
                         "row_counts_source": SOURCE_SNAPSHOT})
