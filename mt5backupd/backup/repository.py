"""The weekly archive of the trading repository (legacy backup-full-repo.sh): its spec."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from pyrage import x25519

from mt5backupd.backup import archive, spool
from mt5backupd.backup.compress import Writable
from mt5backupd.backup.shipspec import ProduceStats, ShipSpec, check_generated_names
from mt5backupd.config import RepositoryConfig
from mt5backupd.errors import ConfigError

KIND = spool.KIND_REPOSITORY
PREFIX = "repository"
SUFFIX = ".tar.zst"


def repository_spec(repo: RepositoryConfig) -> ShipSpec:
    """The spec of one tar.zst of [repository] path; checks the path first."""
    if repo.path is None or not repo.path.is_dir():
        raise ConfigError(f"[repository] path {repo.path}: not a directory")
    check_generated_names(PREFIX, SUFFIX, "repository prefix")
    root = repo.path

    async def produce(spooled: Writable) -> ProduceStats:
        t0 = time.monotonic()
        raw = await asyncio.get_running_loop().run_in_executor(
            None, archive.write_tar, root, repo.exclude, spooled, repo.compression_level)
        return ProduceStats(raw, time.monotonic() - t0)

    async def verify(path: Path, identities: Sequence[x25519.Identity]) -> None:
        await asyncio.get_running_loop().run_in_executor(None, archive.check_tar, path,
                                                         identities)

    return ShipSpec(kind=KIND, prefix=PREFIX, suffix=SUFFIX,
                    compression=f"zstd:{repo.compression_level}", keep=repo.keep,
                    produce=produce, verify=verify, describe=str(root),
                    manifest_fields={"extra": {"path": str(root),
                                               "exclude": list(repo.exclude)}})
