"""Configuration: TOML (plus the legacy environment variables) into frozen, typed objects.

Every error names the file and the key (``config.toml: [receiver] max_upload_bytes: ...``);
unknown sections and keys are errors, because a typo in a backup config must never silently
fall back to a default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mt5backupd.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/mt5backupd/config.toml")
CONFIG_ENV = "MT5BACKUPD_CONFIG"

T = TypeVar("T")


class Secret:
    """A secret value that never shows itself in repr/str (and so never in logs or errors)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class RetentionConfig:
    """Receiver retention per client and kind; all zero means "no policy" (nothing is pruned)."""

    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    auto: bool = False  # prune after every commit

    @property
    def is_empty(self) -> bool:
        return not (self.keep_last or self.keep_daily or self.keep_weekly or self.keep_monthly)


@dataclass(frozen=True)
class ReceiverConfig:
    listen_host: str = "0.0.0.0"  # noqa: S104 - the receiver serves other machines by design
    listen_port: int = 9101
    data_dir: Path = Path("/var/lib/mt5backupd-receiver")
    tokens_file: Path = Path("/etc/mt5backupd/receiver-tokens.json")
    max_upload_bytes: int = 200 * 1024**3
    min_free_bytes: int = 1024**3
    partial_ttl_s: float = 7 * 86400.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    retention: RetentionConfig = field(default_factory=RetentionConfig)


@dataclass(frozen=True)
class LogConfig:
    dir: Path | None = None  # JSON log files; None = stderr only
    level: str = "INFO"
    rotation_bytes: int = 20 * 1024**2
    retention_files: int = 10


@dataclass(frozen=True)
class Config:
    source: Path | None = None  # the TOML file this came from, for messages
    log: LogConfig = field(default_factory=LogConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    # The legacy BACKUP_API_TOKEN, served by the receiver as the client token named "default".
    legacy_receiver_token: Secret | None = None


class _Section:
    """Typed access to one TOML table; remembers which keys were read to reject unknown ones."""

    def __init__(self, where: str, name: str, table: Mapping[str, Any]) -> None:
        self.where = where
        self.name = name
        self.table = table
        self.seen: set[str] = set()

    def _err(self, key: str, msg: str) -> ConfigError:
        if not self.name:
            return ConfigError(f"{self.where}: {key}: {msg}")
        return ConfigError(f"{self.where}: [{self.name}] {key}: {msg}")

    def get(self, key: str, kind: type[T], default: T) -> T:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        # bool is an int subclass: refuse true/false where a number is wanted, and vice versa.
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self._err(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    def opt_str(self, key: str) -> str | None:
        self.seen.add(key)
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._err(key, f"expected string, got {type(value).__name__}")
        return value

    def opt_path(self, key: str) -> Path | None:
        value = self.opt_str(key)
        return Path(value) if value else None

    def path(self, key: str, default: Path) -> Path:
        value = self.opt_str(key)
        return Path(value) if value else default

    def int_min(self, key: str, default: int, minimum: int) -> int:
        value = self.get(key, int, default)
        if value < minimum:
            raise self._err(key, f"must be >= {minimum}, got {value}")
        return value

    def float_min(self, key: str, default: float, minimum: float) -> float:
        value = self.get(key, float, default)
        if value < minimum:
            raise self._err(key, f"must be >= {minimum}, got {value}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self._err(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def sub(self, key: str) -> _Section:
        self.seen.add(key)
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self._err(key, "expected a table")
        return _Section(self.where, f"{self.name}.{key}" if self.name else key, value)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self._err(unknown[0], "unknown key")


def parse_listen(value: str, where: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` -> (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104
    return host, int(port_s)


def _load_receiver(sec: _Section) -> ReceiverConfig:
    d = ReceiverConfig()
    listen = sec.get("listen", str, f"{d.listen_host}:{d.listen_port}")
    host, port = parse_listen(listen, f"{sec.where}: [receiver] listen")
    ret = sec.sub("retention")
    retention = RetentionConfig(
        keep_last=ret.int_min("keep_last", 0, 0),
        keep_daily=ret.int_min("keep_daily", 0, 0),
        keep_weekly=ret.int_min("keep_weekly", 0, 0),
        keep_monthly=ret.int_min("keep_monthly", 0, 0),
        auto=ret.get("auto", bool, False),
    )
    ret.finish()
    if retention.auto and retention.is_empty:
        raise ret._err("auto", "needs at least one keep_* > 0 (an empty policy would delete all)")
    cfg = ReceiverConfig(
        listen_host=host,
        listen_port=port,
        data_dir=sec.path("data_dir", d.data_dir),
        tokens_file=sec.path("tokens_file", d.tokens_file),
        max_upload_bytes=sec.int_min("max_upload_bytes", d.max_upload_bytes, 1),
        min_free_bytes=sec.int_min("min_free_bytes", d.min_free_bytes, 0),
        partial_ttl_s=sec.float_min("partial_ttl_s", d.partial_ttl_s, 1.0),
        tls_cert=sec.opt_path("tls_cert"),
        tls_key=sec.opt_path("tls_key"),
        retention=retention,
    )
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        missing = "tls_key" if cfg.tls_key is None else "tls_cert"
        raise sec._err(missing, "tls_cert and tls_key must be given together")
    sec.finish()
    return cfg


def _load_log(sec: _Section, env: Mapping[str, str]) -> LogConfig:
    d = LogConfig()
    level = sec.choice("level", d.level, ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"))
    log_dir = sec.opt_path("dir")
    if env.get("LOG_DIR"):  # legacy variable, kept working
        log_dir = Path(env["LOG_DIR"])
    cfg = LogConfig(
        dir=log_dir,
        level=level,
        rotation_bytes=sec.int_min("rotation_bytes", d.rotation_bytes, 1024),
        retention_files=sec.int_min("retention_files", d.retention_files, 1),
    )
    sec.finish()
    return cfg


def resolve_config_path(cli_value: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """Return (path, explicit). A missing default file is fine (defaults + env apply)."""
    if cli_value:
        return Path(cli_value), True
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), True
    return DEFAULT_CONFIG_PATH, False


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (None: defaults only) and apply the environment overrides."""
    env = os.environ if env is None else env
    where = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except PermissionError:
            raise ConfigError(f"{path}: config file not readable (permission denied)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    root = _Section(where, "", data)
    log = _load_log(root.sub("log"), env)
    receiver = _load_receiver(root.sub("receiver"))
    # Sections of the backup side are parsed by their own loaders once present; until then an
    # unknown top-level table is reported like any unknown key.
    unknown = sorted(set(data) - root.seen)
    if unknown:
        raise ConfigError(f"{where}: [{unknown[0]}]: unknown section")
    token = env.get("BACKUP_API_TOKEN")
    return Config(
        source=path,
        log=log,
        receiver=receiver,
        legacy_receiver_token=Secret(token) if token else None,
    )
