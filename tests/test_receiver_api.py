"""The receiver over real loopback HTTP: legacy curl flow, resumable uploads, auth, admin."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.receiver_harness import Receiver


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def upload_resumable(http: aiohttp.ClientSession, rcv: Receiver, token: str, name: str,
                           data: bytes, *, parts: int = 3) -> dict[str, object]:
    h = rcv.auth(token)
    async with http.post(f"{rcv.url}/api/v1/uploads", json={"name": name, "size": len(data)},
                         headers=h) as resp:
        assert resp.status == 201, await resp.text()
        uid = (await resp.json())["upload_id"]
    step = max(1, len(data) // parts)
    offset = 0
    while offset < len(data):
        chunk = data[offset : offset + step]
        async with http.patch(f"{rcv.url}/api/v1/uploads/{uid}", data=chunk,
                              headers={**h, "Upload-Offset": str(offset)}) as resp:
            assert resp.status == 204, await resp.text()
            offset = int(resp.headers["Upload-Offset"])
    async with http.post(f"{rcv.url}/api/v1/uploads/{uid}/commit",
                         json={"sha256": sha(data), "size": len(data)}, headers=h) as resp:
        assert resp.status == 201, await resp.text()
        result: dict[str, object] = await resp.json()
        return result


async def test_legacy_curl_flow(receiver: Receiver, tmp_path: Path) -> None:
    """curl -F upload, list, download and `sha256sum -c` on the .sha256 line all work."""
    dump = tmp_path / "mt5_trading-20261125-030000.dump"
    dump.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    auth = f"Authorization: Bearer {receiver.tokens.alice}"

    def curl(*args: str) -> bytes:
        return subprocess.run(["curl", "-sS", "-f", "-H", auth, *args], check=True,
                              capture_output=True).stdout

    up = json.loads(await asyncio.to_thread(
        curl, "-F", f"file=@{dump}", f"{receiver.url}/api/backup/upload"))
    assert up["id"] == dump.name
    assert up["sha256"] == sha(dump.read_bytes())
    assert up["size"] == dump.stat().st_size

    listing = json.loads(await asyncio.to_thread(curl, f"{receiver.url}/api/backup/list"))
    assert [b["id"] for b in listing["backups"]] == [dump.name]

    out = tmp_path / "download"
    out.mkdir()
    await asyncio.to_thread(curl, "-o", str(out / dump.name),
                            f"{receiver.url}/api/backup/download/{dump.name}")
    await asyncio.to_thread(curl, "-o", str(out / f"{dump.name}.sha256"),
                            f"{receiver.url}/api/backup/download/{dump.name}.sha256")
    check = subprocess.run(["sha256sum", "-c", f"{dump.name}.sha256"], cwd=out,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK" in check.stdout


async def test_legacy_upload_with_sha_field_and_raw_body(receiver: Receiver,
                                                         http: aiohttp.ClientSession) -> None:
    """A multipart sha256 field (even after the file) and a raw body with a header both verify."""
    data = os.urandom(100_000)
    h = receiver.auth(receiver.tokens.alice)
    form = aiohttp.FormData()
    form.add_field("file", data, filename="a.dump")
    form.add_field("sha256", f"{sha(data)}  a.dump\n")
    async with http.post(f"{receiver.url}/api/backup/upload", data=form, headers=h) as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(f"{receiver.url}/api/backup/upload?name=raw.dump", data=data,
                         headers={**h, "X-Content-SHA256": sha(data)}) as resp:
        assert resp.status == 200
        assert (await resp.json())["id"] == "raw.dump"
    bad = aiohttp.FormData()
    bad.add_field("file", data, filename="bad.dump")
    bad.add_field("sha256", "0" * 64)
    async with http.post(f"{receiver.url}/api/backup/upload", data=bad, headers=h) as resp:
        assert resp.status == 422
        assert (await resp.json())["error"] == "checksum_mismatch"
    async with http.get(f"{receiver.url}/api/backup/list", headers=h) as resp:
        assert sorted(b["id"] for b in (await resp.json())["backups"]) == ["a.dump", "raw.dump"]
    assert list((receiver.cfg.data_dir / "partial" / "alice").iterdir()) == []


async def test_resumable_upload_roundtrip_and_range(receiver: Receiver,
                                                    http: aiohttp.ClientSession) -> None:
    """Chunked upload at explicit offsets commits; download honours Range, ETag, If-None-Match."""
    data = os.urandom(2_500_000)
    record = await upload_resumable(http, receiver, receiver.tokens.alice, "r.dump", data)
    assert record["sha256"] == sha(data)
    h = receiver.auth(receiver.tokens.alice)
    url = f"{receiver.url}/api/backup/download/r.dump"
    async with http.get(url, headers=h) as resp:
        assert resp.status == 200
        assert resp.headers["ETag"] == f'"{sha(data)}"'
        assert resp.headers["X-Content-SHA256"] == sha(data)
        assert await resp.read() == data
    async with http.get(url, headers={**h, "Range": "bytes=1000-1999"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        assert await resp.read() == data[1000:2000]
    async with http.get(url, headers={**h, "Range": "bytes=-10"}) as resp:
        assert await resp.read() == data[-10:]
    async with http.get(url, headers={**h, "Range": f"bytes={len(data)}-"}) as resp:
        assert resp.status == 416
    async with http.get(url, headers={**h, "If-None-Match": f'"{sha(data)}"'}) as resp:
        assert resp.status == 304


async def test_wrong_offset_is_409_and_changes_nothing(receiver: Receiver,
                                                      http: aiohttp.ClientSession) -> None:
    """A PATCH at the wrong offset gets 409 with the current offset; the data is untouched."""
    h = receiver.auth(receiver.tokens.alice)
    async with http.post(f"{receiver.url}/api/v1/uploads", json={"name": "o.dump"},
                         headers=h) as resp:
        uid = (await resp.json())["upload_id"]
    url = f"{receiver.url}/api/v1/uploads/{uid}"
    async with http.patch(url, data=b"a" * 1000, headers={**h, "Upload-Offset": "0"}) as resp:
        assert resp.status == 204
    for wrong in ("0", "999", "5000"):
        async with http.patch(url, data=b"b" * 10, headers={**h, "Upload-Offset": wrong}) as resp:
            assert resp.status == 409
            assert resp.headers["Upload-Offset"] == "1000"
            assert (await resp.json())["offset"] == 1000
    async with http.head(url, headers=h) as resp:
        assert resp.headers["Upload-Offset"] == "1000"
    async with http.patch(url, data=b"c", headers=h) as resp:
        assert resp.status == 400  # Upload-Offset is required
    async with http.post(f"{url}/commit", json={"sha256": sha(b"a" * 1000), "size": 1000},
                         headers=h) as resp:
        assert resp.status == 201


@pytest.mark.parametrize(
    ("commit", "reason"),
    [({"sha256": "f" * 64, "size": 4}, "checksum_mismatch"),
     ({"sha256": sha(b"data"), "size": 5}, "size_mismatch")],
)
async def test_commit_mismatch_refused_and_discarded(
    receiver: Receiver, http: aiohttp.ClientSession, commit: dict[str, object], reason: str
) -> None:
    """A commit whose sha256 or size differs is a 422, the data is discarded and nothing listed."""
    h = receiver.auth(receiver.tokens.alice)
    async with http.post(f"{receiver.url}/api/v1/uploads", json={"name": "m.dump"},
                         headers=h) as resp:
        uid = (await resp.json())["upload_id"]
    async with http.patch(f"{receiver.url}/api/v1/uploads/{uid}", data=b"data",
                          headers={**h, "Upload-Offset": "0"}) as resp:
        assert resp.status == 204
    async with http.post(f"{receiver.url}/api/v1/uploads/{uid}/commit", json=commit,
                         headers=h) as resp:
        assert resp.status == 422
        assert (await resp.json())["error"] == reason
    async with http.get(f"{receiver.url}/api/backup/list", headers=h) as resp:
        assert (await resp.json())["backups"] == []
    async with http.head(f"{receiver.url}/api/v1/uploads/{uid}", headers=h) as resp:
        assert resp.status == 404
    assert list((receiver.cfg.data_dir / "partial" / "alice").iterdir()) == []


async def test_oversize_413(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """Over max_upload_bytes: 413 at session creation, on Content-Length, and mid-stream."""
    h = receiver.auth(receiver.tokens.alice)
    limit = receiver.cfg.max_upload_bytes
    async with http.post(f"{receiver.url}/api/v1/uploads",
                         json={"name": "big.dump", "size": limit + 1}, headers=h) as resp:
        assert resp.status == 413
    async with http.post(f"{receiver.url}/api/backup/upload?name=big.dump",
                         data=b"x" * (limit + 1), headers=h) as resp:
        assert resp.status == 413

    async def stream() -> object:
        block = b"y" * (1024 * 1024)
        for _ in range(limit // len(block) + 2):
            yield block

    try:
        async with http.post(f"{receiver.url}/api/backup/upload?name=big.dump", data=stream(),
                             headers=h) as resp:
            assert resp.status == 413
    except aiohttp.ClientError:
        pass  # the server may close before reading the rest; the checks below are what count
    async with http.get(f"{receiver.url}/api/backup/list", headers=h) as resp:
        assert (await resp.json())["backups"] == []
    assert list((receiver.cfg.data_dir / "partial" / "alice").iterdir()) == []
    assert receiver.metrics.rejections.labels(reason="too_large")._value.get() >= 2


async def test_auth_is_uniform_401(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """Missing, malformed and wrong tokens get the same 401 body; /health needs no token."""
    bodies = []
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Bearer {receiver.tokens.alice}x"}):
        async with http.get(f"{receiver.url}/api/backup/list", headers=headers) as resp:
            assert resp.status == 401
            bodies.append(await resp.text())
    assert len(set(bodies)) == 1
    async with http.get(f"{receiver.url}/health") as resp:
        body = await resp.json()
        assert resp.status == 200
        assert body["status"] == "ok"
        assert receiver.tokens.alice not in json.dumps(body)


async def test_namespaces_isolated(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """Each client token sees and downloads only its own backups; same name is per-client."""
    a, b = receiver.tokens.alice, receiver.tokens.bob
    await upload_resumable(http, receiver, a, "same.dump", b"alice-data")
    await upload_resumable(http, receiver, b, "same.dump", b"bob-data")
    await upload_resumable(http, receiver, a, "only-alice.dump", b"secret")
    async with http.get(f"{receiver.url}/api/backup/list", headers=receiver.auth(b)) as resp:
        assert [x["id"] for x in (await resp.json())["backups"]] == ["same.dump"]
    async with http.get(f"{receiver.url}/api/backup/download/same.dump",
                        headers=receiver.auth(b)) as resp:
        assert await resp.read() == b"bob-data"
    async with http.get(f"{receiver.url}/api/backup/download/only-alice.dump",
                        headers=receiver.auth(b)) as resp:
        assert resp.status == 404
    async with http.get(f"{receiver.url}/api/backup/list?client=alice",
                        headers=receiver.auth(b)) as resp:
        assert resp.status == 403
    async with http.get(f"{receiver.url}/api/backup/list",
                        headers=receiver.auth(receiver.tokens.admin)) as resp:
        clients = sorted((x["client"], x["id"]) for x in (await resp.json())["backups"])
        assert clients == [("alice", "only-alice.dump"), ("alice", "same.dump"),
                           ("bob", "same.dump")]


async def test_append_only_and_admin_delete(receiver: Receiver,
                                            http: aiohttp.ClientSession) -> None:
    """Clients cannot delete or overwrite; a re-upload of identical bytes is idempotent; admin
    deletes."""
    a = receiver.auth(receiver.tokens.alice)
    await upload_resumable(http, receiver, receiver.tokens.alice, "keep.dump", b"v1")
    async with http.delete(f"{receiver.url}/api/backup/keep.dump", headers=a) as resp:
        assert resp.status == 403
    async with http.post(f"{receiver.url}/api/backup/upload?name=keep.dump", data=b"v2",
                         headers=a) as resp:
        assert resp.status == 409
    async with http.post(f"{receiver.url}/api/v1/uploads", json={"name": "keep.dump"},
                         headers=a) as resp:
        assert resp.status == 409
    async with http.post(f"{receiver.url}/api/backup/upload?name=keep.dump", data=b"v1",
                         headers=a) as resp:
        assert resp.status == 200  # identical retry
    async with http.get(f"{receiver.url}/api/backup/download/keep.dump", headers=a) as resp:
        assert await resp.read() == b"v1"
    admin = receiver.auth(receiver.tokens.admin)
    async with http.delete(f"{receiver.url}/api/backup/keep.dump?client=alice",
                           headers=admin) as resp:
        assert resp.status == 200
    async with http.get(f"{receiver.url}/api/backup/list", headers=a) as resp:
        assert (await resp.json())["backups"] == []


async def test_admin_prune_keeps_newest(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """Prune applies keep_last per client and kind, never removes the newest, refuses empty."""
    for i in range(4):
        await upload_resumable(http, receiver, receiver.tokens.alice, f"b{i}.dump", b"x%d" % i)
    admin = receiver.auth(receiver.tokens.admin)
    async with http.post(f"{receiver.url}/api/admin/prune", json={}, headers=admin) as resp:
        assert resp.status == 400  # config has no policy and none was given
    async with http.post(f"{receiver.url}/api/admin/prune",
                         json={"keep_last": 2, "dry_run": True}, headers=admin) as resp:
        assert [r["id"] for r in (await resp.json())["removed"]] == ["b0.dump", "b1.dump"]
    async with http.post(f"{receiver.url}/api/admin/prune",
                         json={"keep_last": 1, "client": "alice"}, headers=admin) as resp:
        assert (await resp.json())["count"] == 3
    async with http.get(f"{receiver.url}/api/backup/list",
                        headers=receiver.auth(receiver.tokens.alice)) as resp:
        assert [b["id"] for b in (await resp.json())["backups"]] == ["b3.dump"]
    async with http.post(f"{receiver.url}/api/admin/prune", json={"keep_last": 1},
                         headers=receiver.auth(receiver.tokens.alice)) as resp:
        assert resp.status == 403


async def test_eight_concurrent_uploads(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """Eight uploads at once all commit and each stored copy hashes to its source."""
    blobs = {f"c{i}.dump": os.urandom(1_000_000 + i) for i in range(8)}
    tokens = [receiver.tokens.alice, receiver.tokens.bob]
    results = await asyncio.gather(*(
        upload_resumable(http, receiver, tokens[i % 2], name, data, parts=4)
        for i, (name, data) in enumerate(blobs.items())
    ))
    assert [r["sha256"] for r in results] == [sha(d) for d in blobs.values()]
    for i, (name, data) in enumerate(blobs.items()):
        async with http.get(f"{receiver.url}/api/backup/download/{name}",
                            headers=receiver.auth(tokens[i % 2])) as resp:
            assert sha(await resp.read()) == sha(data)


async def test_metrics_parse_and_count(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    """/metrics parses as Prometheus text and counts bytes, commits and rejections."""
    await upload_resumable(http, receiver, receiver.tokens.alice, "m.dump", b"z" * 5000)
    async with http.get(f"{receiver.url}/api/backup/list") as resp:
        assert resp.status == 401
    async with http.get(f"{receiver.url}/metrics") as resp:
        text = await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("mt5backup_receiver_bytes_received_total", ())] == 5000
    assert samples[("mt5backup_receiver_commits_total", (("kind", "database"),))] == 1
    assert samples[("mt5backup_receiver_rejections_total", (("reason", "unauthorized"),))] == 1
    assert samples[("mt5backup_receiver_storage_used_bytes", ())] == 5000
    assert samples[("mt5backup_receiver_storage_free_bytes", ())] > 0
    assert ("mt5backup_receiver_uploads_in_flight", ()) in samples
