"""pg_dump as a supervised subprocess whose stdout is pumped (in a thread) into a sink.

The pump never waits on the network: its sink is the local spool file. pg_dump (started by
``toolproc``, with ``childenv``'s environment) runs in its own process group so that a stall, a
failure of ours or a shutdown stops it (and nothing it spawned) in order. stderr is drained
concurrently, logged and kept for the error message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from loguru import logger

from mt5backupd.backup.childenv import child_env
from mt5backupd.backup.compress import ReadSource
from mt5backupd.backup.toolproc import SpawnedDump, start_tool, stop_group
from mt5backupd.errors import ConfigError, Mt5BackupError

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class DumpFailed(Mt5BackupError):
    """pg_dump did not finish cleanly; nothing it wrote may be presented as a backup."""


def parse_tool_version(text: str) -> tuple[int, str]:
    """``pg_dump (PostgreSQL) 15.18 (Debian ...)`` -> (15, "15.18")."""
    match = _VERSION_RE.search(text)
    if not match:
        raise ValueError(f"unrecognised version output: {text.strip()[:80]!r}")
    major = int(match.group(1))
    minor = match.group(2)
    return major, f"{major}.{minor}" if minor is not None else str(major)


def server_major(version_num: int) -> int:
    """``server_version_num`` (150018) -> 15; 9.6's 90624 -> 9."""
    return version_num // 10000


async def tool_version(binary: str, key: str) -> tuple[int, str]:
    """(major, version text) of a PostgreSQL tool; ``key`` names its config key, under
    [database] unless it names its section itself (``[wal] pg_basebackup``)."""
    key = key if key.startswith("[") else f"[database] {key}"
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=child_env())
    except FileNotFoundError:
        raise ConfigError(f"{key}: {binary!r} not found (install the PostgreSQL "
                          "client matching the server, or set its path)") from None
    except PermissionError:
        raise ConfigError(f"{key}: {binary!r} is not executable") from None
    out, _err = await proc.communicate()
    try:
        return parse_tool_version(out.decode(errors="replace"))
    except ValueError as exc:
        raise ConfigError(f"{key}: {binary!r}: {exc}") from None


def check_dump_compatible(dump_major: int, server_major_version: int, binary: str) -> None:
    if dump_major < server_major_version:
        raise ConfigError(
            f"[database] pg_dump: {binary} is version {dump_major} but the server is "
            f"{server_major_version}; pg_dump must be at least the server's major version"
        )


@dataclass
class DumpStats:
    raw_bytes: int = 0
    duration_s: float = 0.0
    returncode: int | None = None
    stderr_tail: list[str] = field(default_factory=list)


async def run_dump(
    argv: list[str],
    env: Mapping[str, str],
    pump: Callable[[ReadSource, Callable[[int], None]], int],
    *,
    stall_timeout_s: float,
    stats: DumpStats | None = None,
    tool: str = "pg_dump",
    spawned: SpawnedDump | None = None,
) -> DumpStats:
    """Run pg_dump with stdout into ``pump(source, on_read)`` (called in a worker thread),
    or pump one started earlier (``spawned``, with the same argv and env).

    Raises DumpFailed on a non-zero exit, a signal or a stall; re-raises whatever the pump
    raised (disk full, ...) after stopping pg_dump. Either way pg_dump is gone on return.
    """
    if spawned is None:
        spawned = start_tool(argv, env, tool=tool)
    try:  # from here on the dump is ours to end, whatever happens
        return await _pump_dump(spawned, pump, stall_timeout_s, stats or DumpStats(), tool)
    finally:
        await spawned.stop(tool=tool)


async def _pump_dump(spawned: SpawnedDump,
                     pump: Callable[[ReadSource, Callable[[int], None]], int],
                     stall_timeout_s: float, stats: DumpStats, tool: str) -> DumpStats:
    loop = asyncio.get_running_loop()
    proc, read_fd, started = spawned.proc, spawned.read_fd, spawned.started
    source: ReadSource = read_fd
    if spawned.drain is not None:  # its early bytes wait in a scratch file: those first
        source = await loop.run_in_executor(None, spawned.drain.stop)
        logger.debug("pumping {} {:.3f} s after it started, {} bytes drained meanwhile", tool,
                     time.monotonic() - started, spawned.drain.drained_bytes)
    # a dump started early waits in its full pipe until now: that is not a stall
    last_activity = [time.monotonic()]

    def on_read(_n: int) -> None:
        last_activity[0] = time.monotonic()

    tail: collections.deque[str] = collections.deque(maxlen=20)

    async def drain_stderr() -> None:
        async for raw_line in await proc.stderr():
            line = raw_line.decode(errors="replace").rstrip()
            if line:
                tail.append(line)
                logger.warning("{}: {}", tool, line)

    stalled = False

    async def watchdog() -> None:
        nonlocal stalled
        interval_s = min(1.0, stall_timeout_s / 4)
        while proc.returncode is None:
            await asyncio.sleep(interval_s)
            if time.monotonic() - last_activity[0] > stall_timeout_s:
                stalled = True
                logger.error("{} produced no output for {:.0f} s; stopping it", tool,
                             stall_timeout_s)
                await stop_group(proc)
                return

    stderr_task = asyncio.create_task(drain_stderr())
    watch_task = asyncio.create_task(watchdog())
    pump_future = loop.run_in_executor(None, pump, source, on_read)
    try:
        try:
            stats.raw_bytes = await asyncio.shield(pump_future)
        except BaseException:
            await stop_group(proc)  # unblocks the pump (EOF), whatever went wrong
            with contextlib.suppress(BaseException):
                await pump_future
            raise
        stats.returncode = await proc.wait()
        await stderr_task
    finally:
        watch_task.cancel()
        if proc.returncode is None:
            await stop_group(proc)
        if not stderr_task.done():
            stderr_task.cancel()
        with contextlib.suppress(BaseException):
            await stderr_task
        stats.duration_s = time.monotonic() - started
        stats.stderr_tail = list(tail)
    if stalled:
        raise DumpFailed(f"{tool} produced no output for {stall_timeout_s:.0f} s "
                         "([database] stall_timeout_s) and was killed")
    if stats.returncode != 0:
        reason = tail[-1] if tail else "no message"
        if stats.returncode is not None and stats.returncode < 0:
            how = f"was killed by signal {-stats.returncode}"
        else:
            how = f"exited with status {stats.returncode}"
        raise DumpFailed(f"{tool} {how}: {reason}")
    return stats
