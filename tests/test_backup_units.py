"""Table tests of the backup side's pure pieces: names, rotation, backoff, versions, config."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mt5backupd.backoff import backoff_delays, is_retryable_status
from mt5backupd.backup.dump import (
    check_dump_compatible,
    parse_tool_version,
    pg_dump_argv,
    server_major,
)
from mt5backupd.backup.spool import backup_stem
from mt5backupd.config import (
    Compression,
    load_config,
    normalize_remote_url,
    parse_compression,
    read_env_file,
)
from mt5backupd.errors import ConfigError
from mt5backupd.retention import LocalItem, select_rotation

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


def test_backup_id_legacy_pattern_in_utc() -> None:
    """Names follow the legacy mt5_trading-YYYYMMDD-HHMMSS pattern, in UTC."""
    from zoneinfo import ZoneInfo

    local = datetime(2026, 11, 25, 5, 0, 7, tzinfo=ZoneInfo("Europe/Athens"))
    assert backup_stem("mt5_trading", local) == "mt5_trading-20261125-030007"


@pytest.mark.parametrize(
    ("items", "keep", "removed"),
    [
        ([LocalItem(f"b{i}", T0 - timedelta(days=i), False) for i in range(5)], 3, ["b4", "b3"]),
        ([LocalItem(f"b{i}", T0 - timedelta(days=i), i == 4) for i in range(5)], 1,
         ["b3", "b2", "b1"]),
        ([LocalItem("only", T0, True)], 1, []),
        ([LocalItem("a", T0, False), LocalItem("b", T0 - timedelta(1), False)], 5, []),
    ],
)
def test_select_rotation(items: list[LocalItem], keep: int, removed: list[str]) -> None:
    """Rotation removes the oldest beyond `keep`, oldest first, and never a pending backup."""
    assert select_rotation(items, keep) == removed


@pytest.mark.parametrize(
    ("retries", "base", "rng", "expected"),
    [
        (3, 1.0, 0.0, [0.5, 1.0, 2.0]),
        (3, 1.0, 1.0, [1.0, 2.0, 4.0]),
        (4, 100.0, 1.0, [100.0, 200.0, 300.0, 300.0]),  # capped at 300 s
        (0, 5.0, 0.5, []),
    ],
)
def test_backoff_delays(retries: int, base: float, rng: float, expected: list[float]) -> None:
    """Delays double, carry 50% jitter and stop at the cap."""
    assert backoff_delays(retries, base, cap_s=300.0, rng=lambda: rng) == expected


@pytest.mark.parametrize(("status", "retryable"),
                         [(408, True), (429, True), (500, True), (503, True), (507, True),
                          (400, False), (401, False), (404, False), (409, False), (413, False)])
def test_retryable_statuses(status: int, retryable: bool) -> None:
    """Only timeouts, throttling and server errors are retried; other 4xx fail at once."""
    assert is_retryable_status(status) is retryable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)", (15, "15.18")),
        ("pg_restore (PostgreSQL) 16.2", (16, "16.2")),
        ("pg_dump (PostgreSQL) 9.6.24", (9, "9.6")),
        ("pg_dump (PostgreSQL) 17devel", (17, "17")),
    ],
)
def test_parse_tool_version(text: str, expected: tuple[int, str]) -> None:
    """Major versions are read from pg_dump/pg_restore --version output."""
    assert parse_tool_version(text) == expected


def test_version_compatibility() -> None:
    """pg_dump must be at least the server's major version."""
    assert server_major(150018) == 15
    assert server_major(90624) == 9
    check_dump_compatible(16, 15, "pg_dump")
    with pytest.raises(ConfigError, match="version 13 but the server is 15"):
        check_dump_compatible(13, 15, "pg_dump")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("zstd:3", Compression("zstd", 3)), ("zstd", Compression("zstd", 3)),
     ("gzip:9", Compression("gzip", 9)), ("GZIP:1", Compression("gzip", 1)),
     ("none", Compression("none", 0))],
)
def test_parse_compression(value: str, expected: Compression) -> None:
    """zstd:LEVEL, gzip:LEVEL and none are accepted (levels default sensibly)."""
    assert parse_compression(value) == expected


@pytest.mark.parametrize("value", ["lz4", "zstd:0", "zstd:20", "gzip:10", "none:1", "zstd:x"])
def test_bad_compression_refused(value: str) -> None:
    """Unknown methods and out-of-range levels are refused."""
    with pytest.raises(ValueError):
        parse_compression(value)


def test_pg_dump_argv_has_no_secrets_and_right_level() -> None:
    """argv carries format and level; connection details and password go via the environment."""
    from mt5backupd.config import DatabaseConfig, Secret

    cfg = DatabaseConfig(dbname="mt5_trading", password=Secret("pw-in-env-only"),
                         compression=Compression("gzip", 6))
    assert pg_dump_argv(cfg) == ["pg_dump", "--format=custom", "--compress=6", "--no-password",
                                 "--dbname=mt5_trading"]
    zstd = DatabaseConfig(compression=Compression("zstd", 3))
    assert "--compress=0" in pg_dump_argv(zstd)


@pytest.mark.parametrize(
    ("url", "expected"),
    [("http://h:9101", "http://h:9101"), ("http://h:9101/", "http://h:9101"),
     ("http://h:9101/api/backup/upload", "http://h:9101"),
     ("https://h/base/api/backup/upload/", "https://h/base")],
)
def test_normalize_remote_url(url: str, expected: str) -> None:
    """The legacy BACKUP_API_URL (full upload URL) and a base URL both work."""
    assert normalize_remote_url(url) == expected


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


def test_backup_sections_validated(tmp_path: Path) -> None:
    """[database]/[local]/[remote] keys are typed and checked with the key named."""
    cases = {
        "[database]\ncompression = 'lz4'\n": "[database] compression",
        "[local]\nkeep = 0\n": "[local] keep: must be >= 1",
        "[remote]\nurl = 'backup:9101'\n": "[remote] url",
        "[remote]\non_unavailable = 'retry'\n": "[remote] on_unavailable",
        "[database]\npassword = 'x'\n": "[database] password: unknown key",
    }
    for text, fragment in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            load_config(path, env={})


def test_read_env_file_missing(tmp_path: Path) -> None:
    """A missing env file is a config error naming it."""
    with pytest.raises(ConfigError, match="env file not found"):
        read_env_file(tmp_path / "absent")


def test_secrets_from_systemd_credentials_and_legacy(tmp_path: Path) -> None:
    """The config's file wins, then $CREDENTIALS_DIRECTORY, then the legacy variable; an
    unprotected credential file is refused."""
    import os

    from mt5backupd.config import DatabaseConfig, RemoteConfig, Secret
    from mt5backupd.config.secretfiles import database_password, remote_token

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db-password").write_text("from-credential\n")
    os.chmod(creds / "db-password", 0o600)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    legacy = DatabaseConfig(password=Secret("from-env"))
    got = database_password(legacy, env)
    assert got is not None
    assert got.reveal() == "from-credential"
    assert database_password(legacy, {}) == Secret("from-env")
    own = tmp_path / "pw"
    own.write_text("from-file")
    os.chmod(own, 0o400)
    got = database_password(DatabaseConfig(password_file=own), env)
    assert got is not None
    assert got.reveal() == "from-file"
    (creds / "remote-token").write_text("tok")
    os.chmod(creds / "remote-token", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        remote_token(RemoteConfig(), env)
    assert remote_token(RemoteConfig(), {}) is None


def test_env_file_hash_is_a_comment_only_at_word_start(tmp_path: Path) -> None:
    """As in the shell, `abc#123` is a value; ` # note` and quoted text behave as in bash."""
    env_file = tmp_path / "mt5-backup"
    env_file.write_text("POSTGRES_PASSWORD=abc#123 # the password\n"
                        "BACKUP_API_TOKEN='tok # not a comment'\n")
    values = read_env_file(env_file)
    assert values["POSTGRES_PASSWORD"] == "abc#123"
    assert values["BACKUP_API_TOKEN"] == "tok # not a comment"


def test_system_timezone_keeps_dst_rules(tmp_path: Path) -> None:
    """The system zone comes from $TZ or the /etc/localtime link as a real zone (with DST),
    not as today's fixed offset."""
    from zoneinfo import ZoneInfo

    from mt5backupd.daemon.schedule import make_trigger, system_timezone

    assert system_timezone({"TZ": "Europe/Athens"}) == ZoneInfo("Europe/Athens")
    link = tmp_path / "localtime"
    link.symlink_to("/usr/share/zoneinfo/America/New_York")
    assert system_timezone({}, link) == ZoneInfo("America/New_York")
    trigger = make_trigger("0 3 * * *", system_timezone({"TZ": "Europe/Athens"}))
    winter = datetime(2026, 1, 10, 12, tzinfo=UTC)
    summer = datetime(2026, 7, 10, 12, tzinfo=UTC)
    # 03:00 Athens is 01:00 UTC in winter and 00:00 UTC in summer
    assert trigger.get_next_fire_time(None, winter).astimezone(UTC).hour == 1
    assert trigger.get_next_fire_time(None, summer).astimezone(UTC).hour == 0
