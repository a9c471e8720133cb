"""Encryption benchmark: encrypted `--run-now` and `restore` against the same runs unencrypted.

One run: a throwaway PostgreSQL with a generated MT5-like database (--size-mb MiB of table
data), two configs that differ only in ``[encryption] recipients`` (local backups, the default
compression, each in its own directory), then, alternating so drift hits both alike:

1. ``mt5backupd --run-now`` unencrypted and encrypted (wall time of the whole process, best of
   --repeat; target: encrypted <= 1.05x), and the peak RSS of each run (the largest of the
   process and the children it reaped, pg_dump included: ``ru_maxrss`` of a fresh wrapper per
   run; target: flat, under 80 MB);
2. ``mt5backupd restore latest --create`` of each newest backup into a fresh database (the
   encrypted one with ``--identity``; target: <= 1.05x).

    python bench/encryption.py [--size-mb 300] [--repeat 3]
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
from datetime import UTC, datetime
from pathlib import Path

from common import machine_info
from pyrage import x25519

from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.sampledata import generate

TARGET_RATIO = 1.05
TARGET_RSS_MB = 80.0
# The command run in a fresh interpreter that reports its children's peak RSS (KiB) last.
WRAPPER = ("import resource, subprocess, sys\n"
           "done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)\n"
           "sys.stdout.buffer.write(done.stdout)\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
           "sys.exit(done.returncode)\n")


def run_wrapped(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, stdout) of one command."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *argv], env=env, capture_output=True,
                          text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv[3:5]} failed ({done.returncode}): {done.stderr[-2000:]}")
    rss_kib = int(done.stderr.strip().splitlines()[-1])
    return wall, rss_kib / 1024, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mt5b-bench-enc-", dir="/var/tmp"))
    os.chmod(work, 0o755)  # noqa: S103 - the postgres user must traverse it (no secrets inside)
    mt5 = [sys.executable, "-m", "mt5backupd"]
    try:
        with PgCluster.create(work / "pg") as pg:
            pg.create_database("mt5_trading")
            t0 = time.monotonic()
            asyncio.run(generate(pg.dsn("mt5_trading"), target_bytes=args.size_mb * 1024**2))
            print(f"generated {args.size_mb} MiB of table data in {time.monotonic() - t0:.0f} s")
            identity = x25519.Identity.generate()
            key = work / "key.txt"
            key.write_text(f"{identity}\n")
            key.chmod(0o600)
            base = (f'[database]\nhost = "{pg.host}"\nport = {pg.port}\nuser = "{pg.user}"\n'
                    f'dbname = "mt5_trading"\npg_dump = "{pg.bin_dir / "pg_dump"}"\n'
                    f'pg_restore = "{pg.bin_dir / "pg_restore"}"\n[local]\nkeep = 2\n')
            configs = {}
            for name, extra in (("plain", ""), ("age", '[encryption]\nrecipients = '
                                                f'["{identity.to_public()}"]\n')):
                config = work / f"{name}.toml"
                config.write_text(base.replace("[local]\n", f'[local]\ndir = "{work / name}"\n')
                                  + extra)
                configs[name] = config
            env = {**os.environ, **pg.env("postgres")}
            backup_s: dict[str, list[float]] = {"plain": [], "age": []}
            rss_mb: dict[str, list[float]] = {"plain": [], "age": []}
            sizes: dict[str, int] = {}
            raw = 0
            for _ in range(args.repeat):
                for name in ("plain", "age"):
                    wall, rss, out = run_wrapped(
                        [*mt5, "--run-now", "--json", "--config", str(configs[name])], env)
                    result = json.loads(out)
                    backup_s[name].append(wall)
                    rss_mb[name].append(rss)
                    sizes[name] = int(result["size"])
                    raw = int(result["raw_bytes"])
            restore_s: dict[str, list[float]] = {"plain": [], "age": []}
            n = 0
            for _ in range(args.repeat):
                for name in ("plain", "age"):
                    n += 1
                    target = f"r_{name}_{n}"
                    identity_args = ["--identity", str(key)] if name == "age" else []
                    wall, _rss, _out = run_wrapped(
                        [*mt5, "restore", "latest", "--target-db", target, "--create",
                         "--no-owner", *identity_args, "--config", str(configs[name])], env)
                    restore_s[name].append(wall)
                    pg.drop_database(target)
            info = machine_info(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    b_plain, b_age = min(backup_s["plain"]), min(backup_s["age"])
    r_plain, r_age = min(restore_s["plain"]), min(restore_s["age"])
    peak_plain, peak_age = max(rss_mb["plain"]), max(rss_mb["age"])
    print()
    print(f"Run {datetime.now(UTC):%Y-%m-%d}, `--size-mb {args.size_mb}` (pg_dump -Fc -Z0 "
          f"output {raw / 1e6:.0f} MB; stored {sizes['plain'] / 1e6:.1f} MB zstd:1, "
          f"{sizes['age'] / 1e6:.1f} MB zstd:1 + age), best of {args.repeat}, alternating.")
    print(f"Machine: {info.get('nproc')} CPUs ({info.get('cpu')}), {info.get('memory', '?')}.\n")
    print("| Measurement | unencrypted | encrypted (age, 1 recipient) | ratio | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| `--run-now` wall s | {b_plain:.2f} | {b_age:.2f} | {b_age / b_plain:.3f} | "
          f"<= {TARGET_RATIO} ({verdict(b_age / b_plain <= TARGET_RATIO)}) |")
    print(f"| `--run-now` peak RSS MB (max of {args.repeat}) | {peak_plain:.0f} | "
          f"{peak_age:.0f} | {peak_age / peak_plain:.2f} | < {TARGET_RSS_MB:.0f} MB "
          f"({verdict(peak_age < TARGET_RSS_MB)}) |")
    print(f"| `restore latest --create` wall s | {r_plain:.2f} | {r_age:.2f} | "
          f"{r_age / r_plain:.3f} | <= {TARGET_RATIO} "
          f"({verdict(r_age / r_plain <= TARGET_RATIO)}) |")
    print(f"\nall runs: backup plain {[round(x, 2) for x in backup_s['plain']]}, age "
          f"{[round(x, 2) for x in backup_s['age']]}; restore plain "
          f"{[round(x, 2) for x in restore_s['plain']]}, age "
          f"{[round(x, 2) for x in restore_s['age']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
