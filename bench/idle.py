"""Idle cost of the daemon: RSS and CPU of `mt5backupd run` over an idle period.

Starts the real daemon (no database is contacted while idle; the schedule never fires during the
measurement), scrapes /metrics once a second like an eager Prometheus would, and reports RSS and
CPU time from /proc. Baseline in the same run: a bare `python -c "import time; time.sleep()"`.

    python bench/idle.py [--seconds 60] [--scrape-interval-s 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mt5backupd.testkit.pghost import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(pid: int, seconds: float, scrape_url: str | None, interval_s: float
            ) -> tuple[float, float, float]:
    """(CPU %, RSS MB at the end, peak RSS MB) over ``seconds``."""
    c0, t0 = cpu_s(pid), time.monotonic()
    while time.monotonic() - t0 < seconds:
        if scrape_url:
            with urllib.request.urlopen(scrape_url, timeout=5) as resp:
                resp.read()
        time.sleep(interval_s)
    elapsed = time.monotonic() - t0
    return (100 * (cpu_s(pid) - c0) / elapsed, rss_mb(pid), rss_mb(pid, "VmHWM"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--scrape-interval-s", type=float, default=1.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mt5b-idle-"))
    port = free_port()
    config = work / "config.toml"
    config.write_text(
        f'[local]\ndir = "{work / "backups"}"\n'
        '[schedule]\ndatabase = "0 3 1 1 *"\nupload_pending = ""\nrepository = ""\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n')
    baseline = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    daemon = subprocess.Popen([sys.executable, "-m", "mt5backupd", "run", "--config",
                               str(config)], stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(2)  # let start-up settle
        d_cpu, d_rss, d_peak = measure(daemon.pid, args.seconds, url, args.scrape_interval_s)
        b_cpu, b_rss, _ = measure(baseline.pid, 5, None, 1)
    finally:
        for proc in (daemon, baseline):
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"idle daemon over {args.seconds:.0f} s, /metrics scraped every "
          f"{args.scrape_interval_s:g} s:")
    print(f"  CPU {d_cpu:.2f} %   RSS {d_rss:.1f} MB (peak {d_peak:.1f} MB)")
    print(f"  baseline (bare python sleeping): CPU {b_cpu:.2f} %, RSS {b_rss:.1f} MB")
    print(f"  RSS over baseline: {d_rss - b_rss:.1f} MB; target RSS < 60 MB, CPU ~0 %: "
          f"{'meets' if d_rss < 60 and d_cpu < 1 else 'MISSES'}")
    print()
    print("| idle daemon | CPU % | RSS MB | peak RSS MB |")
    print("|---|---:|---:|---:|")
    print(f"| `mt5backupd run`, {args.seconds:.0f} s, scraped every {args.scrape_interval_s:g} s "
          f"| {d_cpu:.2f} | {d_rss:.1f} | {d_peak:.1f} |")
    print(f"| baseline: bare `python` sleeping | {b_cpu:.2f} | {b_rss:.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
