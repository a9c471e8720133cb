"""One set of promises, two storage backends: every test here runs against the filesystem
and against an S3 bucket (moto's server), through the receiver's real HTTP routes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mt5backupd.config import ReceiverConfig
from tests.receiver_harness import Receiver, receiver_config
from tests.s3_fixtures import TEST_PART_BYTES, MotoS3, s3_receiver_cfg

MiB = 1024**2


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["filesystem", "s3"])
def receiver_cfg(request: pytest.FixtureRequest, tmp_path: Path, moto_s3: MotoS3,
                 s3_env: dict[str, str]) -> ReceiverConfig:
    cfg = receiver_config(tmp_path, max_upload_bytes=32 * MiB)
    if request.param == "s3":
        cfg = s3_receiver_cfg(cfg, moto_s3, moto_s3.new_bucket())
    return cfg


class Api:
    """The resumable protocol, spoken by one token."""

    def __init__(self, http: aiohttp.ClientSession, rcv: Receiver, token: str) -> None:
        self.http = http
        self.url = rcv.url
        self.h = rcv.auth(token)

    async def create(self, name: str, size: int | None = None, expect: int = 201) -> str:
        body: dict[str, Any] = {"name": name}
        if size is not None:
            body["size"] = size
        async with self.http.post(f"{self.url}/api/v1/uploads", json=body,
                                  headers=self.h) as resp:
            assert resp.status == expect, await resp.text()
            return str((await resp.json()).get("upload_id", ""))

    async def patch(self, uid: str, offset: int, data: bytes) -> tuple[int, dict[str, Any]]:
        async with self.http.patch(f"{self.url}/api/v1/uploads/{uid}", data=data,
                                   headers={**self.h, "Upload-Offset": str(offset)}) as resp:
            body = {} if resp.status == 204 else await resp.json()
            return resp.status, {**body, "offset": resp.headers.get("Upload-Offset")}

    async def head(self, uid: str) -> tuple[int, int | None]:
        async with self.http.head(f"{self.url}/api/v1/uploads/{uid}", headers=self.h) as resp:
            offset = resp.headers.get("Upload-Offset")
            return resp.status, int(offset) if offset is not None else None

    async def commit(self, uid: str, data: bytes, *, sha256: str | None = None,
                     size: int | None = None) -> tuple[int, dict[str, Any]]:
        body = {"sha256": sha256 or sha(data), "size": len(data) if size is None else size}
        async with self.http.post(f"{self.url}/api/v1/uploads/{uid}/commit", json=body,
                                  headers=self.h) as resp:
            return resp.status, await resp.json()

    async def upload(self, name: str, data: bytes, pieces: int = 3) -> dict[str, Any]:
        uid = await self.create(name)
        step = max(1, -(-len(data) // pieces))
        offset = 0
        while offset < len(data):
            status, got = await self.patch(uid, offset, data[offset:offset + step])
            assert status == 204, got
            offset = int(got["offset"])
        status, record = await self.commit(uid, data)
        assert status == 201, record
        return record

    async def list(self) -> list[str]:
        async with self.http.get(f"{self.url}/api/backup/list", headers=self.h) as resp:
            assert resp.status == 200
            return [b["id"] for b in (await resp.json())["backups"]]

    async def download(self, name: str, range_: str | None = None) -> tuple[int, bytes]:
        headers = {**self.h, **({"Range": range_} if range_ else {})}
        async with self.http.get(f"{self.url}/api/backup/download/{name}",
                                 headers=headers) as resp:
            return resp.status, await resp.read()


async def test_session_offsets_commit_list_and_ranged_download(
        receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """Offsets advance across part boundaries, the commit verifies, the backup lists and
    downloads whole and by Range."""
    api = Api(http, receiver, receiver.tokens.alice)
    data = os.urandom(2 * TEST_PART_BYTES + 12345)
    uid = await api.create("db-1.dump.zst", size=len(data))
    assert await api.head(uid) == (200, 0)
    first = TEST_PART_BYTES + 100  # one whole part and a tail
    assert (await api.patch(uid, 0, data[:first]))[0] == 204
    assert await api.head(uid) == (200, first)
    assert (await api.patch(uid, first, data[first:]))[0] == 204
    assert await api.head(uid) == (200, len(data))
    status, record = await api.commit(uid, data)
    assert status == 201, record
    assert (record["sha256"], record["size"]) == (sha(data), len(data))
    assert await api.list() == ["db-1.dump.zst"]
    assert await api.download("db-1.dump.zst") == (200, data)
    start = TEST_PART_BYTES - 10
    assert await api.download("db-1.dump.zst", f"bytes={start}-{start + 99}") == (
        206, data[start:start + 100])
    assert await api.download("db-1.dump.zst", "bytes=-7") == (206, data[-7:])
    assert (await api.head(uid))[0] == 404  # a committed session is gone


async def test_offset_mismatch_is_409_with_the_current_offset(
        receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """A PATCH at the wrong offset is refused with 409 and told where the upload is."""
    api = Api(http, receiver, receiver.tokens.alice)
    uid = await api.create("x.dump")
    assert (await api.patch(uid, 0, b"a" * 1000))[0] == 204
    status, got = await api.patch(uid, 10, b"b")
    assert status == 409
    assert got["error"] == "offset_mismatch"
    assert int(got["offset"]) == 1000


@pytest.mark.parametrize("wrong", ["sha256", "size"])
async def test_commit_with_wrong_sha_or_size_is_422_and_drops_the_upload(
        receiver: Receiver, http: aiohttp.ClientSession, wrong: str) -> None:
    """A commit whose sha256 or size is not what arrived is 422; nothing becomes a backup."""
    api = Api(http, receiver, receiver.tokens.alice)
    data = os.urandom(50_000)
    uid = await api.create("bad.dump")
    assert (await api.patch(uid, 0, data))[0] == 204
    if wrong == "sha256":
        status, got = await api.commit(uid, data, sha256="0" * 64)
    else:
        status, got = await api.commit(uid, data, size=len(data) + 1)
    assert status == 422, got
    assert got["error"] == f"{'checksum' if wrong == 'sha256' else 'size'}_mismatch"
    assert await api.list() == []
    assert (await api.head(uid))[0] == 404


async def test_append_only_names_and_idempotent_retry(
        receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """A committed name is never replaced: a new session for it is 409, a racing one is 409
    at commit, and the very same bytes again answer with the existing record."""
    api = Api(http, receiver, receiver.tokens.alice)
    data = os.urandom(70_000)
    late = await api.create("keep.dump")  # begun before the name was taken
    again = await api.create("keep.dump")
    first = await api.upload("keep.dump", data)
    await api.create("keep.dump", expect=409)
    assert (await api.patch(late, 0, b"other bytes"))[0] == 204
    status, got = await api.commit(late, b"other bytes")
    assert status == 409, got
    assert (await api.patch(again, 0, data))[0] == 204
    status, same = await api.commit(again, data)
    assert status == 201
    assert same == first
    assert await api.download("keep.dump") == (200, data)


async def test_too_large_is_413(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """A declared size over the limit, or more bytes than declared, is 413."""
    api = Api(http, receiver, receiver.tokens.alice)
    await api.create("huge.dump", size=receiver.cfg.max_upload_bytes + 1, expect=413)
    uid = await api.create("small.dump", size=10)
    status, got = await api.patch(uid, 0, b"x" * 11)
    assert status == 413, got


async def test_client_namespaces_and_partials_never_listed(
        receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """Each token sees only its own backups and uploads; an upload in progress is never
    listed or downloadable; an admin lists every client."""
    alice = Api(http, receiver, receiver.tokens.alice)
    bob = Api(http, receiver, receiver.tokens.bob)
    await alice.upload("same-name.dump", b"alice's")
    await bob.upload("same-name.dump", b"bob's!")
    pending = await alice.create("pending.dump")
    assert (await alice.patch(pending, 0, b"half"))[0] == 204
    assert await alice.list() == ["same-name.dump"]
    assert await alice.download("same-name.dump") == (200, b"alice's")
    assert await bob.download("same-name.dump") == (200, b"bob's!")
    assert (await alice.download("pending.dump"))[0] == 404
    assert (await bob.head(pending))[0] == 404  # not even bob's to ask about
    assert (await bob.patch(pending, 4, b"x"))[0] == 404
    admin = Api(http, receiver, receiver.tokens.admin)
    async with http.get(f"{receiver.url}/api/backup/list", headers=admin.h) as resp:
        clients = sorted(b["client"] for b in (await resp.json())["backups"])
    assert clients == ["alice", "bob"]


async def test_abort_removes_the_upload(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """DELETE of an upload: 204, then it is gone; its name is free again."""
    api = Api(http, receiver, receiver.tokens.alice)
    uid = await api.create("gone.dump")
    assert (await api.patch(uid, 0, os.urandom(TEST_PART_BYTES + 1)))[0] == 204
    async with http.delete(f"{receiver.url}/api/v1/uploads/{uid}", headers=api.h) as resp:
        assert resp.status == 204
    assert (await api.head(uid))[0] == 404
    await api.upload("gone.dump", b"fresh")


async def test_legacy_one_shot_upload_and_sidecar(
        receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """The legacy multipart upload stores and verifies; the .sha256 line and the bytes come
    back; a wrong declared sha256 is 422 and an empty body 400, and neither stores anything."""
    api = Api(http, receiver, receiver.tokens.alice)
    data = os.urandom(TEST_PART_BYTES + 4321)
    form = aiohttp.FormData()
    form.add_field("sha256", sha(data))
    form.add_field("file", data, filename="legacy.dump")
    async with http.post(f"{receiver.url}/api/backup/upload", data=form, headers=api.h) as resp:
        assert resp.status == 200, await resp.text()
    assert await api.download("legacy.dump") == (200, data)
    status, line = await api.download("legacy.dump.sha256")
    assert (status, line.decode()) == (200, f"{sha(data)}  legacy.dump\n")
    async with http.post(f"{receiver.url}/api/backup/upload?name=wrong.dump&sha256={'1' * 64}",
                         data=b"abc", headers=api.h) as resp:
        assert resp.status == 422
    # an empty body (a legacy script whose pg_dump failed before its first byte) stores nothing
    empty = aiohttp.FormData()
    empty.add_field("file", b"", filename="empty.dump")
    for body in (empty, b""):
        async with http.post(f"{receiver.url}/api/backup/upload?name=empty.dump", data=body,
                             headers=api.h) as resp:
            assert resp.status == 400, await resp.text()
            answer = await resp.json()
            assert answer["error"] == "bad_request" and "empty upload" in answer["message"]
    assert await api.list() == ["legacy.dump"]


async def test_prune_and_delete(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """Admin prune keeps the newest by policy; admin delete removes one; client tokens may
    do neither."""
    api = Api(http, receiver, receiver.tokens.alice)
    admin = Api(http, receiver, receiver.tokens.admin)
    for day in (1, 2, 3):
        await api.upload(f"mt5_trading-2026110{day}-030000.dump.zst", os.urandom(100))
    async with http.post(f"{receiver.url}/api/admin/prune",
                         json={"client": "alice", "keep_last": 2}, headers=admin.h) as resp:
        assert resp.status == 200
        pruned = await resp.json()
    assert [r["id"] for r in pruned["removed"]] == ["mt5_trading-20261101-030000.dump.zst"]
    assert pruned["locked"] == []
    async with http.delete(f"{receiver.url}/api/backup/mt5_trading-20261102-030000.dump.zst",
                           headers=api.h) as resp:
        assert resp.status == 403
    async with http.delete(
            f"{receiver.url}/api/backup/mt5_trading-20261102-030000.dump.zst?client=alice",
            headers=admin.h) as resp:
        assert resp.status == 200
    assert await api.list() == ["mt5_trading-20261103-030000.dump.zst"]


async def test_empty_backup(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """A zero-byte upload commits and downloads as zero bytes."""
    api = Api(http, receiver, receiver.tokens.alice)
    uid = await api.create("empty.dump", size=0)
    status, record = await api.commit(uid, b"")
    assert status == 201, record
    assert await api.download("empty.dump") == (200, b"")
