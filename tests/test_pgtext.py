"""The shared PostgreSQL text helpers: SQL quoting of given names, pg_restore's failure line."""

from __future__ import annotations

import pytest

from mt5backupd.backup.pgrestore import failure_reason
from mt5backupd.pgtext import quote_ident, quote_literal


@pytest.mark.parametrize(
    ("name", "ident", "literal"),
    [
        ("mt5_trading", '"mt5_trading"', "'mt5_trading'"),
        ('a"; DROP DATABASE x; --', '"a""; DROP DATABASE x; --"', "'a\"; DROP DATABASE x; --'"),
        ("it's", '"it\'s"', "'it''s'"),
        ("", '""', "''"),
    ],
)
def test_quoting(name: str, ident: str, literal: str) -> None:
    """Quotes inside a name are doubled, so it stays one identifier or one literal."""
    assert quote_ident(name) == ident
    assert quote_literal(name) == literal


@pytest.mark.parametrize(
    ("returncode", "stderr", "reason"),
    [
        (1, "pg_restore: error: could not connect\nFATAL: no such database\n",
         "FATAL: no such database"),
        (1, "  single line  \n\n", "single line"),
        (1, "", "exit status 1"),
        (-9, " \n", "exit status -9"),
    ],
)
def test_failure_reason(returncode: int, stderr: str, reason: str) -> None:
    """The last stderr line says why pg_restore failed; with none, the exit status."""
    assert failure_reason(returncode, stderr) == reason
