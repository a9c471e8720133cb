"""A throwaway PostgreSQL cluster: the test suite's database and the one ``mt5backupd demo`` uses.

Backups are only worth something if they are proven against a real server, so tests and the demo
run ``initdb`` into a private directory instead of mocking PostgreSQL or touching the machine's
own cluster. Everything here trades durability for speed (``fsync=off`` and friends) because the
data is disposable; never point this at a database anyone cares about.

The two things that make this harder than ``initdb && pg_ctl start``:

* PostgreSQL refuses to run as root, and CI containers run as root. Server binaries then run as
  the ``postgres`` OS account via ``runuser`` and the cluster directories are chowned to it,
  which also means they must live somewhere that account can reach.
* A test that fails or is interrupted must not leave a postmaster behind (it would hold the port
  and the directory forever), so stopping escalates from a fast shutdown to an immediate one to
  SIGKILL, and an ``atexit`` hook stops whatever the process forgot.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote

from mt5backupd.errors import Mt5BackupError

BINDIR_ENV = "MT5BACKUPD_PG_BINDIR"
SERVER_OS_USER = "postgres"  # the OS account server binaries run as when we are root
SUPERUSER = "postgres"  # the database superuser initdb creates
_DEBIAN_GLOB_ROOT = Path("/usr/lib/postgresql")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for the terminating NUL and slack
_INSTALL_HINT = "install the server with 'apt-get install postgresql' or set " + BINDIR_ENV

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


class PgClusterError(Mt5BackupError):
    """The throwaway cluster could not be created, started, stopped or queried."""


def find_bin_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Locate the PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``).

    Debian keeps them out of PATH (``/usr/lib/postgresql/<major>/bin``), so PATH lookup alone
    would miss them. An explicit ``$MT5BACKUPD_PG_BINDIR`` that lacks ``initdb`` is an error
    rather than a silent fallback: the operator asked for that version.
    """
    env = os.environ if environ is None else environ
    explicit = env.get(BINDIR_ENV)
    if explicit:
        path = Path(explicit)
        if not (path / "initdb").is_file():
            raise PgClusterError(f"{BINDIR_ENV}={explicit}: no initdb there; {_INSTALL_HINT}")
        return path
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and (Path(out) / "initdb").is_file():
                return Path(out)
    candidates: list[tuple[int, Path]] = []
    if _DEBIAN_GLOB_ROOT.is_dir():
        for entry in _DEBIAN_GLOB_ROOT.iterdir():
            if entry.name.isdigit() and (entry / "bin" / "initdb").is_file():
                candidates.append((int(entry.name), entry / "bin"))
    if candidates:
        return max(candidates)[1]
    raise PgClusterError(f"PostgreSQL server binaries (initdb) not found; {_INSTALL_HINT}")


def free_port() -> int:
    """A currently unused loopback TCP port, chosen by the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def quote_ident(name: str) -> str:
    """SQL identifier quoting, so database and role names from tests cannot inject SQL."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """SQL string literal quoting (standard_conforming_strings is on by default since 9.1)."""
    return "'" + value.replace("'", "''") + "'"


def _is_root() -> bool:
    return os.geteuid() == 0


def _server_argv(argv: list[str]) -> list[str]:
    """Prefix server-binary invocations so they run as ``postgres`` when we are root."""
    if _is_root():
        return ["runuser", "-u", SERVER_OS_USER, "--", *argv]
    return argv


def _chown_to_server_user(path: Path) -> None:
    if _is_root():
        pw = pwd.getpwnam(SERVER_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _server_user_can_reach(path: Path) -> bool:
    """Whether the ``postgres`` account can traverse into ``path`` (ACLs included)."""
    if not _is_root():
        return True
    res = subprocess.run(
        _server_argv(["test", "-x", str(path), "-a", "-w", str(path)]),
        capture_output=True,
        timeout=30,
        check=False,
    )
    return res.returncode == 0


def _new_root(parent: Path | None) -> Path:
    root = Path(tempfile.mkdtemp(prefix="mt5pg-", dir=parent))
    root.chmod(0o755)
    _chown_to_server_user(root)
    return root


def _make_root(base_dir: Path | None) -> Path:
    """A fresh cluster directory in ``base_dir``, or in the temp dir if postgres can't reach it."""
    if base_dir is not None:
        base_dir.mkdir(parents=True, exist_ok=True)
    root = _new_root(base_dir)
    if _server_user_can_reach(root):
        return root
    shutil.rmtree(root)
    root = _new_root(None)
    if not _server_user_can_reach(root):
        shutil.rmtree(root)
        raise PgClusterError(
            f"the '{SERVER_OS_USER}' account cannot reach {root}; "
            "check the permissions of the temp directory"
        )
    return root


def _process_alive(pid: int) -> bool:
    """True for a live process; a zombie (unreaped because PID 1 may not reap) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat[stat.rfind(")") + 2 :].split(" ", 1)[0]
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the postmaster's backends and auxiliary processes)."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split(" ")
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry.name))
    return out


class PgCluster:
    """One private PostgreSQL cluster: its directory, port, socket and the processes it runs.

    Build it with :meth:`create`. As a context manager it starts on enter and on exit stops the
    server and deletes everything it created, whatever happened inside the block.
    """

    def __init__(
        self,
        root: Path,
        *,
        bin_dir: Path,
        port: int,
        socket_dir: Path,
        extra_dirs: tuple[Path, ...] = (),
    ) -> None:
        self._root = root
        self._bin_dir = bin_dir
        self._port = port
        self._socket_dir = socket_dir
        self._extra_dirs = extra_dirs
        self._admin_password: str | None = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def create(
        cls, base_dir: Path | None = None, *, port: int | None = None, bin_dir: Path | None = None
    ) -> PgCluster:
        """``initdb`` a new cluster in a fresh directory inside ``base_dir`` (not started yet).

        When we are root and the ``postgres`` account cannot reach ``base_dir`` (pytest's
        ``/tmp/pytest-of-root`` is 0700), the cluster goes into a fresh directory in the system
        temp dir instead of loosening permissions on someone else's directory chain;
        :attr:`root` always says where it went.
        """
        bin_dir = bin_dir or find_bin_dir()
        if _is_root():
            try:
                pwd.getpwnam(SERVER_OS_USER)
            except KeyError:
                raise PgClusterError(
                    f"running as root, but there is no '{SERVER_OS_USER}' OS account to run the "
                    f"server as; {_INSTALL_HINT}"
                ) from None
        root = _make_root(base_dir)
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
            _chown_to_server_user(socket_dir)
            cluster = cls(
                root,
                bin_dir=bin_dir,
                port=port if port is not None else free_port(),
                socket_dir=socket_dir,
                extra_dirs=tuple(created[1:]),
            )
            cluster._initdb()
        except BaseException:
            for path in created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return cluster

    def _initdb(self) -> None:
        res = subprocess.run(
            _server_argv(
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
        if not _process_alive(pid):
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

    def _client_env(self, dbname: str, user: str | None, password: str | None) -> dict[str, str]:
        # Inherited PG* variables (PGSERVICE, PGSSLMODE, a developer's PGPASSWORD...) would make
        # the helpers talk to, or authenticate as, something other than this cluster.
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if password is None and (user or SUPERUSER) == SUPERUSER:
            password = self._admin_password
        return {**base, **self.env(dbname, user=user, password=password)}

    # -- lifecycle ---------------------------------------------------------------------------

    def _pg_ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _server_argv([str(self._bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]),
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
        _LIVE.add(self)
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
                _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the postmaster and all its backends at once, like a crash or OOM kill.

        Killing the backends too is what makes "server gone mid-dump" real: a backend whose
        postmaster died may otherwise keep streaming a COPY to pg_dump for a while. The next
        :meth:`start` runs crash recovery.
        """
        pid = self.pid
        if pid is None:
            return
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_process_alive(v) for v in victims) and time.monotonic() < deadline:
            time.sleep(0.01)
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
        _LIVE.discard(self)

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
        return f"PgCluster(root={str(self._root)!r}, port={self._port})"

    # -- administration ----------------------------------------------------------------------

    def psql(
        self,
        sql: str,
        dbname: str = "postgres",
        *,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 300.0,
    ) -> str:
        """Run an SQL script with psql (stops at the first error) and return its output.

        Output is unaligned and tuples-only (``-A -t``), so ``psql("select 1").strip() == "1"``.
        The script is fed on stdin, so it may hold several statements and psql meta-commands.
        """
        return self._run_psql(["-f", "-"], sql, dbname, user, password, timeout)

    def _command(self, statement: str, dbname: str = "postgres") -> str:
        # -c sends the text verbatim: no psql variable interpolation of ':' in passwords, and a
        # single statement is not wrapped in a transaction (CREATE DATABASE needs that).
        return self._run_psql(["-c", statement], None, dbname, None, None, 120.0)

    def _run_psql(
        self,
        args: list[str],
        stdin: str | None,
        dbname: str,
        user: str | None,
        password: str | None,
        timeout: float,
    ) -> str:
        argv = [
            str(self._bin_dir / "psql"), "-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-w",
            *args,
        ]
        try:
            res = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                env=self._client_env(dbname, user, password),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PgClusterError(f"psql on {dbname!r} timed out after {timeout:.0f}s") from None
        if res.returncode != 0:
            raise PgClusterError(f"psql on {dbname!r} failed: {res.stderr.strip()}")
        return res.stdout

    def create_database(self, name: str, *, owner: str | None = None) -> None:
        stmt = f"CREATE DATABASE {quote_ident(name)}"
        if owner is not None:
            stmt += f" OWNER {quote_ident(owner)}"
        self._command(stmt)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, disconnecting any sessions still using it."""
        self._command(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")

    def set_password(self, user: str, password: str) -> None:
        """Give ``user`` a (SCRAM) password, creating it as a plain LOGIN role if missing.

        New roles get no privileges; grant what the test needs (e.g. ``pg_read_all_data``).
        Setting the superuser's password also lets the admin helpers keep working after
        :meth:`require_password`.
        """
        exists = self._command(
            f"SELECT 1 FROM pg_roles WHERE rolname = {quote_literal(user)}"  # noqa: S608 - quoted
        ).strip()
        if not exists:
            self._command(f"CREATE ROLE {quote_ident(user)} LOGIN")
        self._command(
            f"ALTER ROLE {quote_ident(user)} WITH LOGIN PASSWORD {quote_literal(password)}"
        )
        if user == SUPERUSER:
            self._admin_password = password

    def require_password(self) -> None:
        """Make every connection (socket and TCP) authenticate with scram-sha-256.

        The superuser gets a random password first if it has none, so this object's own admin
        helpers keep working; :meth:`dsn` and :meth:`env` still include a password only when
        asked. Returns once new connections are actually refused without a password.
        """
        if self._admin_password is None:
            self.set_password(SUPERUSER, secrets.token_urlsafe(18))
        self._write_hba("scram-sha-256")
        self._reload_until(lambda: not self._passwordless_login_works())

    def allow_trust(self) -> None:
        """Undo :meth:`require_password`: every local and loopback connection is trusted again."""
        self._write_hba("trust")
        self._reload_until(self._passwordless_login_works)

    def _write_hba(self, method: str) -> None:
        lines = [
            "# written by mt5backupd.pgcluster",
            f"local all all {method}",
            f"host all all 127.0.0.1/32 {method}",
            f"host all all ::1/128 {method}",
            f"local replication all {method}",
            f"host replication all 127.0.0.1/32 {method}",
            f"host replication all ::1/128 {method}",
        ]
        # Rewriting in place keeps the file's owner (postgres) and mode.
        (self.data_dir / "pg_hba.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _passwordless_login_works(self) -> bool:
        env = {k: v for k, v in self._client_env("postgres", None, None).items()
               if k != "PGPASSWORD"}
        res = subprocess.run(
            [str(self._bin_dir / "psql"), "-X", "-q", "-w", "-c", "SELECT 1"],
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
        return res.returncode == 0

    def _reload_until(self, done: Callable[[], bool]) -> None:
        # pg_reload_conf() is asynchronous: the postmaster re-reads pg_hba.conf on SIGHUP some
        # time later, so a test connecting right away could still see the old rules.
        res = self._pg_ctl("reload", "-s", timeout=30)
        if res.returncode != 0:
            raise PgClusterError(f"pg_ctl reload failed: {res.stderr.strip()}")
        deadline = time.monotonic() + 10
        while not done():
            if time.monotonic() > deadline:
                raise PgClusterError(
                    f"pg_hba.conf change did not take effect; server log:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def server_version(self) -> str:
        """``server_version`` as the running server reports it, e.g. ``15.8 (Debian 15.8-1)``."""
        return self._command("SHOW server_version").strip()


_LIVE: set[PgCluster] = set()


@atexit.register
def _stop_forgotten_clusters() -> None:
    """Last line of defence: a process that exits without stopping a cluster still stops it."""
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.stop("immediate", timeout=10)

