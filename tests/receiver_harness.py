"""Real receivers for tests: in-process on a free loopback port, or a subprocess to kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mt5backupd.config import ReceiverConfig, RetentionConfig
from mt5backupd.receiver import auth


@dataclass
class TokenSet:
    alice: str
    bob: str
    admin: str

    def header(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


def make_tokens(tokens_file: Path) -> TokenSet:
    return TokenSet(
        alice=auth.add_token(tokens_file, "alice", admin=False),
        bob=auth.add_token(tokens_file, "bob", admin=False),
        admin=auth.add_token(tokens_file, "ops", admin=True),
    )


def receiver_config(tmp: Path, **overrides: object) -> ReceiverConfig:
    values: dict[str, object] = {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "data_dir": tmp / "data",
        "tokens_file": tmp / "tokens.json",
        "max_upload_bytes": 64 * 1024 * 1024,
        "min_free_bytes": 0,
        "partial_ttl_s": 3600.0,
        "retention": RetentionConfig(),
    }
    values.update(overrides)
    return ReceiverConfig(**values)  # type: ignore[arg-type]


@dataclass
class ReceiverProcess:
    """``mt5backupd receiver`` as a real process, restartable on the same port and data."""

    workdir: Path
    port: int
    data_dir: Path
    extra_toml: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "receiver.log"
        self.config_path = self.workdir / "receiver.toml"
        self.config_path.write_text(
            "[receiver]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            f'data_dir = "{self.data_dir}"\n'
            f'tokens_file = "{self.workdir / "tokens.json"}"\n'
            "min_free_bytes = 0\n" + self.extra_toml
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("BACKUP_API_TOKEN", "LOG_DIR")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mt5backupd", "receiver", "--config", str(self.config_path)],
                stdout=log, stderr=log, env=env, start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("receiver did not become healthy")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
