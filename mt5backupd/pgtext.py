"""SQL text built from names we are given (database and role names): quoted, never pasted."""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """An SQL identifier in double quotes, so a database or role name cannot inject SQL."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """An SQL string literal (standard_conforming_strings is on by default since 9.1)."""
    return "'" + value.replace("'", "''") + "'"
