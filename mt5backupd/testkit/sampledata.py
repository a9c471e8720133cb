"""An MT5-like trading database of a chosen size, for tests, benchmarks and ``mt5backupd demo``.

Backup behaviour depends on the shape of the data (one huge append-only tick table, a few small
relational ones with foreign keys), so the generator reproduces that shape rather than filling a
single blob table. All rows are produced server-side with ``INSERT ... SELECT generate_series``:
shipping rows from Python would make a 1 GB benchmark database take tens of minutes instead of
about a minute.

``target_bytes`` is the size the generated tables (heap, TOAST and indexes) add to the database.
An empty PostgreSQL 15 database already takes about 7.5 MB (the catalogs), so
``pg_database_size`` after ``generate(target_bytes=2 MB)`` is about 9.5 MB; at benchmark sizes
the difference disappears.

The content is deterministic for a given ``target_bytes`` and ``seed`` (fixed start time, seeded
``random()``), so two generations are equal row for row;
:func:`mt5backupd.testkit.dbcontent.table_checksums` proves a restored copy equals its source.

Script mode: ``python -m mt5backupd.testkit.sampledata --dsn DSN --size-mb N``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from mt5backupd.testkit.dbcontent import data_bytes, database_bytes, table_row_counts

TABLES = ("symbols", "accounts", "ticks", "bars", "orders", "deals", "positions")
START_TIME = datetime(2024, 1, 2, tzinfo=UTC)  # a Tuesday; fixed so the data is reproducible

# name, description, digits, typical price, contract size, base currency, profit currency
SYMBOLS: tuple[tuple[str, str, int, float, int, str, str], ...] = (
    ("EURUSD", "Euro vs US Dollar", 5, 1.0850, 100_000, "EUR", "USD"),
    ("GBPUSD", "Great Britain Pound vs US Dollar", 5, 1.2650, 100_000, "GBP", "USD"),
    ("USDJPY", "US Dollar vs Japanese Yen", 3, 148.20, 100_000, "USD", "JPY"),
    ("USDCHF", "US Dollar vs Swiss Franc", 5, 0.8790, 100_000, "USD", "CHF"),
    ("AUDUSD", "Australian Dollar vs US Dollar", 5, 0.6560, 100_000, "AUD", "USD"),
    ("USDCAD", "US Dollar vs Canadian Dollar", 5, 1.3540, 100_000, "USD", "CAD"),
    ("NZDUSD", "New Zealand Dollar vs US Dollar", 5, 0.6120, 100_000, "NZD", "USD"),
    ("EURGBP", "Euro vs Great Britain Pound", 5, 0.8580, 100_000, "EUR", "GBP"),
    ("EURJPY", "Euro vs Japanese Yen", 3, 160.80, 100_000, "EUR", "JPY"),
    ("GBPJPY", "Great Britain Pound vs Japanese Yen", 3, 187.40, 100_000, "GBP", "JPY"),
    ("EURCHF", "Euro vs Swiss Franc", 5, 0.9530, 100_000, "EUR", "CHF"),
    ("AUDJPY", "Australian Dollar vs Japanese Yen", 3, 97.20, 100_000, "AUD", "JPY"),
    ("XAUUSD", "Gold vs US Dollar", 2, 2035.50, 100, "XAU", "USD"),
    ("XAGUSD", "Silver vs US Dollar", 3, 23.150, 5_000, "XAG", "USD"),
    ("US30", "Dow Jones Industrial Average", 1, 37500.0, 1, "USD", "USD"),
    ("US500", "S&P 500", 2, 4750.00, 1, "USD", "USD"),
    ("NAS100", "Nasdaq 100", 2, 16800.00, 1, "USD", "USD"),
    ("GER40", "DAX 40", 1, 16700.0, 1, "EUR", "EUR"),
    ("UK100", "FTSE 100", 1, 7700.0, 1, "GBP", "GBP"),
    ("JPN225", "Nikkei 225", 0, 33500.0, 1, "JPY", "JPY"),
    ("BTCUSD", "Bitcoin vs US Dollar", 2, 44500.00, 1, "BTC", "USD"),
    ("ETHUSD", "Ethereum vs US Dollar", 2, 2350.00, 1, "ETH", "USD"),
    ("USOIL", "WTI Crude Oil", 3, 72.450, 1_000, "USD", "USD"),
    ("UKOIL", "Brent Crude Oil", 3, 77.800, 1_000, "USD", "USD"),
)

# Calibrated on PostgreSQL 15 (see Plan.for_target): bytes the whole data set grows per tick, and
# the size of the empty tables and indexes. Ticks are ~90% of the bytes, as in a real MT5 store.
_BYTES_PER_TICK = 134.0
_FIXED_BYTES = 340_000
_TICKS_PER_BAR = 20
_TICKS_PER_ORDER = 40
_ORDERS_PER_ACCOUNT = 50
_ORDERS_PER_POSITION = 10
_PARALLEL_THRESHOLD_TICKS = 200_000  # below this, extra connections cost more than they save

_SCHEMA = """
CREATE TABLE symbols (
    symbol_id       bigint PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    description     text NOT NULL,
    digits          smallint NOT NULL,
    contract_size   numeric(18,5) NOT NULL,
    currency_base   char(3) NOT NULL,
    currency_profit char(3) NOT NULL
);
CREATE TABLE accounts (
    login       bigint PRIMARY KEY,
    name        text NOT NULL,
    group_name  text NOT NULL,
    currency    char(3) NOT NULL,
    leverage    integer NOT NULL,
    balance     numeric(18,2) NOT NULL,
    credit      numeric(18,2) NOT NULL DEFAULT 0,
    registered  timestamptz NOT NULL
);
-- ticks and bars get their keys after the bulk load: building an index once is far cheaper than
-- maintaining it row by row.
CREATE TABLE ticks (
    symbol_id bigint NOT NULL,
    time      timestamptz NOT NULL,
    bid       numeric(18,5) NOT NULL,
    ask       numeric(18,5) NOT NULL,
    last      numeric(18,5) NOT NULL,
    volume    bigint NOT NULL,
    flags     integer NOT NULL
);
CREATE TABLE bars (
    symbol_id   bigint NOT NULL,
    time        timestamptz NOT NULL,
    open        numeric(18,5) NOT NULL,
    high        numeric(18,5) NOT NULL,
    low         numeric(18,5) NOT NULL,
    close       numeric(18,5) NOT NULL,
    tick_volume bigint NOT NULL,
    spread      integer NOT NULL,
    real_volume bigint NOT NULL
);
CREATE TABLE orders (
    ticket      bigint PRIMARY KEY,
    login       bigint NOT NULL REFERENCES accounts,
    symbol_id   bigint NOT NULL REFERENCES symbols,
    time_setup  timestamptz NOT NULL,
    time_done   timestamptz,
    type        smallint NOT NULL,
    state       smallint NOT NULL,
    volume      numeric(18,2) NOT NULL,
    price_open  numeric(18,5) NOT NULL,
    sl          numeric(18,5),
    tp          numeric(18,5),
    comment     text NOT NULL DEFAULT ''
);
CREATE TABLE deals (
    ticket       bigint PRIMARY KEY,
    order_ticket bigint NOT NULL REFERENCES orders,
    login        bigint NOT NULL REFERENCES accounts,
    symbol_id    bigint NOT NULL REFERENCES symbols,
    time         timestamptz NOT NULL,
    type         smallint NOT NULL,
    entry        smallint NOT NULL,
    volume       numeric(18,2) NOT NULL,
    price        numeric(18,5) NOT NULL,
    profit       numeric(18,2) NOT NULL,
    commission   numeric(18,2) NOT NULL,
    swap         numeric(18,2) NOT NULL
);
CREATE TABLE positions (
    ticket        bigint PRIMARY KEY,
    order_ticket  bigint NOT NULL UNIQUE REFERENCES orders,
    login         bigint NOT NULL REFERENCES accounts,
    symbol_id     bigint NOT NULL REFERENCES symbols,
    time_open     timestamptz NOT NULL,
    type          smallint NOT NULL,
    volume        numeric(18,2) NOT NULL,
    price_open    numeric(18,5) NOT NULL,
    price_current numeric(18,5) NOT NULL,
    sl            numeric(18,5),
    tp            numeric(18,5),
    profit        numeric(18,2) NOT NULL
);
CREATE INDEX orders_login_time_idx ON orders (login, time_setup);
CREATE INDEX deals_login_time_idx ON deals (login, time);
"""

_DROP = "DROP TABLE IF EXISTS positions, deals, orders, bars, ticks, accounts, symbols CASCADE"

# One symbol's ticks: a smooth two-wave price path plus noise, a spread of about a point or more,
# strictly increasing times (250 ms steps with < 200 ms jitter keep (symbol_id, time) unique) and
# MT5 tick flags (2 bid, 4 ask, 8 last, 16 volume, 32 buy, 64 sell).
_TICKS_SQL = """
INSERT INTO ticks (symbol_id, time, bid, ask, last, volume, flags)
SELECT $1::bigint, t, bid, bid + spread,
       CASE WHEN r < 0.5 THEN bid ELSE bid + spread END,
       1 + floor(r * 50)::bigint,
       (ARRAY[2, 4, 6, 6, 6, 30, 62, 94])[1 + floor(r * 8)::int]
FROM (
    SELECT $2::timestamptz + (i * 250 + floor(random() * 200)) * interval '1 millisecond' AS t,
           round(($3::float8 * (1 + 0.02 * sin(i / 15000.0 + $1) + 0.004 * sin(i / 900.0 + 2 * $1)
                  + 0.0003 * (random() - 0.5)))::numeric, $4::int) AS bid,
           round(($3::float8 * 0.00008 * (1 + random()))::numeric, $4::int)
               + power(10::numeric, -$4::int) AS spread,
           random() AS r
    FROM generate_series(0, $5::bigint - 1) AS i
) AS q
"""

# One symbol's M1 bars over the same price path as its ticks.
_BARS_SQL = """
INSERT INTO bars (symbol_id, time, open, high, low, close, tick_volume, spread, real_volume)
SELECT $1::bigint, t, o, greatest(o, c) + w, least(o, c) - w, c, tv, sp, tv * (1 + sp)
FROM (
    SELECT $2::timestamptz + i * interval '1 minute' AS t,
           round(($3::float8 * (1 + 0.02 * sin(i * 240 / 15000.0 + $1)
                  + 0.0003 * (random() - 0.5)))::numeric, $4::int) AS o,
           round(($3::float8 * (1 + 0.02 * sin((i + 1) * 240 / 15000.0 + $1)
                  + 0.0003 * (random() - 0.5)))::numeric, $4::int) AS c,
           round(($3::float8 * 0.0004 * random())::numeric, $4::int) AS w,
           (20 + floor(random() * 400))::bigint AS tv,
           (1 + floor(random() * 30))::int AS sp
    FROM generate_series(0, $5::bigint - 1) AS i
) AS q
"""

_ACCOUNTS_SQL = """
INSERT INTO accounts (login, name, group_name, currency, leverage, balance, credit, registered)
SELECT 100000 + g,
       'Client ' || g,
       (ARRAY['real\\standard', 'real\\pro', 'real\\ecn', 'demo\\forex'])[1 + g % 4],
       (ARRAY['USD', 'USD', 'EUR', 'GBP'])[1 + (g / 4) % 4],
       (ARRAY[30, 100, 200, 500])[1 + floor(random() * 4)::int],
       round((100 + random() * 50000)::numeric, 2),
       CASE WHEN g % 10 = 0 THEN 500 ELSE 0 END,
       $2::timestamptz - (floor(random() * 1000) || ' days')::interval
FROM generate_series(1, $1::bigint) AS g
"""

# Orders on random accounts and symbols; most are filled (state 4), some cancelled (2).
_ORDERS_SQL = """
INSERT INTO orders (ticket, login, symbol_id, time_setup, time_done, type, state, volume,
                    price_open, sl, tp, comment)
SELECT 5000000 + q.g, q.login, q.sid, q.t, q.t + q.fill, q.type, q.state, q.volume,
       round(q.px::numeric, s.digits),
       CASE WHEN q.r < 0.4 THEN NULL ELSE round((q.px * 0.99)::numeric, s.digits) END,
       CASE WHEN q.r < 0.6 THEN NULL ELSE round((q.px * 1.01)::numeric, s.digits) END,
       CASE WHEN q.r < 0.3 THEN '' WHEN q.r < 0.8 THEN 'EA#' || (q.g % 97) ELSE 'manual' END
FROM (
    SELECT a.*, ($5::float8[])[a.sid] * (1 + 0.01 * (random() - 0.5)) AS px
    FROM (
        SELECT g,
               100000 + 1 + floor(random() * $2::bigint)::bigint AS login,
               1 + floor(random() * $3::int)::int AS sid,
               $4::timestamptz + g * interval '7 seconds' AS t,
               (50 + floor(random() * 900)) * interval '1 millisecond' AS fill,
               floor(random() * 2)::smallint AS type,
               CASE WHEN random() < 0.9 THEN 4 ELSE 2 END::smallint AS state,
               round((0.01 + random() * 5)::numeric, 2) AS volume,
               random() AS r
        FROM generate_series(1, $1::bigint) AS g
    ) AS a
) AS q
JOIN symbols s ON s.symbol_id = q.sid
ORDER BY q.g
"""

_DEALS_SQL = """
INSERT INTO deals (ticket, order_ticket, login, symbol_id, time, type, entry, volume, price,
                   profit, commission, swap)
SELECT 30000000 + o.ticket, o.ticket, o.login, o.symbol_id, o.time_done, o.type,
       (o.ticket % 2)::smallint, o.volume, o.price_open,
       CASE WHEN o.ticket % 2 = 0 THEN 0 ELSE round(((random() - 0.45) * 400)::numeric, 2) END,
       -round(o.volume * 3.5, 2),
       CASE WHEN o.ticket % 7 = 0 THEN round(((random() - 0.7) * 20)::numeric, 2) ELSE 0 END
FROM orders o
WHERE o.state = 4
ORDER BY o.ticket
"""

_POSITIONS_SQL = """
INSERT INTO positions (ticket, order_ticket, login, symbol_id, time_open, type, volume,
                       price_open, price_current, sl, tp, profit)
SELECT o.ticket, o.ticket, o.login, o.symbol_id, o.time_done, o.type, o.volume, o.price_open,
       round(o.price_open * (1 + 0.004 * (random() - 0.5))::numeric, s.digits), o.sl, o.tp,
       round(((random() - 0.5) * 300)::numeric, 2)
FROM orders o JOIN symbols s ON s.symbol_id = o.symbol_id
WHERE o.state = 4 AND o.ticket % $1::int = 0
ORDER BY o.ticket
"""

_KEYS_SQL = (
    "ALTER TABLE ticks ADD CONSTRAINT ticks_pkey PRIMARY KEY (symbol_id, time)",
    "ALTER TABLE bars ADD CONSTRAINT bars_pkey PRIMARY KEY (symbol_id, time)",
)
# Foreign keys on the big tables are added (and validated) after their primary keys; both take
# a lock on symbols that conflicts with itself, so they run one after the other.
_FOREIGN_KEYS_SQL = (
    "ALTER TABLE ticks ADD CONSTRAINT ticks_symbol_id_fkey FOREIGN KEY (symbol_id) "
    "REFERENCES symbols",
    "ALTER TABLE bars ADD CONSTRAINT bars_symbol_id_fkey FOREIGN KEY (symbol_id) "
    "REFERENCES symbols",
)


@dataclass(frozen=True)
class Plan:
    """How many rows of each kind make up a database of a given size."""

    ticks_per_symbol: int
    bars_per_symbol: int
    accounts: int
    orders: int
    position_every: int  # every n-th filled order ticket is still an open position

    @classmethod
    def for_target(cls, target_bytes: int) -> Plan:
        """Scale every table linearly with the target, keeping a minimum of a few rows each."""
        ticks = max(len(SYMBOLS) * 10, int((target_bytes - _FIXED_BYTES) / _BYTES_PER_TICK))
        per_symbol = math.ceil(ticks / len(SYMBOLS))
        orders = max(100, ticks // _TICKS_PER_ORDER)
        return cls(
            ticks_per_symbol=per_symbol,
            bars_per_symbol=max(5, per_symbol // _TICKS_PER_BAR),
            accounts=max(10, orders // _ORDERS_PER_ACCOUNT),
            orders=orders,
            position_every=_ORDERS_PER_POSITION,
        )


def _seed(base: float, index: int) -> float:
    """A distinct setseed() value in [-1, 1] per work unit, so results don't depend on which
    connection happened to run which unit."""
    return math.fmod(base + index * 0.0137, 1.0)


async def generate(
    dsn: str,
    *,
    target_bytes: int,
    parallel: int | None = None,
    replace: bool = False,
    seed: float = 0.42,
) -> dict[str, int]:
    """Create the MT5 tables in ``dsn``'s database and fill them to about ``target_bytes``.

    ``parallel`` connections load ticks and bars side by side (default: 1 for small targets,
    else 4, which keeps a 2-core server busy while one connection waits on the client).
    ``replace`` drops existing MT5 tables first; without it an existing table is an error, so a
    typo in a DSN cannot wipe a real database. Returns the exact row count per table.
    """
    if target_bytes <= 0:
        raise ValueError("target_bytes must be positive")
    plan = Plan.for_target(target_bytes)
    total_ticks = plan.ticks_per_symbol * len(SYMBOLS)
    if parallel is None:
        parallel = 1 if total_ticks < _PARALLEL_THRESHOLD_TICKS else 4
    parallel = max(1, parallel)

    pool = await asyncpg.create_pool(dsn, min_size=parallel, max_size=parallel)
    try:
        async with pool.acquire() as con:
            if replace:
                await con.execute(_DROP)
            async with con.transaction():
                await con.execute(_SCHEMA)
                await con.executemany(
                    "INSERT INTO symbols VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    [
                        (i, name, desc, digits, contract, base_ccy, profit_ccy)
                        for i, (name, desc, digits, _price, contract, base_ccy, profit_ccy)
                        in enumerate(SYMBOLS, start=1)
                    ],
                )
            await con.execute("SELECT setseed($1)", _seed(seed, 0))
            await con.execute(_ACCOUNTS_SQL, plan.accounts, START_TIME)
            await con.execute(
                _ORDERS_SQL, plan.orders, plan.accounts, len(SYMBOLS), START_TIME,
                [s[3] for s in SYMBOLS],
            )
            await con.execute(_DEALS_SQL)
            await con.execute(_POSITIONS_SQL, plan.position_every)

        units: list[tuple[str, Sequence[Any]]] = []
        for sid, (_name, _desc, digits, price, *_rest) in enumerate(SYMBOLS, start=1):
            units.append((_TICKS_SQL, (sid, START_TIME, price, digits, plan.ticks_per_symbol)))
            units.append((_BARS_SQL, (sid, START_TIME, price, digits, plan.bars_per_symbol)))

        async def run_unit(index: int, sql: str, args: Sequence[Any]) -> None:
            async with pool.acquire() as con:
                await con.execute("SELECT setseed($1)", _seed(seed, index + 1))
                await con.execute(sql, *args)

        await _bounded(
            [functools.partial(run_unit, i, sql, args) for i, (sql, args) in enumerate(units)],
            parallel,
        )
        await _bounded([functools.partial(pool.execute, stmt) for stmt in _KEYS_SQL], parallel)
        async with pool.acquire() as con:
            for stmt in _FOREIGN_KEYS_SQL:
                await con.execute(stmt)
            await con.execute("ANALYZE " + ", ".join(TABLES))
    finally:
        await pool.close()
    return await table_row_counts(dsn)


async def _bounded(jobs: Sequence[Callable[[], Awaitable[Any]]], limit: int) -> None:
    """Run ``jobs`` with at most ``limit`` in flight; the first failure cancels the rest."""
    sem = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await job()

    async with asyncio.TaskGroup() as tg:
        for job in jobs:
            tg.create_task(one(job))


def main(argv: Sequence[str] | None = None) -> int:
    """Script mode, mainly for benchmarks: generate, then print row counts and sizes."""
    parser = argparse.ArgumentParser(
        prog="python -m mt5backupd.testkit.sampledata",
        description="Fill a PostgreSQL database with MT5-like sample trading data.",
    )
    parser.add_argument("--dsn", required=True, help="libpq/asyncpg URL of an empty database")
    parser.add_argument("--size-mb", type=float, required=True, help="target data size in MiB")
    parser.add_argument("--parallel", type=int, default=None, help="loader connections")
    parser.add_argument("--replace", action="store_true", help="drop existing MT5 tables first")
    args = parser.parse_args(argv)

    async def run() -> tuple[dict[str, int], int, int]:
        counts = await generate(
            args.dsn,
            target_bytes=int(args.size_mb * 1024 * 1024),
            parallel=args.parallel,
            replace=args.replace,
        )
        return counts, await data_bytes(args.dsn), await database_bytes(args.dsn)

    started = time.monotonic()
    try:
        counts, data, db = asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as err:
        print(f"sampledata: {err}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    for table in TABLES:
        print(f"{table:<10} {counts.get(table, 0):>12,d} rows")
    print(f"data size  {data / 2**20:>12,.1f} MiB (pg_database_size {db / 2**20:,.1f} MiB)")
    print(f"elapsed    {elapsed:>12.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
