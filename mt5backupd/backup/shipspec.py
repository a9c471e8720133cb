"""What one run of a kind makes and how it is checked (database dump, repository archive).

Everything else (spool, upload, publication, rotation) is the same for every kind and lives in
``run``. A spec's generated names are held to the receiver's id rules before anything runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyrage import x25519

from mt5backupd.backup import spool
from mt5backupd.backup.compress import Writable
from mt5backupd.errors import ConfigError
from mt5backupd.names import InvalidName, validate_backup_id


@dataclass
class ProduceStats:
    raw_bytes: int  # bytes before our compression (pg_dump's output, the tar stream)
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)  # into the manifest's "extra"


@dataclass
class ShipSpec:
    kind: str
    prefix: str  # backup name prefix (the database name, "repository")
    suffix: str  # file suffix (.dump.zst, .tar.zst, ...)
    compression: str  # as recorded in the manifest
    keep: int
    produce: Callable[[Writable], Awaitable[ProduceStats]]  # into the spool (maybe via age)
    # read the stored file back; the identities open it when it is encrypted
    verify: Callable[[Path, Sequence[x25519.Identity]], Awaitable[None]]
    describe: str  # "mt5_trading" / "/srv/trading-repo" for the log line
    manifest_fields: dict[str, Any] = field(default_factory=dict)  # Manifest attributes
    # A fixed id stem instead of ``prefix-<time>`` (WAL objects are named by their segment);
    # keep = 0 then means no rotation by count (WAL is pruned with the base backups).
    name: str | None = None
    # when the run began, if before its spec (pg_dump started ahead of the preflight): the
    # backup's time and the run's duration then count from there, not from the spool file
    began: tuple[datetime, float] | None = None  # (wall clock, time.monotonic())


# the longest name a run can generate from a prefix: a stem with a same-second counter
_SAMPLE_TIME = datetime(2000, 1, 1, tzinfo=UTC)
_SAMPLE_COUNTER = "-999"


def check_generated_names(prefix: str, suffix: str, config_key: str) -> None:
    """Refuse, as a config error naming ``config_key``, a prefix whose backup ids the receiver
    would refuse (it holds every id to ``names.validate_backup_id``): better before the dump
    than as an upload that can never succeed."""
    sample = spool.backup_stem(prefix, _SAMPLE_TIME) + _SAMPLE_COUNTER + suffix
    try:
        validate_backup_id(sample)
    except InvalidName as exc:
        raise ConfigError(f"{config_key} {prefix!r} gives backup names like {sample!r} that "
                          f"are not valid backup ids: {exc}") from None
