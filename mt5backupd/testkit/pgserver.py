"""A throwaway PostgreSQL cluster's life: initdb, start, stop, kill, destroy; where to connect.

Backups are only worth something if they are proven against a real server, so tests and the demo
run ``initdb`` into a private directory instead of mocking PostgreSQL or touching the machine's
own cluster. Everything here trades durability for speed (``fsync=off`` and friends) because the
data is disposable; never point this at a database anyone cares about. The admin helpers (psql,
databases, passwords) are in :mod:`mt5backupd.testkit.pgcluster`, whose ``PgCluster`` is the class
to use.

What makes this harder than ``initdb && pg_ctl start`` (running as root, finding the binaries,
killing a whole process tree) lives in :mod:`mt5backupd.testkit.pghost`. A test that fails or is
interrupted must not leave a postmaster behind, so stopping escalates from a fast shutdown to an
immediate one to SIGKILL, and a started cluster is tracked by :mod:`mt5backupd.testkit.reaper`,
which stops it at interpreter exit if the process forgot to.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote

from mt5backupd.pgtext import quote_literal
from mt5backupd.testkit import reaper
from mt5backupd.testkit.pghost import (
    SUPERUSER,
    PgClusterError,
    chown_to_server_user,
    find_bin_dir,
    free_port,
    kill_with_children,
    make_root,
    process_alive,
    require_server_account,
    server_argv,
)

__all__ = ["PgServer", "StopMode"]

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for the terminating NUL and slack

StopMode = Literal["smart", "fast", "immediate"]

# Settings for a cluster whose contents may be lost at any moment. fsync is off because only an
# OS crash (not a process crash) could then lose data; max_wal_size is large so bulk sample-data
# loads do not spend their time in checkpoints. synchronous_commit stays ON deliberately: with
# fsync off a synchronous commit costs one write() to the page cache, while asynchronous commit
# would make kill() (the fault tests' crash) silently drop the last ~0.6 s of committed
# transactions, which is not a failure mode of the production server being simulated.
_THROWAWAY_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "shared_buffers": "128MB",
    "max_wal_size": "2GB",
    "logging_collector": "off",
    "log_line_prefix": "'%m [%p] '",
    "log_min_messages": "warning",
}

# What point-in-time recovery tests need on top (PostgreSQL 10+ defaults to the first two, but a
# test must not depend on a packager's defaults): WAL for a replica, senders and slots for
# pg_receivewal and pg_basebackup, full page writes so recovery from a base backup is exact.
REPLICATION_SETTINGS: dict[str, str] = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "full_page_writes": "on",
    "wal_sender_timeout": "'60s'",
}


class PgServer:
    """One private PostgreSQL cluster: its directory, port, socket and the processes it runs.

    Build it (or the ``PgCluster`` subclass) with :meth:`create`. As a context manager it starts
    on enter and on exit stops the server and deletes everything it created, whatever happened
    inside the block.
    """

    def __init__(
        self,
        root: Path,
        *,
        bin_dir: Path,
        port: int,
        socket_dir: Path,
        extra_dirs: tuple[Path, ...] = (),
        settings: dict[str, str] | None = None,
    ) -> None:
        self._root = root
        self._bin_dir = bin_dir
        self._port = port
        self._socket_dir = socket_dir
        self._extra_dirs = extra_dirs
        self._settings = dict(settings or {})

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def create(
        cls, base_dir: Path | None = None, *, port: int | None = None, bin_dir: Path | None = None,
        replication: bool = False,
    ) -> Self:
        """``initdb`` a new cluster in a fresh directory inside ``base_dir`` (not started yet).

        ``replication=True`` configures it for streaming replication (``REPLICATION_SETTINGS``;
        ``pg_hba.conf`` admits replication connections either way), as PITR needs.

        When we are root and the ``postgres`` account cannot reach ``base_dir`` (pytest's
        ``/tmp/pytest-of-root`` is 0700), the cluster goes into a fresh directory in the system
        temp dir instead of loosening permissions on someone else's directory chain;
        :attr:`root` always says where it went.
        """
        bin_dir = bin_dir or find_bin_dir()
        require_server_account()
        root = make_root(base_dir)
        created: list[Path] = [root]
        try:
            socket_dir = root / "sock"
            if len(str(socket_dir / ".s.PGSQL.65535")) > _SOCKET_PATH_MAX:
                # Unix socket paths are limited to ~107 bytes; deep pytest paths exceed that.
                socket_dir = Path(tempfile.mkdtemp(prefix="mt5pgs-"))
                created.append(socket_dir)
            else:
                socket_dir.mkdir()
            socket_dir.chmod(0o755)
            chown_to_server_user(socket_dir)
            cluster = cls(
                root,
                bin_dir=bin_dir,
                port=port if port is not None else free_port(),
                socket_dir=socket_dir,
                extra_dirs=tuple(created[1:]),
                settings=REPLICATION_SETTINGS if replication else None,
            )
            cluster._initdb()
        except BaseException:
            for path in created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return cluster

    @classmethod
    def adopt(cls, root: Path, *, bin_dir: Path | None = None) -> Self:
        """A server for a data directory made elsewhere (``root/data``: a restored base
        backup), not started yet: its own free port and socket directory are appended to its
        postgresql.conf (later lines win), and as root it is handed to the ``postgres`` account."""
        bin_dir = bin_dir or find_bin_dir()
        socket_dir = Path(tempfile.mkdtemp(prefix="mt5pgs-"))
        socket_dir.chmod(0o755)
        chown_to_server_user(socket_dir)
        server = cls(root, bin_dir=bin_dir, port=free_port(), socket_dir=socket_dir,
                     extra_dirs=(socket_dir,))
        settings = {"port": str(server.port), "listen_addresses": "'127.0.0.1'",
                    "unix_socket_directories": quote_literal(str(socket_dir))}
        with (server.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# mt5backupd.testkit adopted cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        for path in (root, *root.rglob("*")):
            chown_to_server_user(path)
        return server

    def _initdb(self) -> None:
        res = subprocess.run(
            server_argv(
                [
                    str(self._bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ]
            ),
            capture_output=True,
            text=True,
            cwd=self._root,
            timeout=300,
            check=False,
        )
        if res.returncode != 0:
            raise PgClusterError(f"initdb failed in {self.data_dir}: {res.stderr.strip()[-2000:]}")
        settings = {
            **_THROWAWAY_SETTINGS,
            **self._settings,
            "listen_addresses": "'127.0.0.1'",
            "port": str(self._port),
            "unix_socket_directories": quote_literal(str(self._socket_dir)),
        }
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as f:
            f.write("\n# mt5backupd throwaway cluster\n")
            f.writelines(f"{key} = {value}\n" for key, value in settings.items())

    # -- properties --------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The directory this cluster owns; removed by :meth:`destroy`."""
        return self._root

    @property
    def data_dir(self) -> Path:
        return self._root / "data"

    @property
    def log_path(self) -> Path:
        return self._root / "server.log"

    @property
    def host(self) -> str:
        """The unix socket directory (libpq treats a host starting with '/' as one)."""
        return str(self._socket_dir)

    @property
    def port(self) -> int:
        return self._port

    @property
    def user(self) -> str:
        return SUPERUSER

    @property
    def bin_dir(self) -> Path:
        return self._bin_dir

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs, else None."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
            pid = int(first)
        except (OSError, ValueError):
            return None
        if not process_alive(pid):
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return pid
        # A stale pid file after a kill could name an unrelated process that reused the PID.
        return pid if comm.startswith(("postgres", "postmaster")) else None

    # -- connection parameters ---------------------------------------------------------------

    def dsn(
        self,
        dbname: str = "postgres",
        *,
        user: str | None = None,
        password: str | None = None,
        unix_socket: bool = False,
    ) -> str:
        """A ``postgresql://`` URL that both libpq (psql, pg_dump) and asyncpg accept.

        TCP to 127.0.0.1 by default because that is how the daemon reaches a real server; the
        password is included only when passed, so tests can prove what happens without one.
        """
        auth = quote(user or SUPERUSER, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        db = quote(dbname, safe="")
        if unix_socket:
            return f"postgresql://{auth}@/{db}?host={quote(self.host)}&port={self._port}"
        return f"postgresql://{auth}@127.0.0.1:{self._port}/{db}"

    def env(
        self, dbname: str = "postgres", *, user: str | None = None, password: str | None = None
    ) -> dict[str, str]:
        """libpq environment variables for a client subprocess (socket connection)."""
        out = {
            "PGHOST": self.host,
            "PGPORT": str(self._port),
            "PGUSER": user or SUPERUSER,
            "PGDATABASE": dbname,
        }
        if password is not None:
            out["PGPASSWORD"] = password
        return out

    # -- lifecycle ---------------------------------------------------------------------------

    def _pg_ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            server_argv([str(self._bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]),
            capture_output=True,
            text=True,
            cwd=self._root,
            timeout=timeout,
            check=False,
        )

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server log, for error messages that explain a failed start."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and return once it accepts connections (also after :meth:`kill`)."""
        if self.is_running():
            return
        # Tracked before pg_ctl runs: an interrupt during start must not leak the postmaster.
        reaper.track(self, self._stop_at_exit)
        try:
            res = self._pg_ctl(
                "start", "-w", "-s", "-t", str(int(timeout)), "-l", str(self.log_path),
                timeout=timeout + 30,
            )
        except subprocess.TimeoutExpired:
            self.kill()
            raise PgClusterError(
                f"pg_ctl start did not return within {timeout:.0f}s; server log:\n"
                f"{self.log_tail()}"
            ) from None
        if res.returncode != 0:
            self.kill()
            raise PgClusterError(
                f"PostgreSQL failed to start ({res.stderr.strip() or res.stdout.strip()}); "
                f"server log {self.log_path}:\n{self.log_tail()}"
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            res = subprocess.run(
                [
                    str(self._bin_dir / "pg_isready"), "-q", "-t", "2",
                    "-h", self.host, "-p", str(self._port), "-U", SUPERUSER,
                ],
                capture_output=True,
                timeout=30,
                check=False,
            )
            if res.returncode == 0:
                return
            if not self.is_running() or time.monotonic() > deadline:
                self.kill()
                raise PgClusterError(
                    f"PostgreSQL did not become ready within {timeout:.0f}s; server log:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Stop the server; escalates to an immediate shutdown, then SIGKILL, so it never hangs.

        A no-op when the server is not running, including right after :meth:`kill`.
        """
        try:
            if not self.is_running():
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._pg_ctl("stop", "-w", "-s", "-m", mode, "-t", str(int(timeout)),
                             timeout=timeout + 10)
            if self.is_running() and mode != "immediate":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._pg_ctl("stop", "-w", "-s", "-m", "immediate", "-t", "10", timeout=20)
            if self.is_running():
                self.kill()
        finally:
            if not self.is_running():
                reaper.untrack(self)

    def _stop_at_exit(self) -> None:
        self.stop("immediate", timeout=10)

    def kill(self) -> None:
        """SIGKILL the postmaster and all its backends at once, like a crash or OOM kill.

        The next :meth:`start` runs crash recovery.
        """
        pid = self.pid
        if pid is None:
            return
        kill_with_children(pid)
        # Everything is dead, so the lock files are stale. Removing them means a PID reused by
        # an unrelated process can never be mistaken for (and signalled as) our postmaster, and
        # a restart works even where PID 1 does not reap orphans: PostgreSQL's own stale-lock
        # check uses kill(pid, 0), which succeeds on the unreaped zombie of the old postmaster.
        for stale in (
            self.data_dir / "postmaster.pid",
            self._socket_dir / f".s.PGSQL.{self._port}.lock",
            self._socket_dir / f".s.PGSQL.{self._port}",
        ):
            with contextlib.suppress(OSError):
                stale.unlink()
        reaper.untrack(self)

    def destroy(self) -> None:
        """Stop the server (however it is doing) and delete every directory this cluster made."""
        try:
            self.stop()
        finally:
            if self.is_running():
                self.kill()
            for path in (self._root, *self._extra_dirs):
                shutil.rmtree(path, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self._root)!r}, port={self._port})"
