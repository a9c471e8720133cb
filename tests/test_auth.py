"""Receiver tokens: stored as hashes, reloaded, the legacy token, the CLI."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mt5backupd.config import Secret
from mt5backupd.errors import EXIT_CONFIG, ConfigError
from mt5backupd.receiver.auth import TokenStore, add_token, digest_token


def test_token_add_stores_only_hash_0600(tmp_path: Path) -> None:
    """`token add` stores a hash in a 0600 file and the token authenticates as its client."""
    tokens_file = tmp_path / "tokens.json"
    token = add_token(tokens_file, "alice", admin=False)
    admin = add_token(tokens_file, "ops", admin=True)
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    text = tokens_file.read_text()
    assert token not in text
    assert digest_token(token) in text
    store = TokenStore(tokens_file)
    principal = store.authenticate(f"Bearer {token}")
    assert principal is not None
    assert (principal.name, principal.admin) == ("alice", False)
    admin_principal = store.authenticate(f"Bearer {admin}")
    assert admin_principal is not None
    assert admin_principal.admin
    with pytest.raises(ConfigError, match="exists"):
        add_token(tokens_file, "alice", admin=False)


def test_token_store_reloads_and_refuses_writable_file(tmp_path: Path) -> None:
    """A token added while serving works at once; a group-writable tokens file is refused."""
    tokens_file = tmp_path / "tokens.json"
    add_token(tokens_file, "alice", admin=False)
    store = TokenStore(tokens_file)
    later = add_token(tokens_file, "bob", admin=False)
    os.utime(tokens_file, ns=(1, 1))  # mtime change detection must not depend on clock ticks
    principal = store.authenticate(f"Bearer {later}")
    assert principal is not None
    assert principal.name == "bob"
    os.chmod(tokens_file, 0o664)
    with pytest.raises(ConfigError, match="writable by group/others"):
        TokenStore(tokens_file)


def test_legacy_env_token_is_client_default(tmp_path: Path) -> None:
    """BACKUP_API_TOKEN authenticates as the client token named "default"."""
    store = TokenStore(tmp_path / "absent.json", Secret("legacy-secret-token"))
    principal = store.authenticate("Bearer legacy-secret-token")
    assert principal is not None
    assert (principal.name, principal.admin) == ("default", False)
    assert store.authenticate("Bearer other") is None


def test_cli_token_add_prints_once_and_config_error_exit(tmp_path: Path) -> None:
    """The CLI prints the new token on stdout only; a bad config is one line and exit 4."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[receiver]\ntokens_file = "{tmp_path / "t.json"}"\n')
    run = subprocess.run([sys.executable, "-m", "mt5backupd", "receiver", "token", "add", "alice",
                          "--config", str(cfg)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip()
    assert token.startswith("mt5b_")
    assert token not in run.stderr
    assert token not in (tmp_path / "t.json").read_text()
    cfg.write_text("[receiver]\nmax_upload_bytes = -5\n")
    bad = subprocess.run([sys.executable, "-m", "mt5backupd", "--config", str(cfg), "receiver"],
                         capture_output=True, text=True)
    assert bad.returncode == EXIT_CONFIG
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "max_upload_bytes" in lines[0]
    assert str(cfg) in lines[0]
