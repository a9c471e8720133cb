"""Receiver under faults: killed mid-upload, disk full, dropped sockets, hostile paths."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mt5backupd.receiver.auth import TokenStore
from mt5backupd.receiver.context import STORAGE_KEY
from mt5backupd.receiver.server import start_receiver
from mt5backupd.testkit.receiverproc import ReceiverProcess
from tests.diskfaults import small_tmpfs
from tests.receiver_harness import Receiver, TokenSet, make_tokens, receiver_config
from tests.waits import wait_until


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_kill9_mid_upload_then_resume_after_restart(
    receiver_process: tuple[ReceiverProcess, TokenSet], tmp_path: Path
) -> None:
    """kill -9 of the receiver mid-PATCH; after restart the offset is what landed on disk, the
    rest resumes from there and the committed file hashes to the source."""
    proc, tokens = receiver_process
    proc.start()
    data = os.urandom(24 * 1024 * 1024)
    h = {"Authorization": f"Bearer {tokens.alice}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proc.url}/api/v1/uploads",
                             json={"name": "k.dump", "size": len(data)}, headers=h) as resp:
            uid = (await resp.json())["upload_id"]
        sent = 0

        async def slow_body() -> AsyncIterator[bytes]:
            nonlocal sent
            step = 1024 * 1024
            for i in range(0, len(data), step):
                yield data[i : i + step]
                sent += step
                if sent >= 10 * step:
                    proc.kill9()  # really kill the server while the body is in flight
                    # the server stays dead a moment while the client goes on sending, so the
                    # next chunk meets the reset (a crash mid-body is the behaviour under test)
                    await asyncio.sleep(0.2)

        with pytest.raises(aiohttp.ClientError):
            async with http.patch(f"{proc.url}/api/v1/uploads/{uid}", data=slow_body(),
                                  headers={**h, "Upload-Offset": "0"}) as resp:
                await resp.read()
        proc.start()
        async with http.head(f"{proc.url}/api/v1/uploads/{uid}", headers=h) as resp:
            assert resp.status == 200
            offset = int(resp.headers["Upload-Offset"])
        assert 0 < offset <= 10 * 1024 * 1024
        async with http.patch(f"{proc.url}/api/v1/uploads/{uid}", data=data[offset:],
                              headers={**h, "Upload-Offset": str(offset)}) as resp:
            assert resp.status == 204
            assert int(resp.headers["Upload-Offset"]) == len(data)
        async with http.post(f"{proc.url}/api/v1/uploads/{uid}/commit",
                             json={"sha256": sha(data), "size": len(data)}, headers=h) as resp:
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["sha256"] == sha(data)
        async with http.get(f"{proc.url}/api/backup/download/k.dump", headers=h) as resp:
            assert sha(await resp.read()) == sha(data)


async def test_client_disconnect_keeps_received_bytes(receiver: Receiver) -> None:
    """A socket closed mid-body keeps what arrived; HEAD reports it and the upload resumes."""
    h = receiver.auth(receiver.tokens.alice)
    data = os.urandom(6 * 1024 * 1024)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{receiver.url}/api/v1/uploads", json={"name": "d.dump"},
                             headers=h) as resp:
            uid = (await resp.json())["upload_id"]
    host, port = receiver.url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    head = (f"PATCH /api/v1/uploads/{uid} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {receiver.tokens.alice}\r\nUpload-Offset: 0\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    writer.write(head.encode() + data[: 3 * 1024 * 1024])
    await writer.drain()
    landed = receiver.cfg.data_dir / "partial" / "alice" / f"{uid}.data"
    await wait_until(lambda: landed.exists() and landed.stat().st_size > 0, 10,
                     "the first bytes of the body on the receiver's disk")
    writer.transport.abort()  # really close the socket mid-stream

    def body_handled() -> bool:
        in_flight = receiver.metrics.registry.get_sample_value(
            "mt5backup_receiver_uploads_in_flight")
        return in_flight == 0

    await wait_until(body_handled, 10, "the receiver to finish with the dropped body")
    async with aiohttp.ClientSession() as http:
        async with http.head(f"{receiver.url}/api/v1/uploads/{uid}", headers=h) as resp:
            offset = int(resp.headers["Upload-Offset"])
        assert 0 < offset <= 3 * 1024 * 1024
        async with http.patch(f"{receiver.url}/api/v1/uploads/{uid}", data=data[offset:],
                              headers={**h, "Upload-Offset": str(offset)}) as resp:
            assert resp.status == 204
        async with http.post(f"{receiver.url}/api/v1/uploads/{uid}/commit",
                             json={"sha256": sha(data), "size": len(data)}, headers=h) as resp:
            assert resp.status == 201


async def test_disk_full_is_507_and_leaves_nothing(tmp_path: Path) -> None:
    """ENOSPC on a real 8 MiB tmpfs: 507, no temp data left, an older backup intact."""
    with small_tmpfs(tmp_path / "small", 8 * 1024 * 1024) as data_dir:
        cfg = receiver_config(tmp_path, data_dir=data_dir)
        tokens = make_tokens(cfg.tokens_file)
        running = await start_receiver(cfg, TokenStore(cfg.tokens_file))
        h = {"Authorization": f"Bearer {tokens.alice}"}
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{running.url}/api/backup/upload?name=old.dump",
                                     data=b"o" * 1000, headers=h) as resp:
                    assert resp.status == 200
                big = os.urandom(12 * 1024 * 1024)
                for body_path in ("/api/backup/upload?name=big.dump", "resumable"):
                    if body_path == "resumable":
                        async with http.post(f"{running.url}/api/v1/uploads",
                                             json={"name": "big2.dump"}, headers=h) as resp:
                            uid = (await resp.json())["upload_id"]
                        url = f"{running.url}/api/v1/uploads/{uid}"
                        headers = {**h, "Upload-Offset": "0"}
                        method = http.patch
                    else:
                        url, headers, method = f"{running.url}{body_path}", h, http.post

                    async def body() -> AsyncIterator[bytes]:
                        for i in range(0, len(big), 1024 * 1024):
                            yield big[i : i + 1024 * 1024]

                    async with method(url, data=body(), headers=headers) as resp:
                        assert resp.status == 507, await resp.text()
                partial = [p for p in (data_dir / "partial").rglob("*") if p.is_file()]
                assert partial == []
                async with http.get(f"{running.url}/api/backup/list", headers=h) as resp:
                    assert [b["id"] for b in (await resp.json())["backups"]] == ["old.dump"]
                async with http.get(f"{running.url}/api/backup/download/old.dump",
                                    headers=h) as resp:
                    assert await resp.read() == b"o" * 1000
        finally:
            await running.close()


async def test_min_free_bytes_refuses_with_507(tmp_path: Path) -> None:
    """When the upload would leave less than min_free_bytes free, it is refused up front."""
    cfg = receiver_config(tmp_path, min_free_bytes=2**62)
    tokens = make_tokens(cfg.tokens_file)
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file))
    try:
        async with aiohttp.ClientSession() as http:
            h = {"Authorization": f"Bearer {tokens.alice}"}
            async with http.post(f"{running.url}/api/backup/upload?name=x.dump", data=b"abc",
                                 headers=h) as resp:
                assert resp.status == 507
            async with http.post(f"{running.url}/api/v1/uploads",
                                 json={"name": "y.dump", "size": 3}, headers=h) as resp:
                assert resp.status == 507
    finally:
        await running.close()


HOSTILE_PATHS = [
    "/api/backup/download/..%2F..%2F..%2Fsecret.txt",
    "/api/backup/download/%2e%2e%2fsecret.txt",
    "/api/backup/download/..%2fsecret.txt.sha256",
    "/api/backup/download/%00",
    "/api/backup/download/a%00b",
    "/api/backup/download/%2Fetc%2Fpasswd",
    "/api/backup/download/" + "x" * 300,
    "/api/backup/download/.hidden",
    "/api/backup/download/../../secret.txt",
    "/api/backup/download/..",
    "/api/backup/download/link.dump",
    "/api/backup/list?client=..%2F..",
    "/api/backup/list?client=%2Fetc",
    "/api/v1/uploads/..%2F..%2Fsecret",
    "/api/v1/uploads/0123456789abcdef0123456789abcdeg",
]


async def raw_get(url: str, path: str, token: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    status = int(raw.split(b" ", 2)[1])
    return status, raw


@pytest.mark.parametrize("path", HOSTILE_PATHS)
async def test_hostile_paths_never_escape(receiver: Receiver, tmp_path: Path, path: str) -> None:
    """Traversal, encoded, NUL, absolute, over-long and symlinked ids get 400/404 and no byte
    from outside data_dir."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    # A symlink planted inside the client's namespace must not be followed out of the root.
    ns = receiver.cfg.data_dir / "backups" / "alice"
    ns.mkdir(parents=True, exist_ok=True)
    (ns / "link.dump").mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (ns / "link.dump" / "data").symlink_to(secret)
    with contextlib.suppress(FileExistsError):
        (ns / "link.dump" / "meta.json").write_text(
            '{"id":"link.dump","client":"alice","name":"link.dump","kind":"database",'
            '"size":18,"sha256":"' + "0" * 64 + '","created":"2026-01-01T00:00:00Z"}')
    status, raw = await raw_get(receiver.url, path, receiver.tokens.alice)
    assert status in (400, 403, 404), raw[:300]
    assert b"TOP-SECRET" not in raw


async def test_partial_expiry_and_restart_rehash(tmp_path: Path) -> None:
    """Idle partial uploads expire after partial_ttl_s; a live one survives a restart and its
    hash is rebuilt from disk."""
    cfg = receiver_config(tmp_path, partial_ttl_s=60.0)
    tokens = make_tokens(cfg.tokens_file)
    h = {"Authorization": f"Bearer {tokens.alice}"}
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file))
    try:
        async with aiohttp.ClientSession() as http:
            uids = []
            for name in ("idle.dump", "live.dump"):
                async with http.post(f"{running.url}/api/v1/uploads", json={"name": name},
                                     headers=h) as resp:
                    uids.append((await resp.json())["upload_id"])
                async with http.patch(f"{running.url}/api/v1/uploads/{uids[-1]}",
                                      data=b"first-half", headers={**h, "Upload-Offset": "0"}):
                    pass
    finally:
        await running.close()
    idle_data = cfg.data_dir / "partial" / "alice" / f"{uids[0]}.data"
    old = time.time() - 3600
    os.utime(idle_data, (old, old))
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file))  # a "restart"
    try:
        # The expiry task runs at start-up; calling it again must find nothing more to do.
        await wait_until(lambda: not idle_data.exists(), 10, "the start-up expiry")
        assert await running.app[STORAGE_KEY].expire_partials() == 0
        assert not idle_data.exists()
        async with aiohttp.ClientSession() as http:
            async with http.head(f"{running.url}/api/v1/uploads/{uids[0]}", headers=h) as resp:
                assert resp.status == 404
            async with http.patch(f"{running.url}/api/v1/uploads/{uids[1]}", data=b"+second",
                                  headers={**h, "Upload-Offset": "10"}) as resp:
                assert resp.status == 204
            full = b"first-half+second"
            async with http.post(f"{running.url}/api/v1/uploads/{uids[1]}/commit",
                                 json={"sha256": sha(full), "size": len(full)}, headers=h) as resp:
                assert resp.status == 201
    finally:
        await running.close()
