"""The `check` lines for point-in-time recovery ([wal] enabled): the tools, the server's WAL
settings, the replication privilege, the slot, and the slot's disk risk."""

from __future__ import annotations

import asyncpg

from mt5backupd.backup.database import connect_db
from mt5backupd.backup.dump import tool_version
from mt5backupd.config import Config
from mt5backupd.config.secretfiles import database_password
from mt5backupd.errors import Mt5BackupError
from mt5backupd.ops.checks_model import Check

_SERVER_FIX = ("in postgresql.conf: wal_level = replica and max_wal_senders >= 2 (restart), "
               "see docs/operations.md \"Point-in-time recovery\"")


async def _tool(key: str, binary: str) -> Check:
    try:
        _major, version = await tool_version(binary, f"[wal] {key}")
    except Mt5BackupError as exc:
        return Check(key, False, str(exc), f"install the PostgreSQL client, or set [wal] {key}")
    return Check(key, True, f"{binary} {version}")


async def wal_checks(cfg: Config) -> list[Check]:
    if not cfg.wal.enabled:
        return []
    results = [await _tool("pg_receivewal", cfg.wal.pg_receivewal),
               await _tool("pg_basebackup", cfg.wal.pg_basebackup)]
    db = cfg.database
    try:
        conn = await connect_db(db, database_password(db), db.dbname)
    except Mt5BackupError as exc:
        return [*results, Check("WAL settings", False, f"not checked: {exc}")]
    try:
        level = str(await conn.fetchval("SHOW wal_level"))
        senders = int(await conn.fetchval("SHOW max_wal_senders"))
        results.append(Check("wal_level", level in ("replica", "logical"),
                             f"wal_level = {level}, max_wal_senders = {senders}", _SERVER_FIX)
                       if senders > 0 else
                       Check("wal_level", False, f"max_wal_senders = {senders}", _SERVER_FIX))
        role = await conn.fetchrow("SELECT rolname, rolreplication OR rolsuper AS ok "
                                   "FROM pg_roles WHERE rolname = current_user")
        results.append(Check("replication privilege", bool(role["ok"]),
                             f"role {role['rolname']} "
                             f"{'may' if role['ok'] else 'may not'} stream WAL",
                             f"ALTER ROLE {role['rolname']} REPLICATION; and a line "
                             "'host replication <role> <address> scram-sha-256' in pg_hba.conf"))
        slot = await conn.fetchrow(
            "SELECT slot_type, wal_status, pg_current_wal_lsn() - restart_lsn AS retained "
            "FROM pg_replication_slots WHERE slot_name = $1", cfg.wal.slot)
        if slot is None:
            results.append(Check("replication slot", True, f"{cfg.wal.slot} does not exist "
                                 "yet; the daemon creates it when it starts", warning=True))
        elif slot["slot_type"] != "physical" or slot["wal_status"] == "lost":
            results.append(Check("replication slot", False,
                                 f"{cfg.wal.slot}: {slot['slot_type']}, wal_status "
                                 f"{slot['wal_status']}",
                                 "drop it (SELECT pg_drop_replication_slot(...)), let the "
                                 "daemon recreate it, then take a base backup"))
        else:
            retained = int(slot["retained"] or 0)
            results.append(Check("replication slot", True, f"{cfg.wal.slot}: retains "
                                 f"{retained / 1e6:.1f} MB of WAL ({slot['wal_status']})"))
        keep = str(await conn.fetchval("SHOW max_slot_wal_keep_size"))
        unset = keep in ("-1", "")
        results.append(Check(
            "max_slot_wal_keep_size", True,
            "unset: while the daemon is down the slot keeps WAL until the server's disk is "
            "full; set it (e.g. '50GB') so the server gives up the slot first" if unset
            else f"{keep}: the slot is dropped from WAL retention beyond that", warning=unset))
    except (asyncpg.PostgresError, OSError) as exc:
        results.append(Check("WAL settings", False, f"query failed: {exc}"))
    finally:
        await conn.close()
    return results
