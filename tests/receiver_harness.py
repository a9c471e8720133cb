"""Real receivers for tests: tokens and config for the in-process one on a free loopback port.

The receiver as a subprocess to kill and restart is ``ReceiverProcess`` in
``mt5backupd.testkit.receiverproc``, shared with the benches.
"""

from __future__ import annotations

from dataclasses import dataclass
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
