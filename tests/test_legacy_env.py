"""The legacy /etc/default/mt5-backup env file: its variables, its errors, shell-like parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from mt5backupd.config import (
    load_config,
    read_env_file,
)
from mt5backupd.errors import ConfigError


def test_legacy_env_file_overrides(tmp_path: Path) -> None:
    """The legacy /etc/default/mt5-backup variables map onto the config; no TOML needed."""
    env_file = tmp_path / "mt5-backup"
    env_file.write_text(
        "# legacy\nexport POSTGRES_DB=mt5_trading\nPOSTGRES_USER='trader'\n"
        'POSTGRES_PASSWORD="s3cr3t pass"\nPOSTGRES_HOST=db.local\nPOSTGRES_PORT=5433\n'
        "BACKUP_DIR=/var/backups/mt5\nKEEP_LOCAL_BACKUPS=5\n"
        "BACKUP_API_URL=http://backup:9101/api/backup/upload\nBACKUP_API_TOKEN=tok-123456\n"
        "MAX_RETRIES=4\nRETRY_DELAY=10 # seconds\n")
    env_file.chmod(0o600)  # it holds a password: group/world-readable would be refused
    cfg = load_config(None, env={}, env_file=env_file)
    assert cfg.database.dbname == "mt5_trading"
    assert cfg.database.user == "trader"
    assert cfg.database.host == "db.local"
    assert cfg.database.port == 5433
    assert cfg.database.password is not None
    assert cfg.database.password.reveal() == "s3cr3t pass"
    assert cfg.local.dir == Path("/var/backups/mt5")
    assert cfg.local.keep == 5
    assert cfg.remote.url == "http://backup:9101"
    assert cfg.remote.token is not None
    assert cfg.remote.max_retries == 4
    assert cfg.remote.retry_delay_s == 10.0
    assert "s3cr3t" not in repr(cfg)
    assert "tok-123456" not in repr(cfg)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [("KEEP_LOCAL_BACKUPS=zero", "KEEP_LOCAL_BACKUPS"), ("POSTGRES_PORT=-1", "POSTGRES_PORT"),
     ("BACKUP_API_URL=ftp://x", "BACKUP_API_URL"), ("not a line", ":1: expected KEY=VALUE")],
)
def test_legacy_env_errors_name_variable_and_file(tmp_path: Path, line: str,
                                                  fragment: str) -> None:
    """A bad legacy value is refused with the file and the variable named."""
    env_file = tmp_path / "mt5-backup"
    env_file.write_text(line + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, env_file=env_file)
    assert str(env_file) in str(err.value)
    assert fragment in str(err.value)


def test_read_env_file_missing(tmp_path: Path) -> None:
    """A missing env file is a config error naming it."""
    with pytest.raises(ConfigError, match="env file not found"):
        read_env_file(tmp_path / "absent")


def test_env_file_hash_is_a_comment_only_at_word_start(tmp_path: Path) -> None:
    """As in the shell, `abc#123` is a value; ` # note` and quoted text behave as in bash."""
    env_file = tmp_path / "mt5-backup"
    env_file.write_text("POSTGRES_PASSWORD=abc#123 # the password\n"
                        "BACKUP_API_TOKEN='tok # not a comment'\n")
    values = read_env_file(env_file)
    assert values["POSTGRES_PASSWORD"] == "abc#123"
    assert values["BACKUP_API_TOKEN"] == "tok # not a comment"
