"""The base backup's spec (kind ``base``): ``pg_basebackup -Ft -D - -X none`` through the pipeline.

Why ``-X none``: the WAL a base backup needs (from its start to its end LSN) is streamed and
shipped by pg_receivewal through the replication slot anyway, so including it would store it
twice; ``-X stream`` cannot write to stdout at all, and ``-X fetch`` may find the WAL already
recycled on a busy server. The range it needs is read from the ``backup_manifest`` member as the
tar streams by and recorded in the manifest (``extra.wal``), so restore fetches exactly those
segments and refuses when one is missing. A base backup without streamed WAL could not be
restored, so the job refuses to run unless ``[wal] enabled``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import zstandard
from pyrage import x25519

from mt5backupd.backup import compress
from mt5backupd.backup.archive import check_tar
from mt5backupd.backup.childenv import pg_child_env
from mt5backupd.backup.database import connect_db
from mt5backupd.backup.dump import run_dump, tool_version
from mt5backupd.backup.shipspec import ProduceStats, ShipSpec, check_generated_names
from mt5backupd.backup.tarwatch import TarWatcher
from mt5backupd.config import Config, Secret
from mt5backupd.errors import ConfigError, Mt5BackupError
from mt5backupd.walnames import format_lsn, parse_lsn, segment_name

KIND = "base"
PREFIX = "base"
SUFFIX = ".tar.zst"
ZSTD_LEVEL = 1  # the data directory compresses well at 1; higher levels cost CPU on the primary
MANIFEST_MEMBER = "backup_manifest"


def pg_basebackup_argv(binary: str) -> list[str]:
    # --checkpoint=fast: the backup starts now instead of after the next spread checkpoint
    return [binary, "--format=tar", "--pgdata=-", "--wal-method=none", "--checkpoint=fast",
            "--no-password", "--label=mt5backupd"]


def wal_range(manifest_bytes: bytes, segment_bytes: int) -> dict[str, Any]:
    """The WAL a base backup needs, from its ``backup_manifest`` (pure): timeline, start and
    end LSN and the segments holding them."""
    try:
        ranges = json.loads(manifest_bytes)["WAL-Ranges"]
        first, last = ranges[0], ranges[-1]
        timeline = int(last["Timeline"])
        start, end = parse_lsn(first["Start-LSN"]), parse_lsn(last["End-LSN"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise Mt5BackupError(f"pg_basebackup's backup_manifest has no usable WAL-Ranges: "
                             f"{exc}") from None
    return {"timeline": timeline, "start_lsn": format_lsn(start), "end_lsn": format_lsn(end),
            "start_segment": segment_name(int(first["Timeline"]), start, segment_bytes),
            "end_segment": segment_name(timeline, end, segment_bytes),
            "segment_bytes": segment_bytes}


async def base_spec(cfg: Config, password: Secret | None) -> ShipSpec:
    """Preflight (the server's segment size, pg_basebackup's version), then the spec."""
    if not cfg.wal.enabled:
        raise ConfigError("[wal] enabled is false: a base backup without streamed WAL cannot "
                          "be restored; enable [wal] first")
    db = cfg.database
    check_generated_names(PREFIX, SUFFIX, "base prefix")
    _major, version = await tool_version(cfg.wal.pg_basebackup, "[wal] pg_basebackup")
    conn = await connect_db(db, password, db.dbname)
    try:
        segment_bytes = int(await conn.fetchval(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'"))
        server_version = str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()

    async def produce(sink: compress.Writable) -> ProduceStats:
        watcher = TarWatcher((MANIFEST_MEMBER,))

        def pump(source: compress.ReadSource, on_read: Callable[[int], None]) -> int:
            raw = 0
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
            with cctx.stream_writer(cast("IO[bytes]", sink), write_size=compress.READ_BYTES,
                                    closefd=False) as writer:
                for batch in compress.read_batches(source, on_read):
                    raw += len(batch)
                    watcher.feed(batch)
                    writer.write(batch)
            return raw

        t0 = time.monotonic()
        with pg_child_env(db, password) as env:
            stats = await run_dump(pg_basebackup_argv(cfg.wal.pg_basebackup), env, pump,
                                   stall_timeout_s=db.stall_timeout_s, tool="pg_basebackup")
        if MANIFEST_MEMBER not in watcher.files:
            raise Mt5BackupError("pg_basebackup's stream has no backup_manifest member")
        wal = wal_range(watcher.files[MANIFEST_MEMBER], segment_bytes)
        # recovery is consistent from the end LSN on: this is the earliest restorable time
        wal["end_time"] = datetime.now(UTC).isoformat()
        return ProduceStats(stats.raw_bytes, time.monotonic() - t0, {"wal": wal})

    async def verify(path: Path, identities: Sequence[x25519.Identity]) -> None:
        await asyncio.get_running_loop().run_in_executor(None, check_tar, path, identities)

    return ShipSpec(kind=KIND, prefix=PREFIX, suffix=SUFFIX, compression=f"zstd:{ZSTD_LEVEL}",
                    # keep=0: no rotation by count here; wal.shipper.rotate_bases rotates
                    # after the run, never away the newest base whose WAL chain is complete
                    keep=0, produce=produce, verify=verify,
                    describe=f"pg_basebackup of {db.host or 'local'}:{db.port or 5432}",
                    manifest_fields={"database": "", "pg_dump_version": version,
                                     "server_version": server_version})



