"""Backup benchmark: `mt5backupd --run-now` against bare pg_dump and the legacy script's flow.

Run it (from the repository root)::

    .venv/bin/python bench/backup.py                  # 1 GiB database, everything
    .venv/bin/python bench/backup.py --size-mb 256 --skip-table

What it measures, in one run, on a throwaway PostgreSQL cluster filled by
``mt5backupd.testkit.sampledata`` with ``--size-mb`` MiB of MT5-like data, and a real
``mt5backupd receiver`` subprocess on loopback:

1. **Baseline A**: bare ``pg_dump -Fc -Z0 > /dev/null`` (best of ``--repeat``), and beside each
   run the **floor F**: ``pg_dump -Fc -Z0 | zstd -LEVEL -T1 > FILE`` at the default level, C tools
   only: what compressing alone costs on this machine (ratios of the medians to A and to ours).
2. **Default**: ``mt5backupd --run-now`` (a subprocess, with the default compression
   ``mt5backupd.config.DEFAULT_COMPRESSION``): dump, compress, hash, spool, upload concurrently,
   pg_restore --list, commit. Wall time (best of ``--repeat``), its ratio to A (target <= 1.3),
   and the manifest's ``dump_duration_s``.
3. **Legacy flow**: ``pg_dump -Fc -Z9 -f FILE``, then ``sha256sum FILE``, then ``curl -F
   file=@FILE`` to the same receiver's legacy endpoint, one after the other. Ratio legacy/ours
   (target >= 8) and stored size ours/legacy (target <= 1.2).
4. **Pipeline overhead** at equal compression: ``--run-now`` with ``gzip:6`` against bare
   ``pg_dump -Fc -Z6 > /dev/null`` (target <= 1.05; both best of ``--repeat``).
5. **Peak RSS** of the ``--run-now`` process at the main size and a quarter of it: GNU
   ``/usr/bin/time -v`` (maximum over the process and the children it reaped, pg_dump
   included) when installed, plus the Python process's own VmHWM polled from /proc
   (target: flat, under 80 MB).
6. **Compression table** (unless ``--skip-table``): stored size, wall time, ratio to A and
   peak RSS of ``--run-now`` with none, gzip:1/6/9 and zstd:1/3/4/5/6/9/12 (zstd:12 skipped
   when zstd:9 already took over 4x A), the default level with ``compression_threads`` 1 and 0,
   plus the shell pipeline ``pg_dump -Z0 | zstd -T2 -3 > /dev/null`` for reference.

For every timed command it also records where the CPU went (polled from /proc): the
mt5backupd Python process (event-loop thread and every other thread: the pump, zstd workers,
executor), pg_dump, pg_restore, the PostgreSQL backend, the receiver, and everything else on
the machine ("other processes"). The machine may be shared: before each step the script waits
(``--quiet-timeout-s``) for it to be idle, and a step during which other processes used a
noticeable share of the CPU is measured again (``--max-attempts``); what remains is listed as
noise. Everything lives in one temp dir on the disk of ``--dir`` (default /var/tmp), removed at
the end with the receiver and the cluster stopped, unless ``--keep-dir``. 1 MB = 10^6 bytes;
1 MiB = 2^20 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import asyncpg
import common  # bench/common.py: this script's directory is on sys.path
import zstandard

from mt5backupd.config import DEFAULT_COMPRESSION, DatabaseConfig, parse_compression
from mt5backupd.receiver import auth
from mt5backupd.testkit.dbcontent import data_bytes
from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.receiverproc import ReceiverProcess
from mt5backupd.testkit.sampledata import generate

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000
MAIN_DB = "mt5_trading"
SMALL_DB = "mt5_quarter"
CLIENT = "bench"
GNU_TIME = "/usr/bin/time"
RANDOM_POOL_BYTES = 64 * MiB
FREE_MARGIN_BYTES = 2 * GiB

TARGET_DEFAULT_RATIO = 1.1  # --run-now (default compression) / bare -Z0 dump, medians
TARGET_LEGACY_SPEEDUP = 10.0  # legacy flow / --run-now (issue 14)
TARGET_SIZE_RATIO = 1.2  # our stored size / legacy -Z9 file
TARGET_OVERHEAD = 1.05  # --run-now gzip:6 / bare -Z6 dump
TARGET_RSS_BYTES = 80 * MB
RSS_FLAT_TOLERANCE = 1.15  # main-size peak within 15% of the quarter-size peak counts as flat

TABLE_COMPRESSIONS = ("none", "gzip:1", "gzip:6", "gzip:9", "zstd:1", "zstd:3", "zstd:4",
                      "zstd:5", "zstd:6", "zstd:9", "zstd:12")
# Every row runs with the default [database] compression_threads; the default level also runs
# with the other thread counts (zstd worker threads cost CPU on two cores, and their job buffers
# are most of the process's memory).
DEFAULT_THREADS = DatabaseConfig().compression_threads
THREAD_VARIANTS = tuple((DEFAULT_COMPRESSION, t) for t in (2, 1, 0) if t != DEFAULT_THREADS)
TABLE_ROWS: tuple[tuple[str, str, int | None], ...] = (
    *((c, c, None) for c in TABLE_COMPRESSIONS),
    *((f"{c} threads={t}", c, t) for c, t in THREAD_VARIANTS),
)
MAX_ATTEMPTS = 3  # a step disturbed by other processes is measured again, up to this often
SLOW_LEVEL = "zstd:12"
SLOW_SKIP_RATIO = 4.0  # skip zstd:12 when zstd:9 already took this many times A


# ---------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    print(msg, flush=True)


def fmt_mb(n: int | float) -> str:
    return f"{n / MB:.1f} MB"


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def clean_env() -> dict[str, str]:
    """The environment for every child: no inherited libpq or legacy mt5backupd variables."""
    legacy = ("POSTGRES_", "BACKUP_", "KEEP_LOCAL_BACKUPS", "MAX_RETRIES", "RETRY_DELAY",
              "LOG_DIR", "MT5BACKUPD_CONFIG")
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PG") and not k.startswith(legacy)}


def stop_group(proc: subprocess.Popen[Any], timeout_s: float = 15.0) -> None:
    """SIGTERM the child's process group (it runs in its own session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------- machine description


def machine_info(path: Path, pg_version: str) -> dict[str, str]:
    return {
        **common.machine_info(path),
        "postgresql": pg_version,
        "zstandard": f"{zstandard.__version__} ({zstandard.backend})",
        "gnu time": GNU_TIME if gnu_time_available() else "not installed (RSS polled)",
    }


def gnu_time_available() -> bool:
    if not (os.access(GNU_TIME, os.X_OK) and shutil.which("time")):
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([GNU_TIME, "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
        return "GNU" in out.stdout + out.stderr
    return False


# ---------------------------------------------------------------- /proc sampling


def read_stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, ppid, CPU seconds user+system) of ``pid``; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick


def read_mem(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of ``pid`` in bytes; zeros when gone."""
    hwm = rss = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * KiB
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * KiB
    return hwm, rss


def thread_cpu(pid: int) -> dict[int, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (task / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


@dataclass
class Tracked:
    group: str
    comm: str
    cpu0: float  # CPU seconds at first sight (0 for processes born during the measurement)
    cpu: float
    hwm: int = 0


class TreeSampler:
    """Polls the CPU time of process trees (and the memory of the measured one) in a thread.

    Groups: ``run`` (the measured command and its descendants), ``postgres`` (the postmaster
    and its children: the backend serving pg_dump), ``receiver``. The tree is rescanned every
    ``rescan_every`` ticks; tracked processes are read every tick.
    """

    def __init__(self, run_pid: int, others: dict[str, int], interval_s: float,
                 rescan_every: int = 5) -> None:
        self.roots = {run_pid: "run", **{pid: g for g, pid in others.items() if pid}}
        self.run_pid = run_pid
        self.interval_s = interval_s
        self.rescan_every = rescan_every
        self.tracked: dict[int, Tracked] = {}
        self.python_pid: int | None = None
        self.threads: dict[int, float] = {}
        self.tree_rss_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._scan(first=True)

    def _group_of(self, pid: int, parents: dict[int, int]) -> str | None:
        seen = 0
        while pid > 1 and seen < 64:
            if pid in self.roots:
                return self.roots[pid]
            pid = parents.get(pid, 0)
            seen += 1
        return None

    def _scan(self, *, first: bool = False) -> None:
        info: dict[int, tuple[str, int, float]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                st = read_stat(int(entry.name))
                if st is not None:
                    info[int(entry.name)] = st
        parents = {pid: st[1] for pid, st in info.items()}
        for pid, (comm, _ppid, cpu) in info.items():
            if pid in self.tracked:
                continue
            group = self._group_of(pid, parents)
            if group is None:
                continue
            base = cpu if first and group != "run" else 0.0
            self.tracked[pid] = Tracked(group, comm, base, cpu)
            if group == "run" and comm.startswith("python") and self.python_pid is None:
                self.python_pid = pid

    def _tick(self) -> None:
        tree_rss = 0
        for pid, t in self.tracked.items():
            st = read_stat(pid)
            if st is None:
                continue
            t.comm, t.cpu = st[0], st[2]
            if t.group == "run" and self.python_pid is None and t.comm.startswith("python"):
                self.python_pid = pid  # seen first between fork and exec (as "time")
            if t.group == "run":
                hwm, rss = read_mem(pid)
                t.hwm = max(t.hwm, hwm)
                tree_rss += rss
        self.tree_rss_peak = max(self.tree_rss_peak, tree_rss)
        if self.python_pid is not None:
            # merged, not replaced: threads that exit (zstd workers, executor) keep their total
            self.threads.update(thread_cpu(self.python_pid))
        self.samples += 1

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                if n % self.rescan_every == 0:
                    self._scan()
                self._tick()
            n += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_by(self, group: str, comm_prefix: str = "") -> float:
        return sum(t.cpu - t.cpu0 for t in self.tracked.values()
                   if t.group == group and t.comm.startswith(comm_prefix))

    def hwm_of(self, comm_prefix: str) -> int:
        return max((t.hwm for t in self.tracked.values()
                    if t.group == "run" and t.comm.startswith(comm_prefix)), default=0)


@dataclass
class CpuProfile:
    """CPU seconds spent during one measurement, by who spent them."""

    python_loop: float = 0.0  # mt5backupd's main thread: event loop, aiohttp client, logging
    python_threads: list[float] = field(default_factory=list)  # pump, zstd workers, executor
    python_total: float = 0.0
    pg_dump: float = 0.0
    pg_restore: float = 0.0
    tools: float = 0.0  # sha256sum, curl, zstd in the legacy/shell flows
    postgres: float = 0.0  # the backend serving pg_dump (and anything else the cluster did)
    receiver: float = 0.0
    foreign: float = 0.0  # CPU of everything else on the machine (other users' jobs) meanwhile
    steal: float = 0.0  # time the hypervisor gave our vCPUs to someone else

    @classmethod
    def from_sampler(cls, s: TreeSampler) -> CpuProfile:
        loop = 0.0
        others: list[float] = []
        if s.python_pid is not None:
            for tid, cpu in s.threads.items():
                if tid == s.python_pid:
                    loop = cpu
                else:
                    others.append(cpu)
        python = s.cpu_by("run", "python")
        dump = s.cpu_by("run", "pg_dump")
        restore = s.cpu_by("run", "pg_restore")
        tools = max(0.0, s.cpu_by("run") - python - dump - restore)
        return cls(loop, sorted(others, reverse=True), python, dump, restore, tools,
                   s.cpu_by("postgres"), s.cpu_by("receiver"))

    @property
    def total(self) -> float:
        return (self.python_total + self.pg_dump + self.pg_restore + self.tools + self.postgres
                + self.receiver)

    def line(self) -> str:
        parts = []
        if self.python_total:
            top = "+".join(f"{c:.1f}" for c in self.python_threads[:4] if c >= 0.05)
            parts.append(f"mt5backupd {self.python_total:.1f} (loop {self.python_loop:.1f}, "
                         f"threads {top or '0'})")
        parts.append(f"pg_dump {self.pg_dump:.1f}")
        if self.pg_restore:
            parts.append(f"pg_restore {self.pg_restore:.1f}")
        if self.tools:
            parts.append(f"tools {self.tools:.1f}")
        parts.append(f"postgres {self.postgres:.1f}")
        parts.append(f"receiver {self.receiver:.1f}")
        noise = f"; other processes {self.foreign:.1f}"
        if self.steal >= 0.1:
            noise += f", steal {self.steal:.1f}"
        return f"CPU s: {', '.join(parts)}; total {self.total:.1f}{noise}"


def cpu_times() -> tuple[float, float]:
    """Machine-wide (busy, steal) CPU seconds from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def wait_quiet(timeout_s: float, window_s: float = 2.0, max_cores: float = 0.15) -> float:
    """Wait until the machine is idle (busy < ``max_cores`` over ``window_s``), at most
    ``timeout_s``: other people's tests and benchmarks on a shared box would skew a timing.
    Returns the busy fraction of the last window (cores)."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy0, _ = cpu_times()
        time.sleep(window_s)
        busy = (cpu_times()[0] - busy0) / window_s
        if busy < max_cores or time.monotonic() >= deadline:
            return busy


def is_disturbed(cpu: CpuProfile, wall_s: float) -> bool:
    """Other processes (or the hypervisor) took a noticeable share of the CPU meanwhile."""
    return cpu.foreign > max(0.3, 0.05 * wall_s) or cpu.steal > 0.05 * wall_s


# ---------------------------------------------------------------- running measured commands


@dataclass
class Timed:
    label: str
    wall_s: float
    cpu: CpuProfile
    time_v: dict[str, str] = field(default_factory=dict)
    python_hwm: int = 0
    pg_dump_hwm: int = 0
    tree_rss_peak: int = 0
    samples: int = 0
    busy_before: float = 0.0  # cores busy just before the step (after waiting for quiet)

    @property
    def disturbed(self) -> bool:
        return is_disturbed(self.cpu, self.wall_s)

    @property
    def max_rss(self) -> int | None:
        """GNU time's "Maximum resident set size": the largest single process of the tree."""
        value = self.time_v.get("Maximum resident set size (kbytes)")
        return int(value) * KiB if value else None


def parse_time_v(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, sep, value = line.strip().rpartition(": ")
            if sep:
                out[key] = value.strip()
    return out


class Bench:
    """The shared state of one benchmark run: cluster, receiver, directories, options."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.gnu_time = gnu_time_available()
        self.interval_s = 0.05 if self.gnu_time else 0.02
        self.pg: PgCluster | None = None
        self.client_token = ""
        self.admin_token = ""
        self.token_file = work / "remote-token"
        self.pool = os.urandom(RANDOM_POOL_BYTES)
        self.prewarm_bytes = 0
        self.seq = 0
        self.env = clean_env()
        self.rx = ReceiverProcess(
            work / "receiver", env=self.env,
            extra_toml=f"max_upload_bytes = {1024 * GiB}\npartial_ttl_s = 86400\n",
        )
        self.busy_before = 0.0

    # -- cluster -------------------------------------------------------------------------

    @property
    def cluster(self) -> PgCluster:
        assert self.pg is not None
        return self.pg

    def pg_env(self, db: str) -> dict[str, str]:
        return {**self.env, **self.cluster.env(db)}

    def pg_bin(self, tool: str) -> str:
        return str(self.cluster.bin_dir / tool)

    # -- receiver ------------------------------------------------------------------------

    @property
    def rx_url(self) -> str:
        return self.rx.url

    def start_receiver(self, timeout_s: float = 30.0) -> None:
        self.rx.workdir.mkdir()
        self.client_token = auth.add_token(self.rx.tokens_file, CLIENT, admin=False)
        self.admin_token = auth.add_token(self.rx.tokens_file, "ops", admin=True)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.client_token + "\n")
        self.rx.start(timeout_s)

    def receiver_log_tail(self) -> str:
        return self.rx.log_tail()

    @property
    def rx_pid(self) -> int:
        return self.rx.proc.pid if self.rx.proc is not None else 0

    def rx_call(self, method: str, path: str) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.rx_url}{path}", method=method,
                                     headers={"Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
        parsed: dict[str, Any] = json.loads(raw) if raw.strip() else {}
        return parsed

    def clear_receiver(self) -> None:
        """Delete what the bench client stored, so the disk does not fill over the run."""
        listing = self.rx_call("GET", f"/api/backup/list?client={CLIENT}")
        for record in listing.get("backups", []):
            backup = urllib.parse.quote(str(record["id"]), safe="")
            self.rx_call("DELETE", f"/api/backup/{backup}?client={CLIENT}")

    def receiver_sizes(self) -> dict[str, int]:
        listing = self.rx_call("GET", f"/api/backup/list?client={CLIENT}")
        return {str(r["id"]): int(r["size"]) for r in listing.get("backups", [])}

    # -- the page cache ------------------------------------------------------------------

    def settle(self) -> None:
        """Before each timed step: flush earlier writes, then (unless --no-prewarm) fill and
        drop page cache so the step runs on host-backed memory (see the markdown note)."""
        os.sync()
        self.busy_before = wait_quiet(self.args.quiet_timeout_s) if self.args.quiet_timeout_s else 0
        if self.busy_before >= 0.15:
            log(f"   (machine still busy: {self.busy_before:.2f} cores used by others)")
        if self.args.no_prewarm or not self.prewarm_bytes:
            return
        path = self.work / "prewarm.bin"
        view = memoryview(self.pool)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            written = 0
            while written < self.prewarm_bytes:
                written += os.write(fd, view[: min(len(view), self.prewarm_bytes - written)])
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    # -- measured commands ---------------------------------------------------------------

    def timed(self, label: str, argv: Sequence[str], *, env: dict[str, str],
              stdout: IO[bytes] | int | None = subprocess.DEVNULL,
              stderr_path: Path | None = None, check: bool = True,
              pipe_into: Sequence[str] | None = None) -> Timed:
        """Run ``argv`` (under GNU time when available) with CPU/RSS sampling; ``pipe_into``
        adds a second command reading its stdout (a shell-like pipeline, without a shell)."""
        self.seq += 1
        time_file = self.work / f"time-{self.seq}.txt"
        err_path = stderr_path or self.work / f"stderr-{self.seq}.txt"
        full = [GNU_TIME, "-v", "-o", str(time_file), *argv] if self.gnu_time else list(argv)
        others = {"postgres": self.cluster.pid or 0, "receiver": self.rx_pid}
        busy0, steal0 = cpu_times()
        self0 = time.process_time()
        with err_path.open("ab") as err:
            t0 = time.perf_counter()
            first = subprocess.Popen(full, stdout=subprocess.PIPE if pipe_into else stdout,
                                     stderr=err, env=env, start_new_session=True)
            second: subprocess.Popen[bytes] | None = None
            try:
                if pipe_into:
                    assert first.stdout is not None
                    second = subprocess.Popen(list(pipe_into), stdin=first.stdout, stdout=stdout,
                                              stderr=err, env=env, start_new_session=True)
                    first.stdout.close()
                sampler = TreeSampler(first.pid, others, self.interval_s)
                if second is not None:
                    sampler.roots[second.pid] = "run"
                with sampler:
                    rc = first.wait()
                    rc2 = second.wait() if second is not None else 0
                wall = time.perf_counter() - t0
            except BaseException:
                stop_group(first, 5)
                if second is not None:
                    stop_group(second, 5)
                raise
        if check and (rc != 0 or rc2 != 0):
            tail = err_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{label}: exit status {rc}/{rc2}: {tail}")
        busy1, steal1 = cpu_times()
        profile = CpuProfile.from_sampler(sampler)
        ours = profile.total + time.process_time() - self0  # this script: sampler, waits
        profile.foreign = max(0.0, busy1 - busy0 - ours)
        profile.steal = steal1 - steal0
        time_v = parse_time_v(time_file) if self.gnu_time else {}
        busy_before, self.busy_before = self.busy_before, 0.0
        return Timed(label, wall, profile, time_v, sampler.hwm_of("python"),
                     sampler.hwm_of("pg_dump"), sampler.tree_rss_peak, sampler.samples,
                     busy_before)

    def measure(self, fn: Callable[[], T], timed_of: Callable[[T], Timed]) -> T:
        """``fn()``, again (up to --max-attempts) while other processes disturbed it; the least
        disturbed attempt counts."""
        attempts: list[T] = []
        for _ in range(max(1, self.args.max_attempts)):
            result = fn()
            attempts.append(result)
            t = timed_of(result)
            if not t.disturbed:
                return result
            log(f"   (disturbed: {t.label} {t.wall_s:.2f} s while other processes used "
                f"{t.cpu.foreign:.1f} CPU s; measuring again)")
        return min(attempts, key=lambda r: timed_of(r).cpu.foreign)

    def bare_dump(self, level: int, db: str = MAIN_DB) -> Timed:
        return self.measure(lambda: self._bare_dump(level, db), lambda t: t)

    def _bare_dump(self, level: int, db: str) -> Timed:
        self.settle()
        return self.timed(f"pg_dump -Fc -Z{level} > /dev/null",
                          [self.pg_bin("pg_dump"), "-Fc", f"-Z{level}", "-d", db],
                          env=self.pg_env(db))

    def verify_default(self, compression: str) -> dict[str, Any]:
        """One more (untimed) default `--run-now`, kept, then `mt5backupd verify` of it: the
        test restore compares every table's rows with the counts the run read off the stream."""
        keep = self.args.keep_dir
        self.args.keep_dir = True
        config = self.work / f"run-{self.seq + 1}" / "config.toml"  # the run's own directory
        try:
            self._run_now(compression, MAIN_DB, None)
        finally:
            self.args.keep_dir = keep
        proc = subprocess.run([sys.executable, "-m", "mt5backupd", "verify", "--json",
                               "--config", str(config)], env=self.env, capture_output=True,
                              text=True, check=False)
        try:
            outcome: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            outcome = {"result": f"no JSON (exit {proc.returncode}): {proc.stderr[-500:]}"}
        if not keep:
            shutil.rmtree(config.parent / "spool", ignore_errors=True)
        return outcome

    def run_now(self, compression: str, db: str = MAIN_DB,
                threads: int | None = None) -> RunNow:
        return self.measure(lambda: self._run_now(compression, db, threads), lambda r: r.timed)

    def _run_now(self, compression: str, db: str, threads: int | None) -> RunNow:
        self.seq += 1
        run_dir = self.work / f"run-{self.seq}"
        spool_dir = run_dir / "spool"
        run_dir.mkdir()
        pg = self.cluster
        config = run_dir / "config.toml"
        config.write_text(
            "[database]\n"
            f'host = "{pg.host}"\n'
            f"port = {pg.port}\n"
            f'user = "{pg.user}"\n'
            f'dbname = "{db}"\n'
            f'pg_dump = "{self.pg_bin("pg_dump")}"\n'
            f'pg_restore = "{self.pg_bin("pg_restore")}"\n'
            f'compression = "{compression}"\n'
            + (f"compression_threads = {threads}\n" if threads is not None else "")
            + "[local]\n"
            f'dir = "{spool_dir}"\n'
            "keep = 1\n"
            "[remote]\n"
            f'url = "{self.rx_url}"\n'
            f'token_file = "{self.token_file}"\n'
            "retry_delay_s = 0.5\n"
        )
        self.settle()
        out_path = run_dir / "result.json"
        with out_path.open("wb") as out:
            timed = self.timed(
                f"--run-now {compression}" + (f" threads={threads}" if threads is not None
                                               else ""),
                [sys.executable, "-m", "mt5backupd", "--run-now", "--json", "--config",
                 str(config)],
                env=self.env, stdout=out, stderr_path=run_dir / "stderr.log", check=False)
        try:
            result: dict[str, Any] = json.loads(out_path.read_text())
        except ValueError:
            result = {}
        if not result.get("ok") or result.get("upload_state") != "uploaded":
            tail = (run_dir / "stderr.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"--run-now {compression} failed: {result or 'no JSON'}\n{tail}"
                               f"\nreceiver: {self.receiver_log_tail()}")
        manifests = [p for p in spool_dir.glob("*.json") if not p.name.startswith(".")]
        manifest: dict[str, Any] = json.loads(manifests[0].read_text()) if manifests else {}
        remote_size = self.receiver_sizes().get(Path(str(result["file"])).name, -1)
        if remote_size != int(result["size"]):
            raise RuntimeError(f"receiver holds {remote_size} bytes, local {result['size']}")
        run = RunNow(
            compression=compression, db=db, threads=threads, timed=timed,
            size=int(result["size"]),
            raw_bytes=int(result["raw_bytes"]), duration_s=float(result["duration_s"]),
            dump_duration_s=float(manifest.get("dump_duration_s", result["dump_duration_s"])),
        )
        if not self.args.keep_dir:
            shutil.rmtree(spool_dir, ignore_errors=True)
        self.clear_receiver()
        return run


@dataclass
class RunNow:
    compression: str
    db: str
    threads: int | None  # [database] compression_threads; None: the default
    timed: Timed
    size: int
    raw_bytes: int
    duration_s: float  # the run's own figure (preflight to rotation, no interpreter start-up)
    dump_duration_s: float  # the manifest's: pg_dump start to its exit (pump done)

    @property
    def wall_s(self) -> float:
        return self.timed.wall_s

    @property
    def key(self) -> str:
        return self.compression + (f" threads={self.threads}" if self.threads is not None else "")

    @property
    def rss(self) -> int:
        return self.timed.max_rss or self.timed.python_hwm


@dataclass
class Legacy:
    dump: Timed
    sha: Timed
    upload: Timed
    size: int

    @property
    def total_s(self) -> float:
        return self.dump.wall_s + self.sha.wall_s + self.upload.wall_s


# ---------------------------------------------------------------- the steps


def best(runs: Sequence[Timed]) -> Timed:
    return min(runs, key=lambda t: t.wall_s)


def best_run(runs: Sequence[RunNow]) -> RunNow:
    return min(runs, key=lambda r: r.wall_s)


def legacy_flow(b: Bench) -> Legacy:
    return b.measure(lambda: _legacy_flow(b), lambda lg: lg.dump)


def _legacy_flow(b: Bench) -> Legacy:
    legacy_dir = b.work / "legacy"
    legacy_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    path = legacy_dir / f"{MAIN_DB}_{stamp}.dump"
    b.settle()
    dump = b.timed("pg_dump -Fc -Z9 -f FILE",
                   [b.pg_bin("pg_dump"), "-Fc", "-Z9", "-f", str(path), "-d", MAIN_DB],
                   env=b.pg_env(MAIN_DB))
    size = path.stat().st_size
    sha = b.timed("sha256sum FILE", ["sha256sum", str(path)], env=b.env)
    out_path = legacy_dir / "curl.json"
    with out_path.open("wb") as out:
        upload = b.timed(
            "curl -F file=@FILE",
            ["curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {b.client_token}",
             "-F", f"file=@{path}", f"{b.rx_url}/api/backup/upload"],
            env=b.env, stdout=out)
    answer: dict[str, Any] = json.loads(out_path.read_text())
    if answer.get("status") != "ok" or int(answer.get("size", -1)) != size:
        raise RuntimeError(f"legacy upload: {answer}")
    if not b.args.keep_dir:
        path.unlink()
    b.clear_receiver()
    return Legacy(dump, sha, upload, size)


def shell_zstd(b: Bench) -> Timed | None:
    zstd = shutil.which("zstd")
    if zstd is None:
        return None
    return b.measure(lambda: _shell_zstd(b, zstd), lambda t: t)


def _shell_zstd(b: Bench, zstd: str) -> Timed:
    b.settle()
    return b.timed("pg_dump -Fc -Z0 | zstd -T2 -3 > /dev/null",
                   [b.pg_bin("pg_dump"), "-Fc", "-Z0", "-d", MAIN_DB], env=b.pg_env(MAIN_DB),
                   pipe_into=[zstd, "-T2", "-3", "-q", "-c"])


def zstd_floor(b: Bench, level: int) -> Timed | None:
    """The same bytes through C tools only: ``pg_dump -Fc -Z0 | zstd -LEVEL > FILE``
    (single-threaded, as our default pump compresses). What any compressing backup pays on this
    machine before hashing, parsing, uploading or verifying anything."""
    zstd = shutil.which("zstd")
    if zstd is None:
        return None
    return b.measure(lambda: _zstd_floor(b, zstd, level), lambda t: t)


def _zstd_floor(b: Bench, zstd: str, level: int) -> Timed:
    b.settle()
    out_path = b.work / "floor.dump.zst"
    try:
        with out_path.open("wb") as out:
            return b.timed(f"pg_dump -Fc -Z0 | zstd -{level} > FILE",
                           [b.pg_bin("pg_dump"), "-Fc", "-Z0", "-d", MAIN_DB],
                           env=b.pg_env(MAIN_DB), stdout=out,
                           pipe_into=[zstd, f"-{level}", "-T1", "-q", "-c"])
    finally:
        out_path.unlink(missing_ok=True)


async def _prepare_databases(pg: PgCluster, main_bytes: int) -> dict[str, tuple[float, int]]:
    """Generate both databases; VACUUM (hint bits, visibility map) and CHECKPOINT so no dump
    pays for the load. Returns {db: (seconds, data bytes)}."""
    out: dict[str, tuple[float, int]] = {}
    for db, target in ((MAIN_DB, main_bytes), (SMALL_DB, main_bytes // 4)):
        t0 = time.monotonic()
        await generate(pg.dsn(db), target_bytes=target)
        con = await asyncpg.connect(pg.dsn(db))
        try:
            await con.execute("VACUUM")
            await con.execute("CHECKPOINT")
        finally:
            await con.close()
        out[db] = (time.monotonic() - t0, await data_bytes(pg.dsn(db)))
    return out


# ---------------------------------------------------------------- report


@dataclass
class Report:
    machine: dict[str, str]
    size_mb: float
    repeat: int
    default: str
    prewarm: bool
    databases: dict[str, tuple[float, int]] = field(default_factory=dict)
    baseline: list[Timed] = field(default_factory=list)
    floor: list[Timed] = field(default_factory=list)  # pg_dump -Z0 | zstd -LEVEL > FILE
    default_runs: list[RunNow] = field(default_factory=list)
    legacy: Legacy | None = None
    bare_z6: list[Timed] = field(default_factory=list)
    gzip6_runs: list[RunNow] = field(default_factory=list)
    small_run: RunNow | None = None
    table: dict[str, RunNow] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)  # `mt5backupd verify --json`
    shell: Timed | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def a_s(self) -> float:
        return best(self.baseline).wall_s

    def ours(self) -> RunNow:
        return best_run(self.default_runs)

    def floor_ratio(self) -> float:
        """Medians F / A: what compressing alone costs on this machine."""
        return ratio(statistics.median(t.wall_s for t in self.floor),
                     statistics.median(t.wall_s for t in self.baseline))

    def all_runs(self) -> list[RunNow]:
        runs = [*self.default_runs, *self.gzip6_runs]
        if self.small_run is not None:
            runs.append(self.small_run)
        runs += [r for r in self.table.values() if r not in runs]
        return runs

    def all_timed(self) -> list[Timed]:
        steps = [*self.baseline, *self.floor, *self.bare_z6, *(r.timed for r in self.all_runs())]
        if self.legacy is not None:
            steps += [self.legacy.dump, self.legacy.sha, self.legacy.upload]
        if self.shell is not None:
            steps.append(self.shell)
        return steps

    def disturbed(self) -> list[Timed]:
        """Steps during which other processes took a noticeable share of the CPU."""
        return [t for t in self.all_timed() if t.disturbed]

    def noise_line(self) -> str:
        steps = self.all_timed()
        total = sum(t.cpu.foreign for t in steps)
        worst = max(steps, key=lambda t: t.cpu.foreign)
        bad = self.disturbed()
        text = (f"other processes used {total:.1f} CPU s during the {len(steps)} timed steps "
                f"(most: {worst.cpu.foreign:.1f} s during {worst.label!r})")
        if bad:
            text += "; disturbed: " + ", ".join(f"{t.label} ({t.cpu.foreign:.1f} s)" for t in bad)
        return text

    def meets_all(self, run: RunNow) -> tuple[bool, bool]:
        time_ok = ratio(run.wall_s, self.a_s) <= TARGET_DEFAULT_RATIO
        size_ok = (self.legacy is not None
                   and ratio(run.size, self.legacy.size) <= TARGET_SIZE_RATIO)
        return time_ok, size_ok

    def candidates(self) -> list[RunNow]:
        rows = {r.key: r for r in [*self.table.values(), self.ours()]}
        return [r for r in rows.values() if all(self.meets_all(r))]

    def recommendation(self) -> str:
        good = self.candidates()
        if not good:
            return ("no measured compression meets both the time and the size target on this "
                    "machine; see the CPU profile")
        pick = min(good, key=lambda r: (r.size, r.wall_s))
        names = ", ".join(sorted(r.key for r in good))
        return (f"{pick.key} (smallest stored size among those meeting both targets: "
                f"{names})")

    # -- text ----------------------------------------------------------------------------

    def text(self) -> str:
        out = ["", "== machine =="]
        out += [f"  {k:<15} {v}" for k, v in self.machine.items()]
        out += ["", "== databases (sampledata) =="]
        for db, (took, size) in self.databases.items():
            out.append(f"  {db:<12} {fmt_mb(size):>10} of table data, generated in {took:.1f} s")
        if self.default_runs:
            out.append(f"  pg_dump -Fc -Z0 output of {MAIN_DB}: "
                       f"{fmt_mb(self.ours().raw_bytes)}")
        out.append(f"  prewarm before each timed step: "
                   f"{'yes' if self.prewarm else 'no'}; repeat = {self.repeat}")
        a = self.a_s
        out += ["", "== 1. baseline A: pg_dump -Fc -Z0 > /dev/null =="]
        for t in self.baseline:
            out.append(f"  run {t.wall_s:7.2f} s   {t.cpu.line()}")
        out.append(f"  A = {a:.2f} s (best of {len(self.baseline)})")
        if self.floor:
            for t in self.floor:
                out.append(f"  F run {t.wall_s:5.2f} s   {t.cpu.line()}")
            out.append(f"  F = {self.floor[0].label}: medians F / A = {self.floor_ratio():.3f}")

        ours = self.ours()
        r_def = ratio(ours.wall_s, a)
        out += ["", f"== 2. mt5backupd --run-now, default compression {self.default} "
                f"(compression_threads {DEFAULT_THREADS}) =="]
        for r in self.default_runs:
            out.append(f"  run {r.wall_s:7.2f} s  (run's duration_s {r.duration_s:.2f}, "
                       f"manifest dump_duration_s {r.dump_duration_s:.2f})  "
                       f"stored {fmt_mb(r.size)}")
            out.append(f"      {r.timed.cpu.line()}")
        out.append(f"  best {ours.wall_s:.2f} s; ratio to A {r_def:.2f}; "
                   f"dump_duration_s / A = {ratio(ours.dump_duration_s, a):.2f}")
        med_a = statistics.median(t.wall_s for t in self.baseline)
        med_ours = statistics.median(r.wall_s for r in self.default_runs)
        r_med = ratio(med_ours, med_a)
        out.append(f"  medians: --run-now {med_ours:.2f} s / A {med_a:.2f} s = {r_med:.3f} "
                   f"({verdict(r_med <= TARGET_DEFAULT_RATIO)} <= {TARGET_DEFAULT_RATIO})")
        if self.floor:
            med_f = statistics.median(t.wall_s for t in self.floor)
            out.append(f"  medians: --run-now {med_ours:.2f} s / F {med_f:.2f} s = "
                       f"{ratio(med_ours, med_f):.3f}")

        if self.verify:
            out.append(f"  verify (test restore, rows vs the stream's counts): "
                       f"{self.verify.get('result')}, {self.verify.get('tables', '?')} tables, "
                       f"restore {self.verify.get('restore_duration_s', '?')} s")

        if self.legacy is not None:
            lg = self.legacy
            speed = ratio(lg.total_s, ours.wall_s)
            size_r = ratio(ours.size, lg.size)
            out += ["", "== 3. legacy flow (sequential) =="]
            for step in (lg.dump, lg.sha, lg.upload):
                out.append(f"  {step.label:<28} {step.wall_s:7.2f} s   {step.cpu.line()}")
            out.append(f"  {'total':<28} {lg.total_s:7.2f} s; legacy file {fmt_mb(lg.size)}")
            out.append(f"  legacy / ours = {speed:.2f}x ({verdict(speed >= TARGET_LEGACY_SPEEDUP)}"
                       f" >= {TARGET_LEGACY_SPEEDUP:g}x)")
            out.append(f"  stored size ours / legacy = {fmt_mb(ours.size)} / {fmt_mb(lg.size)} "
                       f"= {size_r:.3f} ({verdict(size_r <= TARGET_SIZE_RATIO)} "
                       f"<= {TARGET_SIZE_RATIO})")

        if self.bare_z6 and self.gzip6_runs:
            z6 = best(self.bare_z6)
            g6 = best_run(self.gzip6_runs)
            over = ratio(g6.wall_s, z6.wall_s)
            out += ["", "== 4. pipeline overhead at equal compression (gzip:6) =="]
            for t in self.bare_z6:
                out.append(f"  bare pg_dump -Fc -Z6 > /dev/null {t.wall_s:7.2f} s   "
                           f"{t.cpu.line()}")
            for r in self.gzip6_runs:
                out.append(f"  --run-now gzip:6               {r.wall_s:7.2f} s   "
                           f"(dump_duration_s {r.dump_duration_s:.2f})  {r.timed.cpu.line()}")
            out.append(f"  best {g6.wall_s:.2f} / {z6.wall_s:.2f} = {over:.3f} "
                       f"({verdict(over <= TARGET_OVERHEAD)} <= {TARGET_OVERHEAD}); "
                       f"dump_duration_s / bare = {ratio(g6.dump_duration_s, z6.wall_s):.3f}")

        out += ["", "== 5. peak RSS of mt5backupd --run-now =="]
        rss_runs = [ours] + ([self.small_run] if self.small_run else [])
        for r in rss_runs:
            gnu = fmt_mb(r.timed.max_rss) if r.timed.max_rss is not None else "n/a"
            out.append(f"  {r.db:<12} raw {fmt_mb(r.raw_bytes):>10}: GNU time max RSS {gnu}, "
                       f"python VmHWM {fmt_mb(r.timed.python_hwm)}, pg_dump VmHWM "
                       f"{fmt_mb(r.timed.pg_dump_hwm)}, tree RSS peak "
                       f"{fmt_mb(r.timed.tree_rss_peak)} ({r.timed.samples} samples)")
        if self.small_run is not None:
            peak, small = ours.rss, self.small_run.rss
            flat = peak <= small * RSS_FLAT_TOLERANCE
            out.append(f"  {fmt_mb(small)} -> {fmt_mb(peak)} for 4x the data: "
                       f"{'flat' if flat else 'GROWS'}; under {TARGET_RSS_BYTES // MB} MB: "
                       f"{verdict(max(peak, small) < TARGET_RSS_BYTES)}")

        if self.table:
            out += ["", "== 6. compression choices via --run-now (compression_threads = "
                    f"{DEFAULT_THREADS} unless named) =="]
            out.append(f"  {'compression':<18} {'stored MB':>10} {'wall s':>8} {'ratio A':>8} "
                       f"{'vs legacy':>9} {'dump s':>7} {'RSS MB':>7}  CPU")
            for name, _c, _t in TABLE_ROWS:
                row = self.table.get(name)
                if row is None:
                    continue
                vs = ratio(row.size, self.legacy.size) if self.legacy else float("nan")
                out.append(f"  {name:<18} {row.size / MB:10.1f} {row.wall_s:8.2f} "
                           f"{ratio(row.wall_s, a):8.2f} {vs:9.3f} {row.dump_duration_s:7.2f} "
                           f"{row.rss / MB:7.1f}"
                           f"  {row.timed.cpu.line()}")
            if self.shell is not None:
                out.append(f"  shell: pg_dump -Fc -Z0 | zstd -T2 -3 > /dev/null "
                           f"{self.shell.wall_s:.2f} s (ratio A {ratio(self.shell.wall_s, a):.2f})"
                           f"  {self.shell.cpu.line()}")
        out += [f"  skipped: {s}" for s in self.skipped]
        out += ["", f"  noise: {self.noise_line()}"]
        out += ["", "== verdict ==",
                f"  default {self.default}: {r_def:.2f}x A "
                f"({verdict(r_def <= TARGET_DEFAULT_RATIO)} <= {TARGET_DEFAULT_RATIO})"]
        if self.legacy is not None:
            out.append(f"  legacy/ours {ratio(self.legacy.total_s, ours.wall_s):.2f}x, "
                       f"size ours/legacy {ratio(ours.size, self.legacy.size):.3f}")
            out.append(f"  recommended default: {self.recommendation()}")
        return "\n".join(out)

    # -- markdown ------------------------------------------------------------------------

    def markdown(self) -> str:
        m = self.machine
        a = self.a_s
        ours = self.ours()
        main_mb = self.databases.get(MAIN_DB, (0.0, 0))[1] / MB
        out = [
            "### Backup run (bench/backup.py)",
            "",
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}, "
            f"{m['filesystem']}; PostgreSQL {m['postgresql']}, Python {m['python']}, zstandard "
            f"{m['zstandard']}, mt5backupd {m['mt5backupd']}. Database: "
            "`mt5backupd.testkit.sampledata` "
            f"at --size-mb {self.size_mb:g} ({main_mb:.0f} MB of table data, pg_dump -Fc -Z0 "
            f"output {ours.raw_bytes / MB:.0f} MB). PostgreSQL, mt5backupd and the receiver all "
            "run on this one machine (receiver over loopback), so the receiver's CPU competes "
            f"with the dump. Wall times are best of {self.repeat} where marked (x{self.repeat}), "
            "else one run; `--run-now` times are the whole process (interpreter start-up, "
            "preflight, dump, pg_restore --list, upload, commit). 1 MB = 10^6 bytes.",
            "",
            "| Measurement | Wall s | Ratio | Target | Stored MB |",
            "|---|---:|---:|---|---:|",
            f"| A: `pg_dump -Fc -Z0 > /dev/null` (x{len(self.baseline)}) | {a:.1f} | 1.00 | | |",
        ]
        r_def = ratio(ours.wall_s, a)
        out.append(f"| `--run-now`, default `{self.default}`, compression_threads "
                   f"{DEFAULT_THREADS} (x{len(self.default_runs)}) | "
                   f"{ours.wall_s:.1f} | {r_def:.2f} x A | <= {TARGET_DEFAULT_RATIO} "
                   f"({verdict(r_def <= TARGET_DEFAULT_RATIO)}) | {ours.size / MB:.0f} |")
        out.append(f"| ... its manifest `dump_duration_s` | {ours.dump_duration_s:.1f} | "
                   f"{ratio(ours.dump_duration_s, a):.2f} x A | | |")
        med_a = statistics.median(t.wall_s for t in self.baseline)
        med_ours = statistics.median(r.wall_s for r in self.default_runs)
        out.append(f"| ... medians: `--run-now` / A | {med_ours:.2f} / {med_a:.2f} | "
                   f"{ratio(med_ours, med_a):.2f} | | |")
        if self.floor:
            med_f = statistics.median(t.wall_s for t in self.floor)
            out.append(f"| F: `pg_dump -Fc -Z0 \\| zstd -{parse_compression(self.default).level}"
                       f" > FILE`, C tools only (x{len(self.floor)}), medians | {med_f:.2f} | "
                       f"{self.floor_ratio():.2f} x A | | |")
            out.append(f"| ... medians: `--run-now` / F | {med_ours:.2f} / {med_f:.2f} | "
                       f"{ratio(med_ours, med_f):.2f} | | |")
        if self.verify:
            out.append(f"| `mt5backupd verify` of a default backup (restore, rows vs counts) | "
                       f"{self.verify.get('restore_duration_s', '?')} | | "
                       f"{self.verify.get('result')} | |")
        if self.legacy is not None:
            lg = self.legacy
            speed = ratio(lg.total_s, ours.wall_s)
            size_r = ratio(ours.size, lg.size)
            out.append(f"| legacy: `pg_dump -Fc -Z9 -f`, `sha256sum`, `curl -F` | "
                       f"{lg.total_s:.1f} ({lg.dump.wall_s:.1f} + {lg.sha.wall_s:.1f} + "
                       f"{lg.upload.wall_s:.1f}) | {speed:.1f}x slower than ours | >= "
                       f"{TARGET_LEGACY_SPEEDUP:g}x ({verdict(speed >= TARGET_LEGACY_SPEEDUP)}) "
                       f"| {lg.size / MB:.0f} |")
            out.append(f"| stored size ours / legacy | | {size_r:.2f} | <= {TARGET_SIZE_RATIO} "
                       f"({verdict(size_r <= TARGET_SIZE_RATIO)}) | |")
        if self.bare_z6 and self.gzip6_runs:
            z6 = best(self.bare_z6)
            g6 = best_run(self.gzip6_runs)
            over = ratio(g6.wall_s, z6.wall_s)
            out.append(f"| bare `pg_dump -Fc -Z6 > /dev/null` (x{len(self.bare_z6)}) | "
                       f"{z6.wall_s:.1f} | | | |")
            out.append(f"| `--run-now`, `gzip:6` (x{len(self.gzip6_runs)}) | {g6.wall_s:.1f} | "
                       f"{over:.3f} x bare -Z6 | <= {TARGET_OVERHEAD} "
                       f"({verdict(over <= TARGET_OVERHEAD)}) | {g6.size / MB:.0f} |")
        rss_rows = [ours] + ([self.small_run] if self.small_run else [])
        rss = " / ".join(f"{r.rss / MB:.0f} MB ({r.raw_bytes / MB:.0f} MB dump)"
                         for r in rss_rows)
        peak = max(r.rss for r in rss_rows)
        how = "GNU time max RSS" if ours.timed.max_rss is not None else "polled VmHWM"
        out.append(f"| peak RSS of `--run-now` ({how}) | | {rss} | flat, < "
                   f"{TARGET_RSS_BYTES // MB} MB ({verdict(peak < TARGET_RSS_BYTES)}) | |")
        if self.table:
            out += ["", "Compression choices (`--run-now` with the default `compression_threads = "
                    f"{DEFAULT_THREADS}` unless named; one run each unless measured above):",
                    "", "| compression | stored MB | wall s | ratio to A | size / legacy -Z9 | "
                    "peak RSS MB |", "|---|---:|---:|---:|---:|---:|"]
            for name, _c, _t in TABLE_ROWS:
                row = self.table.get(name)
                if row is None:
                    continue
                vs = f"{ratio(row.size, self.legacy.size):.2f}" if self.legacy else ""
                mark = " (default)" if name == self.default else ""
                out.append(f"| `{name}`{mark} | {row.size / MB:.0f} | {row.wall_s:.1f} | "
                           f"{ratio(row.wall_s, a):.2f} | {vs} | {row.rss / MB:.0f} |")
            if self.shell is not None:
                out.append(f"| shell `pg_dump -Z0 \\| zstd -T2 -3 > /dev/null` | | "
                           f"{self.shell.wall_s:.1f} | {ratio(self.shell.wall_s, a):.2f} | | |")
        if self.skipped:
            out += ["", "Skipped: " + "; ".join(self.skipped) + "."]
        out += ["", f"Noise: {self.noise_line()}."]
        if self.legacy is not None:
            out += ["", f"Recommended default: {self.recommendation()}."]
        if self.prewarm and m.get("page reporting", "").startswith("yes"):
            out += ["", "This VM reports freed memory to its host (virtio-balloon free page "
                    "reporting), so page cache filled from long-idle memory pays a host page "
                    "fault per page; each timed step ran right after `sync` and an untimed "
                    "fill-and-drop of page cache (as in bench/receiver.py)."]
        return "\n".join(out)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mb", type=float, default=1024.0,
                   help="generated table data in MiB (default 1024; a quarter of it is the "
                        "second RSS size)")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs of the baselines, the default --run-now and the gzip:6 pair; the "
                        "best counts (default 2)")
    p.add_argument("--skip-table", action="store_true",
                   help="skip the compression table (step 6)")
    p.add_argument("--keep-dir", action="store_true",
                   help="keep the temp dir (configs, logs, legacy file) instead of removing it")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="parent of the temp dir; everything is written on its filesystem "
                        "(default /var/tmp)")
    p.add_argument("--max-attempts", type=int, default=MAX_ATTEMPTS,
                   help="measure a step again while other processes disturbed it (used more "
                        f"than 0.3 CPU s / 5%% of its wall time), at most this often "
                        f"(default {MAX_ATTEMPTS})")
    p.add_argument("--quiet-timeout-s", type=float, default=180.0,
                   help="before each timed step, wait up to this long for the machine to be "
                        "idle (other jobs skew timings); 0 disables (default 180)")
    p.add_argument("--no-prewarm", action="store_true",
                   help="do not fill and drop page cache before each timed step")
    args = p.parse_args(argv)
    if args.size_mb <= 0 or args.repeat < 1:
        p.error("--size-mb must be > 0 and --repeat >= 1")
    return args


def step(msg: str) -> Callable[[str], None]:
    log(f"-- {msg}")
    return lambda detail: log(f"   {detail}")


def run(b: Bench, report: Report) -> None:
    args = b.args
    pg = b.cluster
    say = step(f"generating {args.size_mb:g} MiB + {args.size_mb / 4:g} MiB of sample data")
    for db in (MAIN_DB, SMALL_DB):
        pg.create_database(db)
    report.databases = asyncio.run(_prepare_databases(pg, int(args.size_mb * MiB)))
    for db, (took, size) in report.databases.items():
        say(f"{db}: {fmt_mb(size)} in {took:.1f} s")
    os.sync()
    b.prewarm_bytes = min(report.databases[MAIN_DB][1], 2 * GiB)
    if shutil.disk_usage(b.work).free < 4 * report.databases[MAIN_DB][1] + FREE_MARGIN_BYTES:
        raise RuntimeError(f"not enough free space in {b.work}")
    b.start_receiver()
    log(f"   receiver pid {b.rx_pid} on {b.rx_url}")

    level = parse_compression(report.default).level
    say = step(f"1. baseline A: pg_dump -Fc -Z0 > /dev/null, and the floor F: pg_dump -Fc -Z0 "
               f"| zstd -{level} > FILE, x{args.repeat} each")
    for _ in range(args.repeat):
        report.baseline.append(b.bare_dump(0))
        say(f"A {report.baseline[-1].wall_s:.2f} s  {report.baseline[-1].cpu.line()}")
        floor = zstd_floor(b, level)
        if floor is None:
            report.skipped.append("floor F: no zstd binary")
            break
        report.floor.append(floor)
        say(f"F {floor.wall_s:.2f} s  {floor.cpu.line()}")

    say = step(f"2. --run-now with the default {report.default} x{args.repeat}")
    for _ in range(args.repeat):
        r = b.run_now(report.default)
        report.default_runs.append(r)
        say(f"{r.wall_s:.2f} s ({ratio(r.wall_s, report.a_s):.2f} x A), dump_duration_s "
            f"{r.dump_duration_s:.2f}, {fmt_mb(r.size)}  {r.timed.cpu.line()}")
    report.table[report.default] = report.ours()
    say = step(f"2b. verify (test restore) of a {report.default} backup of {MAIN_DB}")
    report.verify = b.verify_default(report.default)
    say(f"{report.verify.get('result')}: {report.verify.get('tables', '?')} tables, restore "
        f"{report.verify.get('restore_duration_s', '?')} s")

    say = step("3. legacy flow: pg_dump -Z9 -f, sha256sum, curl -F")
    report.legacy = legacy_flow(b)
    lg = report.legacy
    say(f"{lg.dump.wall_s:.2f} + {lg.sha.wall_s:.2f} + {lg.upload.wall_s:.2f} = "
        f"{lg.total_s:.2f} s, {fmt_mb(lg.size)}")

    say = step(f"4. gzip:6: bare pg_dump -Z6 and --run-now gzip:6, x{args.repeat} each")
    for _ in range(args.repeat):
        report.bare_z6.append(b.bare_dump(6))
        say(f"bare -Z6 {report.bare_z6[-1].wall_s:.2f} s  {report.bare_z6[-1].cpu.line()}")
        r = b.run_now("gzip:6")
        report.gzip6_runs.append(r)
        say(f"--run-now gzip:6 {r.wall_s:.2f} s  {r.timed.cpu.line()}")
    report.table["gzip:6"] = best_run(report.gzip6_runs)

    say = step(f"5. peak RSS: --run-now {report.default} on {SMALL_DB}")
    report.small_run = b.run_now(report.default, SMALL_DB)
    say(f"{SMALL_DB}: {report.small_run.wall_s:.2f} s, RSS {fmt_mb(report.small_run.rss)}; "
        f"{MAIN_DB}: RSS {fmt_mb(report.ours().rss)}")

    if args.skip_table:
        report.skipped.append("compression table (--skip-table)")
        return
    say = step("6. compression table via --run-now")
    for name, compression, threads in TABLE_ROWS:
        if name in report.table:
            continue
        if name == SLOW_LEVEL and "zstd:9" in report.table:
            z9 = report.table["zstd:9"]
            if ratio(z9.wall_s, report.a_s) > SLOW_SKIP_RATIO:
                report.skipped.append(f"{name}: zstd:9 already took "
                                      f"{ratio(z9.wall_s, report.a_s):.1f}x A")
                continue
        parse_compression(compression)
        r = b.run_now(compression, threads=threads)
        report.table[name] = r
        say(f"{name:<16} {fmt_mb(r.size):>10} {r.wall_s:7.2f} s ({ratio(r.wall_s, report.a_s):.2f}"
            f" x A)  {r.timed.cpu.line()}")
    report.shell = shell_zstd(b)
    if report.shell is None:
        report.skipped.append("shell zstd pipeline: no zstd binary")
    else:
        say(f"shell pipeline {report.shell.wall_s:.2f} s  {report.shell.cpu.line()}")


@contextlib.contextmanager
def workspace(parent: Path, keep: bool) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mt5b-bench-backup-", dir=parent))
    work.chmod(0o755)  # the cluster runs as 'postgres' when we are root: it must reach inside
    try:
        yield work
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report: Report | None = None
    with workspace(args.dir, args.keep_dir) as work:
        log(f"work dir {work}; {shutil.disk_usage(work).free / GiB:.1f} GiB free")
        b = Bench(args, work)
        try:
            b.pg = PgCluster.create(work / "pg")
            with b.pg:
                report = Report(machine_info(work, b.pg.server_version()), args.size_mb,
                                args.repeat, DEFAULT_COMPRESSION, not args.no_prewarm)
                try:
                    run(b, report)
                except BaseException:
                    if b.rx.proc is not None:
                        print(f"receiver log (tail):\n{b.receiver_log_tail()}", file=sys.stderr)
                    raise
                finally:
                    b.rx.stop()
        finally:
            b.rx.stop()
    if report is None or not report.baseline or not report.default_runs:
        return 1
    print(report.text())
    print("\n---- markdown for docs/benchmarks.md ----\n")
    print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
