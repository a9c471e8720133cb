"""Network faults on loopback: a port where nothing listens (a server that is down), and a TCP
proxy that throttles the client->server direction (a slow WAN link)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port where nothing listens: connections are refused (a receiver, database or
    daemon that is down). The port stays bound, not listening, for the whole test, so no other
    process can take it meanwhile as it could a port picked and released in advance."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


class ThrottledProxy:
    def __init__(self, target_host: str, target_port: int, rate_bytes_per_s: float) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.rate_bytes_per_s = rate_bytes_per_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ThrottledProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host,
                                                                 self.target_port)
        except OSError:
            writer.close()
            return
        upload = asyncio.create_task(self._pipe(reader, up_writer, throttle=True))
        download = asyncio.create_task(self._pipe(up_reader, writer, throttle=False))
        self._tasks.update((upload, download))
        await asyncio.wait({upload, download}, return_when=asyncio.FIRST_COMPLETED)
        for task in (upload, download):
            task.cancel()
            self._tasks.discard(task)
        for w in (writer, up_writer):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    throttle: bool) -> None:
        started = time.monotonic()
        sent = 0
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(16384):
                writer.write(data)
                await writer.drain()
                sent += len(data)
                if throttle:
                    ahead_s = sent / self.rate_bytes_per_s - (time.monotonic() - started)
                    if ahead_s > 0:
                        await asyncio.sleep(ahead_s)
