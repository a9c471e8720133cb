"""A tool (pg_dump, pg_basebackup) started with its stdout into a pipe, possibly before any event
loop exists.

``--run-now`` starts pg_dump before it imports asyncio, loguru, aiohttp and asyncpg (on two
cores those imports are ~0.1 s that pg_dump's catalog phase now overlaps), so this module
stays light: the tool is a ``subprocess.Popen`` and asyncio is imported only inside the
coroutines, which by then run in a loop that has it. ``ToolProcess`` gives the run's coroutines
what they need of it: ``wait()`` (a pidfd watched by the loop; a worker thread where pidfds are
missing) and its stderr as a stream.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mt5backupd.backup.drain import EarlyDrain
from mt5backupd.errors import ConfigError

if TYPE_CHECKING:
    import asyncio

PIPE_BYTES = 1024 * 1024
TERM_GRACE_S = 5.0
STDERR_WAIT_S = 1.0  # for the last words of a tool stopped before it was pumped


class ToolProcess:
    """A started tool as the run's coroutines use it (the part of asyncio's ``Process`` they
    need): ``pid``, ``returncode``, ``await wait()``, ``await stderr()``."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._stderr: asyncio.Task[asyncio.StreamReader] | None = None
        self._transport: asyncio.ReadTransport | None = None
        self._pidfd = hasattr(os, "pidfd_open")  # False: wait in a worker thread

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        import asyncio

        if (code := self._popen.poll()) is not None:
            return code
        loop = asyncio.get_running_loop()
        pidfd = -1
        if self._pidfd:
            with contextlib.suppress(OSError):  # an old kernel, seccomp, or reaped meanwhile
                pidfd = os.pidfd_open(self.pid)
        if pidfd < 0:
            return await loop.run_in_executor(None, self._popen.wait)
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self._popen.wait()  # exited: reaps at once

    async def stderr(self) -> asyncio.StreamReader:
        """Its stderr as a stream, attached to the running loop on first use (what it wrote
        before waits in the pipe)."""
        import asyncio

        if self._stderr is None:
            self._stderr = asyncio.ensure_future(self._attach_stderr())
        return await asyncio.shield(self._stderr)

    async def _attach_stderr(self) -> asyncio.StreamReader:
        import asyncio

        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        assert self._popen.stderr is not None
        self._transport, _protocol = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), self._popen.stderr)
        return reader

    def close(self) -> None:
        """Close our end of its stderr (idempotent; the tool is gone or being stopped)."""
        if self._stderr is not None and not self._stderr.done():
            # being attached (a stop cancelled meanwhile): the transport owns the pipe the
            # moment it exists, so it is closed then, never the file under it
            self._stderr.add_done_callback(lambda _task: self.close())
        elif self._transport is not None:
            self._transport.close()
        elif self._popen.stderr is not None:
            self._popen.stderr.close()


def _set_pipe_size(fd: int) -> None:
    # A 1 MiB pipe lets pg_dump write ahead while the pump is busy, in whole-chunk reads.
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


async def stop_group(proc: ToolProcess) -> None:
    """SIGTERM the process group, then SIGKILL after a grace period."""
    import asyncio

    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), TERM_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


@dataclass
class SpawnedDump:
    """A started pg_dump (or pg_basebackup) whose stdout waits in a pipe until ``run_dump``
    pumps it: a run can start the tool first and finish its own preparations meanwhile."""

    argv: list[str]
    proc: ToolProcess
    read_fd: int
    started: float  # time.monotonic() of the spawn
    drain: EarlyDrain | None = None  # what it writes before the pump, kept in a scratch file
    closed: bool = False  # read_fd closed (stop() is idempotent)

    def start_draining(self, directory: Path) -> None:
        """Keep pg_dump writing until the pump takes over (backup/drain)."""
        self.drain = EarlyDrain(self.read_fd, directory)

    async def stop(self, *, tool: str = "pg_dump") -> None:
        """The tool gone, its drain ended, the pipe closed; safe to call again, and after a
        pumped run (then only the leftovers go). What a tool stopped before it was pumped
        wrote to stderr (its own failure, say) is logged, not lost."""
        import asyncio

        from loguru import logger

        try:
            await stop_group(self.proc)  # EOF (or a closed pipe) ends a drain's read too
            with contextlib.suppress(Exception):
                stderr = await self.proc.stderr()
                if not stderr.at_eof():
                    text = await asyncio.wait_for(stderr.read(), STDERR_WAIT_S)
                    for line in text.decode(errors="replace").splitlines():
                        if line.strip():
                            logger.warning("{} (stopped before use): {}", tool, line.rstrip())
        finally:
            if self.drain is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.drain.close)
            self.proc.close()
            if not self.closed:
                self.closed = True
                with contextlib.suppress(OSError):
                    os.close(self.read_fd)


def start_tool(argv: list[str], env: Mapping[str, str], *, tool: str = "pg_dump") -> SpawnedDump:
    """Start the tool with stdout into a fresh pipe (1 MiB, so it writes ahead of the pump) in
    its own process group; a binary that cannot be run is a ConfigError naming its key."""
    read_fd, write_fd = os.pipe()
    _set_pipe_size(write_fd)
    try:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=subprocess.PIPE,
            env=dict(env), start_new_session=True)
    except BaseException as exc:
        os.close(read_fd)
        if not isinstance(exc, OSError):
            raise
        section = "[database]" if tool == "pg_dump" else "[wal]"
        why = "not found" if isinstance(exc, FileNotFoundError) else \
            f"cannot be run ({exc.strerror or exc})"
        raise ConfigError(f"{section} {tool}: {argv[0]!r} {why}") from None
    finally:
        os.close(write_fd)  # only the tool holds the write end now: its exit is our EOF
    return SpawnedDump(list(argv), ToolProcess(popen), read_fd, time.monotonic())
