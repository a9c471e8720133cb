"""S3-backed receiver: ingest through the receiver vs a plain aiobotocore multipart upload of
the same bytes to the same endpoint, and the receiver's peak RSS with 8 concurrent uploads.

    .venv/bin/python bench/s3.py [--size-mb 256] [--rss-mb 256] [--runs 3]

The endpoint is moto's server (``python -m moto.server``) in its own process on loopback, the
only S3 every machine here has; it is far slower than a real store, so the ratio, not the
absolute rate, is the figure. Both sides upload parts one at a time; the receiver reads the
next part from its client (into its scratch file) while one is on its way. CPU seconds per run
of each process show where the two cores go. The peak RSS is the receiver's own (VmHWM, reset
before the 8 uploads); its scratch files are in the page cache, not in its RSS.
Targets: ratio >= 0.8; peak RSS < 8 x part size + 100 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import boto3
from aiobotocore.session import get_session
from botocore.config import Config as BotoConfig
from common import machine_info

from mt5backupd.receiver import auth
from mt5backupd.testkit.pghost import free_port
from mt5backupd.testkit.receiverproc import ReceiverProcess

MiB = 1024**2
PART_BYTES = 16 * MiB
CHUNK_BYTES = 1024 * 1024
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"}


def proc_status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
            values[key] = int(parts[0]) * 1024
    return values


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by the bench client (this process), the receiver and moto, summed over
    the measured calls: where two cores' worth of time goes."""

    def __init__(self, receiver_pid: int, moto_pid: int) -> None:
        self.pids = {"receiver": receiver_pid, "moto": moto_pid}
        self.spent: dict[str, float] = {"client": 0.0, "receiver": 0.0, "moto": 0.0}

    def snapshot(self) -> dict[str, float]:
        return {"client": time.process_time(),
                **{name: cpu_s(pid) for name, pid in self.pids.items()}}

    def add(self, before: dict[str, float]) -> None:
        for name, value in self.snapshot().items():
            self.spent[name] += value - before[name]

    def line(self, runs: int) -> str:
        return ", ".join(f"{k} {v / runs:.2f}" for k, v in self.spent.items())


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def pool_bytes() -> bytes:
    return os.urandom(PART_BYTES)


async def plain_multipart(url: str, bucket: str, key: str, pool: bytes, total: int) -> float:
    cfg = BotoConfig(request_checksum_calculation="when_required",
                     response_checksum_validation="when_required",
                     s3={"addressing_style": "path"})
    async with get_session().create_client("s3", endpoint_url=url, region_name="us-east-1",
                                           config=cfg, aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                                           aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"]
                                           ) as s3:
        start = time.monotonic()
        mpu = await s3.create_multipart_upload(Bucket=bucket, Key=key)
        parts = []
        for number, offset in enumerate(range(0, total, PART_BYTES), start=1):
            body = pool[: min(PART_BYTES, total - offset)]
            resp = await s3.upload_part(Bucket=bucket, Key=key, UploadId=mpu["UploadId"],
                                        PartNumber=number, Body=body)
            parts.append({"PartNumber": number, "ETag": resp["ETag"]})
        await s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"],
                                           MultipartUpload={"Parts": parts})
        return time.monotonic() - start


def stream_sha(pool: bytes, total: int) -> str:
    h = hashlib.sha256()
    for offset in range(0, total, PART_BYTES):
        h.update(pool[: min(PART_BYTES, total - offset)])
    return h.hexdigest()


async def body(pool: bytes, total: int) -> AsyncIterator[bytes]:
    view = memoryview(pool)
    sent = 0
    while sent < total:
        at = sent % PART_BYTES
        n = min(CHUNK_BYTES, total - sent, PART_BYTES - at)
        yield bytes(view[at:at + n])
        sent += n


async def through_receiver(http: aiohttp.ClientSession, url: str, token: str, name: str,
                           pool: bytes, total: int, sha: str) -> float:
    h = {"Authorization": f"Bearer {token}"}
    start = time.monotonic()
    async with http.post(f"{url}/api/v1/uploads", json={"name": name, "size": total},
                         headers=h) as resp:
        assert resp.status == 201, await resp.text()
        uid = (await resp.json())["upload_id"]
    async with http.patch(f"{url}/api/v1/uploads/{uid}", data=body(pool, total),
                          headers={**h, "Upload-Offset": "0"}) as resp:
        assert resp.status == 204, await resp.text()
    async with http.post(f"{url}/api/v1/uploads/{uid}/commit",
                         json={"sha256": sha, "size": total}, headers=h) as resp:
        assert resp.status == 201, await resp.text()
    return time.monotonic() - start


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--rss-mb", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    total, rss_total = args.size_mb * MiB, args.rss_mb * MiB
    os.environ.update(CREDS)
    moto, url = start_moto()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
            s3.create_bucket(Bucket="bench")
            workdir = Path(tmp)
            rcv = ReceiverProcess(workdir, env=dict(os.environ), extra_toml=(
                f'\n[receiver.storage]\nbackend = "s3"\nendpoint_url = "{url}"\n'
                f'bucket = "bench"\nregion = "us-east-1"\naddressing_style = "path"\n'
                f"part_size_bytes = {PART_BYTES}\n"))
            token = auth.add_token(rcv.tokens_file, "bench", admin=False)
            rcv.start()
            pool = pool_bytes()
            sha = stream_sha(pool, total)
            print({**machine_info(workdir), "endpoint": "moto server (own process)",
                   "part_size": PART_BYTES})
            plain: list[float] = []
            ours: list[float] = []
            plain_cpu, ours_cpu = CpuMeter(rcv.pid, moto.pid), CpuMeter(rcv.pid, moto.pid)
            timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for run in range(args.runs):  # interleaved, so drift hits both alike
                    cpu_before = plain_cpu.snapshot()
                    plain.append(await plain_multipart(url, "bench", f"plain-{run}", pool, total))
                    plain_cpu.add(cpu_before)
                    cpu_before = ours_cpu.snapshot()
                    ours.append(await through_receiver(http, rcv.url, token, f"r-{run}.dump",
                                                       pool, total, sha))
                    ours_cpu.add(cpu_before)
                p, o = statistics.median(plain), statistics.median(ours)
                print(f"plain aiobotocore multipart: {total / MiB / p:.1f} MiB/s "
                      f"(median of {args.runs}: {', '.join(f'{t:.2f}' for t in plain)} s)")
                print(f"through the receiver:        {total / MiB / o:.1f} MiB/s "
                      f"({', '.join(f'{t:.2f}' for t in ours)} s)")
                print(f"ratio receiver / plain: {p / o:.2f} (target >= 0.8)")
                print(f"CPU s per run, plain: {plain_cpu.line(args.runs)}; through the "
                      f"receiver: {ours_cpu.line(args.runs)}")

                before = proc_status(rcv.pid)
                Path(f"/proc/{rcv.pid}/clear_refs").write_text("5")
                rss_sha = stream_sha(pool, rss_total)
                start = time.monotonic()
                await asyncio.gather(*(through_receiver(http, rcv.url, token, f"c-{i}.dump",
                                                        pool, rss_total, rss_sha)
                                       for i in range(8)))
                took = time.monotonic() - start
                after = proc_status(rcv.pid)
                bound = 8 * PART_BYTES + 100 * 10**6
                print(f"8 concurrent uploads of {args.rss_mb} MiB in {took:.1f} s: receiver "
                      f"RSS before {before['VmRSS'] / 1e6:.0f} MB, peak {after['VmHWM'] / 1e6:.0f}"
                      f" MB (bound 8 x part + 100 MB = {bound / 1e6:.0f} MB: "
                      f"{'meets' if after['VmHWM'] < bound else 'MISSES'})")
            rcv.stop()
        finally:
            moto.kill()
            moto.wait()


if __name__ == "__main__":
    asyncio.run(main())
