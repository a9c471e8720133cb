"""Files this process trusts that others could change: group/world-writable files are refused,
and so are group/world-readable ones that hold a secret. Mode bits only, so it holds for root."""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mt5backupd.config.legacy_env import holds_secret, read_env_file
from mt5backupd.config.model import Config
from mt5backupd.errors import ConfigError


@dataclass(frozen=True)
class FileProblem:
    """A file this process would trust that others can write (or, holding a secret, read)."""

    path: Path
    what: str  # "config file", "[receiver] tls_key", ...
    message: str  # one line naming the file and the fix
    fix: str  # the command that fixes it

    def __str__(self) -> str:
        return self.message


def _file_mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)  # follows a symlink: its target is what counts
    except (FileNotFoundError, NotADirectoryError):
        return None  # a missing file is reported where it is used, with its own message


def file_mode_problem(path: Path, what: str, *, secret: bool) -> FileProblem | None:
    """Group/world-writable is refused for every file we trust (whoever can write a config
    decides what runs as this user: ``pg_dump = "/tmp/x"``); group/world-readable too when the
    file holds a secret. Mode bits only, so it holds for root as well."""
    mode = _file_mode(path)
    if mode is None:
        return None
    if mode & 0o022:
        fix = f"chmod 600 {path}" if secret else f"chmod go-w {path}"
        return FileProblem(path, what, f"{path}: {what} is writable by group/others (mode "
                           f"{mode:04o}), so they could change what runs here; run: {fix}",
                           fix)
    if secret and mode & 0o077:
        fix = f"chmod 600 {path}"
        return FileProblem(path, what, f"{path}: {what} holds a secret that group/others can "
                           f"read (mode {mode:04o}); run: {fix}", fix)
    return None


def source_file_problems(path: Path | None, env_file: Path | None,
                         env_file_values: Mapping[str, str]) -> list[FileProblem]:
    """The config file and the legacy env file (a secret when it holds a password/token)."""
    found = []
    if path is not None:
        found.append(file_mode_problem(path, "config file", secret=False))
    if env_file is not None:
        found.append(file_mode_problem(env_file, "env file",
                                       secret=holds_secret(env_file_values)))
    return [p for p in found if p is not None]


def referenced_file_problems(cfg: Config) -> list[FileProblem]:
    """Files the config points to: secrets, and the receiver's tokens file (hashes only, but
    whoever writes it can mint an admin token)."""
    files: list[tuple[Path | None, str, bool]] = [
        (cfg.database.password_file, "[database] password_file", True),
        (cfg.remote.token_file, "[remote] token_file", True),
        (cfg.receiver.tokens_file, "[receiver] tokens_file", False),
        (cfg.receiver.tls_key, "[receiver] tls_key", True),
        (cfg.encryption.identity_file, "[encryption] identity_file", True),
        (cfg.receiver.storage.credentials_file, "[receiver.storage] credentials_file", True),
    ]
    found = [file_mode_problem(p, what, secret=secret) for p, what, secret in files
             if p is not None]
    return [p for p in found if p is not None]


def file_mode_problems(path: Path | None, env_file: Path | None,
                       cfg: Config) -> list[FileProblem]:
    """Every refused file, for `check` (which reports them all instead of stopping at one)."""
    values: dict[str, str] = {}
    if env_file is not None:
        with contextlib.suppress(ConfigError):
            values = read_env_file(env_file)
    return source_file_problems(path, env_file, values) + referenced_file_problems(cfg)

