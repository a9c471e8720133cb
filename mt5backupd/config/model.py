"""The configuration as frozen, typed sections: one dataclass per TOML table, defaults included."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mt5backupd.config.compression import DEFAULT_COMPRESSION, Compression, parse_compression
from mt5backupd.config.secret import Secret

ON_UNAVAILABLE = ("keep-local", "abort")

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


STORAGE_BACKENDS = ("filesystem", "s3")
ADDRESSING_STYLES = ("auto", "path", "virtual")
OBJECT_LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
S3_MIN_PART_BYTES = 5 * 1024**2  # S3's own floor for every part but the last


@dataclass(frozen=True)
class StorageConfig:
    """[receiver.storage]: where committed backups live. Bucket credentials come from the AWS
    chain (environment, shared credentials file, ``credentials_file``), never from this file."""

    backend: str = "filesystem"
    endpoint_url: str | None = None  # None: AWS itself
    bucket: str = ""
    prefix: str = ""
    region: str | None = None
    addressing_style: str = "auto"
    part_size_bytes: int = 16 * 1024**2
    credentials_file: Path | None = None
    object_lock_days: int = 0  # 0: no retention set on committed objects
    object_lock_mode: str = "GOVERNANCE"
    # S3 ingest: per upload request, an unlinked file of up to two parts; None: the system temp dir
    scratch_dir: Path | None = None


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
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass(frozen=True)
class LogConfig:
    dir: Path | None = None  # JSON log files; None = stderr only
    level: str = "INFO"
    rotation_bytes: int = 20 * 1024**2
    retention_files: int = 10


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
    base: str = "0 2 * * 0"  # weekly base backup (pg_basebackup) when [wal] enabled
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
class EncryptionConfig:
    """age encryption of every backup: on when there is at least one recipient."""

    recipients: tuple[str, ...] = ()  # every recipient: the config's list, then the file's
    recipients_file: Path | None = None
    identity_file: Path | None = None  # only where restores and test restores run

    @property
    def enabled(self) -> bool:
        return bool(self.recipients)


@dataclass(frozen=True)
class WalConfig:
    """[wal]: continuous WAL streaming (pg_receivewal) and base backups for point-in-time
    recovery; off by default."""

    enabled: bool = False
    slot: str = "mt5backupd"  # physical replication slot, created when missing
    max_lag_s: float = 10.0  # the growing partial segment is shipped at least this often
    synchronous: bool = False  # pg_receivewal --synchronous (flush and confirm every write)
    pg_receivewal: str = "pg_receivewal"
    pg_basebackup: str = "pg_basebackup"
    keep_base: int = 2  # local base backups kept (WAL older than the oldest is pruned with it)
    # restarts of a dead pg_receivewal wait 1 s, 2 s, 4 s ... up to this
    restart_max_delay_s: float = 60.0


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
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    wal: WalConfig = field(default_factory=WalConfig)
    # The legacy BACKUP_API_TOKEN, served by the receiver as the client token named "default".
    legacy_receiver_token: Secret | None = None

