"""Configuration: TOML (plus the legacy environment variables) into frozen, typed objects.

The parts, one concern each: `model` (the sections), `loader` (TOML -> Config), `section` (typed
table access), `secret` (the Secret type), `compression` (the compression spec), `urls` (the
receiver URL rules), `legacy_env` (the legacy variables), `filemodes` (files others could
change), `secretfiles` (reading secrets), `legacy_import` (the installer's import). The names
below are the public surface: ``from mt5backupd.config import Config, load_config``.
"""

from __future__ import annotations

from mt5backupd.config.compression import (
    DEFAULT_COMPRESSION,
    Compression,
    parse_compression,
)
from mt5backupd.config.filemodes import FileProblem, file_mode_problems
from mt5backupd.config.legacy_env import read_env_file
from mt5backupd.config.loader import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ScheduleChecks,
    check_schedule,
    load_config,
    resolve_config_path,
)
from mt5backupd.config.model import (
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
from mt5backupd.config.urls import is_plain_http_remote, normalize_remote_url

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_COMPRESSION",
    "DEFAULT_CONFIG_PATH",
    "Compression",
    "Config",
    "DaemonConfig",
    "DatabaseConfig",
    "EncryptionConfig",
    "FileProblem",
    "HealthConfig",
    "HttpConfig",
    "LocalConfig",
    "LogConfig",
    "MetricsConfig",
    "NotifyConfig",
    "ReceiverConfig",
    "RemoteConfig",
    "RepositoryConfig",
    "RetentionConfig",
    "ScheduleChecks",
    "ScheduleConfig",
    "Secret",
    "StorageConfig",
    "WalConfig",
    "check_schedule",
    "file_mode_problems",
    "is_plain_http_remote",
    "load_config",
    "normalize_remote_url",
    "parse_compression",
    "read_env_file",
    "resolve_config_path",
]
