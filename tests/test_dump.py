"""pg_dump: tool versions, compatibility with the server, its argv."""

from __future__ import annotations

import pytest

from mt5backupd.backup.childenv import pg_dump_argv
from mt5backupd.backup.dump import (
    check_dump_compatible,
    parse_tool_version,
    server_major,
)
from mt5backupd.config import (
    Compression,
)
from mt5backupd.errors import ConfigError


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


def test_pg_dump_argv_has_no_secrets_and_right_level() -> None:
    """argv carries format and level; connection details and password go via the environment."""
    from mt5backupd.config import DatabaseConfig, Secret

    cfg = DatabaseConfig(dbname="mt5_trading", password=Secret("pw-in-env-only"),
                         compression=Compression("gzip", 6))
    assert pg_dump_argv(cfg) == ["pg_dump", "--format=custom", "--compress=6", "--no-password",
                                 "--dbname=mt5_trading"]
    zstd = DatabaseConfig(compression=Compression("zstd", 3))
    assert "--compress=0" in pg_dump_argv(zstd)
