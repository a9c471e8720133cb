"""Row counts recorded with a backup, so a test restore can be compared.

By default they come from the dump stream (``customformat``: exact for every table, see
``exact_counts``). When pg_dump compresses its own output (``gzip:N``) the backup instead
opens a REPEATABLE READ transaction, exports its snapshot, counts rows there and runs
``pg_dump --snapshot``: counts and dump see exactly the same data, whatever the trading
application writes meanwhile. Tables larger than ``exact_count_max_bytes`` get the planner's
estimate instead (``reltuples``), marked ``exact: false``; a scan of a huge tick table would
otherwise lengthen the backup.
"""

from __future__ import annotations

from typing import Any

_TABLES_SQL = """
SELECT n.nspname, c.relname, c.oid::regclass::text AS qualified,
       pg_total_relation_size(c.oid) AS bytes, c.reltuples::bigint AS estimate
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
ORDER BY 1, 2
"""


def table_key(schema: str, table: str) -> str:
    return f"{schema}.{table}"


_ESTIMATES_SQL = """
SELECT n.nspname, c.relname, c.reltuples::bigint AS estimate
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
"""


async def table_estimates(conn: Any) -> dict[str, int]:
    """Every user table with the planner's row estimate: one catalog query, no scan."""
    return {table_key(r["nspname"], r["relname"]): max(int(r["estimate"]), 0)
            for r in await conn.fetch(_ESTIMATES_SQL)}


def exact_counts(rows_by_table: dict[str, int],
                 tables: dict[str, int]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The manifest's ``row_counts`` from counts read off the dump stream (all exact), and the
    tables the server had (``tables``, with estimates) whose data is not in the stream. Those
    are recorded with their estimate, so a test restore that lacks their rows fails."""
    counts: dict[str, dict[str, Any]] = {
        table: {"rows": rows, "exact": True} for table, rows in rows_by_table.items()}
    missing = sorted(set(tables) - set(counts))
    for table in missing:
        counts[table] = {"rows": tables[table], "exact": False}
    return dict(sorted(counts.items())), missing


async def count_rows(conn: Any, exact_count_max_bytes: int) -> dict[str, dict[str, Any]]:
    """``{"public.ticks": {"rows": 123, "exact": true}, ...}`` for every user table, in the
    connection's current snapshot."""
    counts: dict[str, dict[str, Any]] = {}
    for row in await conn.fetch(_TABLES_SQL):
        key = table_key(row["nspname"], row["relname"])
        estimate = int(row["estimate"])
        if int(row["bytes"]) > exact_count_max_bytes and estimate >= 0:
            counts[key] = {"rows": estimate, "exact": False}
        else:
            rows = await conn.fetchval(f"SELECT count(*) FROM {row['qualified']}")  # noqa: S608
            counts[key] = {"rows": int(rows), "exact": True}
    return counts


def compare(expected: dict[str, dict[str, Any]], restored: dict[str, int],
            tolerance: float = 0.1) -> list[str]:
    """Problems (empty when the restore matches): a table missing, an exact count that
    differs, an estimate off by more than ``tolerance``."""
    problems = []
    for table, info in sorted(expected.items()):
        if table not in restored:
            problems.append(f"table {table} is missing from the restore")
            continue
        want, got = int(info["rows"]), restored[table]
        if info.get("exact", True):
            if got != want:
                problems.append(f"{table}: {got} rows restored, {want} at dump time")
        elif abs(got - want) > max(tolerance * want, 1000):
            problems.append(f"{table}: {got} rows restored, about {want} estimated at dump time")
    return problems
