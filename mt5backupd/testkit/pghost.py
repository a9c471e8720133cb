"""What a throwaway PostgreSQL cluster needs from the host: binaries, an OS account, processes.

* The server binaries: Debian keeps them out of PATH, so :func:`find_bin_dir` looks where they are.
* The OS account: PostgreSQL refuses to run as root, and CI containers run as root. Server
  binaries then run as the ``postgres`` account via ``runuser`` (:func:`server_argv`) and the
  cluster directories are chowned to it, which also means they must live somewhere that account
  can reach (:func:`make_root`).
* Processes: whether the postmaster lives, its children, and killing them all at once, read from
  ``/proc`` because PID 1 in a container may not reap orphans (zombies count as dead here).
* A free loopback port, and SQL quoting for the names tests pass in.

Everything here is a plain function: importing this module starts, registers and writes nothing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from mt5backupd.errors import Mt5BackupError

BINDIR_ENV = "MT5BACKUPD_PG_BINDIR"
SERVER_OS_USER = "postgres"  # the OS account server binaries run as when we are root
SUPERUSER = "postgres"  # the database superuser initdb creates
INSTALL_HINT = "install the server with 'apt-get install postgresql' or set " + BINDIR_ENV
_DEBIAN_GLOB_ROOT = Path("/usr/lib/postgresql")


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
            raise PgClusterError(f"{BINDIR_ENV}={explicit}: no initdb there; {INSTALL_HINT}")
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
    raise PgClusterError(f"PostgreSQL server binaries (initdb) not found; {INSTALL_HINT}")


def free_port() -> int:
    """A currently unused loopback TCP port, chosen by the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the postgres OS account -----------------------------------------------------------------


def is_root() -> bool:
    return os.geteuid() == 0


def require_server_account() -> None:
    """Fail with the fix named when we are root and there is no account to run the server as."""
    if not is_root():
        return
    try:
        pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise PgClusterError(
            f"running as root, but there is no '{SERVER_OS_USER}' OS account to run the "
            f"server as; {INSTALL_HINT}"
        ) from None


def server_argv(argv: list[str]) -> list[str]:
    """Prefix server-binary invocations so they run as ``postgres`` when we are root."""
    if is_root():
        return ["runuser", "-u", SERVER_OS_USER, "--", *argv]
    return argv


def chown_to_server_user(path: Path) -> None:
    if is_root():
        pw = pwd.getpwnam(SERVER_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _server_user_can_reach(path: Path) -> bool:
    """Whether the ``postgres`` account can traverse into ``path`` (ACLs included)."""
    if not is_root():
        return True
    res = subprocess.run(
        server_argv(["test", "-x", str(path), "-a", "-w", str(path)]),
        capture_output=True,
        timeout=30,
        check=False,
    )
    return res.returncode == 0


def _new_root(parent: Path | None) -> Path:
    root = Path(tempfile.mkdtemp(prefix="mt5pg-", dir=parent))
    root.chmod(0o755)
    chown_to_server_user(root)
    return root


def make_root(base_dir: Path | None) -> Path:
    """A fresh cluster directory in ``base_dir``, or in the temp dir if postgres can't reach it.

    Falling back to the temp dir (pytest's ``/tmp/pytest-of-root`` is 0700) beats loosening the
    permissions of someone else's directory chain.
    """
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


# -- processes -------------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
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


def children(pid: int) -> list[int]:
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


def kill_with_children(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL ``pid`` and its direct children at once; return when all are dead (or timeout).

    Killing the backends too is what makes "server gone mid-dump" real: a backend whose
    postmaster died may otherwise keep streaming a COPY to pg_dump for a while.
    """
    victims = [pid, *children(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(process_alive(v) for v in victims) and time.monotonic() < deadline:
        time.sleep(0.01)
