"""Secrets from files (or systemd credentials), refused when group/world-accessible.

libpq silently ignores a ``.pgpass`` that others can read; we say so instead, because a backup that
fails at 03:00 with "password authentication failed" is worse than a clear error at install time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from mt5backupd.config.model import DatabaseConfig, RemoteConfig
from mt5backupd.config.secret import CREDENTIAL_DB_PASSWORD, CREDENTIAL_REMOTE_TOKEN, Secret
from mt5backupd.errors import ConfigError
from mt5backupd.fsutil import insecure_mode
from mt5backupd.redact import register_secret


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
    """The systemd credential file, if present and not empty (the installer ships empty ones
    for secrets an operator does not use)."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory:
        path = Path(directory) / name
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_size > 0:
                return path
    return None


def _secret(file: Path | None, key: str, credential: str, legacy: Secret | None,
            env: Mapping[str, str] | None) -> Secret | None:
    """The configured file, else the systemd credential, else the legacy variable's value."""
    env = os.environ if env is None else env
    if file is not None:
        return read_secret_file(file, key)
    cred = _credential(credential, env)
    if cred is not None:
        return read_secret_file(cred, "credential")
    if legacy is not None:
        register_secret(legacy.reveal())
    return legacy


def database_password(cfg: DatabaseConfig, env: Mapping[str, str] | None = None) -> Secret | None:
    """password_file, else the systemd credential ``db-password``, else legacy POSTGRES_PASSWORD."""
    return _secret(cfg.password_file, "[database] password_file", CREDENTIAL_DB_PASSWORD,
                   cfg.password, env)


def remote_token(cfg: RemoteConfig, env: Mapping[str, str] | None = None) -> Secret | None:
    """token_file, else the systemd credential ``remote-token``, else legacy BACKUP_API_TOKEN."""
    return _secret(cfg.token_file, "[remote] token_file", CREDENTIAL_REMOTE_TOKEN, cfg.token, env)


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
