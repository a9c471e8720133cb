"""The S3 ingest path (s3store/parts.py, scratch.py) with the real receiver and moto: parts
received while the previous one is on its way, backpressure at two parts, the durable offset
never ahead of acknowledged parts, a client gone mid-part and a replica killed mid-part, and a
scratch disk that is full or gone (507, nothing left behind)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mt5backupd.config import ReceiverConfig
from mt5backupd.errors import ConfigError
from mt5backupd.receiver.auth import TokenStore
from mt5backupd.receiver.bodies import READ_BUFSIZE
from mt5backupd.receiver.context import STORAGE_KEY
from mt5backupd.receiver.metrics import ReceiverMetrics
from mt5backupd.receiver.s3store import S3Storage, conn, health
from mt5backupd.receiver.s3store.hashstate import ResumableSha256
from mt5backupd.receiver.server import RunningReceiver, start_receiver
from mt5backupd.testkit.receiverproc import ReceiverProcess
from tests.diskfaults import small_tmpfs
from tests.receiver_harness import make_tokens, receiver_config
from tests.s3_fixtures import TEST_PART_BYTES, MotoS3, StoreSwitch, s3_receiver_cfg
from tests.waits import log_offset, wait_for_log, wait_until

MiB = 1024**2
PART = TEST_PART_BYTES


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def chunked(data: bytes, size: int = MiB) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at:at + size]


def durable_parts(moto: MotoS3, bucket: str, uid: str) -> list[int]:
    """Part sizes in the session's state.json, read from the store itself (not the receiver),
    after checking that its hash state covers exactly those parts (not bytes received since)."""
    body = moto.client().get_object(Bucket=bucket, Key=f"sessions/alice/{uid}/state.json")
    state = json.loads(body["Body"].read())
    sizes = [size for _n, _etag, size in state["parts"]]
    ResumableSha256.from_state(bytes.fromhex(state["hash_state"]), sum(sizes))
    assert [n for n, _etag, _size in state["parts"]] == list(range(1, len(sizes) + 1))
    return sizes


async def create(http: aiohttp.ClientSession, base: str, name: str) -> str:
    async with http.post(f"{base}/api/v1/uploads", json={"name": name}) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["upload_id"])


async def offset_of(http: aiohttp.ClientSession, base: str, uid: str) -> int:
    async with http.head(f"{base}/api/v1/uploads/{uid}") as resp:
        assert resp.status == 200
        return int(resp.headers["Upload-Offset"])


async def finish(http: aiohttp.ClientSession, base: str, uid: str, data: bytes,
                 offset: int) -> None:
    """PATCH the rest from ``offset``, commit, and read the backup back whole."""
    async with http.patch(f"{base}/api/v1/uploads/{uid}", data=data[offset:],
                          headers={"Upload-Offset": str(offset)}) as resp:
        assert resp.status == 204, await resp.text()
    async with http.post(f"{base}/api/v1/uploads/{uid}/commit",
                         json={"sha256": sha(data), "size": len(data)}) as resp:
        assert resp.status == 201, await resp.text()
        name = (await resp.json())["id"]
    async with http.get(f"{base}/api/backup/download/{name}") as resp:
        assert sha(await resp.read()) == sha(data)


async def bytes_received(http: aiohttp.ClientSession, base: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "mt5backup_receiver_bytes_received_total")


async def raw_patch(base: str, token: str, uid: str, offset: int, declared: int,
                    data: bytes) -> asyncio.StreamWriter:
    """A PATCH that promises ``declared`` bytes and sends only ``data`` (the caller then
    closes the connection, or kills the receiver)."""
    url = urlsplit(base)
    _reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write((f"PATCH /api/v1/uploads/{uid} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                  f"Authorization: Bearer {token}\r\nUpload-Offset: {offset}\r\n"
                  "Content-Type: application/offset+octet-stream\r\n"
                  f"Content-Length: {declared}\r\n\r\n").encode())
    writer.write(data)
    await writer.drain()
    return writer


async def in_process(cfg: ReceiverConfig, metrics: ReceiverMetrics | None = None
                     ) -> RunningReceiver:
    return await start_receiver(cfg, TokenStore(cfg.tokens_file), metrics=metrics)


@dataclass
class Behind:
    """An in-process S3 receiver whose store sits behind a switch the test can hold."""

    switch: StoreSwitch
    bucket: str
    running: RunningReceiver
    token: str
    metrics: ReceiverMetrics
    scratch: Path


@contextlib.asynccontextmanager
async def behind_switch(tmp_path: Path, moto: MotoS3) -> AsyncIterator[Behind]:
    target = urlsplit(moto.url)
    switch = StoreSwitch(str(target.hostname), int(target.port or 80))
    await switch.on()
    bucket = moto.new_bucket()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cfg = s3_receiver_cfg(receiver_config(tmp_path), moto, bucket, endpoint_url=switch.url,
                          scratch_dir=scratch)
    tokens = make_tokens(cfg.tokens_file)
    metrics = ReceiverMetrics()
    running = await in_process(cfg, metrics)
    try:
        yield Behind(switch, bucket, running, tokens.alice, metrics, scratch)
    finally:
        switch.release()
        await running.close()
        await switch.off()


async def test_parts_overlap_backpressure_at_two_parts_offset_only_acknowledged(
        tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str]) -> None:
    """With the store stalled on part 1, the receiver goes on reading into the second slot and
    stops at two parts (backpressure); state.json in the bucket still says no part; released,
    the many-part upload completes and commits with the right sha256."""
    data = os.urandom(4 * PART + MiB + 123)
    async with behind_switch(tmp_path, moto_s3) as behind:
        switch, bucket, running, scratch = (behind.switch, behind.bucket, behind.running,
                                            behind.scratch)
        received = behind.metrics.bytes_received._value
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {behind.token}"}) as http:
            uid = await create(http, running.url, "many.dump")
            switch.hold(budget_bytes=256 * 1024)  # state reads and writes pass, parts do not

            async def patch() -> int:
                async with http.patch(f"{running.url}/api/v1/uploads/{uid}",
                                      data=chunked(data),
                                      headers={"Upload-Offset": "0"}) as resp:
                    assert resp.status == 204, await resp.text()
                    return int(resp.headers["Upload-Offset"])

            sending = asyncio.create_task(patch())
            try:
                await wait_until(lambda: received.get() >= 2 * PART, 20,
                                 "the second slot filled while part 1 is held")
                await asyncio.sleep(0.5)  # the store stays stalled: reading must stay stopped
                # two slots, and at most the one body chunk being split (aiohttp hands over
                # what it has buffered, up to twice its read buffer)
                assert 2 * PART <= received.get() <= 2 * PART + 2 * READ_BUFSIZE
                assert durable_parts(moto_s3, bucket, uid) == []
                assert os.listdir(scratch) == []  # two parts on disk, in a file without a name
            finally:
                switch.release()
            assert await sending == len(data)
            assert durable_parts(moto_s3, bucket, uid) == [PART] * 4  # and a tail object
            await finish(http, running.url, uid, data, len(data))
            storage = running.app[STORAGE_KEY]
            assert isinstance(storage, S3Storage)
            assert len(storage.sessions.locks) == 0  # none kept after use


def s3_replica(workdir: Path, moto: MotoS3, bucket: str, env: dict[str, str],
               tokens_file: Path | None = None) -> ReceiverProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "scratch").mkdir()
    return ReceiverProcess(workdir, tokens_file=tokens_file, env=env, extra_toml=moto.toml(
        bucket, scratch_dir=f'"{workdir / "scratch"}"'))


def own_fds() -> list[tuple[str, str]]:
    """(path under /proc/self/fd, what it points at) of this process's open files."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append((f"/proc/self/fd/{fd}", os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:  # the directory listing's own, already closed
            continue
    return found


def scratch_fds(pid: int, scratch: Path) -> list[str]:
    """The receiver's open files in its scratch dir (an unlinked file shows as "(deleted)")."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed since the listing (the receiver keeps working)
            continue
        if target.startswith(str(scratch)):
            found.append(target)
    return found


async def test_kill9_mid_part_and_client_gone_mid_part_resume_on_other_replica(
        tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str]) -> None:
    """Replica A killed -9 while part 3 is in its scratch file: B reports the two acknowledged
    parts, takes the rest and commits; the scratch file never had a name. A client that goes
    away mid-part: what arrived becomes durable (a part and a tail) and the upload finishes on
    the other replica."""
    bucket = moto_s3.new_bucket()
    a = s3_replica(tmp_path / "a", moto_s3, bucket, s3_env)
    tokens = make_tokens(a.tokens_file)
    b = s3_replica(tmp_path / "b", moto_s3, bucket, s3_env, tokens_file=a.tokens_file)
    a.start()
    b.start()
    try:
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {tokens.alice}"}) as http:
            data = os.urandom(3 * PART + 777)
            uid = await create(http, a.url, "killed.dump")
            conn = await raw_patch(a.url, tokens.alice, uid, 0, len(data),
                                   data[:2 * PART + MiB])

            async def two_parts_durable() -> bool:
                return await offset_of(http, b.url, uid) == 2 * PART

            await wait_until(two_parts_durable, 20, "two parts acknowledged on B")
            open_files = scratch_fds(a.pid, tmp_path / "a" / "scratch")
            assert open_files and all(f.endswith("(deleted)") for f in open_files)
            assert os.listdir(tmp_path / "a" / "scratch") == []
            a.kill9()
            conn.transport.abort()
            assert await offset_of(http, b.url, uid) == 2 * PART
            await finish(http, b.url, uid, data, 2 * PART)

            data = os.urandom(2 * PART + 999)
            a.start()
            uid = await create(http, a.url, "gone.dump")
            sent = PART + 2 * MiB
            conn = await raw_patch(a.url, tokens.alice, uid, 0, len(data), data[:sent])

            async def all_read() -> bool:  # bytes the receiver had not read yet would be lost
                return await bytes_received(http, a.url) >= sent

            await wait_until(all_read, 20, "the receiver read all that was sent")
            log_at = log_offset(a.log_path)
            conn.close()
            await conn.wait_closed()
            await wait_for_log(a.log_path, "went away during PATCH", 20, after=log_at)
            assert await offset_of(http, b.url, uid) == sent
            assert durable_parts(moto_s3, bucket, uid) == [PART]  # and a tail
            await finish(http, b.url, uid, data, sent)
    finally:
        a.stop()
        b.stop()


async def test_scratch_full_or_gone_is_507_and_leaves_nothing(
        tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str]) -> None:
    """A scratch disk too small for two parts: the PATCH is refused with 507
    insufficient_storage (never a 500), the scratch file is gone with the request, the upload
    keeps its durable offset and finishes once there is room; a scratch dir that vanished is a
    507 too; one missing at start-up is refused (exit 4)."""
    bucket = moto_s3.new_bucket()
    scratch = tmp_path / "scratch"
    with small_tmpfs(scratch, PART + MiB):
        cfg = s3_receiver_cfg(receiver_config(tmp_path), moto_s3, bucket, scratch_dir=scratch)
        tokens = make_tokens(cfg.tokens_file)
        running = await in_process(cfg)
        data = os.urandom(3 * PART)
        try:
            async with aiohttp.ClientSession(
                    headers={"Authorization": f"Bearer {tokens.alice}"}) as http:
                uid = await create(http, running.url, "full.dump")
                async with http.patch(f"{running.url}/api/v1/uploads/{uid}",
                                      data=chunked(data), headers={"Upload-Offset": "0"}) as r:
                    assert r.status == 507
                    assert (await r.json())["error"] == "insufficient_storage"
                assert shutil.disk_usage(scratch).used == 0
                offset = await offset_of(http, running.url, uid)
                assert offset in (0, PART)  # part 1 acknowledged or not: never more
        finally:
            await running.close()
    running = await in_process(cfg)  # room again: the small filesystem is gone
    try:
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {tokens.alice}"}) as http:
            await finish(http, running.url, uid, data, offset)
            scratch.rmdir()
            uid = await create(http, running.url, "gone.dump")
            async with http.patch(f"{running.url}/api/v1/uploads/{uid}", data=b"x" * 1000,
                                  headers={"Upload-Offset": "0"}) as r:
                assert r.status == 507
                assert "scratch" in (await r.json())["message"]
    finally:
        await running.close()
    with pytest.raises(ConfigError, match="scratch_dir"):
        await in_process(cfg)


async def test_a_part_changed_on_the_scratch_disk_is_never_sent(
        tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str]) -> None:
    """Bytes that change in the scratch file between their arrival and their upload (a bad
    disk) are caught against the part's SHA-256 as received: 503, the part is not saved, and
    the client's resend from the durable offset completes with the right sha256."""
    data = os.urandom(3 * PART + 123)
    async with behind_switch(tmp_path, moto_s3) as behind:
        switch, bucket, running, scratch = (behind.switch, behind.bucket, behind.running,
                                            behind.scratch)
        received = behind.metrics.bytes_received._value
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {behind.token}"}) as http:
            uid = await create(http, running.url, "bitrot.dump")
            switch.hold(budget_bytes=256 * 1024)

            async def patch() -> int:
                async with http.patch(f"{running.url}/api/v1/uploads/{uid}",
                                      data=chunked(data), headers={"Upload-Offset": "0"}) as resp:
                    return resp.status

            sending = asyncio.create_task(patch())
            try:
                await wait_until(lambda: received.get() >= 2 * PART, 20,
                                 "part 2 received while part 1 is held")
                # part 2 waits in the second slot of the (unlinked) scratch file: change a byte
                (path,) = [fd for fd, to in own_fds() if to.startswith(str(scratch))]
                with open(path, "r+b") as scratch_file:
                    scratch_file.seek(PART + PART // 2)
                    byte = scratch_file.read(1)
                    scratch_file.seek(PART + PART // 2)
                    scratch_file.write(bytes([byte[0] ^ 0xFF]))
            finally:
                switch.release()
            assert await sending == 503
            assert durable_parts(moto_s3, bucket, uid) == [PART]  # part 1 only
            await finish(http, running.url, uid, data, await offset_of(http, running.url, uid))


async def test_a_frozen_store_is_a_503_in_bounded_time(
        tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that takes connections and then answers nothing (frozen, not down) is a 503
    once a call's time bound passes, for a PATCH and for /health, never a request held for
    good; it answers again when the store does (bounds shortened for the test)."""
    monkeypatch.setattr(conn, "CALL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(conn, "SLOWEST_BYTES_PER_S", 1 << 40)
    monkeypatch.setattr(health, "PROBE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(health, "HEALTH_CACHE_S", 0.0)
    data = os.urandom(PART + 99)
    async with behind_switch(tmp_path, moto_s3) as behind:
        switch, running = behind.switch, behind.running
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {behind.token}"}) as http:
            uid = await create(http, running.url, "frozen.dump")
            switch.hold(budget_bytes=0)
            t0 = asyncio.get_running_loop().time()
            async with http.patch(f"{running.url}/api/v1/uploads/{uid}", data=data,
                                  headers={"Upload-Offset": "0"}) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"].isdigit()
            async with http.get(f"{running.url}/health") as resp:
                assert resp.status == 503
            assert asyncio.get_running_loop().time() - t0 < 20
            switch.release()
            await finish(http, running.url, uid, data, await offset_of(http, running.url, uid))
