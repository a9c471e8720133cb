"""Point-in-time recovery: the recovery point under steady inserts, and the primary's insert
rate with and without WAL streaming.

    .venv/bin/python bench/pitr.py [--seconds 8] [--rate 50] [--max-lag 1,10]

Recovery point: rows are inserted at ``--rate`` per second (each its own transaction, commit
time recorded by the server); at a moment X the whole trading host "dies": the WAL service is
cancelled without a last shipment and the primary is stopped immediately. Then a restore to
latest from the receiver alone is started and the newest row in it is compared with X:
``X - newest commit`` is the data a real loss would have cost (goal <= max_lag_s; with
``synchronous``, moonshot <= 1 s). Overhead: inserts/s for ``--seconds`` with the same client
loop, without and with pg_receivewal + shipper running. Restore time (``--wal-mb``, default
1024): a base backup, then that much WAL from bulk inserts, shipped; ``restore --pitr`` (local
copies: sha256 of each, zstd, extraction) + PostgreSQL recovery until promoted, against the bare
way with the same base and WAL: extract the plain tar, ``restore_command`` copying raw segments,
recovery until promoted (the tar and the raw segments prepared untimed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from common import machine_info

from mt5backupd.backup.run import run_base
from mt5backupd.config import Config, DatabaseConfig, LocalConfig, RemoteConfig, WalConfig
from mt5backupd.ops.pitr import WAL_SUBDIR, extract_base, recovery_settings, restore_pitr
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


def start_until_promoted(root: Path) -> float:
    """Seconds from pg_ctl start to the end of recovery (promoted); the server is destroyed."""
    server = PgCluster.adopt(root)
    t0 = time.monotonic()
    server.start(timeout=1800)
    try:
        while server.psql("SELECT pg_is_in_recovery()").strip() != "f":
            time.sleep(0.05)
        return time.monotonic() - t0
    finally:
        server.destroy()


async def restore_time(pg: PgCluster, cfg: Config, work: Path, wal_mb: int) -> None:
    service = WalService(cfg)
    service.start()
    try:
        while not service.receivewal.running:  # noqa: ASYNC110 - polls a child process
            await asyncio.sleep(0.05)
        assert (await run_base(cfg)).ok
        pg.psql("CREATE TABLE IF NOT EXISTS bulk (id bigint, pad text)", DB)
        start = int(pg.psql("SELECT pg_current_wal_lsn() - '0/0'").strip())
        while int(pg.psql("SELECT pg_current_wal_lsn() - '0/0'").strip()) - start \
                < wal_mb * 1024 * 1024:
            pg.psql("INSERT INTO bulk SELECT g, repeat(md5(g::text), 6) "
                    "FROM generate_series(1, 200000) g", DB)
        last = datetime.fromisoformat(pg.psql(
            "INSERT INTO deals (note) VALUES ('last') RETURNING committed", DB).strip())
        from mt5backupd.wal.shipper import ShippedIndex, shipped_dir
        while True:
            newest = ShippedIndex.load(shipped_dir(cfg)).newest_uploaded_at
            if newest and datetime.fromisoformat(newest) > last:
                break
            await asyncio.sleep(0.5)
    finally:
        await service.stop()
        pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    ours_root = make_root(work / "restore-ours")
    t0 = time.monotonic()
    result = await restore_pitr(cfg, "latest", ours_root / "data", source="local", to_time=None)
    fetch_s = time.monotonic() - t0
    # the bare inputs, prepared untimed: the plain base tar and the raw segments
    bare_root = make_root(work / "restore-bare")  # reachable by the postgres account
    raw_wal = bare_root / "raw-wal"
    shutil.copytree(ours_root / "data" / WAL_SUBDIR, raw_wal)
    plain_tar = work / "base.tar"
    scratch = work / "scratch-extract"
    extract_base(cfg.local.dir / result.base, scratch, [])
    with tarfile.open(plain_tar, "w") as tar:
        for entry in sorted(scratch.iterdir()):
            tar.add(entry, arcname=entry.name)
    shutil.rmtree(scratch)
    t1 = time.monotonic()
    with tarfile.open(plain_tar) as tar:
        tar.extractall(bare_root / "data", filter="data")
    (bare_root / "data").chmod(0o700)
    (bare_root / "data" / "recovery.signal").touch()
    with (bare_root / "data" / "postgresql.auto.conf").open("a") as conf:
        conf.write(recovery_settings(bare_root / "data", None).replace(
            str((bare_root / "data" / WAL_SUBDIR).resolve()), str(raw_wal)))
    extract_s = time.monotonic() - t1
    # the bare recovery first: the one that goes first pays for the writeback of the ~2 GB
    # both restores just wrote, so the baseline takes that cost, not mt5backupd
    bare_recover_s = await asyncio.to_thread(start_until_promoted, bare_root)
    recover_s = await asyncio.to_thread(start_until_promoted, ours_root)
    ours, bare = fetch_s + recover_s, extract_s + bare_recover_s
    print(f"restore of base + {wal_mb} MiB WAL ({result.wal_objects} objects): mt5backupd "
          f"{ours:.1f} s (restore --pitr {fetch_s:.1f} s + recovery {recover_s:.1f} s) vs bare "
          f"{bare:.1f} s (tar -x {extract_s:.1f} s + recovery {bare_recover_s:.1f} s): "
          f"{ours / bare:.2f}x")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--max-lag", default="1,10")
    ap.add_argument("--wal-mb", type=int, default=1024, help="0: skip the restore-time part")
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
            for lag in (float(x) for x in args.max_lag.split(",") if x):
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
            if args.wal_mb:
                await restore_time(pg, dataclasses.replace(
                    base, local=LocalConfig(dir=work / "local-restore")), work, args.wal_mb)
        rcv.stop()


if __name__ == "__main__":
    asyncio.run(main())
