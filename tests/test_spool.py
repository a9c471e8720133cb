"""The local spool: backup file names."""

from __future__ import annotations

from datetime import datetime

from mt5backupd.backup.spool import backup_stem


def test_backup_stem_legacy_pattern_in_utc() -> None:
    """Names follow the legacy mt5_trading-YYYYMMDD-HHMMSS pattern, in UTC."""
    from zoneinfo import ZoneInfo

    local = datetime(2026, 11, 25, 5, 0, 7, tzinfo=ZoneInfo("Europe/Athens"))
    assert backup_stem("mt5_trading", local) == "mt5_trading-20261125-030007"
