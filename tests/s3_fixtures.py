"""A real S3 endpoint for tests: moto's server on a loopback port (``moto[server]``, installed
with the test extra), one fresh bucket per test, and receiver configs that use it.

Loaded as a pytest plugin (``pytest_plugins`` in conftest.py); tests import helpers from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from mt5backupd.config import ReceiverConfig, StorageConfig

# moto takes any key; these never leave the test process and its children
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
          "AWS_SESSION_TOKEN": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
          "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
TEST_PART_BYTES = 5 * 1024**2  # S3's minimum: tests cross part boundaries with small data


@dataclass
class MotoS3:
    url: str

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self, *, object_lock: bool = False) -> str:
        name = f"t-{secrets.token_hex(8)}"
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        return name

    def storage(self, bucket: str, **overrides: Any) -> StorageConfig:
        base = StorageConfig(backend="s3", endpoint_url=self.url, bucket=bucket,
                             region="us-east-1", addressing_style="path",
                             part_size_bytes=TEST_PART_BYTES)
        return dataclasses.replace(base, **overrides)

    def toml(self, bucket: str, **extra: str) -> str:
        """A ``[receiver.storage]`` table for a receiver process."""
        lines = ["", "[receiver.storage]", 'backend = "s3"', f'endpoint_url = "{self.url}"',
                 f'bucket = "{bucket}"', 'region = "us-east-1"', 'addressing_style = "path"',
                 f"part_size_bytes = {TEST_PART_BYTES}"]
        lines += [f"{k} = {v}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's S3 server on a free loopback port, for the whole session (buckets isolate)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoS3(f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials for moto in this process's environment (the AWS chain reads them), and the
    environment for receiver processes."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **S3_ENV}


def s3_receiver_cfg(base: ReceiverConfig, moto: MotoS3, bucket: str,
                    **storage: Any) -> ReceiverConfig:
    return dataclasses.replace(base, storage=moto.storage(bucket, **storage))


class StoreSwitch:
    """A TCP proxy in front of the S3 endpoint that can be switched off (listener closed, live
    connections cut: the store is gone) and on again on the same port, or held (requests stop
    flowing to the store once a budget of bytes is used up, as if it stalled) and released."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._budget = 0

    def hold(self, budget_bytes: int = 0) -> None:
        """From now on, at most ``budget_bytes`` more go to the store (small requests pass, a
        part's body stalls)."""
        self._budget = budget_bytes
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def on(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def off(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       gated: bool) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if gated and not self._flowing.is_set():
                        if len(data) > self._budget:
                            await self._flowing.wait()
                        else:
                            self._budget -= len(data)
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._writers.discard(writer)
        self._writers.discard(up_writer)
