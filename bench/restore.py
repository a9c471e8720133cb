"""Restore benchmark: `mt5backupd restore` against bare pg_restore of the same file.

One run: a throwaway PostgreSQL with a generated MT5-like database (--size-mb), one backup with
the default compression (`--run-now`, local only), then, alternating, the bare restore
(`zstd -dc FILE | pg_restore`, or a decompressed file with -j) and `mt5backupd restore` into fresh
databases. The ratio is ours / bare; target <= 1.1. Ours includes what bare skips: the sha256
check before touching the database, and the interpreter start.

    python bench/restore.py [--size-mb 1024] [--repeat 2] [--jobs 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.sampledata import generate


def timed(cmd: list[str] | str, env: dict[str, str], shell: bool = False) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, env=env, shell=shell, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--jobs", default="1,2")
    args = parser.parse_args()
    jobs_list = [int(j) for j in args.jobs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mt5b-bench-restore-", dir="/var/tmp"))
    os.chmod(work, 0o755)  # noqa: S103 - the postgres user must traverse it (no secrets inside)
    try:
        with PgCluster.create(work / "pg") as pg:
            pg.create_database("mt5_trading")
            t0 = time.monotonic()
            asyncio.run(generate(pg.dsn("mt5_trading"), target_bytes=args.size_mb * 1024**2))
            print(f"generated {args.size_mb} MiB of table data in {time.monotonic() - t0:.0f} s")
            config = work / "config.toml"
            config.write_text(
                f'[database]\nhost = "{pg.host}"\nport = {pg.port}\nuser = "{pg.user}"\n'
                f'dbname = "mt5_trading"\npg_dump = "{pg.bin_dir / "pg_dump"}"\n'
                f'pg_restore = "{pg.bin_dir / "pg_restore"}"\n[local]\ndir = "{work / "b"}"\n')
            mt5 = [sys.executable, "-m", "mt5backupd"]
            out = subprocess.run([*mt5, "--run-now", "--json", "--config", str(config)],
                                 capture_output=True, text=True, check=True)
            backup = json.loads(out.stdout)
            archive = Path(backup["file"])
            print(f"backup {archive.name}: {backup['size'] / 1e6:.0f} MB ({backup['compression']})")
            env = {**os.environ, **pg.env("postgres")}
            pg_restore = str(pg.bin_dir / "pg_restore")
            rows = []
            n = 0
            for jobs in jobs_list:
                bare_s, ours_s = [], []
                for _ in range(args.repeat):
                    n += 1
                    bare_db, our_db = f"bare_{n}", f"ours_{n}"
                    pg.create_database(bare_db)
                    if jobs == 1:
                        bare = (f"zstd -dc '{archive}' | '{pg_restore}' --exit-on-error "
                                f"--no-owner -d {bare_db}")
                        bare_s.append(timed(["bash", "-o", "pipefail", "-c", bare], env))
                    else:
                        plain = work / "plain.dump"
                        t_bare = time.monotonic()
                        subprocess.run(["zstd", "-q", "-f", "-d", str(archive), "-o", str(plain)],
                                       check=True)
                        timed([pg_restore, "--exit-on-error", "--no-owner", f"--jobs={jobs}",
                               "-d", bare_db, str(plain)], env)
                        bare_s.append(time.monotonic() - t_bare)
                        plain.unlink()
                    ours_s.append(timed([*mt5, "restore", "latest", "--target-db", our_db,
                                         "--create", "--no-owner", f"--jobs={jobs}",
                                         "--config", str(config)], env))
                    pg.drop_database(bare_db)
                    pg.drop_database(our_db)
                b, o = min(bare_s), min(ours_s)
                rows.append((jobs, b, o))
                print(f"jobs={jobs}: bare {b:.1f} s, mt5backupd restore {o:.1f} s, "
                      f"ratio {o / b:.3f} ({'meets' if o / b <= 1.1 else 'MISSES'} <= 1.1)")
            print()
            print(f"Database: {args.size_mb} MiB of generated MT5 data; backup "
                  f"{backup['size'] / 1e6:.0f} MB `{backup['compression']}`; best of "
                  f"{args.repeat}.\n")
            print("| restore | bare pg_restore s | `mt5backupd restore` s | ratio | target |")
            print("|---|---:|---:|---:|---|")
            for jobs, b, o in rows:
                how = "`zstd -dc \\| pg_restore`" if jobs == 1 else \
                    f"`zstd -d` + `pg_restore -j {jobs}`"
                print(f"| jobs {jobs} ({how}) | {b:.1f} | {o:.1f} | {o / b:.3f} | <= 1.1 "
                      f"({'meets' if o / b <= 1.1 else 'MISSES'}) |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
