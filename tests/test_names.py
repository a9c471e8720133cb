"""Backup ids and client names: what the receiver accepts as names."""

from __future__ import annotations

import pytest

from mt5backupd.names import InvalidName, validate_backup_id, validate_client_name

HOSTILE_IDS = [
    "../../etc/passwd",
    "..",
    ".",
    "",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    ".hidden",
    "a..b",
    "x" * 201,
    "%2e%2e%2fetc",
    "name with space",
    "tab\tname",
    "newline\nname",
    "x.dump.sha256",
    "ü.dump",
]


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_hostile_backup_ids_refused(value: str) -> None:
    """Every traversal, separator, NUL, hidden, over-long or reserved id is refused."""
    with pytest.raises(InvalidName):
        validate_backup_id(value)


@pytest.mark.parametrize(
    "value",
    ["mt5_trading-20261125-030000.dump", "mt5_trading-20261125-030000.dump.zst", "A+b_c-1.tar.zst",
     "x" * 200],
)
def test_ordinary_backup_ids_accepted(value: str) -> None:
    """Legacy and new backup file names are valid ids and come back unchanged."""
    assert validate_backup_id(value) == value


@pytest.mark.parametrize("value", ["Alice", "-x", "", "a" * 65, "a/b", "a.b"])
def test_bad_client_names_refused(value: str) -> None:
    """Client names double as directory names: lowercase, short, no dots or separators."""
    with pytest.raises(InvalidName):
        validate_client_name(value)
