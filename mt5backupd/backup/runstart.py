"""The start of a database run, before anything heavy: the run lock, the password, and pg_dump
itself, started at once.

pg_dump's first ~0.3 s are its own catalog phase (locks, schema queries); started before the
preflight (database and receiver checks, tool versions) and, on the command line, before the
run imports its HTTP and database clients, that phase overlaps ours instead of following it.
Its output waits in the pipe until the run pumps it. A run that fails before it pumps (a
preflight error, an incompatible pg_dump) stops it: it has only read catalogs.

pg_dump is not started early when the run will not use it as it is: row counts taken in an
exported snapshot (``gzip:N``: pg_dump needs that snapshot's name first), or earlier backups
waiting for their upload (the run sends those first, and a waiting pg_dump would hold its
snapshot and its table locks on the server the whole time).

This module and what it imports stay light (no asyncio, loguru, aiohttp or asyncpg): ``--run-now``
begins a run with it before any of those is imported, and pg_dump runs while they load.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import UTC, datetime
from types import TracebackType

from mt5backupd.backup import customformat, spool
from mt5backupd.backup.childenv import pg_child_env, pg_dump_argv
from mt5backupd.backup.runlock import RunLock
from mt5backupd.backup.shipspec import check_generated_names
from mt5backupd.backup.toolproc import SpawnedDump, start_tool
from mt5backupd.config import Config, DatabaseConfig
from mt5backupd.config.secret import Secret
from mt5backupd.config.secretfiles import check_pgpass, database_password


def check_database_names(db: DatabaseConfig) -> None:
    """The backup ids made from [database] dbname must be ids the receiver accepts."""
    check_generated_names(db.dbname, db.compression.suffix, "[database] dbname")


def dump_may_start_early(cfg: Config) -> bool:
    """Whether the run will pump a pg_dump started before its preflight (pure but for reading
    the local manifests)."""
    if cfg.database.compression.kind == "gzip":
        return False
    waiting = bool(cfg.remote.url) and any(m.pending for m in spool.load_manifests(cfg.local.dir))
    return not waiting


class RunStart:
    """Holds the run lock, the database password and, when it may, a started pg_dump, from
    before the preflight to the end of the run. ``take_dump`` hands the dump over once (with
    its argv, to check it is the one wanted); one not taken is stopped on exit."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.begun = False
        self.error: Exception | None = None  # why begin() failed, raised again on entering
        self.began = (datetime.now(UTC), time.monotonic())  # reset by begin()
        self.lock = RunLock(cfg.local.dir)
        self.password: Secret | None = None
        self._dump: SpawnedDump | None = None
        self._env = contextlib.ExitStack()

    async def __aenter__(self) -> RunStart:
        """Begin, once: a caller may begin it early and hand it on; entering it then is a
        no-op, or raises what failed that early begin (where the run records its failures)."""
        if self.error is not None:
            raise self.error
        if not self.begun:
            try:
                self.begin()
            except BaseException:
                await self.close()
                raise
        return self

    def begin(self) -> None:
        """The lock, the password and pg_dump (when it may start early). No event loop needed;
        on failure the exception is kept in ``error`` and raised, and ``close()`` undoes what
        was done."""
        cfg = self.cfg
        self.began = (datetime.now(UTC), time.monotonic())
        try:
            if cfg.remote.url:  # local files may carry any name; the receiver holds its rules
                check_database_names(cfg.database)
            cfg.local.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.lock.acquire()
            self.begun = True
            self.password = database_password(cfg.database)
            with contextlib.suppress(RuntimeError):  # no home directory: no ~/.pgpass to check
                check_pgpass()
            if dump_may_start_early(cfg):
                env = self._env.enter_context(pg_child_env(cfg.database, self.password))
                self._dump = start_tool(pg_dump_argv(cfg.database), env)
                self._dump.start_draining(cfg.local.dir)
                # the row counter's numpy (~0.1 s of imports) while the preflight runs, not
                # when pg_dump's bytes already wait in the pipe
                threading.Thread(target=customformat.preload, name="preload",
                                 daemon=True).start()
        except Exception as exc:
            self.error = exc
            raise

    async def take_dump(self, argv: list[str]) -> SpawnedDump | None:
        """The started pg_dump, now the caller's to end, if it runs ``argv``; None when there
        is none (start one). One that runs something else is stopped first: never two."""
        if self._dump is not None and self._dump.argv != argv:
            await self.drop_dump()
        dump, self._dump = self._dump, None
        return dump

    async def drop_dump(self) -> None:
        """Stop the started pg_dump now: the run goes another way."""
        dump, self._dump = self._dump, None
        if dump is not None:
            await dump.stop()

    @property
    def closed(self) -> bool:
        """Nothing left for ``close()`` to end: no pg_dump, no lock (nor the passfile, which
        only exists while the lock is held)."""
        return self._dump is None and not self.lock.held

    async def close(self) -> None:
        """Stop a pg_dump nobody took, remove its passfile, release the lock (idempotent)."""
        dump, self._dump = self._dump, None  # before any await: a second close never sees it
        try:
            if dump is not None:
                from loguru import logger

                logger.debug("stopping the pg_dump started for this run: the run did not use it")
                await dump.stop()
        finally:
            self._env.close()
            self.lock.release()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
