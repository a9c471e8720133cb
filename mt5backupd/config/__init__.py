"""Configuration: TOML (plus the legacy environment variables) into frozen, typed objects.

Every error names the file and the key (``config.toml: [receiver] max_upload_bytes: ...``);
unknown sections and keys are errors, because a typo in a backup config must never silently
fall back to a default.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

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
    # A connection without complete request headers this long after it opened (or after its
    # last response) is closed: silent and slow-header connections cannot pile up.
    header_timeout_s: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    retention: RetentionConfig = field(default_factory=RetentionConfig)


@dataclass(frozen=True)
class LogConfig:
    dir: Path | None = None  # JSON log files; None = stderr only
    level: str = "INFO"
    rotation_bytes: int = 20 * 1024**2
    retention_files: int = 10


COMPRESSION_KINDS = ("zstd", "gzip", "none")
# Measured (docs/benchmarks.md): on a 1 GB MT5-like database zstd level 1 in the pump thread is
# as fast as any level (the pump keeps up with pg_dump), and on this data smaller than levels 2-4.
DEFAULT_COMPRESSION = "zstd:1"
ON_UNAVAILABLE = ("keep-local", "abort")


@dataclass(frozen=True)
class Compression:
    """``zstd:LEVEL`` (pg_dump -Z0, compressed in-process), ``gzip:LEVEL`` (pg_dump's own -Z),
    or ``none``."""

    kind: str
    level: int

    @property
    def suffix(self) -> str:
        return ".dump.zst" if self.kind == "zstd" else ".dump"

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.level}"


def parse_compression(value: str) -> Compression:
    """Parse ``zstd:3`` / ``gzip:6`` / ``none``; ValueError names what is wrong."""
    kind, _, level_s = value.strip().lower().partition(":")
    if kind not in COMPRESSION_KINDS:
        raise ValueError(f"must be zstd:LEVEL, gzip:LEVEL or none; got {value!r}")
    if kind == "none":
        if level_s:
            raise ValueError("none takes no level")
        return Compression("none", 0)
    default_level = 3 if kind == "zstd" else 6
    if not level_s:
        return Compression(kind, default_level)
    if not level_s.isdigit():
        raise ValueError(f"level must be a number; got {level_s!r}")
    level = int(level_s)
    low, high = (1, 19) if kind == "zstd" else (1, 9)
    if not low <= level <= high:
        raise ValueError(f"{kind} level must be {low}..{high}; got {level}")
    return Compression(kind, level)


@dataclass(frozen=True)
class DatabaseConfig:
    host: str | None = None  # None: libpq's PGHOST/default socket
    port: int | None = None
    user: str | None = None
    dbname: str = "mt5_trading"
    password_file: Path | None = None
    password: Secret | None = None  # legacy POSTGRES_PASSWORD only; never from TOML
    pg_dump: str = "pg_dump"
    pg_restore: str = "pg_restore"
    compression: Compression = field(default_factory=lambda: parse_compression(
        DEFAULT_COMPRESSION))
    # 0 = compress in the pump thread: at level 1 that is ~3x faster than pg_dump produces, and
    # worker threads cost ~40 MB of buffers for no gain on two cores (docs/benchmarks.md).
    compression_threads: int = 0
    stall_timeout_s: float = 300.0
    exact_count_max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class LocalConfig:
    dir: Path = Path("/var/backups/mt5")
    keep: int = 3


@dataclass(frozen=True)
class RemoteConfig:
    url: str | None = None  # None: local-only backups
    token_file: Path | None = None
    token: Secret | None = None  # legacy BACKUP_API_TOKEN only; never from TOML
    max_retries: int = 3
    retry_delay_s: float = 5.0
    timeout_s: float = 60.0
    ca_file: Path | None = None
    on_unavailable: str = "keep-local"
    allow_http: bool = False  # plain http:// to a host that is not loopback


@dataclass(frozen=True)
class ScheduleConfig:
    timezone: str = ""  # "" = the system's
    database: str = "0 3 * * *"
    repository: str = "0 4 * * 0"
    verify: str = "0 5 1 * *"  # monthly test restore
    upload_pending: str = "0 * * * *"
    misfire_grace_s: float = 3600.0


@dataclass(frozen=True)
class RepositoryConfig:
    path: Path | None = None  # None: no repository job
    exclude: tuple[str, ...] = ("__pycache__", "*.pyc", ".venv", "node_modules")
    keep: int = 4
    compression_level: int = 3


@dataclass(frozen=True)
class HttpConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9102
    # The legacy backup.sh textfile series (mt5_backup_*) on /metrics too, for old dashboards.
    legacy_metrics: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    # node_exporter textfile rewritten after every run; None = no textfile
    textfile: Path | None = None


@dataclass(frozen=True)
class HealthConfig:
    max_age_s: float = 26 * 3600.0
    max_pending_age_s: float = 6 * 3600.0


@dataclass(frozen=True)
class DaemonConfig:
    shutdown_grace_s: float = 30.0


@dataclass(frozen=True)
class NotifyConfig:
    webhook_urls: tuple[str, ...] = ()
    on_success: bool = False
    ping_url: str | None = None  # healthchecks.io style: URL, URL/start, URL/fail
    timeout_s: float = 10.0


@dataclass(frozen=True)
class Config:
    source: Path | None = None  # the TOML file this came from, for messages
    log: LogConfig = field(default_factory=LogConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
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
        header_timeout_s=sec.float_min("header_timeout_s", d.header_timeout_s, 1.0),
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


def _load_database(sec: _Section) -> DatabaseConfig:
    d = DatabaseConfig()
    raw_compression = sec.get("compression", str, DEFAULT_COMPRESSION)
    try:
        compression = parse_compression(raw_compression)
    except ValueError as exc:
        raise sec._err("compression", str(exc)) from None
    port = sec.get("port", int, 0)
    if not 0 <= port <= 65535:
        raise sec._err("port", f"must be 1..65535, got {port}")
    cfg = DatabaseConfig(
        host=sec.opt_str("host"),
        port=port or None,
        user=sec.opt_str("user"),
        dbname=sec.get("dbname", str, d.dbname),
        password_file=sec.opt_path("password_file"),
        pg_dump=sec.get("pg_dump", str, d.pg_dump),
        pg_restore=sec.get("pg_restore", str, d.pg_restore),
        compression=compression,
        compression_threads=sec.int_min("compression_threads", d.compression_threads, 0),
        stall_timeout_s=sec.float_min("stall_timeout_s", d.stall_timeout_s, 1.0),
        exact_count_max_bytes=sec.int_min("exact_count_max_bytes", d.exact_count_max_bytes, 0),
    )
    if not cfg.dbname:
        raise sec._err("dbname", "must not be empty")
    sec.finish()
    return cfg


def _load_local(sec: _Section) -> LocalConfig:
    d = LocalConfig()
    cfg = LocalConfig(dir=sec.path("dir", d.dir), keep=sec.int_min("keep", d.keep, 1))
    sec.finish()
    return cfg


def normalize_remote_url(url: str) -> str:
    """Accept a base URL or the legacy full upload URL (``.../api/backup/upload``)."""
    url = url.strip().rstrip("/")
    for legacy_suffix in ("/api/backup/upload", "/api/backup"):
        url = url.removesuffix(legacy_suffix)
    return url


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (also as an IPv4-mapped address): traffic that never
    leaves the machine."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_plain_http_remote(url: str) -> bool:
    """True for an ``http://`` URL whose host is not loopback: the token and every backup
    would cross the network unencrypted and unauthenticated."""
    parts = urlsplit(url)
    return parts.scheme == "http" and not is_loopback_host(parts.hostname or "")


def _load_remote(sec: _Section) -> RemoteConfig:
    d = RemoteConfig()
    url = sec.opt_str("url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise sec._err("url", f"must start with http:// or https://; got {url!r}")
    allow_http = sec.get("allow_http", bool, d.allow_http)
    if url is not None and is_plain_http_remote(url) and not allow_http:
        raise sec._err("url", f"{url!r} is plain http:// to a host that is not loopback: the "
                       "token and the backups would travel unencrypted; use https:// (see "
                       "[remote] ca_file) or set [remote] allow_http = true")
    cfg = RemoteConfig(
        url=normalize_remote_url(url) if url else None,
        token_file=sec.opt_path("token_file"),
        max_retries=sec.int_min("max_retries", d.max_retries, 0),
        retry_delay_s=sec.float_min("retry_delay_s", d.retry_delay_s, 0.0),
        timeout_s=sec.float_min("timeout_s", d.timeout_s, 0.1),
        ca_file=sec.opt_path("ca_file"),
        on_unavailable=sec.choice("on_unavailable", d.on_unavailable, ON_UNAVAILABLE),
        allow_http=allow_http,
    )
    sec.finish()
    return cfg


def _validate_cron(sec: _Section, key: str, expr: str, tz: str) -> None:
    from mt5backupd.daemon.schedule import make_trigger

    try:
        make_trigger(expr, tz)
    except ValueError as exc:
        raise sec._err(key, str(exc)) from None


def _load_schedule(sec: _Section) -> ScheduleConfig:
    d = ScheduleConfig()
    cfg = ScheduleConfig(
        timezone=sec.get("timezone", str, d.timezone),
        database=sec.get("database", str, d.database),
        repository=sec.get("repository", str, d.repository),
        verify=sec.get("verify", str, d.verify),
        upload_pending=sec.get("upload_pending", str, d.upload_pending),
        misfire_grace_s=sec.float_min("misfire_grace_s", d.misfire_grace_s, 1.0),
    )
    if cfg.timezone:
        from mt5backupd.daemon.schedule import resolve_timezone

        try:
            resolve_timezone(cfg.timezone)
        except ValueError as exc:
            raise sec._err("timezone", str(exc)) from None
    for key in ("database", "repository", "verify", "upload_pending"):
        expr = getattr(cfg, key)
        if expr:
            _validate_cron(sec, key, expr, cfg.timezone)
    sec.finish()
    return cfg


def _str_list(sec: _Section, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    sec.seen.add(key)
    if key not in sec.table:
        return default
    value = sec.table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise sec._err(key, "expected a list of strings")
    return tuple(value)


def _load_repository(sec: _Section) -> RepositoryConfig:
    d = RepositoryConfig()
    level = sec.int_min("compression_level", d.compression_level, 1)
    if level > 19:
        raise sec._err("compression_level", f"must be 1..19, got {level}")
    cfg = RepositoryConfig(path=sec.opt_path("path"),
                           exclude=_str_list(sec, "exclude", d.exclude),
                           keep=sec.int_min("keep", d.keep, 1), compression_level=level)
    sec.finish()
    return cfg


def _load_http(sec: _Section) -> HttpConfig:
    d = HttpConfig()
    listen = sec.get("listen", str, f"{d.listen_host}:{d.listen_port}")
    host, port = parse_listen(listen, f"{sec.where}: [http] listen")
    legacy = sec.get("legacy_metrics", bool, d.legacy_metrics)
    sec.finish()
    return HttpConfig(host, port, legacy_metrics=legacy)


def _load_metrics(sec: _Section) -> MetricsConfig:
    textfile = sec.opt_path("textfile")
    if textfile is not None:
        # node_exporter's textfile collector reads only *.prom files of its directory: any
        # other name would be written after every run and silently never scraped.
        if not textfile.is_absolute():
            raise sec._err("textfile", f"must be an absolute path; got {str(textfile)!r}")
        if textfile.suffix != ".prom" or textfile.name == ".prom":
            raise sec._err("textfile", "must end in .prom (node_exporter's textfile collector "
                           f"reads only *.prom files); got {str(textfile)!r}")
    sec.finish()
    return MetricsConfig(textfile=textfile)


def _load_health(sec: _Section) -> HealthConfig:
    d = HealthConfig()
    cfg = HealthConfig(max_age_s=sec.float_min("max_age_s", d.max_age_s, 1.0),
                       max_pending_age_s=sec.float_min("max_pending_age_s",
                                                       d.max_pending_age_s, 1.0))
    sec.finish()
    return cfg


def _load_daemon(sec: _Section) -> DaemonConfig:
    cfg = DaemonConfig(shutdown_grace_s=sec.float_min("shutdown_grace_s",
                                                      DaemonConfig().shutdown_grace_s, 0.0))
    sec.finish()
    return cfg


def _load_notify(sec: _Section) -> NotifyConfig:
    d = NotifyConfig()
    urls = _str_list(sec, "webhook_urls", d.webhook_urls)
    ping = sec.opt_str("ping_url")
    for key, url in [("webhook_urls", u) for u in urls] + [("ping_url", ping or "http://")]:
        if not url.startswith(("http://", "https://")):
            raise sec._err(key, f"must start with http:// or https://; got {url!r}")
    cfg = NotifyConfig(webhook_urls=urls, on_success=sec.get("on_success", bool, d.on_success),
                       ping_url=ping.rstrip("/") if ping else None,
                       timeout_s=sec.float_min("timeout_s", d.timeout_s, 0.1))
    sec.finish()
    return cfg


LEGACY_VARS = (
    "POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_HOST", "POSTGRES_PORT",
    "BACKUP_DIR", "KEEP_LOCAL_BACKUPS", "BACKUP_API_URL", "BACKUP_API_TOKEN", "MAX_RETRIES",
    "RETRY_DELAY",
)


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


def _legacy_int(env: Mapping[str, str], key: str, where: str, minimum: int) -> int | None:
    if not env.get(key):
        return None
    value = env[key].strip()
    if not value.lstrip("-").isdigit() or int(value) < minimum:
        raise ConfigError(f"{where}: {key}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def apply_legacy_env(cfg: Config, env: Mapping[str, str], where: str) -> Config:
    """Overlay the legacy variables (POSTGRES_*, BACKUP_*, ...) on a loaded config."""
    db, local, remote = cfg.database, cfg.local, cfg.remote
    port = _legacy_int(env, "POSTGRES_PORT", where, 1)
    db = replace(
        db,
        dbname=env.get("POSTGRES_DB") or db.dbname,
        user=env.get("POSTGRES_USER") or db.user,
        host=env.get("POSTGRES_HOST") or db.host,
        port=port or db.port,
        password=Secret(env["POSTGRES_PASSWORD"]) if env.get("POSTGRES_PASSWORD") else db.password,
    )
    keep = _legacy_int(env, "KEEP_LOCAL_BACKUPS", where, 1)
    local = replace(local, dir=Path(env["BACKUP_DIR"]) if env.get("BACKUP_DIR") else local.dir,
                    keep=keep or local.keep)
    url = env.get("BACKUP_API_URL")
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: BACKUP_API_URL: must start with http:// or https://")
    retries = _legacy_int(env, "MAX_RETRIES", where, 0)
    delay = _legacy_int(env, "RETRY_DELAY", where, 0)
    remote = replace(
        remote,
        url=normalize_remote_url(url) if url else remote.url,
        token=Secret(env["BACKUP_API_TOKEN"]) if env.get("BACKUP_API_TOKEN") else remote.token,
        max_retries=remote.max_retries if retries is None else retries,
        retry_delay_s=remote.retry_delay_s if delay is None else float(delay),
    )
    return replace(cfg, database=db, local=local, remote=remote)


ENV_FILE_SECRETS = ("POSTGRES_PASSWORD", "BACKUP_API_TOKEN")


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
        secret = any(env_file_values.get(k) for k in ENV_FILE_SECRETS)
        found.append(file_mode_problem(env_file, "env file", secret=secret))
    return [p for p in found if p is not None]


def referenced_file_problems(cfg: Config) -> list[FileProblem]:
    """Files the config points to: secrets, and the receiver's tokens file (hashes only, but
    whoever writes it can mint an admin token)."""
    files: list[tuple[Path | None, str, bool]] = [
        (cfg.database.password_file, "[database] password_file", True),
        (cfg.remote.token_file, "[remote] token_file", True),
        (cfg.receiver.tokens_file, "[receiver] tokens_file", False),
        (cfg.receiver.tls_key, "[receiver] tls_key", True),
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


def resolve_config_path(cli_value: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """Return (path, explicit). A missing default file is fine (defaults + env apply)."""
    if cli_value:
        return Path(cli_value), True
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), True
    return DEFAULT_CONFIG_PATH, False


def load_config(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    env_file: Path | None = None,
    *,
    check_modes: bool = True,
) -> Config:
    """Load ``path`` (None: defaults only) and apply the legacy variables, from ``env_file``
    (which wins, being named on the command line) and the environment.

    A config, env or secret file that others can write (or, holding a secret, read) is refused
    before anything else happens; ``check_modes=False`` is for `check`, which reports them."""
    env = dict(os.environ if env is None else env)
    env_file_values: dict[str, str] = {}
    if env_file is not None:
        env_file_values = read_env_file(env_file)
        env.update(env_file_values)
    if check_modes:
        for problem in source_file_problems(path, env_file, env_file_values):
            raise ConfigError(problem.message)
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
    database = _load_database(root.sub("database"))
    local = _load_local(root.sub("local"))
    remote = _load_remote(root.sub("remote"))
    schedule = _load_schedule(root.sub("schedule"))
    repository = _load_repository(root.sub("repository"))
    http = _load_http(root.sub("http"))
    metrics = _load_metrics(root.sub("metrics"))
    health = _load_health(root.sub("health"))
    daemon = _load_daemon(root.sub("daemon"))
    notify = _load_notify(root.sub("notify"))
    unknown = sorted(set(data) - root.seen)
    if unknown:
        raise ConfigError(f"{where}: [{unknown[0]}]: unknown section")
    token = env.get("BACKUP_API_TOKEN")
    cfg = Config(
        source=path,
        log=log,
        receiver=receiver,
        database=database,
        local=local,
        remote=remote,
        schedule=schedule,
        repository=repository,
        http=http,
        metrics=metrics,
        health=health,
        daemon=daemon,
        notify=notify,
        legacy_receiver_token=Secret(token) if token else None,
    )
    cfg = apply_legacy_env(cfg, env, str(env_file) if env_file else "environment")
    if check_modes:
        for problem in referenced_file_problems(cfg):
            raise ConfigError(problem.message)
    return cfg
