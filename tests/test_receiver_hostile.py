"""The receiver against a hostile client: never a 500, never a secret in a log or an answer,
nothing from outside data_dir, no connection or log flood that a stranger can cause."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from loguru import logger

from mt5backupd.config import ReceiverConfig, load_config
from mt5backupd.errors import ConfigError
from mt5backupd.receiver.auth import TokenStore, digest_token
from mt5backupd.receiver.metrics import ReceiverMetrics
from mt5backupd.receiver.noise import LogBudget
from mt5backupd.receiver.ranges import (
    RangeMalformed,
    RangeNotSatisfiable,
    parse_offset,
    parse_range,
)
from mt5backupd.receiver.server import start_receiver
from mt5backupd.testkit.receiverproc import ReceiverProcess
from tests.receiver_harness import Receiver, TokenSet, make_tokens, receiver_config
from tests.waits import wait_until

HEADER_TIMEOUT_S = 1.0
BODY_IDLE_S = 0.5


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    head: bytes
    body: bytes


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


async def read_reply(reader: asyncio.StreamReader, timeout_s: float = 5.0,
                     head_only: bool = False) -> Reply | None:
    """One HTTP response off a raw socket; None when the server closed without answering."""
    async with asyncio.timeout(timeout_s):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        match = None if head_only else re.search(rb"\r\ncontent-length: *(\d+)", head,
                                                 re.IGNORECASE)
        try:
            body = await reader.readexactly(int(match.group(1))) if match else b""
        except asyncio.IncompleteReadError as exc:  # HEAD: a length, but no body
            body = exc.partial
    return Reply(int(head.split(b" ", 2)[1]), head, body)


async def raw_request(url: str, data: bytes, timeout_s: float = 5.0) -> Reply | None:
    """Send raw bytes, read one answer, close."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    try:
        writer.write(data)
        await writer.drain()
        # A HEAD answer has a Content-Length but no body.
        return await read_reply(reader, timeout_s, head_only=data.startswith(b"HEAD "))
    except ConnectionResetError:
        return None
    finally:
        writer.transport.abort()


async def wait_closed_by_server(reader: asyncio.StreamReader, deadline_s: float) -> float:
    """Seconds until the server closes the connection (EOF), failing past ``deadline_s``."""
    started = time.monotonic()
    async with asyncio.timeout(deadline_s):
        while True:
            try:
                if not await reader.read(65536):
                    break
            except ConnectionResetError:
                break
    return time.monotonic() - started


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every loguru line of the in-process receiver while the test runs."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG",
                      format="{level} {message}\n{exception}")
    yield lines
    logger.remove(sink)


@pytest.fixture
async def tight(tmp_path: Path) -> AsyncIterator[Receiver]:
    """The real receiver with a 1 s header timeout and a 0.5 s body idle timeout."""
    cfg = receiver_config(tmp_path, header_timeout_s=HEADER_TIMEOUT_S)
    tokens = make_tokens(cfg.tokens_file)
    metrics = ReceiverMetrics()
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file), metrics=metrics,
                                   body_idle_timeout_s=BODY_IDLE_S)
    try:
        yield Receiver(running.url, cfg, tokens, metrics, running)
    finally:
        await running.close()


@pytest.fixture
def logged_process(tmp_path: Path) -> Iterator[tuple[ReceiverProcess, TokenSet]]:
    """``mt5backupd receiver`` as a process logging to stderr (receiver.log) and JSON files."""
    proc = ReceiverProcess(tmp_path,
                           extra_toml=f'[log]\ndir = "{tmp_path / "logs"}"\n')
    tokens = make_tokens(tmp_path / "tokens.json")
    try:
        yield proc, tokens
    finally:
        proc.stop()


def all_logs(proc: ReceiverProcess) -> bytes:
    """stderr plus every JSON log file of the process."""
    data = proc.log_path.read_bytes()
    for path in sorted((proc.workdir / "logs").glob("*")):
        data += path.read_bytes()
    return data


async def upload(url: str, token: str, name: str, data: bytes) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.post(
        f"{url}/api/backup/upload", params={"name": name}, data=data,
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, object] = await resp.json()
        return body


# ---------------------------------------------------------------- tokens and numbers


def test_digest_of_any_token_string_is_defined() -> None:
    """Tokens holding surrogates (non-UTF-8 header bytes) hash instead of raising."""
    assert digest_token("\udcff\udcfe\udcfd") == sha(b"\xff\xfe\xfd")
    assert len(digest_token("\ud800x")) == 64  # a surrogate no decoder produces: still a hash


async def test_non_utf8_token_is_401_like_any_bad_token(receiver: Receiver) -> None:
    """Authorization bytes ff fe fd get the same 401 as a wrong token, not a 500."""
    wrong = await raw_request(receiver.url, b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\n"
                              b"Authorization: Bearer wrong-token\r\nConnection: close\r\n\r\n")
    for token in (b"\xff\xfe\xfd", b"mt5b_\xc3(", b"\xed\xa0\x80"):
        reply = await raw_request(receiver.url, b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\n"
                                  b"Authorization: Bearer " + token +
                                  b"\r\nConnection: close\r\n\r\n")
        assert reply is not None and wrong is not None
        assert (reply.status, reply.body) == (401, wrong.body)


async def test_aiohttps_own_refusals_answer_in_json(receiver: Receiver) -> None:
    """No such path, a method the path lacks, a JSON body over aiohttp's limit, an id walking
    up with `..`: 4xx in the same JSON as every other refusal, never aiohttp's plain text."""
    h = receiver.auth(receiver.tokens.alice)
    async with aiohttp.ClientSession() as http:
        cases = [
            ("GET", "/api/v1/nothing-here", None, 404, "not_found"),
            ("PUT", "/api/v1/whoami", None, 405, "method_not_allowed"),
            ("POST", "/api/v1/uploads", b'{"name": "' + b"x" * (2 << 20) + b'"}', 413,
             "too_large"),
            ("GET", "/api/backup/download/..%2F..%2Fetc%2Fpasswd", None, 400, "invalid_id"),
        ]
        for method, path, body, status, reason in cases:
            async with http.request(method, f"{receiver.url}{path}", data=body,
                                    headers={**h, "Content-Type": "application/json"}) as resp:
                assert resp.status == status, (path, await resp.text())
                answer = await resp.json()
                assert answer["error"] == reason, (path, answer)
                if status == 405:
                    assert "GET" in resp.headers["Allow"]
    # a path walking up, sent as is (a client library would have resolved the `..`)
    token = receiver.tokens.alice.encode()
    for raw_path in (b"/api/backup/download/../../etc/passwd", b"/api/../../x", b"/nothing"):
        reply = await raw_request(receiver.url, b"GET " + raw_path + b" HTTP/1.1\r\nHost: x\r\n"
                                  b"Authorization: Bearer " + token +
                                  b"\r\nConnection: close\r\n\r\n")
        assert reply is not None and 400 <= reply.status < 500, raw_path
        assert json.loads(reply.body)["error"] in ("not_found", "invalid_id", "bad_request")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("42", 42), ("007", 7), ("", None), (None, None), ("²", None), ("٣", None),
     ("1²", None), ("-1", None), ("+1", None), (" 1", None), ("1e3", None), ("٣٣", None),
     ("9" * 18, 10**18 - 1), ("9" * 19, None), ("1" * 5000, None)],
)
def test_parse_offset_accepts_ascii_digits_only(text: str | None, expected: int | None) -> None:
    """Upload-Offset is ASCII 0-9 only (isdigit() also takes ² and ٣), and of sane length."""
    assert parse_offset(text) == expected


@pytest.mark.parametrize("header", ["bytes=²-", "bytes=-²", "bytes=٣-", "bytes=0-٣", "bytes=a-b",
                                    "bytes=1", "bytes=--5", "bytes= - "])
def test_malformed_byte_range_is_refused(header: str) -> None:
    """A single bytes= range whose positions are not ASCII digits is malformed (400)."""
    with pytest.raises(RangeMalformed):
        parse_range(header, 100)


@pytest.mark.parametrize("header", ["bytes=" + "9" * 30 + "-", "bytes=" + "1" * 5000 + "-"])
def test_huge_range_start_is_unsatisfiable(header: str) -> None:
    """A start past any size is a 416, even with more digits than int() accepts."""
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def test_huge_range_end_is_clamped() -> None:
    """An end with absurdly many digits still means 'to the end of the body'."""
    assert parse_range("bytes=10-" + "9" * 40, 100) == (10, 99)
    assert parse_range("bytes=-" + "9" * 40, 100) == (0, 99)


async def test_unicode_digits_in_offset_and_range_are_400(receiver: Receiver) -> None:
    """Upload-Offset: ² / ٣ and Range: bytes=²- answer 400 from the real receiver; a huge
    but valid range start is 416."""
    h = receiver.auth(receiver.tokens.alice)
    await upload(receiver.url, receiver.tokens.alice, "r.dump", b"x" * 100)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{receiver.url}/api/v1/uploads", json={"name": "u.dump"},
                             headers=h) as resp:
            uid = (await resp.json())["upload_id"]
        for offset in ("²", "٣", "0" * 30):
            async with http.patch(f"{receiver.url}/api/v1/uploads/{uid}", data=b"abc",
                                  headers={**h, "Upload-Offset": offset}) as resp:
                assert resp.status == 400, offset
        async with http.head(f"{receiver.url}/api/v1/uploads/{uid}", headers=h) as resp:
            assert resp.headers["Upload-Offset"] == "0"  # ٣ was not read as 3
        url = f"{receiver.url}/api/backup/download/r.dump"
        for rng, status in (("bytes=²-", 400), ("bytes=0-٣", 400),
                            ("bytes=" + "9" * 4400 + "-", 416), ("bytes=0-9", 206)):
            async with http.get(url, headers={**h, "Range": rng}) as resp:
                assert resp.status == status, rng


# ---------------------------------------------------------------- unparseable headers


async def test_unparseable_header_never_logged_or_echoed(
    logged_process: tuple[ReceiverProcess, TokenSet],
) -> None:
    """A valid token followed by a control byte, or in a header past 8 KiB, is a generic 400:
    the token is in no log file, not on stderr, not in the answer."""
    proc, tokens = logged_process
    proc.start()
    token = tokens.alice.encode()
    requests = [
        b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
        b"\x01\r\n\r\n",
        b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
        b"A" * 9000 + b"\r\n\r\n",
        b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 9000 +
        b"\r\nAuthorization: Bearer " + token + b"\r\n\r\n",
        b"GET /api/v1/whoami?t=" + token + b"\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for request in requests:
        reply = await raw_request(proc.url, request)
        assert reply is not None and reply.status == 400
        assert token not in reply.head + reply.body
        assert token[:20] not in reply.body
    await wait_until(lambda: all_logs(proc).count(b"malformed request from 127.0.0.1") >= 8, 10,
                     "the malformed-request lines on stderr and in the JSON log")
    logs = all_logs(proc)
    assert token not in logs and token[5:25] not in logs
    assert b"Traceback" not in logs and b"ERROR" not in logs


# ---------------------------------------------------------------- files under data_dir


async def test_planted_and_foreign_entries_are_skipped_and_logged_once(
    receiver: Receiver, tmp_path: Path, log_lines: list[str],
) -> None:
    """Symlinked meta.json / backup dir / client dir, a foreign record, a FIFO and junk are
    skipped when listing (logged once each); the good backup is still listed, nothing from
    outside is served, and /health stays ok."""
    h = receiver.auth(receiver.tokens.alice)
    await upload(receiver.url, receiver.tokens.alice, "good.dump", b"good")
    await upload(receiver.url, receiver.tokens.bob, "bobs.dump", b"bob's")
    backups = receiver.cfg.data_dir / "backups"
    outside = tmp_path / "outside"
    (outside / "evil.dump").mkdir(parents=True)
    secret_record = {"id": "evil.dump", "client": "alice", "name": "evil.dump",
                     "kind": "database", "size": 6, "sha256": sha(b"secret"),
                     "created": "2026-01-01T00:00:00+00:00", "metadata": {}}
    (outside / "evil.dump" / "meta.json").write_text(json.dumps(secret_record))
    (outside / "evil.dump" / "data").write_bytes(b"secret")
    alice = backups / "alice"
    # meta.json symlinked out of the root, with a real data file beside it
    (alice / "link-meta.dump").mkdir()
    (alice / "link-meta.dump" / "meta.json").symlink_to(outside / "evil.dump" / "meta.json")
    (alice / "link-meta.dump" / "data").write_bytes(b"secret")
    # the whole backup dir a symlink out of the root
    (alice / "evil.dump").symlink_to(outside / "evil.dump")
    # a copy of bob's record placed in alice's namespace (foreign)
    (alice / "bobs.dump").mkdir()
    (alice / "bobs.dump" / "meta.json").write_text((backups / "bob" / "bobs.dump" /
                                                    "meta.json").read_text())
    # a FIFO where meta.json belongs (reading it would block forever)
    (alice / "fifo.dump").mkdir()
    os.mkfifo(alice / "fifo.dump" / "meta.json")
    # corrupt JSON, and a name that is not a backup id
    (alice / "junk.dump").mkdir()
    (alice / "junk.dump" / "meta.json").write_text("{not json")
    (alice / "bad name").mkdir()
    # a data file that is a symlink, behind a valid-looking record
    good_meta = json.loads((alice / "good.dump" / "meta.json").read_text())
    (alice / "datalink.dump").mkdir()
    (alice / "datalink.dump" / "meta.json").write_text(json.dumps(
        {**good_meta, "id": "datalink.dump", "name": "datalink.dump"}))
    (alice / "datalink.dump" / "data").symlink_to(outside / "evil.dump" / "data")
    # a client dir that is a symlink out, and one that is a plain file
    (backups / "mallory").symlink_to(outside)
    (backups / "junkclient").write_text("x")

    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(f"{receiver.url}/api/backup/list", headers=h) as resp:
                assert resp.status == 200
                ids = [b["id"] for b in (await resp.json())["backups"]]
            assert ids == ["good.dump", "datalink.dump"] or sorted(ids) == ["datalink.dump",
                                                                             "good.dump"]
            admin = receiver.auth(receiver.tokens.admin)
            async with http.get(f"{receiver.url}/api/backup/list", headers=admin) as resp:
                assert resp.status == 200
                clients = {b["client"] for b in (await resp.json())["backups"]}
            assert clients == {"alice", "bob"}
            async with http.get(f"{receiver.url}/api/backup/list",
                                params={"client": "mallory"}, headers=admin) as resp:
                assert resp.status == 200 and (await resp.json())["count"] == 0
        for bad in ("link-meta.dump", "evil.dump", "bobs.dump", "fifo.dump", "datalink.dump"):
            async with http.get(f"{receiver.url}/api/backup/download/{bad}", headers=h) as resp:
                assert resp.status == 404, bad
                assert b"secret" not in await resp.read()
        async with http.get(f"{receiver.url}/api/backup/download/good.dump", headers=h) as resp:
            assert await resp.read() == b"good"
        async with http.get(f"{receiver.url}/health") as resp:
            assert resp.status == 200
    warnings = [line for line in log_lines if line.startswith("WARNING skipping")]
    for where in ("alice/link-meta.dump", "alice/evil.dump", "alice/bobs.dump",
                  "alice/fifo.dump", "alice/junk.dump", "backups/mallory",
                  "alice/datalink.dump/data"):
        assert sum(where in line for line in warnings) == 1, (where, warnings)


async def test_truncated_stored_file_ends_download_at_once(
    receiver: Receiver, log_lines: list[str],
) -> None:
    """A data file shorter than its record: the download is cut at once and an error logged,
    instead of the client waiting for bytes until its own timeout."""
    data = os.urandom(3 * 1024 * 1024)
    await upload(receiver.url, receiver.tokens.alice, "t.dump", data)
    path = receiver.cfg.data_dir / "backups" / "alice" / "t.dump" / "data"
    os.chmod(path, 0o640)
    os.truncate(path, 1024 * 1024 + 5)
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(
        f"{receiver.url}/api/backup/download/t.dump",
        headers=receiver.auth(receiver.tokens.alice),
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert time.monotonic() - started < 5
    await wait_until(lambda: any(line.startswith("ERROR") and "truncated" in line
                                 for line in log_lines), 10, "the truncation error line")


# ---------------------------------------------------------------- timeouts


def test_header_timeout_config(tmp_path: Path) -> None:
    """[receiver] header_timeout_s defaults to 30, is read from the file, and must be >= 1."""
    assert load_config(None, env={}).receiver.header_timeout_s == 30.0
    path = tmp_path / "c.toml"
    path.write_text("[receiver]\nheader_timeout_s = 5\n")
    assert load_config(path, env={}).receiver.header_timeout_s == 5.0
    path.write_text("[receiver]\nheader_timeout_s = 0.1\n")
    with pytest.raises(ConfigError, match=r"\[receiver\] header_timeout_s"):
        load_config(path, env={})


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n",
                                  b"GET /api/v1/whoami HTTP/1.1\r\nAuthorization: Bear"])
async def test_connection_without_complete_headers_is_closed(tight: Receiver,
                                                             sent: bytes) -> None:
    """Silent and header-only connections are closed after header_timeout_s."""
    reader, writer = await asyncio.open_connection(*host_port(tight.url))
    try:
        writer.write(sent)
        await writer.drain()
        elapsed_s = await wait_closed_by_server(reader, HEADER_TIMEOUT_S + 5)
        assert elapsed_s >= HEADER_TIMEOUT_S * 0.8
    finally:
        writer.transport.abort()


async def test_slow_header_drip_is_closed(tight: Receiver) -> None:
    """A client sending its headers a byte at a time cannot keep the connection past the
    header timeout."""
    reader, writer = await asyncio.open_connection(*host_port(tight.url))
    started = time.monotonic()
    try:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            if reader.at_eof():
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.05)  # the slow drip is the attack under test
        await wait_closed_by_server(reader, HEADER_TIMEOUT_S + 5)
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 5
    finally:
        writer.transport.abort()


async def test_stalled_body_is_408_and_keeps_what_arrived(tight: Receiver) -> None:
    """A PATCH whose body stops arriving gets 408 (not 504); the bytes that came are kept.
    A stalled one-shot upload is a 408 too and leaves no temp file."""
    h = tight.auth(tight.tokens.alice)
    async with aiohttp.ClientSession() as http, http.post(
        f"{tight.url}/api/v1/uploads", json={"name": "s.dump"}, headers=h,
    ) as resp:
        uid = (await resp.json())["upload_id"]
    reply = await raw_request(
        tight.url,
        f"PATCH /api/v1/uploads/{uid} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        f"{tight.tokens.alice}\r\nUpload-Offset: 0\r\nContent-Length: 100\r\n\r\n".encode()
        + b"0123456789")
    assert reply is not None and reply.status == 408
    assert json.loads(reply.body)["error"] == "request_timeout"
    async with aiohttp.ClientSession() as http, http.head(
        f"{tight.url}/api/v1/uploads/{uid}", headers=h,
    ) as resp:
        assert resp.headers["Upload-Offset"] == "10"
    reply = await raw_request(
        tight.url,
        f"POST /api/backup/upload?name=s2.dump HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        f"{tight.tokens.alice}\r\nContent-Length: 100\r\n\r\n".encode() + b"0123456789")
    assert reply is not None and reply.status == 408
    assert not list((tight.cfg.data_dir / "partial").glob("*/oneshot-*"))
    assert tight.metrics.rejections.labels(reason="request_timeout")._value.get() == 2


# ---------------------------------------------------------------- legacy one-shot upload


@pytest.mark.parametrize("query,headers", [
    ("name=..%2F..%2Fx", ""),
    ("", "X-Backup-Name: ../../x\r\n"),
    ("name=ok.dump&kind=..%2Fx", ""),
    ("name=ok.dump", "X-Content-SHA256: not-a-hash\r\n"),
])
async def test_legacy_upload_checks_name_kind_sha_before_the_body(
    receiver: Receiver, query: str, headers: str,
) -> None:
    """A 1 GB one-shot upload with a bad name, kind or declared sha256 is refused from its
    headers alone: the answer comes before any of the body is sent, and nothing is written."""
    reply = await raw_request(
        receiver.url,
        f"POST /api/backup/upload?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        f"{receiver.tokens.alice}\r\n{headers}Content-Length: {1024**3}\r\n\r\n".encode())
    assert reply is not None and reply.status == 400
    assert not list((receiver.cfg.data_dir / "partial").glob("*/*"))


async def test_legacy_multipart_field_before_file_refuses_early(receiver: Receiver) -> None:
    """A multipart upload whose name field (sent before the file) is bad is refused while the
    file part is still being sent."""
    boundary = "XyZ"
    start = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n../../x\r\n"
             f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
             f"filename=\"f.dump\"\r\n\r\n").encode() + b"z" * 200_000
    reply = await raw_request(
        receiver.url,
        f"POST /api/backup/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        f"{receiver.tokens.alice}\r\nContent-Type: multipart/form-data; boundary={boundary}"
        f"\r\nContent-Length: {1024**3}\r\n\r\n".encode() + start)
    assert reply is not None and reply.status == 400
    assert json.loads(reply.body)["error"] == "invalid_id"
    assert not list((receiver.cfg.data_dir / "partial").glob("*/*"))


# ---------------------------------------------------------------- log volume, disconnects


def test_log_budget_table() -> None:
    """The noise budget allows N lines per window, then counts, then reports the count."""
    budget = LogBudget(lines=2, window_s=10.0)
    assert [budget.take(t) for t in (0.0, 1.0, 2.0, 3.0, 9.9)] == [0, 0, None, None, None]
    assert budget.take(10.0) == 3  # new window: the first line says how many were dropped
    assert budget.take(10.5) == 0
    assert budget.take(11.0) is None


async def test_disconnect_is_one_quiet_line_and_malformed_flood_is_small(
    logged_process: tuple[ReceiverProcess, TokenSet],
) -> None:
    """A client dropping mid-upload is one INFO line, no traceback; 100 malformed requests
    and 20 more drops add far less than 150 KB to the logs (stderr + JSON)."""
    proc, tokens = logged_process
    proc.start()
    before = len(all_logs(proc))
    host, port = host_port(proc.url)

    async def drop_mid_body() -> None:
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"POST /api/backup/upload?name=d.dump HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {tokens.alice}\r\nContent-Length: 1000000\r\n"
                     f"\r\n".encode() + b"d" * 100_000)
        await writer.drain()
        await wait_until(lambda: bool(list((proc.data_dir / "partial").glob("*/oneshot-*"))),
                         10, "the one-shot temp file")
        writer.transport.abort()
        await wait_until(lambda: not list((proc.data_dir / "partial").glob("*/oneshot-*")),
                         10, "the temp file removed after the drop")

    await drop_mid_body()
    await wait_until(lambda: b"went away" in all_logs(proc), 10, "the disconnect line")
    first = all_logs(proc)[before:]
    assert first.count(b"went away during POST /api/backup/upload") == 2  # stderr + JSON
    assert b"Traceback" not in first and b"ERROR" not in first

    hostile = [b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
               b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
               b"GET /\x00 HTTP/1.1\r\n\r\n",
               b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"]
    await asyncio.gather(*(raw_request(proc.url, hostile[i % len(hostile)])
                           for i in range(100)))
    for _ in range(20):
        await drop_mid_body()
    async with aiohttp.ClientSession() as http, http.get(f"{proc.url}/health") as resp:
        assert resp.status == 200
    grown = len(all_logs(proc)) - before
    assert grown < 150 * 1024 / 3, grown  # well under the 150 KB the issue allows
    assert b"Traceback" not in all_logs(proc)


# ---------------------------------------------------------------- crash leftovers


async def test_oneshot_leftover_counted_then_swept_at_start(
    receiver_process: tuple[ReceiverProcess, TokenSet],
) -> None:
    """A one-shot upload in flight counts in mt5backup_receiver_partial_uploads; after a
    kill -9 its temp file is removed at the next start and the gauge is 0 again."""
    proc, tokens = receiver_process
    proc.start()

    async def partial_gauge() -> float:
        async with aiohttp.ClientSession() as http, http.get(f"{proc.url}/metrics") as resp:
            text = await resp.text()
        match = re.search(r"^mt5backup_receiver_partial_uploads (\S+)$", text, re.MULTILINE)
        assert match is not None
        return float(match.group(1))

    _reader, writer = await asyncio.open_connection(*host_port(proc.url))
    writer.write(f"POST /api/backup/upload?name=k.dump HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {tokens.alice}\r\nContent-Length: 10000000\r\n"
                 f"\r\n".encode() + b"k" * 1_000_000)
    await writer.drain()
    await wait_until(lambda: bool(list((proc.data_dir / "partial").glob("*/oneshot-*.data"))),
                     10, "the one-shot temp file")
    assert await partial_gauge() == 1
    proc.kill9()
    writer.transport.abort()
    assert list((proc.data_dir / "partial").glob("*/oneshot-*.data"))
    proc.start()
    assert not list((proc.data_dir / "partial").glob("*/oneshot-*.data"))
    assert await partial_gauge() == 0


# ---------------------------------------------------------------- fuzz


# Fixed, so a failure replays; MT5_FUZZ_SEED explores other sequences by hand.
FUZZ_SEED = int(os.environ.get("MT5_FUZZ_SEED", "20261129"))
FUZZ_RAW = 220
FUZZ_CLIENT = 120


def _fuzz_raw_requests(rng: random.Random, tokens: TokenSet) -> list[bytes]:
    methods = [b"GET", b"POST", b"PATCH", b"DELETE", b"HEAD", b"PUT", b"OPTIONS", b"TRACE",
               b"CONNECT", b"PRI", b"get", b"G\x00T", b"X" * 300, b"\x16\x03\x01"]
    paths = [b"/", b"/health", b"/metrics", b"/api/v1/whoami", b"/api/v1/uploads",
             b"/api/v1/uploads/" + b"a" * 32, b"/api/v1/uploads/" + b"a" * 32 + b"/commit",
             b"/api/backup/upload", b"/api/backup/list", b"/api/backup/download/x.dump",
             b"/api/backup/download/..%2f..%2fetc%2fpasswd", b"/api/backup/x.dump",
             b"/api/admin/prune", b"//..//..", b"/%ff%fe", b"/\xff\xfe", b"*",
             b"http://evil/health", b"/api/backup/list?client=%00", b"/a?" + b"q=" * 2000,
             b"/api/backup/download/" + b"a" * 300, b"/api/backup/list?client=../bob"]
    alice = b"Authorization: Bearer " + tokens.alice.encode() + b"\r\n"
    auth = [b"", alice, alice, alice,
            b"Authorization: Bearer " + tokens.admin.encode() + b"\r\n",
            b"Authorization: Bearer \xff\xfe\xfd\r\n", b"Authorization: Basic Zm9vOmJhcg==\r\n",
            b"Authorization: Bearer\r\n", b"Authorization: " + b"B" * 9000 + b"\r\n"]
    extra = [b"", b"Upload-Offset: \xc2\xb2\r\n", b"Upload-Offset: -1\r\n",
             b"Upload-Offset: " + b"9" * 5000 + b"\r\n", b"Range: bytes=\xc2\xb2-\r\n",
             b"Range: bytes=0-0,1-1\r\n", b"Range: bytes=" + b"9" * 5000 + b"-\r\n",
             b"If-Range: x\r\nRange: bytes=0-1\r\n", b"Content-Type: multipart/form-data\r\n",
             b"Content-Type: multipart/form-data; boundary=\r\n",
             b"Content-Type: application/json\r\n", b"Transfer-Encoding: chunked\r\n",
             b"Transfer-Encoding: gzip, chunked\r\n", b"Content-Encoding: gzip\r\n",
             b"X-Backup-Name: ../x\r\n", b"X-Content-SHA256: zz\r\n",
             b"Expect: 100-continue\r\n", b"Connection: upgrade\r\nUpgrade: websocket\r\n",
             b"X-Ctl: a\x01b\r\n", b"Host: a\r\nHost: b\r\n", b": empty-name\r\n"]
    bodies = [b"", b"{}", b"[]", b"null", b"{\"name\": \"x.dump\"}", b"[" * 5000,
              b"{\"size\": " + b"9" * 5000 + b"}", b"\xff\xfe", b"0\r\n\r\n",
              b"zz\r\nabc\r\n0\r\n\r\n", b"--\r\n\r\n", os.urandom(64)]
    out = []
    for _ in range(FUZZ_RAW):
        body = rng.choice(bodies)
        exact = b"Content-Length: %d\r\n" % len(body)
        length = exact if rng.random() < 0.5 else rng.choice([b"", exact,
                             b"Content-Length: %d\r\n" % (len(body) + rng.randint(1, 50)),
                             b"Content-Length: -1\r\n", b"Content-Length: 1e3\r\n",
                             b"Content-Length: \xd9\xa3\r\n",
                             b"Content-Length: 1\r\nContent-Length: 2\r\n"])
        version = rng.choice([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1 x", b""])
        # Mostly one hostile element at a time, so most requests get past the parser and
        # reach routing, auth and the handlers.
        method = rng.choice(methods[:6]) if rng.random() < 0.7 else rng.choice(methods)
        headers = rng.choice(extra) if rng.random() < 0.5 else b""
        if rng.random() < 0.2:
            headers += rng.choice(extra)
        out.append(method + b" " + rng.choice(paths) + b" " + version + b"\r\n"
                   + b"Host: x\r\n" + rng.choice(auth) + headers + length
                   + b"Connection: close\r\n\r\n" + body)
    return out


async def test_fuzz_no_5xx_and_still_healthy(tight: Receiver, log_lines: list[str]) -> None:
    """A few hundred hostile requests (fixed seed; raw sockets and aiohttp) never get a 5xx,
    never log an ERROR, and the receiver answers /health ok afterwards."""
    rng = random.Random(FUZZ_SEED)
    tokens = tight.tokens
    statuses: list[tuple[int, bytes]] = []
    sem = asyncio.Semaphore(32)

    async def one_raw(request: bytes) -> None:
        async with sem:
            reply = await raw_request(tight.url, request, timeout_s=BODY_IDLE_S + 10)
        if reply is not None:
            statuses.append((reply.status, request[:120]))

    await asyncio.gather(*(one_raw(r) for r in _fuzz_raw_requests(rng, tokens)))

    async def one_client(http: aiohttp.ClientSession) -> None:
        method = rng.choice(["GET", "POST", "PATCH", "DELETE", "HEAD"])
        path = rng.choice(["/api/v1/uploads", "/api/backup/upload", "/api/backup/list",
                           "/api/admin/prune", "/api/backup/download/x.dump",
                           "/api/v1/uploads/" + "b" * 32, "/api/backup/y.dump"])
        params = rng.choice([{}, {"name": "../x"}, {"name": "ok.dump", "kind": "A"},
                             {"client": "bob"}, {"client": "\x00"}, {"sha256": "x" * 64},
                             {"name": "f" * 250}])
        headers = {"Authorization": "Bearer " + rng.choice([tokens.alice, tokens.admin, "x"])}
        headers.update(rng.choice([{}, {"Upload-Offset": "٣"}, {"Range": "bytes=²-"},
                                   {"Content-Type": "multipart/form-data; boundary=q"},
                                   {"X-Backup-Name": "a/b"}]))
        body: object = rng.choice([None, b"", b"{", json.dumps({"name": 5}).encode(),
                                   json.dumps({"keep_last": 10**40}).encode(),
                                   json.dumps({"sha256": "a" * 64, "size": -1}).encode(),
                                   json.dumps({"name": "n.dump", "size": 10**30}).encode(),
                                   json.dumps({"metadata": {"x": "y" * 20000}}).encode(),
                                   os.urandom(200)])
        async with sem, http.request(method, tight.url + path, params=params, data=body,
                                     headers=headers) as resp:
            await resp.read()
            statuses.append((resp.status, f"{method} {path} {params}".encode()))

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one_client(http) for _ in range(FUZZ_CLIENT)))

    assert len(statuses) >= FUZZ_CLIENT + FUZZ_RAW // 2
    # the requests reached routing, auth and the handlers, not only the parser
    assert len(collections.Counter(s[0] for s in statuses)) >= 5
    server_errors = [s for s in statuses if s[0] >= 500]
    assert not server_errors, server_errors[:5]
    assert not [line for line in log_lines if line.startswith(("ERROR", "CRITICAL"))]
    async with aiohttp.ClientSession() as http, http.get(f"{tight.url}/health") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"


def test_receiver_config_keeps_header_timeout_default() -> None:
    """ReceiverConfig() carries the documented 30 s header timeout."""
    assert ReceiverConfig().header_timeout_s == 30.0
