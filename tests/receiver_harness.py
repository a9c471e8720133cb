"""Real receivers for tests: tokens, config, and the fixtures ``receiver`` (the app in this
process on a port it binds itself), ``receiver_process`` (``mt5backupd receiver`` as a process to
kill and restart: ``ReceiverProcess`` from ``mt5backupd.testkit.receiverproc``, shared with the
benches) and ``http`` (a client session).

Loaded as a pytest plugin (``pytest_plugins`` in conftest.py); tests import types from here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from mt5backupd.config import ReceiverConfig, RetentionConfig
from mt5backupd.receiver import auth
from mt5backupd.receiver.auth import TokenStore
from mt5backupd.receiver.metrics import ReceiverMetrics
from mt5backupd.receiver.server import RunningReceiver, start_receiver
from mt5backupd.testkit.receiverproc import ReceiverProcess


@dataclass
class TokenSet:
    alice: str
    bob: str
    admin: str

    def header(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


def make_tokens(tokens_file: Path) -> TokenSet:
    return TokenSet(
        alice=auth.add_token(tokens_file, "alice", admin=False),
        bob=auth.add_token(tokens_file, "bob", admin=False),
        admin=auth.add_token(tokens_file, "ops", admin=True),
    )


def receiver_config(tmp: Path, **overrides: object) -> ReceiverConfig:
    values: dict[str, object] = {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "data_dir": tmp / "data",
        "tokens_file": tmp / "tokens.json",
        "max_upload_bytes": 64 * 1024 * 1024,
        "min_free_bytes": 0,
        "partial_ttl_s": 3600.0,
        "retention": RetentionConfig(),
    }
    values.update(overrides)
    return ReceiverConfig(**values)  # type: ignore[arg-type]


@dataclass
class Receiver:
    url: str
    cfg: ReceiverConfig
    tokens: TokenSet
    metrics: ReceiverMetrics
    running: RunningReceiver

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def receiver_cfg(tmp_path: Path) -> ReceiverConfig:
    return receiver_config(tmp_path)


@pytest.fixture
async def receiver(receiver_cfg: ReceiverConfig) -> AsyncIterator[Receiver]:
    """The real receiver app on a free loopback port, with tokens alice, bob and admin ops."""
    tokens = make_tokens(receiver_cfg.tokens_file)
    metrics = ReceiverMetrics()
    running = await start_receiver(receiver_cfg, TokenStore(receiver_cfg.tokens_file),
                                   metrics=metrics)
    try:
        yield Receiver(running.url, receiver_cfg, tokens, metrics, running)
    finally:
        await running.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def receiver_process(tmp_path: Path) -> Iterator[tuple[ReceiverProcess, TokenSet]]:
    """``mt5backupd receiver`` as a separate process (for kill -9 and restart tests), not started;
    its first start binds a free port, later ones reuse it."""
    proc = ReceiverProcess(tmp_path)
    tokens = make_tokens(proc.tokens_file)
    try:
        yield proc, tokens
    finally:
        proc.stop()
