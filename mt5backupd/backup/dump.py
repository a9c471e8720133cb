"""pg_dump as a supervised subprocess whose stdout is pumped (in a thread) into a sink.

The pump never waits on the network: its sink is the local spool file. pg_dump runs in its own
process group so that a stall, a failure of ours or a shutdown stops it (and nothing it spawned)
in order. stderr is drained concurrently, logged and kept for the error message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from mt5backupd.backup.compress import ReadSource
from mt5backupd.backup.drain import EarlyDrain
from mt5backupd.config import DatabaseConfig, Secret
from mt5backupd.errors import ConfigError, Mt5BackupError

PIPE_BYTES = 1024 * 1024
TERM_GRACE_S = 5.0
STDERR_WAIT_S = 1.0  # for the last words of a tool stopped before it was pumped
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


# What a child may inherit from our environment. Everything else (BACKUP_API_TOKEN, the
# receiver's token, webhook URLs, whatever systemd or a shell put there) stays with us.
CHILD_ENV_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "HOME", "TMPDIR"})
# libpq's own variables (https://www.postgresql.org/docs/current/libpq-envars.html), minus
# PGPASSWORD: a password goes into a 0600 passfile instead (see pg_child_env).
LIBPQ_ENV_NAMES = frozenset({
    "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSFILE", "PGSERVICE",
    "PGSERVICEFILE", "PGSYSCONFDIR", "PGOPTIONS", "PGAPPNAME", "PGSSLMODE", "PGREQUIRESSL",
    "PGSSLCOMPRESSION", "PGSSLCERT", "PGSSLKEY", "PGSSLCERTMODE", "PGSSLROOTCERT", "PGSSLCRL",
    "PGSSLCRLDIR", "PGSSLSNI", "PGSSLNEGOTIATION", "PGREQUIREPEER", "PGSSLMINPROTOCOLVERSION",
    "PGSSLMAXPROTOCOLVERSION", "PGGSSENCMODE", "PGKRBSRVNAME", "PGGSSLIB", "PGGSSDELEGATION",
    "PGCONNECT_TIMEOUT", "PGCLIENTENCODING", "PGTARGETSESSIONATTRS", "PGLOADBALANCEHOSTS",
    "PGCHANNELBINDING", "PGREQUIREAUTH", "PGDATESTYLE", "PGTZ", "PGGEQO", "PGLOCALEDIR",
})


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every child process starts from: locale, PATH, TZ, HOME and libpq's
    variables; never a token, a password or a URL of ours."""
    base = os.environ if base is None else base
    return {k: v for k, v in base.items()
            if k in CHILD_ENV_NAMES or k.startswith("LC_") or k in LIBPQ_ENV_NAMES}


def libpq_env(cfg: DatabaseConfig, passfile: Path | None = None,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for libpq tools: the clean child environment, config winning over
    inherited PG* variables, and the password only as a passfile (never argv, never env)."""
    env = child_env(base)
    if cfg.host:
        env["PGHOST"] = cfg.host
    if cfg.port:
        env["PGPORT"] = str(cfg.port)
    if cfg.user:
        env["PGUSER"] = cfg.user
    env["PGDATABASE"] = cfg.dbname
    env.setdefault("PGAPPNAME", "mt5backupd")
    if passfile is not None:
        env["PGPASSFILE"] = str(passfile)
    return env


def passfile_line(password: str) -> str:
    """A .pgpass line matching every host, port, database and user (``:`` and ``\\``
    escaped as libpq expects)."""
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:*:*:{escaped}\n"


@contextlib.contextmanager
def pg_child_env(cfg: DatabaseConfig, password: Secret | None,
                 base: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """libpq_env with the password (ours, else an inherited PGPASSWORD) in a 0600 passfile in a
    0700 directory private to this run, removed afterwards: a child's environment is readable
    in /proc by its user and inherited by everything it starts, a passfile is not."""
    base = os.environ if base is None else base
    secret = password.reveal() if password is not None else base.get("PGPASSWORD")
    if not secret:
        yield libpq_env(cfg, None, base)
        return
    if "\n" in secret or "\r" in secret:
        raise ConfigError("[database] password contains a line break, which libpq cannot "
                          "take from a password file")
    with tempfile.TemporaryDirectory(prefix="mt5backupd-run-") as private:  # mode 0700
        passfile = Path(private) / "pgpass"
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(passfile_line(secret))
        yield libpq_env(cfg, passfile, base)


def pg_dump_argv(cfg: DatabaseConfig, snapshot: str | None = None) -> list[str]:
    level = cfg.compression.level if cfg.compression.kind == "gzip" else 0
    argv = [cfg.pg_dump, "--format=custom", f"--compress={level}", "--no-password",
            f"--dbname={cfg.dbname}"]
    if snapshot:
        argv.append(f"--snapshot={snapshot}")
    return argv


@dataclass
class DumpStats:
    raw_bytes: int = 0
    duration_s: float = 0.0
    returncode: int | None = None
    stderr_tail: list[str] = field(default_factory=list)


def _set_pipe_size(fd: int) -> None:
    # A 1 MiB pipe lets pg_dump write ahead while the pump is busy, in whole-chunk reads.
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, then SIGKILL after a grace period."""
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
    proc: asyncio.subprocess.Process
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
        try:
            await _stop_group(self.proc)  # EOF (or a closed pipe) ends a drain's read too
            if self.proc.stderr is not None and not self.proc.stderr.at_eof():
                with contextlib.suppress(Exception):
                    text = await asyncio.wait_for(self.proc.stderr.read(), STDERR_WAIT_S)
                    for line in text.decode(errors="replace").splitlines():
                        if line.strip():
                            logger.warning("{} (stopped before use): {}", tool, line.rstrip())
        finally:
            if self.drain is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.drain.close)
            if not self.closed:
                self.closed = True
                with contextlib.suppress(OSError):
                    os.close(self.read_fd)


async def spawn_dump(argv: list[str], env: Mapping[str, str], *,
                     tool: str = "pg_dump") -> SpawnedDump:
    """Start the tool with stdout into a fresh pipe (1 MiB, so it writes ahead of the pump)
    in its own process group; a binary that cannot be run is a ConfigError naming its key."""
    read_fd, write_fd = os.pipe()
    _set_pipe_size(write_fd)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd,
            stderr=asyncio.subprocess.PIPE, env=dict(env), start_new_session=True,
        )
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
    return SpawnedDump(list(argv), proc, read_fd, time.monotonic())


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
        spawned = await spawn_dump(argv, env, tool=tool)
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
        assert proc.stderr is not None
        async for raw_line in proc.stderr:
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
                await _stop_group(proc)
                return

    stderr_task = asyncio.create_task(drain_stderr())
    watch_task = asyncio.create_task(watchdog())
    pump_future = loop.run_in_executor(None, pump, source, on_read)
    try:
        try:
            stats.raw_bytes = await asyncio.shield(pump_future)
        except BaseException:
            await _stop_group(proc)  # unblocks the pump (EOF), whatever went wrong
            with contextlib.suppress(BaseException):
                await pump_future
            raise
        stats.returncode = await proc.wait()
        await stderr_task
    finally:
        watch_task.cancel()
        if proc.returncode is None:
            await _stop_group(proc)
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
