"""``mt5backupd receiver`` as a real subprocess, for tests that kill it and for benches.

The one way tests and benches start a receiver process: write its config, start it, learn the
port it bound and wait until ``/health`` answers, with a deadline; stop it with SIGTERM (SIGKILL
if it lingers) or kill -9 it like a crash, and start it again on the same port and data.

The first start binds port 0 unless told otherwise, so there is no window in which another
process can take a port picked in advance. The receiver reports where it listens the way it
reports to systemd: ``READY=1`` and ``STATUS=listening on URL`` sent to ``$NOTIFY_SOCKET``, which
here is a private abstract-namespace socket this module listens on. Restarts reuse that port.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from mt5backupd.testkit import reaper

# Variables a receiver child must not inherit: legacy receiver settings, and a systemd notify
# socket or watchdog of whatever runs the tests.
_DROPPED_ENV = ("BACKUP_API_TOKEN", "LOG_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_URL_RE = re.compile(r"https?://\S+:(\d+)")
_POLL_S = 0.05  # how often to look at the child and /health while waiting


class ReceiverStartError(RuntimeError):
    """The receiver process exited, or did not report ready and healthy, before the deadline."""


class ReceiverProcess:
    """One receiver process and its files: ``receiver.toml``, ``receiver.log`` in ``workdir``.

    ``tokens_file`` (default ``workdir/tokens.json``) must hold at least one token before
    :meth:`start`, as the receiver refuses to run without; ``extra_toml`` adds lines to the
    ``[receiver]`` section; ``env`` replaces this process's environment for the child.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int = 0,
        data_dir: Path | None = None,
        tokens_file: Path | None = None,
        extra_toml: str = "",
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.workdir = workdir
        self.port = port  # 0 until the first start has learned the port the receiver picked
        self.data_dir = data_dir or workdir / "data"
        self.tokens_file = tokens_file or workdir / "tokens.json"
        self.extra_toml = extra_toml
        self.env = env
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "receiver.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "receiver.log"

    @property
    def url(self) -> str:
        if not self.port:
            raise ReceiverStartError("the receiver has not been started yet; no port known")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ReceiverStartError("the receiver is not running")
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return "(no receiver log)"

    def _write_config(self) -> None:
        self.config_path.write_text(
            "[receiver]\n"
            f'listen = "{self.host}:{self.port}"\n'
            f'data_dir = "{self.data_dir}"\n'
            f'tokens_file = "{self.tokens_file}"\n'
            "min_free_bytes = 0\n" + self.extra_toml
        )

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the receiver; return once it reported ready and ``/health`` answered 200."""
        if self.proc is not None and self.proc.poll() is None:
            raise ReceiverStartError(f"receiver already running (pid {self.proc.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        base = os.environ if self.env is None else self.env
        env = {k: v for k, v in base.items() if k not in _DROPPED_ENV}
        deadline = time.monotonic() + timeout_s
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            name = f"mt5backupd-test-receiver-{secrets.token_hex(8)}"
            notify.bind(b"\0" + name.encode())
            env["NOTIFY_SOCKET"] = "@" + name
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "mt5backupd", "receiver", "--config",
                     str(self.config_path)],
                    stdout=log, stderr=log, env=env, start_new_session=True,
                )
            # Tracked at once: a test interrupted while waiting must not leave the process behind.
            reaper.track(self, self._kill_at_exit)
            try:
                self.port = self._wait_ready(notify, deadline)
                self._wait_healthy(deadline)
            except BaseException:
                self.kill9()
                raise

    def _wait_ready(self, notify: socket.socket, deadline: float) -> int:
        """The port from the receiver's ``READY=1`` notification (its STATUS names the URL)."""
        assert self.proc is not None
        while True:
            self._check_alive()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise ReceiverStartError(f"receiver did not report ready:\n{self.log_tail()}")
            notify.settimeout(min(_POLL_S, remaining_s))
            try:
                message = notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            lines = message.split("\n")
            if "READY=1" not in lines:
                continue
            for line in lines:
                match = _URL_RE.search(line) if line.startswith("STATUS=") else None
                if match:
                    return int(match.group(1))
            if self.port:
                return self.port  # the configured port; only port 0 needs the report
            raise ReceiverStartError(f"receiver sent READY=1 without its URL: {message!r}")

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                # the URL is always http://host:port built here, never a caller-given scheme
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ReceiverStartError(f"receiver did not become healthy:\n{self.log_tail()}")
            time.sleep(_POLL_S)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ReceiverStartError(
                f"receiver exited with status {self.proc.returncode}:\n{self.log_tail()}"
            )

    def kill9(self) -> None:
        """SIGKILL the receiver, like a crash; :meth:`start` brings it back on the same port."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None
        reaper.untrack(self)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it has not exited within ``timeout_s``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        reaper.untrack(self)

    def _kill_at_exit(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
