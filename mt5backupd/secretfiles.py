"""Secrets from files (or systemd credentials), refused when group/world-accessible.

libpq silently ignores a ``.pgpass`` that others can read; we say so instead, because a backup that
fails at 03:00 with "password authentication failed" is worse than a clear error at install time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mt5backupd.config import DatabaseConfig, RemoteConfig, Secret
from mt5backupd.errors import ConfigError
from mt5backupd.fsutil import insecure_mode
from mt5backupd.logs import register_secret

CREDENTIAL_DB_PASSWORD = "db-password"
CREDENTIAL_REMOTE_TOKEN = "remote-token"


def read_secret_file(path: Path, what: str) -> Secret:
    try:
        problem = insecure_mode(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: file not found") from None
    if problem:
        raise ConfigError(f"{what} {path}: {problem}")
    try:
        value = path.read_text().strip()
    except PermissionError:
        raise ConfigError(f"{what} {path}: not readable by this user") from None
    if not value:
        raise ConfigError(f"{what} {path}: file is empty")
    register_secret(value)
    return Secret(value)


def _credential(name: str, env: Mapping[str, str]) -> Path | None:
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / name).is_file():
        return Path(directory) / name
    return None


def database_password(cfg: DatabaseConfig, env: Mapping[str, str] | None = None) -> Secret | None:
    """password_file, else the systemd credential ``db-password``, else legacy POSTGRES_PASSWORD."""
    env = os.environ if env is None else env
    if cfg.password_file is not None:
        return read_secret_file(cfg.password_file, "[database] password_file")
    cred = _credential(CREDENTIAL_DB_PASSWORD, env)
    if cred is not None:
        return read_secret_file(cred, "credential")
    if cfg.password is not None:
        register_secret(cfg.password.reveal())
    return cfg.password


def remote_token(cfg: RemoteConfig, env: Mapping[str, str] | None = None) -> Secret | None:
    """token_file, else the systemd credential ``remote-token``, else legacy BACKUP_API_TOKEN."""
    env = os.environ if env is None else env
    if cfg.token_file is not None:
        return read_secret_file(cfg.token_file, "[remote] token_file")
    cred = _credential(CREDENTIAL_REMOTE_TOKEN, env)
    if cred is not None:
        return read_secret_file(cred, "credential")
    if cfg.token is not None:
        register_secret(cfg.token.reveal())
    return cfg.token


def check_pgpass(env: Mapping[str, str] | None = None) -> Path | None:
    """Refuse a .pgpass libpq would ignore; return the file in use, if any."""
    env = os.environ if env is None else env
    path = Path(env["PGPASSFILE"]) if env.get("PGPASSFILE") else Path.home() / ".pgpass"
    try:
        problem = insecure_mode(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if problem:
        raise ConfigError(f"{path}: libpq ignores a password file that others can read: {problem}")
    return path
