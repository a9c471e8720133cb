"""Receiver benchmark: ingest throughput over loopback against the raw disk, and receiver memory.

Run it (from the repository root)::

    .venv/bin/python bench/receiver.py                    # 1 GiB and 4 GiB uploads
    .venv/bin/python bench/receiver.py --size-gib 1 --sender socket

What it measures, in one run:

1. **Disk baseline** on the filesystem that holds the receiver's ``data_dir``: write
   ``--baseline-gib`` in 1 MiB blocks from pre-generated random data, then fsync (plain), and the
   same with ``sha256.update`` before each write (hashed, what a single-threaded receiver does).
2. **Loopback ceiling**: each sender pushes the body into a discard sink (a tiny HTTP server in a
   child process that only ``recv_into``s), to show how fast the client side alone can go.
3. **Receiver ingest**: the real ``mt5backupd receiver`` as a subprocess; one resumable upload
   (create, ONE streamed PATCH, commit) per size and sender, timed from the first byte of the
   PATCH to the commit response. The body is a random 4 MiB block repeated, its sha256 computed
   before the clock starts.
4. **Receiver memory**: idle VmRSS before each upload, VmRSS sampled every 50 ms during it, and
   VmHWM (peak, reset through /proc/PID/clear_refs before each upload) after it; plus the CPU
   seconds the receiver's event-loop thread and its worker threads spent.

Everything lives in one temp dir (``--dir``, default /var/tmp) which is removed at the end with
the receiver killed, unless ``--keep``. 1 MB = 10^6 bytes; 1 GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
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

from mt5backupd import __version__
from mt5backupd.receiver import auth

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000
DISK_BLOCK_BYTES = 1 * MiB  # the baseline's write size
BODY_BLOCK_BYTES = 4 * MiB  # the client repeats one random block of this size
RANDOM_POOL_BYTES = 64 * MiB  # the baseline cycles through this much random data
SAMPLE_INTERVAL_S = 0.05
FREE_MARGIN_BYTES = 2 * GiB  # never fill the disk: skip a run that would leave less than this
RSS_TARGET_BYTES = 100 * MB
RATIO_TARGET = 0.7
SENDERS = ("aiohttp", "socket")


# ---------------------------------------------------------------- small helpers


def mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB if seconds > 0 else float("inf")


def fmt_bytes(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / KiB:.0f} KiB"


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def repeated_sha256(block: bytes, total: int) -> tuple[str, float]:
    """sha256 of ``block`` repeated up to ``total`` bytes, and how long hashing took."""
    h = hashlib.sha256()
    view = memoryview(block)
    t0 = time.perf_counter()
    for chunk in body_chunks(view, total):
        h.update(chunk)
    return h.hexdigest(), time.perf_counter() - t0


def body_chunks(view: memoryview, total: int) -> Iterator[memoryview]:
    remaining = total
    while remaining > 0:
        n = min(len(view), remaining)
        yield view[:n]
        remaining -= n


# ---------------------------------------------------------------- machine description


def machine_info(path: Path) -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) * KiB / GiB:.1f} GiB"
                break
    fstype = "unknown"
    source = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(["df", "--output=fstype,source", str(path)], capture_output=True,
                             text=True, check=True, timeout=10).stdout.splitlines()
        fstype, source = out[1].split()[:2]
    statf = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        statf = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "filesystem": f"{fstype} on {source} (stat -f: {statf})",
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "mt5backupd": __version__,
        "page reporting": "yes (virtio-balloon)" if free_page_reporting() else "no",
    }


def free_page_reporting() -> bool:
    """True in a VM whose balloon reports freed guest pages to the host (VIRTIO_BALLOON_F_REPORTING).

    There, memory freed for a couple of seconds loses its host backing, and the next page-cache
    fill pays a host page fault per page: writes then run at a fraction of their warm speed.
    """
    for dev in Path("/sys/bus/virtio/devices").glob("*"):
        with contextlib.suppress(OSError):
            if int((dev / "device").read_text(), 16) == 5:  # balloon
                features = (dev / "features").read_text().strip()
                if len(features) > 5 and features[5] == "1":
                    return True
    return False


# ---------------------------------------------------------------- 1. disk baseline


@dataclass
class DiskResult:
    label: str
    size: int
    write_s: float  # the write() calls (page cache)
    fsync_s: float
    hashed: bool = False
    cold: bool = False

    @property
    def total_s(self) -> float:
        return self.write_s + self.fsync_s

    @property
    def rate(self) -> float:
        return mb_s(self.size, self.total_s)


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

    With free-page reporting (see free_page_reporting) this gives the next measurement pages
    that are backed by the host again, so the baseline and the receiver run in the same memory
    state and the comparison is of software, not of host page faults. No fsync: the dirty pages
    are dropped with the file.
    """
    _fill(directory / "prewarm.bin", total, pool, sync=False)


def disk_write(directory: Path, total: int, pool: bytes, *, hashed: bool,
               cold: bool = False) -> DiskResult:
    hasher = hashlib.sha256() if hashed else None
    write_s, fsync_s = _fill(directory / "baseline.bin", total, pool, hasher)
    label = "disk: sha256 + write + fsync" if hashed else "disk: write + fsync"
    if cold:
        label += " (cold)"
    return DiskResult(label, total, write_s, fsync_s, hashed, cold)


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


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) per thread id of ``pid``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (task / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


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
            while chunk_in := sock.recv(64 * KiB):
                data += chunk_in
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


@contextlib.contextmanager
def sink_process() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--run-sink"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield port
    finally:
        stop_process(proc)


# ---------------------------------------------------------------- 2b. the real receiver


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Receiver:
    workdir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "receiver.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> None:
        tokens_file = self.workdir / "tokens.json"
        self.token = auth.add_token(tokens_file, "bench", admin=True)
        config = self.workdir / "receiver.toml"
        config.write_text(
            "[receiver]\n"
            f'listen = "{self.host}:{self.port}"\n'
            f'data_dir = "{self.data_dir}"\n'
            f'tokens_file = "{tokens_file}"\n'
            "min_free_bytes = 0\n"
            f"max_upload_bytes = {1024 * GiB}\n"
            "partial_ttl_s = 86400\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in ("BACKUP_API_TOKEN", "LOG_DIR")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mt5backupd", "receiver", "--config", str(config)],
                stdout=log, stderr=log, env=env, start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.port}/health",
                                            timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("receiver did not become healthy")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

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

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class UploadResult:
    size: int
    sender: str
    endpoint: str
    patch_s: float  # first byte of the body request to its response
    total_s: float  # first byte to the commit response
    idle_rss: int
    peak_rss_sampled: int
    peak_rss_hwm: int | None  # None: VmHWM could not be reset, see peak_rss_sampled
    samples: int
    cpu: CpuSplit
    client_cpu_s: float

    @property
    def rate(self) -> float:
        return mb_s(self.size, self.total_s)

    @property
    def peak_rss(self) -> int:
        return max(self.peak_rss_sampled, self.peak_rss_hwm or 0)


def upload(rx: Receiver, size: int, sender: str, block: bytes, sha256: str, seq: int,
           *, legacy: bool, keep: bool) -> UploadResult:
    name = f"bench-{'legacy' if legacy else 'v1'}-{sender}-{size // MiB}m-{seq}"
    send = SENDER_FUNCS[sender]
    if not legacy:
        status, created = rx.call("POST", "/api/v1/uploads", {"name": name, "size": size})
        if status != 201:
            raise RuntimeError(f"create upload: HTTP {status} {created}")
        uid = created["upload_id"]
    hwm_reset = reset_peak_rss(rx.pid)
    time.sleep(0.2)
    idle = proc_status(rx.pid)["VmRSS"]
    cpu0 = thread_cpu(rx.pid)
    client0 = time.process_time()
    with RssSampler(rx.pid) as sampler:
        t0 = time.perf_counter()
        if legacy:
            resp = send(rx.host, rx.port, "POST", f"/api/backup/upload?name={name}",
                        {**rx.auth, "X-Content-SHA256": sha256}, block, size)
            t_patch = time.perf_counter()
            if resp.status != 200:
                raise RuntimeError(f"legacy upload: HTTP {resp.status} {resp.body[:500]!r}")
        else:
            resp = send(rx.host, rx.port, "PATCH", f"/api/v1/uploads/{uid}",
                        {**rx.auth, "Upload-Offset": "0"}, block, size)
            t_patch = time.perf_counter()
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
    hwm = proc_status(rx.pid)["VmHWM"] if hwm_reset else None
    if not keep:
        status, deleted = rx.call("DELETE", f"/api/backup/{name}")
        if status != 200:
            raise RuntimeError(f"delete: HTTP {status} {deleted}")
    return UploadResult(size, sender, "legacy POST" if legacy else "v1 PATCH+commit",
                        t_patch - t0, t1 - t0, idle, sampler.peak, hwm, sampler.samples, cpu,
                        client_cpu)


# ---------------------------------------------------------------- reporting


@dataclass
class Report:
    machine: dict[str, str]
    disk: list[DiskResult] = field(default_factory=list)
    sha_rate: float = 0.0
    ceilings: dict[str, float] = field(default_factory=dict)
    uploads: list[UploadResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def disk_rate(self) -> float:
        plain = [d.rate for d in self.disk if "sha256" not in d.label]
        return statistics.median(plain) if plain else 0.0

    def table(self) -> str:
        out = ["", "== machine =="]
        out += [f"  {k:<11} {v}" for k, v in self.machine.items()]
        out += ["", "== disk baseline (same filesystem as data_dir) =="]
        for d in self.disk:
            out.append(f"  {d.label:<30} {fmt_bytes(d.size):>7}  {d.rate:8.1f} MB/s  "
                       f"(write() {d.write_s:6.2f} s = {mb_s(d.size, d.write_s):7.1f} MB/s, "
                       f"fsync {d.fsync_s:5.2f} s)")
        out.append(f"  {'sha256 alone (in memory)':<30} {'':>7}  {self.sha_rate:8.1f} MB/s")
        if self.ceilings:
            out += ["", "== loopback ceiling: sender -> discard sink (no receiver) =="]
            out += [f"  {s:<30} {'':>7}  {r:8.1f} MB/s" for s, r in self.ceilings.items()]
        out += ["", "== receiver ingest (first PATCH byte -> commit response) =="]
        out.append(f"  {'size':>7} {'sender':<8} {'endpoint':<16} {'MB/s':>8} {'ratio':>6} "
                   f"{'body s':>7} {'total s':>7} {'idle RSS':>9} {'peak RSS':>9} "
                   f"{'VmHWM':>9} {'rx loop':>8} {'rx work':>8} {'client':>7}")
        for u in self.uploads:
            hwm = f"{u.peak_rss_hwm / MB:7.1f}MB" if u.peak_rss_hwm is not None else "n/a"
            out.append(
                f"  {fmt_bytes(u.size):>7} {u.sender:<8} {u.endpoint:<16} {u.rate:8.1f} "
                f"{u.rate / self.disk_rate:6.2f} {u.patch_s:7.2f} {u.total_s:7.2f} "
                f"{u.idle_rss / MB:7.1f}MB {u.peak_rss_sampled / MB:7.1f}MB {hwm:>9} "
                f"{u.cpu.loop_s:7.2f}s {u.cpu.workers_s:7.2f}s {u.client_cpu_s:6.2f}s"
            )
        out += ["  (ratio = receiver MB/s / plain disk MB/s; rx loop = CPU s of the receiver's "
                "event-loop thread,", "   rx work = CPU s of its other threads (write, sha256, "
                "fsync); client = CPU s of this process)"]
        out += [f"  skipped: {s}" for s in self.skipped]
        out += ["", "== verdict =="]
        for u in self.uploads:
            ratio = u.rate / self.disk_rate
            out.append(
                f"  {fmt_bytes(u.size):>7} {u.sender:<8}: ratio {ratio:.2f} "
                f"({'meets' if ratio >= RATIO_TARGET else 'BELOW'} {RATIO_TARGET}), peak RSS "
                f"{u.peak_rss / MB:.1f} MB ({'meets' if u.peak_rss < RSS_TARGET_BYTES else 'ABOVE'}"
                f" {RSS_TARGET_BYTES // MB} MB)"
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
            "in separate processes. 1 MB = 10^6 bytes.",
            "",
            "| Measurement | Size | MB/s | Ratio to disk | Receiver RSS idle / peak |",
            "|---|---:|---:|---:|---:|",
        ]
        for d in self.disk:
            ratio = d.rate / self.disk_rate
            out.append(f"| {d.label} | {fmt_bytes(d.size)} | {d.rate:.0f} | {ratio:.2f} | |")
        out.append(f"| sha256 alone (in memory) | | {self.sha_rate:.0f} | | |")
        for sender, rate in self.ceilings.items():
            out.append(f"| loopback ceiling, {sender} sender -> discard sink | | {rate:.0f} | | |")
        for u in self.uploads:
            out.append(
                f"| receiver, {u.endpoint}, {u.sender} sender | {fmt_bytes(u.size)} | "
                f"{u.rate:.0f} | {u.rate / self.disk_rate:.2f} | "
                f"{u.idle_rss / MB:.0f} MB / {u.peak_rss / MB:.0f} MB |"
            )
        out += ["", f"Targets: ratio >= {RATIO_TARGET}; peak RSS flat and under "
                f"{RSS_TARGET_BYTES // MB} MB."]
        return "\n".join(out)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-gib", default="1,4",
                   help="upload sizes in GiB, comma separated (default: 1,4)")
    p.add_argument("--baseline-gib", type=float, default=1.0,
                   help="size of the disk baseline write in GiB (default: 1)")
    p.add_argument("--dir", type=Path, default=None,
                   help="parent of the temp dir; its filesystem is the one measured "
                        "(default: /var/tmp)")
    p.add_argument("--sender", choices=(*SENDERS, "both"), default="both",
                   help="client used for the uploads (default: both, one after the other)")
    p.add_argument("--legacy", action="store_true",
                   help="also time the legacy one-shot POST /api/backup/upload")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the sender -> discard sink measurement")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp dir (backups, receiver log) instead of removing it")
    p.add_argument("--run-sink", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def enough_space(path: Path, size: int) -> bool:
    return shutil.disk_usage(path).free >= size + FREE_MARGIN_BYTES


def run(args: argparse.Namespace, work: Path) -> Report:
    sizes = [int(float(s) * GiB) for s in args.size_gib.split(",") if s.strip()]
    senders = list(SENDERS) if args.sender == "both" else [args.sender]
    baseline = int(args.baseline_gib * GiB)
    report = Report(machine_info(work))
    print(f"work dir {work} ({report.machine['filesystem']}); "
          f"{shutil.disk_usage(work).free / GiB:.1f} GiB free", flush=True)

    pool = os.urandom(RANDOM_POOL_BYTES)
    block = pool[:BODY_BLOCK_BYTES]

    # 1. disk baseline
    if not enough_space(work, baseline):
        raise SystemExit(f"not enough free space in {work} for a {fmt_bytes(baseline)} baseline")
    for hashed in (False, True):
        result = disk_write(work, baseline, pool, hashed=hashed)
        report.disk.append(result)
        print(f"  {result.label}: {result.rate:.1f} MB/s", flush=True)
    del pool

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
        with sink_process() as port:
            for sender in senders:
                size = min(sizes)
                t0 = time.perf_counter()
                resp = SENDER_FUNCS[sender]("127.0.0.1", port, "PATCH", "/sink", {}, block, size)
                took = time.perf_counter() - t0
                if resp.headers.get("upload-offset") != str(size):
                    raise RuntimeError(f"sink received {resp.headers} of {size}")
                report.ceilings[f"{sender} ({fmt_bytes(size)})"] = mb_s(size, took)
                print(f"  ceiling {sender}: {mb_s(size, took):.1f} MB/s", flush=True)

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
        endpoints = [False, True] if args.legacy else [False]
        for size in sizes:
            for legacy in endpoints:
                for sender in senders:
                    seq += 1
                    if not enough_space(work, size):
                        report.skipped.append(f"{fmt_bytes(size)} {sender}: not enough space")
                        continue
                    res = upload(rx, size, sender, block, digests[size], seq, legacy=legacy,
                                 keep=args.keep)
                    report.uploads.append(res)
                    print(f"  {fmt_bytes(size)} {res.endpoint} via {sender}: "
                          f"{res.rate:.1f} MB/s, peak RSS {res.peak_rss / MB:.1f} MB", flush=True)
    finally:
        rx.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_sink:
        run_sink()
        return 0
    parent = args.dir or Path("/var/tmp")
    work = Path(tempfile.mkdtemp(prefix="mt5b-bench-", dir=parent))
    try:
        report = run(args, work)
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
