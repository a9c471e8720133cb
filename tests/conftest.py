from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from mt5backupd.config import ReceiverConfig
from mt5backupd.receiver.auth import TokenStore
from mt5backupd.receiver.metrics import ReceiverMetrics
from mt5backupd.receiver.server import RunningReceiver, start_receiver
from mt5backupd.testkit.receiverproc import ReceiverProcess
from tests.receiver_harness import TokenSet, make_tokens, receiver_config

pytest_plugins = ["tests.pg_fixtures", "tests.backup_fixtures"]


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
