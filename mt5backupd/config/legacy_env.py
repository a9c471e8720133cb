"""The legacy ``/etc/default/mt5-backup`` variables: the one table of what each became, the
env-file parser, and their overlay on a loaded config.

`load_config` overlays them (``--env-file`` and the environment); `legacy_import` writes them
into a new TOML and credential files. Both read the same table, so a variable cannot mean one
thing to the daemon and another to the installer.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from mt5backupd.config.model import Config
from mt5backupd.config.secret import CREDENTIAL_DB_PASSWORD, CREDENTIAL_REMOTE_TOKEN, Secret
from mt5backupd.config.urls import normalize_remote_url
from mt5backupd.errors import ConfigError

# How a variable's text becomes a value: "url" is checked and normalised (the legacy full upload
# URL is accepted), "seconds" is an integer >= minimum given as a float.
Kind = Literal["str", "path", "url", "int", "seconds"]


@dataclass(frozen=True)
class LegacyVar:
    """One legacy variable and the config key it became (``[section] key``, which is also the
    field of that section's dataclass)."""

    name: str
    section: str
    key: str
    kind: Kind = "str"
    minimum: int = 0  # for "int" and "seconds"

    def parse(self, raw: str, where: str) -> str | Path | int | float:
        """The config value of ``raw``; ConfigError names ``where`` and the variable."""
        if self.kind in ("int", "seconds"):
            value = raw.strip()
            if not value.lstrip("-").isdigit() or int(value) < self.minimum:
                raise ConfigError(f"{where}: {self.name}: expected an integer >= {self.minimum}, "
                                  f"got {value!r}")
            return float(value) if self.kind == "seconds" else int(value)
        if self.kind == "url":
            if not raw.startswith(("http://", "https://")):
                raise ConfigError(f"{where}: {self.name}: must start with http:// or https://")
            return normalize_remote_url(raw)
        return Path(raw) if self.kind == "path" else raw

    def toml(self, raw: str, where: str) -> str:
        """``raw`` as the TOML value of its key (for `legacy_import`)."""
        value = self.parse(raw, where)
        if isinstance(value, int | float):
            return str(value)
        # a JSON string is a valid TOML basic string; a URL normalised, anything else as given
        return json.dumps(value if self.kind == "url" else raw)


@dataclass(frozen=True)
class LegacySecret:
    """A legacy variable holding a secret: never written into the TOML. The daemon takes it as
    ``[section] key`` (a `Secret`); the installer moves it into the systemd credential file
    ``credential``."""

    name: str
    section: str
    key: str
    credential: str


LEGACY_SETTINGS: tuple[LegacyVar, ...] = (
    LegacyVar("POSTGRES_DB", "database", "dbname"),
    LegacyVar("POSTGRES_USER", "database", "user"),
    LegacyVar("POSTGRES_HOST", "database", "host"),
    LegacyVar("POSTGRES_PORT", "database", "port", "int", minimum=1),
    LegacyVar("BACKUP_DIR", "local", "dir", "path"),
    LegacyVar("KEEP_LOCAL_BACKUPS", "local", "keep", "int", minimum=1),
    LegacyVar("BACKUP_API_URL", "remote", "url", "url"),
    LegacyVar("MAX_RETRIES", "remote", "max_retries", "int", minimum=0),
    LegacyVar("RETRY_DELAY", "remote", "retry_delay_s", "seconds", minimum=0),
)
LEGACY_SECRETS: tuple[LegacySecret, ...] = (
    LegacySecret("POSTGRES_PASSWORD", "database", "password", credential=CREDENTIAL_DB_PASSWORD),
    LegacySecret("BACKUP_API_TOKEN", "remote", "token", credential=CREDENTIAL_REMOTE_TOKEN),
)
# Also served by the receiver as the client token named "default".
LEGACY_TOKEN = "BACKUP_API_TOKEN"
# The legacy variable for [log] dir; read by the [log] loader, not part of the installer's import.
LEGACY_LOG_DIR = "LOG_DIR"


def _strip_comment(value: str) -> str:
    """Drop a trailing ``# comment``: as in the shell, ``#`` starts one only at the start of a
    word and outside quotes (``abc#123`` is a value, not ``abc``)."""
    quote = ""
    for i, ch in enumerate(value):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or value[i - 1].isspace()):
            return value[:i]
    return value


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a shell-style ``KEY=VALUE`` file like the legacy ``/etc/default/mt5-backup``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: env file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: env file not readable (permission denied)") from None
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE")
        try:
            parts = shlex.split(_strip_comment(value))
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: {key}: {exc}") from None
        values[key] = " ".join(parts)
    return values


def holds_secret(values: Mapping[str, str]) -> bool:
    """Whether an env file's values include a password or token (it must then be 0600)."""
    return any(values.get(s.name) for s in LEGACY_SECRETS)


def apply_legacy_env(cfg: Config, env: Mapping[str, str], where: str) -> Config:
    """Overlay the legacy variables (POSTGRES_*, BACKUP_*, ...) on a loaded config; an empty
    variable counts as unset."""
    # section -> {field: value}; Any because the table names the fields (a test holds every
    # key to a field of its section, and replace() refuses an unknown one)
    changes: dict[str, dict[str, Any]] = {"database": {}, "local": {}, "remote": {}}
    for var in LEGACY_SETTINGS:
        if env.get(var.name):
            changes[var.section][var.key] = var.parse(env[var.name], where)
    for secret in LEGACY_SECRETS:
        if env.get(secret.name):
            changes[secret.section][secret.key] = Secret(env[secret.name])
    return replace(cfg, database=replace(cfg.database, **changes["database"]),
                   local=replace(cfg.local, **changes["local"]),
                   remote=replace(cfg.remote, **changes["remote"]))
