"""Loading: TOML (plus the legacy environment variables) into a frozen, typed `Config`.

Every error names the file and the key (``config.toml: [receiver] max_upload_bytes: ...``);
unknown sections and keys are errors, because a typo in a backup config must never silently
fall back to a default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mt5backupd.config.compression import DEFAULT_COMPRESSION, parse_compression
from mt5backupd.config.encryption import check_recipients, read_recipients_file
from mt5backupd.config.filemodes import referenced_file_problems, source_file_problems
from mt5backupd.config.legacy_env import (
    LEGACY_LOG_DIR,
    LEGACY_TOKEN,
    apply_legacy_env,
    read_env_file,
)
from mt5backupd.config.model import (
    ADDRESSING_STYLES,
    OBJECT_LOCK_MODES,
    ON_UNAVAILABLE,
    S3_MIN_PART_BYTES,
    STORAGE_BACKENDS,
    Config,
    DaemonConfig,
    DatabaseConfig,
    EncryptionConfig,
    HealthConfig,
    HttpConfig,
    LocalConfig,
    LogConfig,
    MetricsConfig,
    NotifyConfig,
    ReceiverConfig,
    RemoteConfig,
    RepositoryConfig,
    RetentionConfig,
    ScheduleConfig,
    StorageConfig,
    WalConfig,
)
from mt5backupd.config.secret import Secret
from mt5backupd.config.section import Section, parse_listen
from mt5backupd.config.urls import is_plain_http_remote, normalize_remote_url
from mt5backupd.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/mt5backupd/config.toml")
CONFIG_ENV = "MT5BACKUPD_CONFIG"


@dataclass(frozen=True)
class ScheduleChecks:
    """The scheduler's own checks of ``[schedule]``, handed in by whoever loads the config for
    the daemon or the CLI (`mt5backupd.daemon.schedule.SCHEDULE_CHECKS`), so that config imports
    no scheduler. Each raises ValueError saying what is wrong."""

    timezone: Callable[[str], object]  # an IANA zone name
    cron: Callable[[str, str], object]  # (cron expression, zone name; "" = the system's)


# Keys that would put a bucket credential in the TOML: refused by name, never read.
_S3_SECRET_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                   "access_key", "secret_key", "access_key_id", "secret_access_key")


def _load_storage(sec: Section) -> StorageConfig:
    d = StorageConfig()
    for key in _S3_SECRET_KEYS:
        if key in sec.table:
            raise sec.error(key, "bucket credentials never go in the config file: use the "
                            "AWS credential chain (AWS_* environment, ~/.aws/credentials, "
                            "credentials_file = PATH or a systemd credential)")
    cfg = StorageConfig(
        backend=sec.choice("backend", d.backend, STORAGE_BACKENDS),
        endpoint_url=sec.opt_str("endpoint_url") or None,
        bucket=sec.get("bucket", str, d.bucket),
        prefix=sec.get("prefix", str, d.prefix),
        region=sec.opt_str("region") or None,
        addressing_style=sec.choice("addressing_style", d.addressing_style, ADDRESSING_STYLES),
        part_size_bytes=sec.int_min("part_size_bytes", d.part_size_bytes, S3_MIN_PART_BYTES),
        credentials_file=sec.opt_path("credentials_file"),
        object_lock_days=sec.int_min("object_lock_days", d.object_lock_days, 0),
        object_lock_mode=sec.choice("object_lock_mode", d.object_lock_mode, OBJECT_LOCK_MODES),
        scratch_dir=sec.opt_path("scratch_dir"),
    )
    if cfg.backend == "s3" and not cfg.bucket:
        raise sec.error("bucket", 'is required with backend = "s3"')
    if cfg.prefix.startswith("/") or "//" in cfg.prefix:
        raise sec.error("prefix", f"must not start with / or contain //, got {cfg.prefix!r}")
    if cfg.endpoint_url is not None and not cfg.endpoint_url.startswith(("http://", "https://")):
        raise sec.error("endpoint_url", f"expected http(s)://HOST[:PORT], got {cfg.endpoint_url!r}")
    sec.finish()
    return cfg


def _load_receiver(sec: Section) -> ReceiverConfig:
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
        raise ret.error("auto", "needs at least one keep_* > 0 (an empty policy would delete all)")
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
        storage=_load_storage(sec.sub("storage")),
    )
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        missing = "tls_key" if cfg.tls_key is None else "tls_cert"
        raise sec.error(missing, "tls_cert and tls_key must be given together")
    sec.finish()
    return cfg


def _load_log(sec: Section, env: Mapping[str, str]) -> LogConfig:
    d = LogConfig()
    level = sec.choice("level", d.level, ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"))
    log_dir = sec.opt_path("dir")
    if env.get(LEGACY_LOG_DIR):  # legacy variable, kept working
        log_dir = Path(env[LEGACY_LOG_DIR])
    cfg = LogConfig(
        dir=log_dir,
        level=level,
        rotation_bytes=sec.int_min("rotation_bytes", d.rotation_bytes, 1024),
        retention_files=sec.int_min("retention_files", d.retention_files, 1),
    )
    sec.finish()
    return cfg


def _load_database(sec: Section) -> DatabaseConfig:
    d = DatabaseConfig()
    raw_compression = sec.get("compression", str, DEFAULT_COMPRESSION)
    try:
        compression = parse_compression(raw_compression)
    except ValueError as exc:
        raise sec.error("compression", str(exc)) from None
    port = sec.get("port", int, 0)
    if not 0 <= port <= 65535:
        raise sec.error("port", f"must be 1..65535, got {port}")
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
        raise sec.error("dbname", "must not be empty")
    sec.finish()
    return cfg


def _load_local(sec: Section) -> LocalConfig:
    d = LocalConfig()
    cfg = LocalConfig(dir=sec.path("dir", d.dir), keep=sec.int_min("keep", d.keep, 1))
    sec.finish()
    return cfg


def _load_remote(sec: Section) -> RemoteConfig:
    d = RemoteConfig()
    url = sec.opt_str("url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise sec.error("url", f"must start with http:// or https://; got {url!r}")
    allow_http = sec.get("allow_http", bool, d.allow_http)
    if url is not None and is_plain_http_remote(url) and not allow_http:
        raise sec.error("url", f"{url!r} is plain http:// to a host that is not loopback: the "
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


def _load_schedule(sec: Section, checks: ScheduleChecks | None) -> ScheduleConfig:
    d = ScheduleConfig()
    cfg = ScheduleConfig(
        timezone=sec.get("timezone", str, d.timezone),
        database=sec.get("database", str, d.database),
        repository=sec.get("repository", str, d.repository),
        verify=sec.get("verify", str, d.verify),
        upload_pending=sec.get("upload_pending", str, d.upload_pending),
        base=sec.get("base", str, d.base),
        misfire_grace_s=sec.float_min("misfire_grace_s", d.misfire_grace_s, 1.0),
    )
    if checks is not None:
        check_schedule(cfg, checks, sec.where)
    sec.finish()
    return cfg


def check_schedule(cfg: ScheduleConfig, checks: ScheduleChecks, where: str) -> None:
    """The scheduler's checks of ``[schedule]`` (zone, every cron expression): a ConfigError
    ``WHERE: [schedule] KEY: why`` for the first that fails. Part of ``load_config`` when it
    is given the checks; ``--run-now`` runs them after pg_dump started (the scheduler's import
    pulls in asyncio)."""
    if cfg.timezone:
        try:
            checks.timezone(cfg.timezone)
        except ValueError as exc:
            raise ConfigError(f"{where}: [schedule] timezone: {exc}") from None
    for key in ("database", "repository", "verify", "upload_pending", "base"):
        expr = getattr(cfg, key)
        if expr:
            try:
                checks.cron(expr, cfg.timezone)
            except ValueError as exc:
                raise ConfigError(f"{where}: [schedule] {key}: {exc}") from None


def _load_repository(sec: Section) -> RepositoryConfig:
    d = RepositoryConfig()
    level = sec.int_min("compression_level", d.compression_level, 1)
    if level > 19:
        raise sec.error("compression_level", f"must be 1..19, got {level}")
    cfg = RepositoryConfig(path=sec.opt_path("path"),
                           exclude=sec.str_list("exclude", d.exclude),
                           keep=sec.int_min("keep", d.keep, 1), compression_level=level)
    sec.finish()
    return cfg


def _load_http(sec: Section) -> HttpConfig:
    d = HttpConfig()
    listen = sec.get("listen", str, f"{d.listen_host}:{d.listen_port}")
    host, port = parse_listen(listen, f"{sec.where}: [http] listen")
    legacy = sec.get("legacy_metrics", bool, d.legacy_metrics)
    sec.finish()
    return HttpConfig(host, port, legacy_metrics=legacy)


def _load_metrics(sec: Section) -> MetricsConfig:
    textfile = sec.opt_path("textfile")
    if textfile is not None:
        # node_exporter's textfile collector reads only *.prom files of its directory: any
        # other name would be written after every run and silently never scraped.
        if not textfile.is_absolute():
            raise sec.error("textfile", f"must be an absolute path; got {str(textfile)!r}")
        if textfile.suffix != ".prom" or textfile.name == ".prom":
            raise sec.error("textfile", "must end in .prom (node_exporter's textfile collector "
                           f"reads only *.prom files); got {str(textfile)!r}")
    sec.finish()
    return MetricsConfig(textfile=textfile)


def _load_health(sec: Section) -> HealthConfig:
    d = HealthConfig()
    cfg = HealthConfig(max_age_s=sec.float_min("max_age_s", d.max_age_s, 1.0),
                       max_pending_age_s=sec.float_min("max_pending_age_s",
                                                       d.max_pending_age_s, 1.0))
    sec.finish()
    return cfg


def _load_daemon(sec: Section) -> DaemonConfig:
    cfg = DaemonConfig(shutdown_grace_s=sec.float_min("shutdown_grace_s",
                                                      DaemonConfig().shutdown_grace_s, 0.0))
    sec.finish()
    return cfg


def _load_notify(sec: Section) -> NotifyConfig:
    d = NotifyConfig()
    urls = sec.str_list("webhook_urls", d.webhook_urls)
    ping = sec.opt_str("ping_url")
    for key, url in [("webhook_urls", u) for u in urls] + [("ping_url", ping or "http://")]:
        if not url.startswith(("http://", "https://")):
            raise sec.error(key, f"must start with http:// or https://; got {url!r}")
    cfg = NotifyConfig(webhook_urls=urls, on_success=sec.get("on_success", bool, d.on_success),
                       ping_url=ping.rstrip("/") if ping else None,
                       timeout_s=sec.float_min("timeout_s", d.timeout_s, 0.1))
    sec.finish()
    return cfg

def _load_encryption(sec: Section) -> EncryptionConfig:
    where = f"{sec.where}: [encryption]"
    recipients = check_recipients(sec.str_list("recipients", ()), f"{where} recipients")
    recipients_file = sec.opt_path("recipients_file")
    if recipients_file is not None:
        recipients += tuple(r for r in read_recipients_file(recipients_file,
                                                            f"{where} recipients_file")
                            if r not in recipients)
        if not recipients:
            raise sec.error("recipients_file", f"{recipients_file} holds no recipient")
    cfg = EncryptionConfig(recipients=recipients, recipients_file=recipients_file,
                           identity_file=sec.opt_path("identity_file"))
    sec.finish()
    return cfg


_SLOT_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def _load_wal(sec: Section) -> WalConfig:
    d = WalConfig()
    cfg = WalConfig(
        enabled=sec.get("enabled", bool, d.enabled),
        slot=sec.get("slot", str, d.slot),
        max_lag_s=sec.float_min("max_lag_s", d.max_lag_s, 0.2),
        synchronous=sec.get("synchronous", bool, d.synchronous),
        pg_receivewal=sec.get("pg_receivewal", str, d.pg_receivewal),
        pg_basebackup=sec.get("pg_basebackup", str, d.pg_basebackup),
        keep_base=sec.int_min("keep_base", d.keep_base, 1),
        restart_max_delay_s=sec.float_min("restart_max_delay_s", d.restart_max_delay_s, 0.1),
    )
    # PostgreSQL's own rule for slot names: lower-case letters, digits and underscores
    if not cfg.slot or len(cfg.slot) > 63 or not set(cfg.slot) <= _SLOT_CHARS:
        raise sec.error("slot", "must be 1..63 of a-z 0-9 _ (PostgreSQL's slot name rule), "
                        f"got {cfg.slot!r}")
    sec.finish()
    return cfg


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
    schedule_checks: ScheduleChecks | None = None,
) -> Config:
    """Load ``path`` (None: defaults only) and apply the legacy variables, from ``env_file``
    (which wins, being named on the command line) and the environment.

    A config, env or secret file that others can write (or, holding a secret, read) is refused
    before anything else happens; ``check_modes=False`` is for `check`, which reports them.
    ``schedule_checks`` (the scheduler's) refuse a bad cron expression or time zone here, at
    load; without them ``[schedule]`` is type-checked only."""
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
    root = Section(where, "", data)
    log = _load_log(root.sub("log"), env)
    receiver = _load_receiver(root.sub("receiver"))
    database = _load_database(root.sub("database"))
    local = _load_local(root.sub("local"))
    remote = _load_remote(root.sub("remote"))
    schedule = _load_schedule(root.sub("schedule"), schedule_checks)
    repository = _load_repository(root.sub("repository"))
    http = _load_http(root.sub("http"))
    metrics = _load_metrics(root.sub("metrics"))
    health = _load_health(root.sub("health"))
    daemon = _load_daemon(root.sub("daemon"))
    notify = _load_notify(root.sub("notify"))
    encryption = _load_encryption(root.sub("encryption"))
    wal = _load_wal(root.sub("wal"))
    unknown = sorted(set(data) - root.seen)
    if unknown:
        raise ConfigError(f"{where}: [{unknown[0]}]: unknown section")
    token = env.get(LEGACY_TOKEN)
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
        encryption=encryption,
        wal=wal,
        legacy_receiver_token=Secret(token) if token else None,
    )
    cfg = apply_legacy_env(cfg, env, str(env_file) if env_file else "environment")
    if check_modes:
        for problem in referenced_file_problems(cfg):
            raise ConfigError(problem.message)
    return cfg
