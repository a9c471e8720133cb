"""Point-in-time recovery: the recovery point under steady inserts, and the primary's insert
rate with and without WAL streaming.

    .venv/bin/python bench/pitr.py [--seconds 8] [--rate 50] [--max-lag 1,10]

Recovery point: rows are inserted at ``--rate`` per second (each its own transaction, commit
time recorded by the server); at a moment X the whole trading host "dies": the WAL service is
cancelled without a last shipment and the primary is stopped immediately. Then a restore to
latest from the receiver alone is started and the newest row in it is compared with X:
``X - newest commit`` is the data a real loss would have cost (goal <= max_lag_s; with
``synchronous``, moonshot <= 1 s). Overhead: inserts/s for ``--seconds`` with the same client
loop, without and with pg_receivewal + shipper running. Not measured here (yet): restore time
of a base + 1 GB of WAL against bare pg_basebackup + recovery.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from common import machine_info

from mt5backupd.backup.run import run_base
from mt5backupd.config import Config, DatabaseConfig, LocalConfig, RemoteConfig, WalConfig
from mt5backupd.ops.pitr import restore_pitr
from mt5backupd.receiver import auth
from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.pghost import make_root
from mt5backupd.testkit.receiverproc import ReceiverProcess
from mt5backupd.wal.service import WalService

DB = "bench"


async def insert_loop(dsn: str, seconds: float, rate: float) -> int:
    """Insert for ``seconds`` at most ``rate``/s (0: as fast as one connection goes)."""
    conn = await asyncpg.connect(dsn)
    try:
        n, t0 = 0, time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            await conn.execute("INSERT INTO deals (note) VALUES ('x')")
            n += 1
            if rate and n / rate > elapsed:
                await asyncio.sleep(n / rate - elapsed)
        return n
    finally:
        await conn.close()


async def recovery_point(pg: PgCluster, cfg: Config, work: Path, seconds: float,
                         rate: float) -> float:
    service = WalService(cfg)
    service.start()
    try:
        while not service.receivewal.running:  # noqa: ASYNC110 - polls a child process
            await asyncio.sleep(0.05)
        assert (await run_base(cfg)).ok
        await insert_loop(pg.dsn(DB), seconds, rate)
    finally:
        for task in service._tasks:  # the host dies: no orderly last shipment
            task.cancel()
        lost_at = datetime.now(UTC)
        pg.stop("immediate")
        await service.stop()
    root = make_root(work / f"restore-{cfg.wal.max_lag_s}-{cfg.wal.synchronous}")
    await restore_pitr(cfg, "latest", root / "data", source="remote", to_time=None)
    restored = PgCluster.adopt(root)
    restored.start()
    try:
        while restored.psql("SELECT pg_is_in_recovery()").strip() != "f":  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        newest = restored.psql("SELECT max(committed) FROM deals", DB).strip()
    finally:
        restored.destroy()
        pg.start()
        pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    return (lost_at - datetime.fromisoformat(newest)).total_seconds()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--max-lag", default="1,10")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mt5-pitr-bench-") as tmp:
        work = Path(tmp)
        rcv = ReceiverProcess(work / "receiver")
        (work / "receiver").mkdir()
        token = auth.add_token(rcv.tokens_file, "bench", admin=False)
        rcv.start()
        token_file = work / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        with PgCluster.create(work / "pg", replication=True) as pg:
            pg.create_database(DB)
            pg.psql("CREATE TABLE deals (id bigserial PRIMARY KEY, note text, committed "
                    "timestamptz DEFAULT clock_timestamp())", DB)
            print({**machine_info(work), "postgres": pg.server_version()})
            base = Config(
                database=DatabaseConfig(host=pg.host, port=pg.port, user=pg.user, dbname=DB),
                local=LocalConfig(dir=work / "local"),
                remote=RemoteConfig(url=rcv.url, token_file=token_file, retry_delay_s=0.2),
                wal=WalConfig(enabled=True, slot="bench", pg_receivewal=str(
                    pg.bin_dir / "pg_receivewal"), pg_basebackup=str(pg.bin_dir / "pg_basebackup")))
            for lag in (float(x) for x in args.max_lag.split(",")):
                for synchronous in (False, True):
                    cfg = dataclasses.replace(
                        base, local=LocalConfig(dir=work / f"local-{lag}-{synchronous}"),
                        wal=dataclasses.replace(base.wal, max_lag_s=lag,
                                                synchronous=synchronous))
                    rp = await recovery_point(pg, cfg, work, args.seconds, args.rate)
                    print(f"recovery point: max_lag_s={lag:g} synchronous={synchronous}: "
                          f"{rp:.2f} s of commits lost ({'within' if rp <= lag else 'OVER'} "
                          "max_lag_s)")
            plain = await insert_loop(pg.dsn(DB), args.seconds, 0) / args.seconds
            service = WalService(dataclasses.replace(base, local=LocalConfig(dir=work / "ovh")))
            service.start()
            try:
                streaming = await insert_loop(pg.dsn(DB), args.seconds, 0) / args.seconds
            finally:
                await service.stop()
            print(f"insert rate, one connection: {plain:.0f}/s without WAL streaming, "
                  f"{streaming:.0f}/s with (ratio {streaming / plain:.2f})")
        rcv.stop()


if __name__ == "__main__":
    asyncio.run(main())
