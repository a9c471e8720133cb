"""The receiver's HTTP edges: refusal -> status by type hierarchy (pure, a table), the shared
site starter (URL rule, the port bound, a listen failure), and retention applied after a
commit when it is automatic."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mt5backupd.config import RetentionConfig
from mt5backupd.errors import ConfigError
from mt5backupd.receiver.auth import Forbidden, TokenStore
from mt5backupd.receiver.metrics import REJECTION_REASONS, ReceiverMetrics
from mt5backupd.receiver.middleware import STATUS_BY_TYPE, http_status
from mt5backupd.receiver.server import start_receiver
from mt5backupd.receiver.storage import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InsufficientStorage,
    InvalidId,
    NotFound,
    OffsetMismatch,
    RequestTimeout,
    SizeMismatch,
    StorageError,
    TooLarge,
    UploadBusy,
)
from mt5backupd.webapp import site_url, start_site
from tests.receiver_harness import make_tokens, receiver_config


class _UnlistedRefusal(StorageError):
    reason = "unlisted"


class _GoneForGood(NotFound):
    reason = "gone_for_good"


class _Duplicate(Conflict):
    reason = "duplicate"


class _QuotaFull(InsufficientStorage):
    reason = "quota_full"


class _BadPath(InvalidId):
    reason = "bad_path"


STATUS_ROWS: list[tuple[BaseException, int]] = [
    (Forbidden("admin only"), 403),
    (BadRequest("x"), 400),
    (InvalidId("x"), 400),
    (NotFound("x"), 404),
    (RequestTimeout("x"), 408),
    (Conflict("x"), 409),
    (UploadBusy("x"), 409),
    (OffsetMismatch(5, 7), 409),
    (TooLarge("x"), 413),
    (ChecksumMismatch("a" * 64, "b" * 64), 422),
    (SizeMismatch(1, 2), 422),
    (InsufficientStorage("x"), 507),
    (StorageError("x"), 400),
    # subclasses nobody listed take their nearest listed ancestor's status
    (_UnlistedRefusal("x"), 400),
    (_GoneForGood("x"), 404),
    (_Duplicate("x"), 409),
    (_QuotaFull("x"), 507),
    (_BadPath("x"), 400),
    # not a refusal at all: a bug, never dressed up as the client's fault
    (ValueError("x"), 500),
    (KeyError("x"), 500),
]


@pytest.mark.parametrize(("exc", "status"), STATUS_ROWS,
                         ids=[type(e).__name__ for e, _ in STATUS_ROWS])
def test_http_status_by_type_hierarchy(exc: BaseException, status: int) -> None:
    """Each refusal maps to its own status, an unlisted subclass to its nearest ancestor's."""
    assert http_status(exc) == status


def test_forbidden_is_an_auth_refusal_not_a_storage_one() -> None:
    """Forbidden lives with auth and is not a StorageError; it still answers 403."""
    assert not issubclass(Forbidden, StorageError)
    assert Forbidden.reason == "forbidden"


def test_every_listed_refusal_has_a_rejection_label() -> None:
    """The reason of every refusal in the status table is a known rejections metric label."""
    reasons = {getattr(cls, "reason") for cls in STATUS_BY_TYPE if cls is not StorageError}  # noqa: B009
    assert reasons <= set(REJECTION_REASONS)


@pytest.mark.parametrize(("host", "port", "tls", "url"), [
    ("127.0.0.1", 9101, False, "http://127.0.0.1:9101"),
    ("0.0.0.0", 9101, False, "http://127.0.0.1:9101"),
    ("", 8443, True, "https://127.0.0.1:8443"),
    ("::1", 9187, False, "http://[::1]:9187"),
    ("backup.lan", 443, True, "https://backup.lan:443"),
])
def test_site_url(host: str, port: int, tls: bool, url: str) -> None:
    """A site's URL: the IPv4 wildcard reached on loopback, IPv6 in brackets, https with TLS."""
    assert site_url(host, port, tls=tls) == url


async def _hello(_request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def test_start_site_reports_the_port_bound() -> None:
    """Port 0 binds a free port; the URL returned reaches the app on it."""
    app = web.Application()
    app.router.add_get("/", _hello)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        bound = await start_site(runner, "127.0.0.1", 0, config_section="http")
        assert bound.port > 0
        assert bound.url == f"http://127.0.0.1:{bound.port}"
        async with aiohttp.ClientSession() as http, http.get(bound.url) as resp:
            assert await resp.text() == "hello"
    finally:
        await runner.cleanup()


async def test_start_site_listen_failure_is_a_config_error() -> None:
    """A port already listened on is a ConfigError naming the section; the runner is cleaned up."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runner = web.AppRunner(web.Application())
        await runner.setup()
        with pytest.raises(ConfigError, match=rf"^\[receiver\] listen 127\.0\.0\.1:{port}: "):
            await start_site(runner, "127.0.0.1", port, config_section="receiver")
        assert runner.server is None


async def test_auto_retention_prunes_after_each_commit(tmp_path: Path) -> None:
    """With [receiver.retention] auto, each commit (resumable or one-shot) prunes that client's
    kind to the policy; the newest stays and other clients are untouched."""
    cfg = receiver_config(tmp_path, retention=RetentionConfig(keep_last=1, auto=True))
    tokens = make_tokens(cfg.tokens_file)
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file), metrics=ReceiverMetrics())
    alice, bob = tokens.header(tokens.alice), tokens.header(tokens.bob)

    async def ids(http: aiohttp.ClientSession, headers: dict[str, str]) -> list[str]:
        async with http.get(f"{running.url}/api/backup/list", headers=headers) as resp:
            return [b["id"] for b in (await resp.json())["backups"]]

    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{running.url}/api/backup/upload?name=bob-1.dump", data=b"b",
                                 headers=bob) as resp:
                assert resp.status == 200
            for i in range(3):
                async with http.post(f"{running.url}/api/backup/upload?name=a{i}.dump",
                                     data=b"a%d" % i, headers=alice) as resp:
                    assert resp.status == 200
                assert await ids(http, alice) == [f"a{i}.dump"]
            async with http.post(f"{running.url}/api/v1/uploads", json={"name": "a3.dump"},
                                 headers=alice) as resp:
                uid = (await resp.json())["upload_id"]
            async with http.patch(f"{running.url}/api/v1/uploads/{uid}", data=b"a3",
                                  headers={**alice, "Upload-Offset": "0"}) as resp:
                assert resp.status == 204
            sha = hashlib.sha256(b"a3").hexdigest()
            async with http.post(f"{running.url}/api/v1/uploads/{uid}/commit",
                                 json={"sha256": sha, "size": 2}, headers=alice) as resp:
                assert resp.status == 201
            assert await ids(http, alice) == ["a3.dump"]
            assert await ids(http, bob) == ["bob-1.dump"]
    finally:
        await running.close()


async def test_concurrent_prunes_and_uploads_never_fail_a_commit(tmp_path: Path) -> None:
    """Auto-retention after parallel commits and admin prunes run in threads at once: every
    commit is answered 200 and exactly the newest backup stays (no collision on a removal)."""
    cfg = receiver_config(tmp_path, retention=RetentionConfig(keep_last=1, auto=True))
    tokens = make_tokens(cfg.tokens_file)
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file), metrics=ReceiverMetrics())
    alice, admin = tokens.header(tokens.alice), tokens.header(tokens.admin)
    try:
        async with aiohttp.ClientSession() as http:
            async def upload(i: int) -> int:
                async with http.post(f"{running.url}/api/backup/upload?name=p{i:02d}.dump",
                                     data=b"x%d" % i, headers=alice) as resp:
                    return resp.status

            async def admin_prune() -> int:
                async with http.post(f"{running.url}/api/admin/prune",
                                     json={"keep_last": 1}, headers=admin) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(upload(i) for i in range(12)),
                                            *(admin_prune() for _ in range(4)))
            assert statuses == [200] * 16
            async with http.get(f"{running.url}/api/backup/list", headers=alice) as resp:
                assert len((await resp.json())["backups"]) == 1
    finally:
        await running.close()
