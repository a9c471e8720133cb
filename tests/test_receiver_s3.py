"""The S3 backend beyond the shared promises: replicas on one bucket (visibility, resume after
kill -9, a commit race), the store going away mid-upload (503, the client keeps its backup
pending, then succeeds), Object Lock, the start-up preflight, metrics and /health."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import subprocess
import sys
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
from mt5backupd.receiver.metrics import ReceiverMetrics
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
                 ) -> tuple[ReceiverProcess, ReceiverProcess, TokenSet]:
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
    backup is visible on A again; two uploads of one name committed at once on A and B: exactly
    one wins, the other gets 409."""
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

        uids = []
        contents = [os.urandom(300_000), os.urandom(300_000)]
        for base, content in zip((a.url, b.url), contents, strict=True):
            async with http.post(f"{base}/api/v1/uploads", json={"name": "race.dump"}) as resp:
                uid = (await resp.json())["upload_id"]
            async with http.patch(f"{base}/api/v1/uploads/{uid}", data=content,
                                  headers={"Upload-Offset": "0"}) as resp:
                assert resp.status == 204
            uids.append(uid)

        async def commit(base: str, uid: str, content: bytes) -> int:
            async with http.post(f"{base}/api/v1/uploads/{uid}/commit",
                                 json={"sha256": sha(content), "size": len(content)}) as resp:
                return resp.status

        statuses = await asyncio.gather(commit(a.url, uids[0], contents[0]),
                                        commit(b.url, uids[1], contents[1]))
        assert sorted(statuses) == [201, 409]
        winner = contents[statuses.index(201)]
        for base in (a.url, b.url):
            async with http.get(f"{base}/api/backup/download/race.dump") as resp:
                assert await resp.read() == winner


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
    cfg = dataclass_replace_endpoint(s3_receiver_cfg(receiver_config(tmp_path), moto_s3, bucket),
                                     switch.url)
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


def dataclass_replace_endpoint(cfg: object, url: str) -> object:
    import dataclasses

    assert dataclasses.is_dataclass(cfg)
    storage = dataclasses.replace(cfg.storage, endpoint_url=url)  # type: ignore[attr-defined]
    return dataclasses.replace(cfg, storage=storage)  # type: ignore[type-var]
