"""Ship what pg_receivewal received: finished segments, and snapshots of the growing one.

Every object goes through ``backup.run.ship`` (zstd, age when configured, sha256, spool file,
resumable upload, commit), into its own spool directory ``<local dir>/wal/shipped`` whose
manifests are the record of what was shipped: a restart reads them and neither loses nor
repeats an object. Order is kept: while an older object is pending (receiver away), newer ones
are stored locally as pending too and uploaded oldest first when it is back. Local receiving
never waits for any of this: pg_receivewal writes its own directory, the shipper only reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import zstandard
from loguru import logger
from pyrage import x25519

from mt5backupd.backup import spool
from mt5backupd.backup.compress import Writable
from mt5backupd.backup.encryption import is_age_file, plain_reader
from mt5backupd.backup.pending import upload_pending
from mt5backupd.backup.remote import settle_orphans
from mt5backupd.backup.run import ship
from mt5backupd.backup.shipspec import ProduceStats, ShipSpec
from mt5backupd.backup.upload import ReceiverClient
from mt5backupd.config import Config
from mt5backupd.errors import Mt5BackupError
from mt5backupd.fsutil import atomic_write_bytes
from mt5backupd.retention import BaseItem, select_base_rotation
from mt5backupd.walnames import (
    DEFAULT_SEGMENT_BYTES,
    OBJECT_SUFFIX,
    SEGMENT_RE,
    data_end,
    next_segment,
    parse_lsn,
    segment_number,
)

KIND = "wal"
PRUNED_BELOW_FILE = ".pruned-below"  # segment number: older WAL was pruned, never ship it again
ZSTD_LEVEL = 1
BATCH_BYTES = 1024 * 1024
PARTIAL_SUFFIX = ".partial"


def received_dir(cfg: Config) -> Path:
    """Where pg_receivewal writes (raw segments and the growing ``.partial``)."""
    return cfg.local.dir / "wal" / "received"


def shipped_dir(cfg: Config) -> Path:
    """The WAL spool: compressed objects, their sidecars and manifests."""
    return cfg.local.dir / "wal" / "shipped"


def shipping_config(cfg: Config) -> Config:
    """The config ``ship`` and ``upload_pending`` get: the WAL spool as the local directory."""
    return dataclasses.replace(cfg, local=dataclasses.replace(cfg.local, dir=shipped_dir(cfg)))


def wal_spec(segment: str, data: bytes, upto: int | None, received_at: float) -> ShipSpec:
    """One WAL object: the whole segment file's bytes (a snapshot of a growing one holds WAL
    up to ``upto`` and zeros after), zstd-compressed, read back and compared before it counts."""
    raw_sha256 = hashlib.sha256(data).hexdigest()
    # known before the bytes, so it travels in the upload's metadata too (remote restores)
    about = {"segment": segment, "upto": len(data) if upto is None else upto,
             "partial": upto is not None,
             "received_at": datetime.fromtimestamp(received_at, UTC).isoformat()}

    async def produce(sink: Writable) -> ProduceStats:
        def work() -> int:
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
            view = memoryview(data)
            with cctx.stream_writer(cast("IO[bytes]", sink), closefd=False) as writer:
                for i in range(0, len(view), BATCH_BYTES):
                    writer.write(view[i:i + BATCH_BYTES])
            return len(data)

        t0 = time.monotonic()
        raw = await asyncio.get_running_loop().run_in_executor(None, work)
        return ProduceStats(raw, time.monotonic() - t0, {"wal": {**about,
                                                                 "raw_sha256": raw_sha256}})

    async def verify(path: Path, identities: Sequence[x25519.Identity]) -> None:
        plain = await asyncio.get_running_loop().run_in_executor(None, read_plain, path,
                                                                 identities)
        if hashlib.sha256(plain).hexdigest() != raw_sha256:
            raise Mt5BackupError(f"WAL object {path.name} does not read back as what was read")

    return ShipSpec(kind=KIND, prefix=segment, suffix=OBJECT_SUFFIX,
                    compression=f"zstd:{ZSTD_LEVEL}", keep=0, produce=produce, verify=verify,
                    describe=f"WAL {segment}" + ("" if upto is None else f" up to {upto}"),
                    name=segment if upto is None else f"{segment}-p{upto}",
                    manifest_fields={"extra": {"wal": about}})


def read_plain(path: Path, identities: Sequence[x25519.Identity] = ()) -> bytes:
    """Blocking: a stored WAL object's segment bytes (age opened, zstd decoded)."""
    if is_age_file(path):
        with plain_reader(path, identities) as plain:
            return plain.read()
    with path.open("rb") as raw:
        return zstandard.ZstdDecompressor().stream_reader(raw).read()


@dataclass
class ShippedIndex:
    """What the WAL spool's manifests say was shipped (stored locally; maybe upload pending)."""

    full: set[str]  # segments shipped whole
    upto: dict[str, int]  # segment -> furthest snapshot
    newest_received_at: str  # the newest WAL shipped: its "received_at"
    newest_uploaded_at: str  # ... of those the receiver has
    pending: int
    oldest_pending_at: str = ""  # the oldest WAL waiting for its upload: its "received_at"
    pending_error: str = ""  # ... and why its upload did not happen

    @classmethod
    def load(cls, directory: Path) -> ShippedIndex:
        index = cls(set(), {}, "", "", 0)
        for m in spool.load_manifests(directory, KIND):
            wal = m.extra.get("wal", {})
            segment, received = str(wal.get("segment", "")), str(wal.get("received_at", ""))
            if wal.get("partial"):
                index.upto[segment] = max(index.upto.get(segment, 0), int(wal.get("upto", 0)))
            else:
                index.full.add(segment)
            index.newest_received_at = max(index.newest_received_at, received)
            if m.upload.state == "uploaded":
                index.newest_uploaded_at = max(index.newest_uploaded_at, received)
            index.pending += m.pending
            if m.pending and received and (not index.oldest_pending_at
                                           or received < index.oldest_pending_at):
                index.oldest_pending_at = received
                index.pending_error = m.upload.error or ""
        return index


class WalShipper:
    """One round at a time (``ship_round``), called by the service every ``max_lag_s`` / 2."""

    def __init__(self, cfg: Config, client: ReceiverClient | None) -> None:
        self.cfg = cfg
        self.client = client
        self.received = received_dir(cfg)
        self.shipped = shipped_dir(cfg)
        self.shipping_cfg = shipping_config(cfg)
        self.receiver_ok = False
        self.last_error = ""  # why the receiver could not take WAL last time ("" when it did)
        self._settled = False
        self.last_round_ok = True

    async def _remote_ready(self) -> bool:
        """The receiver answers and nothing older is still pending: new objects may go up."""
        if self.client is None:
            return False
        try:
            await self.client.health()
            if not self._settled:
                await settle_orphans(self.client, self.shipped)  # sessions of a killed run
                self._settled = True
            _done, left = await upload_pending(self.client, self.shipping_cfg)
        except Mt5BackupError as exc:
            if self.receiver_ok:
                logger.warning("receiver unavailable for WAL; storing it locally: {}", exc)
            self.receiver_ok = False
            self.last_error = str(exc)
            return False
        self.receiver_ok = True
        self.last_error = ""
        return left == 0

    async def ship_round(self) -> ShippedIndex:
        """Ship every finished segment not shipped yet (in order), then a snapshot of the
        growing segment if it holds more WAL than the last snapshot; tidy the raw directory."""
        self.shipped.mkdir(parents=True, exist_ok=True, mode=0o750)
        # directory scans and the manifests (thousands with days of WAL) are read in a thread:
        # this runs every max_lag_s/2 on the loop that also serves /metrics and the watchdog
        if await asyncio.to_thread(spool.clean_partials, self.shipped):
            logger.warning("removed leftovers of an interrupted WAL shipment")
        remote_ok = await self._remote_ready()
        index = await asyncio.to_thread(ShippedIndex.load, self.shipped)
        finished = await asyncio.to_thread(self._finished_segments)
        floor = pruned_below(self.shipped)
        in_order = True
        for path in finished:
            if path.name in index.full or segment_number(path.name)[1] < floor:
                continue
            in_order, remote_ok = await self._ship_file(path, path.name, None, remote_ok)
            if not in_order:  # never ship N+1 past a failed N: the next round retries N first
                break
        partials = sorted(p for p in self.received.glob(f"*{PARTIAL_SUFFIX}")
                          if SEGMENT_RE.fullmatch(p.name[:-len(PARTIAL_SUFFIX)])) \
            if self.received.is_dir() else []
        if partials and in_order:
            path = partials[-1]
            segment = path.name[:-len(PARTIAL_SUFFIX)]
            if segment not in index.full:
                _done, remote_ok = await self._ship_file(path, segment,
                                                         index.upto.get(segment, 0), remote_ok)
        index = await asyncio.to_thread(ShippedIndex.load, self.shipped)
        await asyncio.to_thread(self._tidy, index, finished)
        return index

    def _finished_segments(self) -> list[Path]:
        if not self.received.is_dir():
            return []
        return sorted(p for p in self.received.iterdir() if SEGMENT_RE.fullmatch(p.name))

    async def _ship_file(self, path: Path, segment: str, shipped_upto: int | None,
                         remote_ok: bool) -> tuple[bool, bool]:
        """Ship ``path`` (a snapshot when ``shipped_upto`` is given and the file holds more than
        it). Returns (stored locally or nothing to do, whether the receiver still takes
        uploads)."""
        try:
            # a finished segment holds what was received by its last write; a snapshot what
            # was received by the time it was read (mtime is coarse: it can lag a commit)
            received_at = path.stat().st_mtime if shipped_upto is None else time.time()
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:  # renamed (partial -> finished) under us: the next round
            return True, remote_ok
        upto = None
        if shipped_upto is not None:
            upto = data_end(data)
            if upto <= shipped_upto:
                return True, remote_ok
        result = await ship(self.shipping_cfg, self.client if remote_ok else None,
                            wal_spec(segment, data, upto, received_at))
        if not result.ok:
            self.last_round_ok = False
            logger.error("shipping WAL {} failed: {}", segment, result.error)
            return False, remote_ok
        return True, remote_ok and result.upload_state != "pending"

    def _tidy(self, index: ShippedIndex, finished: list[Path]) -> None:
        """Snapshots of a segment shipped whole are obsolete locally; raw finished segments
        whose object is stored are removed, but the newest stays (pg_receivewal resumes from
        the newest segment it finds)."""
        for m in spool.load_manifests(self.shipped, KIND):
            wal = m.extra.get("wal", {})
            if wal.get("partial") and wal.get("segment") in index.full:
                spool.remove_backup(self.shipped, m)
        floor = pruned_below(self.shipped)
        for path in finished[:-1]:
            if path.name in index.full or segment_number(path.name)[1] < floor:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def pruned_below(directory: Path) -> int:
    """The segment number WAL was pruned below (0: never pruned)."""
    try:
        return int((directory / PRUNED_BELOW_FILE).read_text().strip())
    except (OSError, ValueError):
        return 0


def chain_complete(wal: dict[str, Any], index: ShippedIndex) -> bool:
    """Whether the WAL a base backup needs (its manifest's ``extra.wal``) is all stored."""
    try:
        segment, end = str(wal["start_segment"]), str(wal["end_segment"])
        segment_bytes = int(wal.get("segment_bytes", DEFAULT_SEGMENT_BYTES))
        end_offset = parse_lsn(str(wal["end_lsn"])) % segment_bytes
    except (KeyError, ValueError, TypeError):
        return False
    while segment < end:
        if segment not in index.full:
            return False
        segment = next_segment(segment, segment_bytes)
    return end in index.full or index.upto.get(end, 0) >= end_offset


def rotate_bases(cfg: Config) -> list[str]:
    """Local base rotation by ``[wal] keep_base``, never away the newest base whose WAL chain
    is complete (``retention.select_base_rotation``)."""
    index = ShippedIndex.load(shipped_dir(cfg))
    bases = spool.load_manifests(cfg.local.dir, "base")
    by_id = {m.id: m for m in bases}
    doomed = select_base_rotation(
        [BaseItem(m.id, m.created, m.pending, chain_complete(m.extra.get("wal", {}), index))
         for m in bases], cfg.wal.keep_base)
    for backup_id in doomed:
        spool.remove_backup(cfg.local.dir, by_id[backup_id])
        logger.info("rotated out local base backup {}", backup_id)
    return doomed


def prune_shipped(cfg: Config) -> list[str]:
    """Local WAL goes with the local base backups: remove the stored WAL objects of segments
    before the oldest local base's start segment (no local base: nothing). A pending one stays
    until uploaded: the receiver may keep older base backups that still need it."""
    starts = [m.extra.get("wal", {}).get("start_segment") for m in
              spool.load_manifests(cfg.local.dir, "base")]
    numbers = [segment_number(s)[1] for s in starts if isinstance(s, str) and s]
    if not numbers:
        return []
    oldest, directory, removed = min(numbers), shipped_dir(cfg), []
    # Never past WAL not shipped yet (shipping behind, receiver away): the receiver may keep
    # older base backups that need it, and below the floor it would be neither shipped nor kept.
    # (Below the previous floor a raw file is the newest one pg_receivewal resumes from, its
    # object already shipped and pruned: not "unshipped".)
    shipped = ShippedIndex.load(directory).full if directory.is_dir() else set()
    previous_floor = pruned_below(directory) if directory.is_dir() else 0
    raw = received_dir(cfg)
    if raw.is_dir():
        unshipped = [number for p in raw.iterdir()
                     if SEGMENT_RE.fullmatch(p.name) and p.name not in shipped
                     and (number := segment_number(p.name)[1]) >= previous_floor]
        oldest = min([oldest, *unshipped])
    # first the floor, so a shipping round cannot re-ship a raw segment pruned below it
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    atomic_write_bytes(directory / PRUNED_BELOW_FILE, f"{oldest}\n".encode(), mode=0o640)
    for m in spool.load_manifests(directory, KIND):
        segment = str(m.extra.get("wal", {}).get("segment", ""))
        if SEGMENT_RE.fullmatch(segment) and segment_number(segment)[1] < oldest \
                and not m.pending:
            spool.remove_backup(directory, m)
            removed.append(m.id)
    if removed:
        logger.info("pruned {} local WAL object(s) older than the oldest base backup",
                    len(removed))
    return removed


def status_fields(index: ShippedIndex) -> dict[str, Any]:
    return {"newest_shipped_received_at": index.newest_received_at,
            "newest_uploaded_received_at": index.newest_uploaded_at, "pending": index.pending,
            "oldest_pending_received_at": index.oldest_pending_at,
            "pending_error": index.pending_error}
