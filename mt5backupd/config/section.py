"""Typed reading of one TOML table: every error names the file and the key, unknown keys are
errors (a typo in a backup config must never silently fall back to a default)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from mt5backupd.errors import ConfigError

T = TypeVar("T")


class Section:
    """Typed access to one TOML table; remembers which keys were read to reject unknown ones."""

    def __init__(self, where: str, name: str, table: Mapping[str, Any]) -> None:
        self.where = where
        self.name = name
        self.table = table
        self.seen: set[str] = set()

    def error(self, key: str, msg: str) -> ConfigError:
        """``FILE: [section] key: msg``."""
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
            raise self.error(key, f"expected {kind.__name__}, got {type(value).__name__} "
                             f"{value!r}")
        return value

    def opt_str(self, key: str) -> str | None:
        self.seen.add(key)
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"expected string, got {type(value).__name__}")
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
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def float_min(self, key: str, default: float, minimum: float) -> float:
        value = self.get(key, float, default)
        if value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def str_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "expected a list of strings")
        return tuple(value)

    def sub(self, key: str) -> Section:
        self.seen.add(key)
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "expected a table")
        return Section(self.where, f"{self.name}.{key}" if self.name else key, value)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def parse_listen(value: str, where: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` -> (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104
    return host, int(port_s)
