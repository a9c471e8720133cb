"""The S3 backend beyond the shared promises: replicas on one bucket (visibility, resume after
kill -9, a commit race), the store going away mid-upload (503, the client keeps its backup
pending, then succeeds), Object Lock, the start-up preflight, metrics and /health."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mt5backupd.backup.upload import (
    GrowingSource,
    ReceiverClient,
    ReceiverUnavailable,
    UploadProgress,
    commit_with_retries,
    send_following,
)
from mt5backupd.config import Secret
from mt5backupd.errors import EXIT_CONFIG
from mt5backupd.receiver.auth import TokenStore
from mt5backupd.receiver.context import STORAGE_KEY
from mt5backupd.receiver.metrics import ReceiverMetrics
from mt5backupd.receiver.s3store import S3Storage
from mt5backupd.receiver.server import start_receiver
from mt5backupd.testkit.receiverproc import ReceiverProcess
from tests.receiver_harness import TokenSet, make_tokens, receiver_config
from tests.s3_fixtures import TEST_PART_BYTES, MotoS3, StoreSwitch, s3_receiver_cfg

MiB = 1024**2


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def replica(workdir: Path, moto: MotoS3, bucket: str, env: dict[str, str],
            tokens_file: Path | None = None, **storage: str) -> ReceiverProcess:
    return ReceiverProcess(workdir, tokens_file=tokens_file, env=env,
                           extra_toml=moto.toml(bucket, **storage))


@pytest.fixture
def two_replicas(tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str]
                 ) -> Iterator[tuple[ReceiverProcess, ReceiverProcess, TokenSet]]:
    bucket = moto_s3.new_bucket()
    a = replica(tmp_path / "a", moto_s3, bucket, s3_env)
    (tmp_path / "a").mkdir()
    tokens = make_tokens(a.tokens_file)
    b = replica(tmp_path / "b", moto_s3, bucket, s3_env, tokens_file=a.tokens_file)
    a.start()
    b.start()
    yield a, b, tokens
    a.stop()
    b.stop()


async def test_replicas_share_uploads_resume_after_kill9_and_race_commits(
        two_replicas: tuple[ReceiverProcess, ReceiverProcess, TokenSet]) -> None:
    """Begun on A, A killed -9: B tells the durable offset, takes the rest and commits; the
    backup is visible on A again; two uploads of one name committed at once on A and B: at most
    one wins, the other gets 409, and a listed record always describes the stored bytes."""
    a, b, tokens = two_replicas
    h = {"Authorization": f"Bearer {tokens.alice}"}
    data = os.urandom(2 * TEST_PART_BYTES + 777)
    first = TEST_PART_BYTES + 1000
    async with aiohttp.ClientSession(headers=h) as http:
        async with http.post(f"{a.url}/api/v1/uploads", json={"name": "r.dump"}) as resp:
            uid = (await resp.json())["upload_id"]
        async with http.patch(f"{a.url}/api/v1/uploads/{uid}", data=data[:first],
                              headers={"Upload-Offset": "0"}) as resp:
            assert resp.status == 204
        a.kill9()
        async with http.head(f"{b.url}/api/v1/uploads/{uid}") as resp:
            assert resp.status == 200
            assert int(resp.headers["Upload-Offset"]) == first
        async with http.patch(f"{b.url}/api/v1/uploads/{uid}", data=data[first:],
                              headers={"Upload-Offset": str(first)}) as resp:
            assert resp.status == 204
        async with http.post(f"{b.url}/api/v1/uploads/{uid}/commit",
                             json={"sha256": sha(data), "size": len(data)}) as resp:
            assert resp.status == 201, await resp.text()
        a.start()
        async with http.get(f"{a.url}/api/backup/download/r.dump") as resp:
            assert await resp.read() == data

        async def commit(base: str, uid: str, content: bytes) -> int:
            async with http.post(f"{base}/api/v1/uploads/{uid}/commit",
                                 json={"sha256": sha(content), "size": len(content)}) as resp:
                return resp.status

        # several races, multipart (two parts) and not: moto's conditional completion is not
        # atomic (both completions can succeed, the later one's bytes winning), so the promise
        # checked is the one that must hold on any store: at most one 201, and a listed
        # record always describes the bytes stored under its name
        wins = 0
        for race, size in enumerate((300_000, 2 * TEST_PART_BYTES + 5, 300_000,
                                     2 * TEST_PART_BYTES + 5)):
            name = f"race{race}.dump"
            uids, contents = [], [os.urandom(size), os.urandom(size)]
            for base, content in zip((a.url, b.url), contents, strict=True):
                async with http.post(f"{base}/api/v1/uploads", json={"name": name}) as resp:
                    uid = (await resp.json())["upload_id"]
                async with http.patch(f"{base}/api/v1/uploads/{uid}", data=content,
                                      headers={"Upload-Offset": "0"}) as resp:
                    assert resp.status == 204
                uids.append(uid)
            statuses = await asyncio.gather(commit(a.url, uids[0], contents[0]),
                                            commit(b.url, uids[1], contents[1]))
            assert sorted(statuses) in ([201, 409], [409, 409]), statuses
            async with http.get(f"{a.url}/api/backup/list") as resp:
                listed = [r for r in (await resp.json())["backups"] if r["id"] == name]
            if listed:  # a record stands: it is the 201's, and it describes the stored bytes
                wins += 1
                winner = contents[statuses.index(201)]
                assert [r["sha256"] for r in listed] == [sha(winner)]
                for base in (a.url, b.url):
                    async with http.get(f"{base}/api/backup/download/{name}") as resp:
                        assert await resp.read() == winner
            # else: both completions landed (moto), and the later one's commit removed the
            # record that no longer described the data: nothing lists bytes it does not hold
        assert wins >= 1


async def test_store_gone_mid_upload_503_then_pending_then_success(
        tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bucket becomes unreachable mid-upload: the receiver answers 503 with Retry-After
    (never 500), the client gives up for now with the backup pending; once the store is back
    the same upload resumes and commits."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries only slow this down
    target = urlsplit(moto_s3.url)
    switch = StoreSwitch(str(target.hostname), int(target.port or 80))
    await switch.on()
    bucket = moto_s3.new_bucket()
    cfg = s3_receiver_cfg(receiver_config(tmp_path), moto_s3, bucket, endpoint_url=switch.url)
    tokens = make_tokens(cfg.tokens_file)
    metrics = ReceiverMetrics()
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file), metrics=metrics)
    data = os.urandom(3 * TEST_PART_BYTES + 99)
    path = tmp_path / "spool.dump"
    path.write_bytes(data)
    progress = UploadProgress()
    cuts: list[asyncio.Task[None]] = []

    def cut_after_first_part(_n: int) -> None:
        if progress.sent_bytes > 2 * TEST_PART_BYTES and not cuts:
            cuts.append(asyncio.get_running_loop().create_task(switch.off()))

    progress.on_bytes = cut_after_first_part
    try:
        async with ReceiverClient(running.url, Secret(tokens.alice), timeout_s=10) as client:
            with pytest.raises(ReceiverUnavailable):
                await send_following(client, GrowingSource.complete(path), name="o.dump",
                                     kind="database", metadata={}, max_retries=1,
                                     retry_delay_s=0.05, progress=progress)
            assert progress.uid is not None
            async with aiohttp.ClientSession() as http:
                async with http.head(f"{running.url}/api/v1/uploads/{progress.uid}",
                                     headers={"Authorization": f"Bearer {tokens.alice}"}) as r:
                    assert r.status == 503
                    assert r.headers["Retry-After"].isdigit()
                async with http.get(f"{running.url}/health") as r:
                    assert r.status == 503
                    assert (await r.json())["storage"]["state"] == "unreachable"
            await switch.on()
            await send_following(client, GrowingSource.complete(path), name="o.dump",
                                 kind="database", metadata={}, max_retries=3,
                                 retry_delay_s=0.05, progress=progress)
            assert progress.resumed_at  # the same session went on, from the durable offset
            record = await commit_with_retries(client, progress, name="o.dump",
                                               sha256=sha(data), size=len(data),
                                               max_retries=2, retry_delay_s=0.05)
            assert (record.sha256, record.size) == (sha(data), len(data))
        rejected = metrics.rejections.labels(reason="store_unavailable")._value.get()
        assert rejected >= 1
        unavailable = metrics.storage_requests.labels(op="head", result="unavailable")
        assert unavailable._value.get() >= 1
    finally:
        await running.close()
        await switch.off()


async def test_object_lock_retention_requested_delete_refused_prune_reports(
        tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str]) -> None:
    """With object_lock_days, every committed object carries retention; an admin delete is
    409 object_locked and prune keeps the locked backups and reports them."""
    bucket = moto_s3.new_bucket(object_lock=True)
    cfg = s3_receiver_cfg(receiver_config(tmp_path), moto_s3, bucket, object_lock_days=2,
                          object_lock_mode="GOVERNANCE")
    tokens = make_tokens(cfg.tokens_file)
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file))
    try:
        async with aiohttp.ClientSession() as http:
            alice = {"Authorization": f"Bearer {tokens.alice}"}
            admin = {"Authorization": f"Bearer {tokens.admin}"}
            for day in (1, 2):
                name = f"mt5_trading-2026110{day}-030000.dump.zst"
                async with http.post(f"{running.url}/api/backup/upload?name={name}",
                                     data=os.urandom(1000), headers=alice) as resp:
                    assert resp.status == 200, await resp.text()
            head = moto_s3.client().head_object(
                Bucket=bucket, Key="backups/alice/mt5_trading-20261101-030000.dump.zst/data")
            assert head["ObjectLockMode"] == "GOVERNANCE"
            left = head["ObjectLockRetainUntilDate"] - dt.datetime.now(dt.UTC)
            assert dt.timedelta(days=1, hours=23) < left <= dt.timedelta(days=2)
            async with http.delete(
                    f"{running.url}/api/backup/mt5_trading-20261101-030000.dump.zst"
                    "?client=alice", headers=admin) as resp:
                assert resp.status == 409
                assert (await resp.json())["error"] == "object_locked"
            async with http.post(f"{running.url}/api/admin/prune",
                                 json={"client": "alice", "keep_last": 1}, headers=admin) as resp:
                pruned = await resp.json()
            assert pruned["count"] == 0
            assert [r["id"] for r in pruned["locked"]] == ["mt5_trading-20261101-030000.dump.zst"]
            async with http.get(f"{running.url}/api/backup/list", headers=alice) as resp:
                assert (await resp.json())["count"] == 2
            # resumable: parts of an upload created with Object Lock parameters carry
            # Content-MD5 (S3 requires it there), from the incremental MD5 and the tail's
            data = os.urandom(TEST_PART_BYTES + 1000)
            async with http.post(f"{running.url}/api/v1/uploads", json={"name": "r.dump"},
                                 headers=alice) as resp:
                uid = (await resp.json())["upload_id"]
            async with http.patch(f"{running.url}/api/v1/uploads/{uid}", data=data,
                                  headers={**alice, "Upload-Offset": "0"}) as resp:
                assert resp.status == 204
            async with http.post(f"{running.url}/api/v1/uploads/{uid}/commit", headers=alice,
                                 json={"sha256": sha(data), "size": len(data)}) as resp:
                assert resp.status == 201, await resp.text()
            head = moto_s3.client().head_object(Bucket=bucket, Key="backups/alice/r.dump/data")
            assert (head["ObjectLockMode"], head["ContentLength"]) == ("GOVERNANCE", len(data))
    finally:
        await running.close()


def run_receiver_cli(workdir: Path, storage_toml: str, env: dict[str, str]
                     ) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(exist_ok=True)
    tokens = workdir / "tokens.json"
    make_tokens(tokens)
    config = workdir / "receiver.toml"
    config.write_text(f'[receiver]\nlisten = "127.0.0.1:0"\ntokens_file = "{tokens}"\n'
                      f'data_dir = "{workdir / "data"}"\n' + storage_toml)
    return subprocess.run([sys.executable, "-m", "mt5backupd", "receiver", "--config",
                           str(config)], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("problem", ["no_object_lock", "unreachable", "no_bucket", "key_in_toml"])
def test_receiver_refuses_to_start_exit_4(tmp_path: Path, moto_s3: MotoS3,
                                          s3_env: dict[str, str], dead_port: int,
                                          problem: str) -> None:
    """Object lock configured on a bucket without it, an unreachable store, a missing bucket,
    a credential in the TOML: exit 4 with one line naming what is wrong."""
    bucket = moto_s3.new_bucket()
    env = {**s3_env, "AWS_MAX_ATTEMPTS": "1"}
    if problem == "no_object_lock":
        toml, expected = moto_s3.toml(bucket, object_lock_days="7"), "Object Lock"
    elif problem == "unreachable":
        toml = moto_s3.toml(bucket).replace(moto_s3.url, f"http://127.0.0.1:{dead_port}")
        expected = "unreachable"
    elif problem == "no_bucket":
        toml, expected = moto_s3.toml("no-such-bucket-here"), "not accessible"
    else:
        toml = moto_s3.toml(bucket, aws_secret_access_key='"x"')
        expected = "aws_secret_access_key: bucket credentials never go in the config file"
    run = run_receiver_cli(tmp_path / "r", toml, env)
    assert run.returncode == EXIT_CONFIG, run.stderr
    assert expected in run.stderr
    assert "testing-secret" not in run.stderr + run.stdout


async def test_abort_and_expiry_abort_multipart_uploads_on_s3(
        tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str]) -> None:
    """An aborted session's multipart upload is aborted on S3, not forgotten; expiry aborts idle
    sessions and multipart uploads no session owns; metrics count store requests by op and
    result; /health reports the store."""
    bucket = moto_s3.new_bucket()
    # a TTL no run comes near, and expiry asked with an explicit "now": no race with the
    # receiver's own expiry loop or a slow machine
    cfg = s3_receiver_cfg(receiver_config(tmp_path, partial_ttl_s=600.0), moto_s3, bucket)
    tokens = make_tokens(cfg.tokens_file)
    metrics = ReceiverMetrics()
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file), metrics=metrics)
    s3 = moto_s3.client()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {tokens.alice}"}
                                         ) as http:
            uids = []
            for name in ("a.dump", "b.dump"):
                async with http.post(f"{running.url}/api/v1/uploads", json={"name": name}) as r:
                    uids.append((await r.json())["upload_id"])
            assert len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 2
            async with http.delete(f"{running.url}/api/v1/uploads/{uids[0]}") as resp:
                assert resp.status == 204
            assert len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
            s3.create_multipart_upload(Bucket=bucket, Key="tmp/alice/orphan")  # a crashed one-shot
            storage = running.app[STORAGE_KEY]
            assert await storage.expire_partials() == 0  # nothing idle yet; orphan seen once
            assert storage.partial_count() == 1
            # an hour later: the idle session and the orphan (ownerless at two scans) go
            assert await storage.expire_partials(now=time.time() + 3600) == 2
            assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
            async with http.head(f"{running.url}/api/v1/uploads/{uids[1]}") as resp:
                assert resp.status == 404
            async with http.get(f"{running.url}/health") as resp:
                health = await resp.json()
            assert health["storage"]["state"] == "ok"
            # public: nothing that names the bucket or the endpoint
            assert bucket not in json.dumps(health)
            assert moto_s3.url not in json.dumps(health)
            async with http.get(f"{running.url}/metrics") as resp:
                text = await resp.text()
        samples = {(s.name, s.labels.get("op"), s.labels.get("result")): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("mt5backup_receiver_storage_requests_total", "abort_multipart", "ok")] >= 2
        assert ("mt5backup_receiver_storage_request_seconds_count", "put", None) in samples
        assert "mt5backup_receiver_storage_free_bytes" not in text
    finally:
        await running.close()


async def test_expiry_removes_stray_tails_and_tmp_leftovers_and_locks_stay_bounded(
        tmp_path: Path, moto_s3: MotoS3, s3_env: dict[str, str]) -> None:
    """Expiry removes tail objects no session points at, tmp/ objects a crash left and data
    objects that never got their record (freeing their name), once older than partial_ttl_s,
    and keeps the tail of a session in use and every recorded backup; a replica's per-upload
    locks are gone once its requests end (expiry looking at sessions adds none)."""
    bucket = moto_s3.new_bucket()
    cfg = s3_receiver_cfg(receiver_config(tmp_path, partial_ttl_s=600.0), moto_s3, bucket)
    tokens = make_tokens(cfg.tokens_file)
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file))
    s3 = moto_s3.client()
    storage = running.app[STORAGE_KEY]
    assert isinstance(storage, S3Storage)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {tokens.alice}"}
                                         ) as http:
            async with http.post(f"{running.url}/api/v1/uploads", json={"name": "t.dump"}) as r:
                uid = (await r.json())["upload_id"]
            async with http.patch(f"{running.url}/api/v1/uploads/{uid}", data=b"t" * 1000,
                                  headers={"Upload-Offset": "0"}) as resp:
                assert resp.status == 204
            async with http.post(f"{running.url}/api/backup/upload?name=kept.dump",
                                 data=b"k" * 10) as resp:
                assert resp.status == 200
        # a data object whose record never came (a commit cut short, a lost commit race)
        strays = [f"sessions/alice/{uid}/tail-stray", "sessions/alice/" + "0" * 32 + "/tail-x",
                  f"tmp/alice/{int(time.time())}-leftover", "backups/alice/lost.dump/data"]
        for key in strays:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")

        def keys() -> set[str]:
            return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}

        live_tail = next(k for k in keys() if k.startswith(f"sessions/alice/{uid}/tail-")
                         and k not in strays)
        assert await storage.expire_partials() == 0
        assert set(strays) <= keys()  # young: could be a tail whose state is being written
        async with storage.sessions.locks.hold("alice", uid, busy_message="busy"):
            # an hour later, the session in use by a request
            await storage.expire_partials(now=time.time() + 3600)
            # an unrecorded data object goes only when two scans in a row found it so (a
            # commit may be between its completion and its record)
            assert "backups/alice/lost.dump/data" in keys()
            await storage.expire_partials(now=time.time() + 3600)
        assert not set(strays) & keys()
        assert live_tail in keys()
        assert {"backups/alice/kept.dump/data", "backups/alice/kept.dump/meta.json"} <= keys()
        assert len(storage.sessions.locks) == 0
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {tokens.alice}"}
                                         ) as http:  # the name is free again
            async with http.post(f"{running.url}/api/backup/upload?name=lost.dump",
                                 data=b"n" * 10) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        await running.close()
