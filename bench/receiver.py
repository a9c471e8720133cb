"""Receiver benchmark: ingest throughput over loopback against the raw disk, and receiver memory.

Run it from the repository root (``make bench-receiver`` does the same)::

    .venv/bin/python bench/receiver.py                    # 1 GiB and 4 GiB uploads, 3 runs each
    .venv/bin/python bench/receiver.py --size-gib 1 --sender socket --repeat 1

What one run measures:

1. **Disk baseline** on the filesystem that holds the receiver's ``data_dir``: write each size in
   1 MiB blocks from pre-generated random data, then fsync ("plain"); and the same with
   ``sha256.update`` of each block before its write ("hashed": what a receiver that hashes and
   writes in one thread can reach at best). Plus one "cold" plain write after a few idle seconds.
2. **Loopback ceiling**: each sender pushes a body into a discard sink (a tiny HTTP server in a
   child process that only ``recv_into``s), to show how fast the client side alone can go.
3. **Receiver ingest**: the real ``mt5backupd receiver`` as a subprocess; resumable uploads
   (create, ONE streamed PATCH, commit), timed from the first byte of the PATCH to the commit
   response. The body is a random 4 MiB block repeated; its sha256 is computed before the clock
   starts. Two senders: aiohttp's client (async-generator body) and a raw socket (``sendall``).
4. **Receiver memory and CPU**: idle VmRSS before each upload, VmRSS sampled every 50 ms during
   it, and VmHWM (the kernel's peak, reset via /proc/PID/clear_refs just before the upload)
   after it; CPU seconds of the receiver's event-loop thread and of its other threads, its minor
   page faults, and the CPU that other processes on the machine used meanwhile (interference).

Each timed step is repeated ``--repeat`` times; the median is reported with the range. Before each
timed step the page cache is filled and dropped once, untimed (see ``prewarm``). Everything lives
in one temp dir (``--dir``, default /var/tmp), removed at the end with the receiver stopped,
unless ``--keep``. 1 MB = 10^6 bytes; 1 GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import common  # bench/common.py: this script's directory is on sys.path

from mt5backupd.receiver import auth
from mt5backupd.testkit.receiverproc import ReceiverProcess

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000
DISK_BLOCK_BYTES = 1 * MiB  # the baseline's write size
BODY_BLOCK_BYTES = 4 * MiB  # the client repeats one random block of this size
RANDOM_POOL_BYTES = 64 * MiB  # the baseline cycles through this much random data
SAMPLE_INTERVAL_S = 0.05
FREE_MARGIN_BYTES = 2 * GiB  # never fill the disk: skip a step that would leave less than this
RSS_TARGET_BYTES = 100 * MB
RATIO_TARGET = 0.7
SENDERS = ("aiohttp", "socket")
INTERFERENCE_CORES = 0.2  # foreign load above this (in CPUs) makes the figures suspect


# ---------------------------------------------------------------- small helpers


def mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB if seconds > 0 else float("inf")


def fmt_bytes(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / KiB:.0f} KiB"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """'min-max' of rates, or '' for a single run."""
    return f"{min(values):.0f}-{max(values):.0f}" if len(values) > 1 else ""


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def body_chunks(view: memoryview, total: int) -> Iterator[memoryview]:
    remaining = total
    while remaining > 0:
        n = min(len(view), remaining)
        yield view[:n]
        remaining -= n


def repeated_sha256(block: bytes, total: int) -> tuple[str, float]:
    """sha256 of ``block`` repeated up to ``total`` bytes, and how long hashing took."""
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for chunk in body_chunks(memoryview(block), total):
        h.update(chunk)
    return h.hexdigest(), time.perf_counter() - t0


# ---------------------------------------------------------------- machine description


def machine_info(path: Path) -> dict[str, str]:
    statf = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        statf = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    info = common.machine_info(path)
    info["filesystem"] += f" (stat -f: {statf})"
    return {**info, "aiohttp": aiohttp.__version__}


# ---------------------------------------------------------------- 1. disk baseline


@dataclass
class DiskResult:
    label: str
    size: int
    write_s: float  # the write() calls (into the page cache)
    fsync_s: float
    hashed: bool = False
    cold: bool = False
    interference: Interference | None = None

    @property
    def total_s(self) -> float:
        return self.write_s + self.fsync_s

    @property
    def rate(self) -> float:
        return mb_s(self.size, self.total_s)

    @property
    def others_cores(self) -> float:
        i = self.interference
        return i.others_s / self.total_s if i is not None and self.total_s > 0 else 0.0


def _fill(path: Path, total: int, pool: bytes, hasher: Any = None,
          *, sync: bool = True) -> tuple[float, float]:
    """Write ``total`` bytes of ``pool`` to ``path`` in 1 MiB blocks; (write s, fsync s)."""
    view = memoryview(pool)
    nblocks = len(pool) // DISK_BLOCK_BYTES
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        written = 0
        i = 0
        while written < total:
            start = (i % nblocks) * DISK_BLOCK_BYTES
            block = view[start : start + min(DISK_BLOCK_BYTES, total - written)]
            if hasher is not None:
                hasher.update(block)
            write_all(fd, block)
            written += len(block)
            i += 1
        t1 = time.perf_counter()
        if sync:
            os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return t1 - t0, t2 - t1


def prewarm(directory: Path, total: int, pool: bytes) -> None:
    """Fill and drop ``total`` bytes of page cache, untimed, right before a measurement.

    With free-page reporting (see free_page_reporting) this hands the next measurement pages the
    host backs again, so the baseline and the receiver run in the same memory state and the
    comparison is of software, not of host page faults. No fsync: the dirty pages are dropped
    with the file.
    """
    _fill(directory / "prewarm.bin", total, pool, sync=False)


def disk_write(directory: Path, total: int, pool: bytes, *, hashed: bool,
               cold: bool = False) -> DiskResult:
    hasher = hashlib.sha256() if hashed else None
    before = ProcCpu.snapshot()
    write_s, fsync_s = _fill(directory / "baseline.bin", total, pool, hasher)
    interference = ProcCpu.snapshot().since(before, own_pids())
    label = "disk: sha256 + write + fsync" if hashed else "disk: write + fsync"
    if cold:
        label += " (cold)"
    return DiskResult(label, total, write_s, fsync_s, hashed, cold, interference)


# ---------------------------------------------------------------- /proc readers


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of ``pid`` in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
            values[key] = int(parts[0]) * KiB
    return values


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    st = proc_status(pid)
    return st["VmHWM"] <= st["VmRSS"] + 4 * MiB


def _stat_fields(path: Path) -> list[str]:
    stat = path.read_text()
    return stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) per thread id of ``pid``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(task / "stat")
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def minor_faults(pid: int) -> int:
    return int(_stat_fields(Path(f"/proc/{pid}/stat"))[7])


PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class ProcCpu:
    """CPU seconds of every process on the machine, and the machine's steal time."""

    cpu: dict[int, tuple[str, float, bool]]  # pid -> (comm, user + system s, kernel thread)
    steal_s: float

    @classmethod
    def snapshot(cls) -> ProcCpu:
        tick = os.sysconf("SC_CLK_TCK")
        cpu: dict[int, tuple[str, float, bool]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                cpu[int(entry.name)] = (comm, (int(fields[11]) + int(fields[12])) / tick,
                                        bool(int(fields[6]) & PF_KTHREAD))
        values = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        return cls(cpu, int(values[7]) / tick)

    def since(self, before: ProcCpu, own: set[int]) -> Interference:
        """CPU used between ``before`` and this snapshot by processes not in ``own``."""
        users: dict[str, float] = {}
        kthreads = 0.0
        for pid, (comm, secs, kthread) in self.cpu.items():
            if pid in own:
                continue
            delta = secs - before.cpu.get(pid, (comm, 0.0, kthread))[1]
            if kthread:
                kthreads += delta
            elif delta > 0:
                users[comm] = users.get(comm, 0.0) + delta
        return Interference(sum(users.values()), kthreads, self.steal_s - before.steal_s,
                            sorted(users.items(), key=lambda kv: -kv[1])[:3])


@dataclass(frozen=True)
class Interference:
    others_s: float  # user processes that are neither this benchmark nor its receiver
    kthreads_s: float  # kernel threads (writeback, page reporting, ksoftirqd, ...)
    steal_s: float
    top: list[tuple[str, float]]


def own_pids(*extra: int) -> set[int]:
    """This process and its children (the discard sink), plus ``extra`` pids."""
    pids = {os.getpid(), *extra}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(c) for c in (task / "children").read_text().split())
    return pids


def background_load(seconds: float = 2.0) -> Interference:
    before = ProcCpu.snapshot()
    time.sleep(seconds)
    return ProcCpu.snapshot().since(before, own_pids())


@dataclass
class CpuSplit:
    loop_s: float  # the main thread: the event loop, HTTP parsing, buffer copies
    workers_s: float  # every other thread: the executor's write() + sha256, fsync

    @classmethod
    def between(cls, pid: int, before: dict[int, float], after: dict[int, float]) -> CpuSplit:
        loop = after.get(pid, 0.0) - before.get(pid, 0.0)
        workers = sum(v - before.get(tid, 0.0) for tid, v in after.items() if tid != pid)
        return cls(loop, workers)


class RssSampler:
    """Polls VmRSS of a process every ``interval_s`` in a thread; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, proc_status(self.pid)["VmRSS"])
                self.samples += 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- senders


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def send_socket(host: str, port: int, method: str, path: str, headers: dict[str, str],
                block: bytes, total: int) -> Response:
    """One HTTP/1.1 request with a ``total``-byte body of ``block`` repeated, over a plain socket.

    The cheapest possible sender: ``sendall`` of a memoryview, no per-chunk Python work beyond
    the loop, so the receiver is what gets measured.
    """
    with socket.create_connection((host, port)) as sock:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}",
                 f"Content-Length: {total}", "Content-Type: application/offset+octet-stream",
                 "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            for chunk in body_chunks(memoryview(block), total):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (an error); read what it said
        data = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while received := sock.recv(64 * KiB):
                data += received
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if not head:
        raise RuntimeError(f"{method} {path}: connection closed without a response")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        parsed[k.strip().lower()] = v.strip()
    return Response(int(status_line.split()[1]), parsed, body)


async def _send_aiohttp(url: str, method: str, headers: dict[str, str], block: bytes,
                        total: int) -> Response:
    async def body() -> AsyncIterator[bytes]:
        remaining = total
        while remaining > 0:
            n = min(len(block), remaining)
            yield block if n == len(block) else block[:n]
            remaining -= n

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.request(method, url, data=body(),
                                   headers={**headers, "Content-Length": str(total),
                                            "Content-Type": "application/offset+octet-stream"}
                                   ) as resp:
            raw = await resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, raw)


def send_aiohttp(host: str, port: int, method: str, path: str, headers: dict[str, str],
                 block: bytes, total: int) -> Response:
    """The same request through aiohttp's client (a streamed async-generator body)."""
    return asyncio.run(_send_aiohttp(f"http://{host}:{port}{path}", method, headers, block, total))


Sender = Callable[[str, int, str, str, dict[str, str], bytes, int], Response]
SENDER_FUNCS: dict[str, Sender] = {"aiohttp": send_aiohttp, "socket": send_socket}


# ---------------------------------------------------------------- 2a. discard sink


def run_sink() -> None:
    """Child-process mode: a minimal HTTP/1.1 sink that reads and drops request bodies."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    print(srv.getsockname()[1], flush=True)
    buf = bytearray(4 * MiB)
    while True:
        conn, _ = srv.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                part = conn.recv(64 * KiB)
                if not part:
                    break
                head += part
            headers, _, rest = head.partition(b"\r\n\r\n")
            length = 0
            for line in headers.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            got = len(rest)
            while got < length:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                got += n
            conn.sendall(b"HTTP/1.1 204 No Content\r\nUpload-Offset: %d\r\n"
                         b"Connection: close\r\n\r\n" % got)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def sink_process() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--run-sink"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        stop_process(proc)


# ---------------------------------------------------------------- 2b. the real receiver


class Receiver:
    """``mt5backupd receiver`` as a subprocess on a loopback port, with one admin token."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process = ReceiverProcess(
            workdir, extra_toml=f"max_upload_bytes = {1024 * GiB}\npartial_ttl_s = 86400\n"
        )
        self.token = ""

    @property
    def host(self) -> str:
        return self.process.host

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def data_dir(self) -> Path:
        return self.process.data_dir

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, timeout_s: float = 30.0) -> None:
        self.token = auth.add_token(self.process.tokens_file, "bench", admin=True)
        self.process.start(timeout_s)

    def stop(self) -> None:
        self.process.stop()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None
             ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{self.host}:{self.port}{path}", data=data,
                                     method=method, headers=self.auth)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
        parsed: dict[str, Any] = json.loads(raw) if raw.strip() else {}
        return status, parsed


@dataclass
class UploadResult:
    size: int
    sender: str
    endpoint: str
    body_s: float  # first byte of the body request -> its response
    total_s: float  # first byte -> the commit response
    idle_rss: int
    peak_rss_sampled: int
    peak_rss_hwm: int | None  # None: VmHWM could not be reset, see peak_rss_sampled
    cpu: CpuSplit
    client_cpu_s: float
    faults: int  # receiver minor page faults during the upload
    interference: Interference  # CPU used by everything else on the machine meanwhile

    @property
    def rate(self) -> float:
        return mb_s(self.size, self.total_s)

    @property
    def peak_rss(self) -> int:
        return max(self.peak_rss_sampled, self.peak_rss_hwm or 0)

    @property
    def others_cores(self) -> float:
        return self.interference.others_s / self.total_s if self.total_s > 0 else 0.0


def upload(rx: Receiver, size: int, sender: str, block: bytes, sha256: str, seq: int,
           *, legacy: bool, keep: bool, warm_pool: bytes | None) -> UploadResult:
    name = f"bench-{'legacy' if legacy else 'v1'}-{sender}-{size // MiB}m-{seq}"
    send = SENDER_FUNCS[sender]
    uid = ""
    if not legacy:
        status, created = rx.call("POST", "/api/v1/uploads", {"name": name, "size": size})
        if status != 201:
            raise RuntimeError(f"create upload: HTTP {status} {created}")
        uid = created["upload_id"]
    if warm_pool is not None:
        prewarm(rx.workdir, size, warm_pool)
    hwm_reset = reset_peak_rss(rx.pid)
    time.sleep(0.2)
    idle = proc_status(rx.pid)["VmRSS"]
    cpu0, faults0, machine0 = thread_cpu(rx.pid), minor_faults(rx.pid), ProcCpu.snapshot()
    client0 = time.process_time()
    with RssSampler(rx.pid) as sampler:
        t0 = time.perf_counter()
        if legacy:
            resp = send(rx.host, rx.port, "POST", f"/api/backup/upload?name={name}",
                        {**rx.auth, "X-Content-SHA256": sha256}, block, size)
            t_body = time.perf_counter()
            if resp.status != 200:
                raise RuntimeError(f"legacy upload: HTTP {resp.status} {resp.body[:500]!r}")
        else:
            resp = send(rx.host, rx.port, "PATCH", f"/api/v1/uploads/{uid}",
                        {**rx.auth, "Upload-Offset": "0"}, block, size)
            t_body = time.perf_counter()
            if resp.status != 204 or resp.headers.get("upload-offset") != str(size):
                raise RuntimeError(f"PATCH: HTTP {resp.status} {resp.headers} "
                                   f"{resp.body[:500]!r}")
            status, committed = rx.call("POST", f"/api/v1/uploads/{uid}/commit",
                                        {"sha256": sha256, "size": size})
            if status != 201:
                raise RuntimeError(f"commit: HTTP {status} {committed}")
        t1 = time.perf_counter()
    client_cpu = time.process_time() - client0
    cpu = CpuSplit.between(rx.pid, cpu0, thread_cpu(rx.pid))
    faults = minor_faults(rx.pid) - faults0
    interference = ProcCpu.snapshot().since(machine0, own_pids(rx.pid))
    hwm = proc_status(rx.pid)["VmHWM"] if hwm_reset else None
    if not keep:
        status, deleted = rx.call("DELETE", f"/api/backup/{name}")
        if status != 200:
            raise RuntimeError(f"delete: HTTP {status} {deleted}")
    return UploadResult(size, sender, "legacy POST" if legacy else "v1 PATCH+commit",
                        t_body - t0, t1 - t0, idle, sampler.peak, hwm, cpu, client_cpu, faults,
                        interference)


# ---------------------------------------------------------------- reporting


@dataclass
class UploadGroup:
    """The repeated runs of one (endpoint, sender, size)."""

    runs: list[UploadResult]

    @property
    def first(self) -> UploadResult:
        return self.runs[0]

    @property
    def rates(self) -> list[float]:
        return [r.rate for r in self.runs]

    @property
    def rate(self) -> float:
        return median(self.rates)

    def med(self, fn: Callable[[UploadResult], float]) -> float:
        return median([fn(r) for r in self.runs])

    @property
    def idle_rss(self) -> int:
        return max(r.idle_rss for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss for r in self.runs)


@dataclass
class Report:
    machine: dict[str, str]
    repeat: int = 1
    prewarmed: bool = True
    disk: list[DiskResult] = field(default_factory=list)
    sha_rate: float = 0.0
    ceilings: dict[str, list[float]] = field(default_factory=dict)
    uploads: list[UploadResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    background: Interference | None = None  # measured over 2 s before starting

    def max_others_cores(self) -> float:
        """The worst median load that foreign user processes put on any timed group."""
        loads = [median([d.others_cores for d in runs]) for runs in self.disk_groups().values()]
        loads += [g.med(lambda r: r.others_cores) for g in self.upload_groups()]
        return max(loads, default=0.0)

    def interference_note(self) -> str | None:
        worst = self.max_others_cores()
        if worst < INTERFERENCE_CORES:
            return None
        return (f"other processes used up to {worst:.2f} of {self.machine['nproc']} CPUs during "
                "timed steps (median of a group): these figures are disturbed; rerun on a quiet "
                "machine")

    def disk_groups(self) -> dict[tuple[str, int], list[DiskResult]]:
        groups: dict[tuple[str, int], list[DiskResult]] = {}
        for d in self.disk:
            groups.setdefault((d.label, d.size), []).append(d)
        return groups

    def upload_groups(self) -> list[UploadGroup]:
        groups: dict[tuple[str, str, int], list[UploadResult]] = {}
        for u in self.uploads:
            groups.setdefault((u.endpoint, u.sender, u.size), []).append(u)
        return [UploadGroup(runs) for runs in groups.values()]

    def disk_rate(self, size: int) -> float:
        """Median plain (warm) disk rate of the measured size closest to ``size``."""
        plain = [d for d in self.disk if not d.hashed and not d.cold]
        if not plain:
            return float("nan")
        closest = min(plain, key=lambda d: abs(d.size - size)).size
        return median([d.rate for d in plain if d.size == closest])

    def table(self) -> str:
        out = ["", "== machine =="]
        out += [f"  {k:<15} {v}" for k, v in self.machine.items()]
        how = (f"median of {self.repeat} (min-max); "
               + ("page cache prewarmed before each timed step" if self.prewarmed
                  else "no prewarming"))
        out += ["", f"== disk baseline, same filesystem as data_dir ({how}) =="]
        for (label, size), runs in self.disk_groups().items():
            rates = [d.rate for d in runs]
            write_s = median([d.write_s for d in runs])
            fsync_s = median([d.fsync_s for d in runs])
            others = median([d.others_cores for d in runs])
            out.append(f"  {label:<37} {fmt_bytes(size):>7} {median(rates):8.1f} MB/s "
                       f"{spread(rates):>11}  (write() {mb_s(size, write_s):6.0f} MB/s, "
                       f"fsync {fsync_s:5.2f} s; others {others:4.2f} CPUs)")
        out.append(f"  {'sha256 alone (in memory)':<37} {'':>7} {self.sha_rate:8.1f} MB/s")
        if self.ceilings:
            out += ["", "== loopback ceiling: sender -> discard sink process, no receiver =="]
            out += [f"  {s:<37} {'':>7} {median(r):8.1f} MB/s {spread(r):>11}"
                    for s, r in self.ceilings.items()]
        out += ["", "== receiver ingest: first PATCH byte -> commit response =="]
        out.append(f"  {'size':>5} {'sender':<7} {'endpoint':<15} {'MB/s':>6} {'min-max':>9} "
                   f"{'ratio':>5} {'RSS idle':>8} {'peak':>6} {'rx loop':>7} {'rx work':>7} "
                   f"{'client':>6} {'faults':>7} {'others':>6} {'kthr':>5} {'steal':>5}")
        for g in self.upload_groups():
            u = g.first
            out.append(
                f"  {fmt_bytes(u.size):>5} {u.sender:<7} {u.endpoint:<15} {g.rate:6.0f} "
                f"{spread(g.rates):>9} {g.rate / self.disk_rate(u.size):5.2f} "
                f"{g.idle_rss / MB:6.1f}MB {g.peak_rss / MB:4.0f}MB "
                f"{g.med(lambda r: r.cpu.loop_s):6.2f}s {g.med(lambda r: r.cpu.workers_s):6.2f}s "
                f"{g.med(lambda r: r.client_cpu_s):5.2f}s "
                f"{g.med(lambda r: r.faults / (r.size / GiB)):7.0f} "
                f"{g.med(lambda r: r.others_cores):6.2f} "
                f"{g.med(lambda r: r.interference.kthreads_s):4.2f}s "
                f"{g.med(lambda r: r.interference.steal_s):4.2f}s"
            )
        out += [
            "  ratio   = median receiver MB/s / median plain disk MB/s of the same size",
            "  peak    = max over runs of VmHWM (reset just before each upload) and of VmRSS "
            "sampled every 50 ms",
            "  rx loop = CPU s of the receiver's event-loop thread (recv, HTTP parsing, copies)",
            "  rx work = CPU s of its other threads (executor: write() + sha256, fsync)",
            "  client  = CPU s of this benchmark process (the sender)",
            "  faults  = receiver minor page faults per GiB received (4 KiB pages)",
            "  others  = CPUs (average) used meanwhile by user processes that are not part of",
            "            this benchmark (interference); kthr = CPU s of kernel threads (writeback,",
            "            page reporting, ksoftirqd); steal = CPU s the hypervisor took",
            "  (all CPU and fault figures are medians over the runs)",
        ]
        out += [f"  skipped: {s}" for s in self.skipped]
        out += ["", "== verdict =="]
        if self.background is not None:
            b = self.background
            top = ", ".join(f"{c} {t / 2:.2f}" for c, t in b.top) or "-"
            out.append(f"  before start: other user processes used {b.others_s / 2:.2f} CPUs "
                       f"(top: {top})")
        note = self.interference_note()
        if note:
            out.append(f"  WARNING: {note}")
        for g in self.upload_groups():
            u = g.first
            ratio = g.rate / self.disk_rate(u.size)
            rss_ok = g.peak_rss < RSS_TARGET_BYTES
            out.append(
                f"  {fmt_bytes(u.size):>5} {u.sender:<7}: ratio {ratio:.2f} "
                f"({'meets' if ratio >= RATIO_TARGET else 'BELOW'} {RATIO_TARGET}), peak RSS "
                f"{g.peak_rss / MB:.1f} MB ({'meets' if rss_ok else 'ABOVE'} "
                f"{RSS_TARGET_BYTES // MB} MB)"
            )
        return "\n".join(out)

    def markdown(self) -> str:
        m = self.machine
        out = [
            "### Receiver ingest (bench/receiver.py)",
            "",
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}, "
            f"{m['filesystem'].split(' (')[0]}; Python {m['python']}, aiohttp {m['aiohttp']}, "
            f"mt5backupd {m['mt5backupd']}. Client and receiver on the same host over loopback, "
            "in separate processes; resumable upload = create, one streamed PATCH, commit, "
            "timed from the first body byte to the commit response. Median of "
            f"{self.repeat} runs (min-max); 1 MB = 10^6 bytes.",
            "",
            "| Measurement | Size | MB/s | min-max | Ratio to disk | Receiver RSS idle / peak |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for (label, size), runs in self.disk_groups().items():
            rates = [d.rate for d in runs]
            out.append(f"| {label} | {fmt_bytes(size)} | {median(rates):.0f} | {spread(rates)} | "
                       f"{median(rates) / self.disk_rate(size):.2f} | |")
        out.append(f"| sha256 alone (in memory) | | {self.sha_rate:.0f} | | | |")
        for sender, rates in self.ceilings.items():
            out.append(f"| loopback ceiling: {sender} -> discard sink | | {median(rates):.0f} | "
                       f"{spread(rates)} | | |")
        for g in self.upload_groups():
            u = g.first
            out.append(
                f"| receiver, {u.endpoint}, {u.sender} sender | {fmt_bytes(u.size)} | "
                f"{g.rate:.0f} | {spread(g.rates)} | {g.rate / self.disk_rate(u.size):.2f} | "
                f"{g.idle_rss / MB:.0f} MB / {g.peak_rss / MB:.0f} MB |"
            )
        out += ["", f"Targets: ratio >= {RATIO_TARGET} (against the plain disk write of the same "
                f"size); receiver peak RSS flat and under {RSS_TARGET_BYTES // MB} MB."]
        note = self.interference_note()
        if note:
            out += ["", f"**Warning:** {note}."]
        if m.get("page reporting", "").startswith("yes"):
            out += ["", "This VM reports freed memory to its host (virtio-balloon free page "
                    "reporting): page cache filled from memory left free for a few seconds pays "
                    "a host page fault per page (the \"cold\" row). "
                    + ("Each timed step therefore ran right after an untimed fill-and-drop of "
                       "the same size, so disk and receiver ran on equally warm memory."
                       if self.prewarmed else "No prewarming was done (--no-prewarm).")]
        return "\n".join(out)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-gib", default="1,4",
                   help="upload sizes in GiB, comma separated (default: 1,4)")
    p.add_argument("--baseline-gib", default=None,
                   help="disk baseline sizes in GiB, comma separated (default: the upload sizes, "
                        "so each upload is compared with a write of its own size)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each timed step; the median is reported (default: 3)")
    p.add_argument("--dir", type=Path, default=None,
                   help="parent of the temp dir; its filesystem is the one measured "
                        "(default: /var/tmp)")
    p.add_argument("--sender", choices=(*SENDERS, "both"), default="both",
                   help="client used for the uploads (default: both, one after the other)")
    p.add_argument("--legacy", action="store_true",
                   help="also time the legacy one-shot POST /api/backup/upload")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the sender -> discard sink measurement")
    p.add_argument("--no-prewarm", action="store_true",
                   help="do not fill and drop page cache before each timed step")
    p.add_argument("--cold-idle-s", type=float, default=5.0,
                   help="also time one 'cold' plain disk write after this long idle; 0 skips "
                        "it (default: 5)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp dir (backups, receiver log) instead of removing it")
    p.add_argument("--run-sink", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def gib_list(text: str) -> list[int]:
    return [int(float(s) * GiB) for s in text.split(",") if s.strip()]


def enough_space(path: Path, size: int) -> bool:
    return shutil.disk_usage(path).free >= size + FREE_MARGIN_BYTES


def run(args: argparse.Namespace, work: Path, report: Report) -> None:
    sizes = gib_list(args.size_gib)
    baselines = sorted(set(gib_list(args.baseline_gib or args.size_gib)))
    senders = list(SENDERS) if args.sender == "both" else [args.sender]
    print(f"work dir {work} ({report.machine['filesystem']}); "
          f"{shutil.disk_usage(work).free / GiB:.1f} GiB free", flush=True)

    report.background = background_load(2.0)
    if report.background.others_s / 2 >= INTERFERENCE_CORES:
        top = ", ".join(f"{c} ({t / 2:.2f} CPUs)" for c, t in report.background.top)
        print(f"WARNING: the machine is busy before start: {top}", flush=True)

    pool = os.urandom(RANDOM_POOL_BYTES)
    block = pool[:BODY_BLOCK_BYTES]
    warm_pool = None if args.no_prewarm else pool

    # 1. disk baseline: one cold plain write (informational), then plain and hashed per size
    if args.cold_idle_s > 0 and enough_space(work, min(baselines)):
        time.sleep(args.cold_idle_s)
        result = disk_write(work, min(baselines), pool, hashed=False, cold=True)
        report.disk.append(result)
        print(f"  {result.label} {fmt_bytes(result.size)}: {result.rate:.1f} MB/s", flush=True)
    for size in baselines:
        if not enough_space(work, size):
            report.skipped.append(f"{fmt_bytes(size)} disk baseline: not enough space")
            continue
        for _ in range(args.repeat):
            for hashed in (False, True):
                if warm_pool is not None:
                    prewarm(work, size, warm_pool)
                result = disk_write(work, size, pool, hashed=hashed)
                report.disk.append(result)
                print(f"  {result.label} {fmt_bytes(size)}: {result.rate:.1f} MB/s", flush=True)

    # sha256 of each body before any clock starts (also the in-memory hash rate)
    digests: dict[int, str] = {}
    hash_rates: list[float] = []
    for size in sorted(set(sizes)):
        digests[size], took = repeated_sha256(block, size)
        hash_rates.append(mb_s(size, took))
    report.sha_rate = max(hash_rates)
    print(f"  sha256 in memory: {report.sha_rate:.1f} MB/s", flush=True)

    # 2a. how fast the senders alone go (discard sink in another process)
    if not args.no_ceiling:
        size = min(sizes)
        with sink_process() as port:
            for sender in senders:
                rates = report.ceilings.setdefault(f"{sender} ({fmt_bytes(size)})", [])
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    resp = SENDER_FUNCS[sender]("127.0.0.1", port, "PATCH", "/sink", {}, block,
                                                size)
                    rates.append(mb_s(size, time.perf_counter() - t0))
                    if resp.headers.get("upload-offset") != str(size):
                        raise RuntimeError(f"sink received {resp.headers} of {size}")
                print(f"  ceiling {sender}: {median(rates):.1f} MB/s", flush=True)

    # 2b/3. the real receiver
    rx = Receiver(work / "receiver")
    rx.workdir.mkdir()
    if os.stat(work).st_dev != os.stat(rx.workdir).st_dev:
        raise RuntimeError("baseline and data_dir are on different filesystems")
    try:
        rx.start()
        print(f"receiver pid {rx.pid} on {rx.host}:{rx.port}, idle RSS "
              f"{proc_status(rx.pid)['VmRSS'] / MB:.1f} MB", flush=True)
        seq = 0
        for size in sizes:
            for legacy in [False, True] if args.legacy else [False]:
                for sender in senders:
                    for _ in range(args.repeat):
                        seq += 1
                        need = (2 if warm_pool else 1) * size
                        if not enough_space(work, need):
                            report.skipped.append(f"{fmt_bytes(size)} {sender}: no space")
                            continue
                        res = upload(rx, size, sender, block, digests[size], seq,
                                     legacy=legacy, keep=args.keep, warm_pool=warm_pool)
                        report.uploads.append(res)
                        print(f"  {fmt_bytes(size)} {res.endpoint} via {sender}: "
                              f"{res.rate:.1f} MB/s, peak RSS {res.peak_rss / MB:.1f} MB",
                              flush=True)
    except BaseException:
        with contextlib.suppress(OSError):
            print(f"receiver log (tail):\n{rx.log_path.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        rx.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_sink:
        run_sink()
        return 0
    parent = args.dir or Path("/var/tmp")
    work = Path(tempfile.mkdtemp(prefix="mt5b-bench-", dir=parent))
    report = Report(machine_info(work), repeat=args.repeat, prewarmed=not args.no_prewarm)
    try:
        run(args, work, report)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report.table())
    print("\n---- markdown for docs/benchmarks.md ----\n")
    print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
