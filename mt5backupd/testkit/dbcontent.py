"""What a database holds, measured: exact row counts, content checksums and sizes.

How tests, benches and the demo prove a restored copy equals its source, and how the sample-data
generator checks it reached its target size. Read-only; any PostgreSQL database will do.
"""

from __future__ import annotations

from typing import Any

import asyncpg

# Rows compared as text in byte order (COLLATE "C"), so the database's locale cannot matter.
_CHECKSUM_SQL = (
    "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text COLLATE \"C\"), ''))"
    " FROM public.{table} AS t"
)


async def _user_tables(con: Any) -> list[tuple[str, str]]:
    rows = await con.fetch(
        """
        SELECT c.relname, quote_ident(c.relname) AS quoted
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
        ORDER BY c.relname
        """
    )
    return [(r["relname"], r["quoted"]) for r in rows]


async def table_row_counts(dsn: str) -> dict[str, int]:
    """Exact ``count(*)`` of every table in schema public (not the planner's estimate)."""
    con = await asyncpg.connect(dsn)
    try:
        return {
            name: int(await con.fetchval(f"SELECT count(*) FROM public.{quoted}"))  # noqa: S608
            for name, quoted in await _user_tables(con)
        }
    finally:
        await con.close()


async def table_checksums(dsn: str) -> dict[str, str]:
    """md5 over every row of every public table, in a collation-independent order.

    Equal checksums mean equal contents, whatever the physical row order or the database's
    locale, which is how a restored copy is compared with its source. Reads whole tables into
    one string, so it is meant for test-sized databases.
    """
    con = await asyncpg.connect(dsn)
    try:
        out: dict[str, str] = {}
        for name, quoted in await _user_tables(con):
            out[name] = await con.fetchval(_CHECKSUM_SQL.format(table=quoted))
        return out
    finally:
        await con.close()


async def data_bytes(dsn: str) -> int:
    """Bytes the public tables take (heap, TOAST, indexes): what ``target_bytes`` aims for."""
    con = await asyncpg.connect(dsn)
    try:
        value = await con.fetchval(
            """
            SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
            """
        )
        return int(value)
    finally:
        await con.close()


async def database_bytes(dsn: str) -> int:
    """``pg_database_size`` of the DSN's database, catalogs included."""
    con = await asyncpg.connect(dsn)
    try:
        return int(await con.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await con.close()
