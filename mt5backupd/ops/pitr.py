"""`mt5backupd restore ID|latest --pitr [--to-time T] --target-dir DIR`: a data directory that
``pg_ctl -D DIR start`` recovers to T and promotes.

Steps: the catalog (local manifests, or the receiver's list) -> the plan (``pitrplan``: window,
base, refusals) -> the base fetched, its sha256 proven, extracted into DIR -> the WAL range it
needs read from its own ``backup_manifest`` -> every WAL object of the chain fetched, its sha256
proven, decoded into ``DIR/pitr_wal/<segment>`` (the newest snapshot under its segment's name)
-> ``recovery.signal`` and the recovery settings in ``postgresql.auto.conf``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import zstandard
from loguru import logger
from pyrage import x25519

from mt5backupd.backup import spool
from mt5backupd.backup.basebackup import MANIFEST_MEMBER, wal_range
from mt5backupd.backup.encryption import NoIdentityError, is_age_file, plain_reader
from mt5backupd.backup.remote import receiver_client
from mt5backupd.backup.upload import ReceiverClient
from mt5backupd.config import Config
from mt5backupd.config.encryption import load_identities
from mt5backupd.errors import ChecksumMismatchError, ConfigError, Mt5BackupError
from mt5backupd.ops.listing import LATEST
from mt5backupd.ops.pitrplan import (
    BaseRef,
    PitrRefused,
    WalRef,
    choose_base,
    parse_target,
    wal_chain,
    window,
)
from mt5backupd.ops.restore import sha256_file
from mt5backupd.wal.shipper import read_plain, shipped_dir
from mt5backupd.walnames import DEFAULT_SEGMENT_BYTES, parse_object

WAL_SUBDIR = "pitr_wal"
DOWNLOAD_SUBDIR = ".mt5backupd-download"
WAL_FETCH_CONCURRENCY = 2


@dataclass
class Catalog:
    bases: list[BaseRef]
    wal: list[WalRef]
    paths: dict[str, Path] = field(default_factory=dict)  # local: id -> file
    segment_bytes: dict[str, int] = field(default_factory=dict)  # base id -> segment size


def _when(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def local_catalog(cfg: Config) -> Catalog:
    cat = Catalog([], [])
    for m in spool.load_manifests(cfg.local.dir, "base"):
        wal = m.extra.get("wal", {})
        cat.bases.append(BaseRef(m.id, m.sha256, _when(str(wal.get("end_time") or m.finished))))
        cat.paths[m.id] = cfg.local.dir / m.file
        cat.segment_bytes[m.id] = int(wal.get("segment_bytes", DEFAULT_SEGMENT_BYTES))
    directory = shipped_dir(cfg)
    for m in spool.load_manifests(directory, "wal"):
        wal = m.extra.get("wal", {})
        obj = parse_object(m.id)
        if obj is None:
            continue
        cat.wal.append(WalRef(m.id, m.sha256, obj.segment, obj.upto,
                              _when(str(wal.get("received_at") or m.started))))
        cat.paths[m.id] = directory / m.file
    return cat


async def remote_catalog(client: ReceiverClient) -> Catalog:
    cat = Catalog([], [])
    for r in await client.list_backups():
        if r.kind == "base":
            cat.bases.append(BaseRef(r.id, r.sha256, _when(r.created)))
        elif r.kind == "wal" and (obj := parse_object(r.id)) is not None:
            wal = r.metadata.get("wal")
            received = wal.get("received_at") if isinstance(wal, dict) else None
            cat.wal.append(WalRef(r.id, r.sha256, obj.segment, obj.upto,
                                  _when(str(received or r.metadata.get("started")
                                            or r.created))))
    return cat


async def window_line(cfg: Config, *, remote: bool) -> str:
    """`list`'s last line: base backups, WAL objects and the recoverable window."""
    if remote:
        client = receiver_client(cfg)
        if client is None:
            raise ConfigError("[remote] url is not set: there is no receiver to list")
        async with client:
            cat = await remote_catalog(client)
    else:
        cat = local_catalog(cfg)
    win = window(cat.bases, cat.wal)
    span = win.text() if win else "none (needs a base backup and shipped WAL)"
    return (f"point-in-time recovery: {len(cat.bases)} base backup(s), {len(cat.wal)} WAL "
            f"object(s); recoverable window {span}")


@dataclass
class PitrResult:
    base: str
    target_dir: Path
    target: datetime | None
    utc_assumed: bool
    wal_objects: int
    window: str
    duration_s: float
    last_segment: str = ""  # the newest WAL handed to recovery: its segment ...
    last_upto: int | None = None  # ... and how far its WAL reaches (None: the whole segment)
    segment_bytes: int = DEFAULT_SEGMENT_BYTES  # the cluster's WAL segment size

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "target_dir": str(self.target_dir),
                "target": self.target.isoformat() if self.target else "end of shipped WAL",
                "utc_assumed": self.utc_assumed, "wal_objects": self.wal_objects,
                "window": self.window, "duration_s": round(self.duration_s, 3)}

    def summary(self) -> str:
        target = (f"{self.target:%Y-%m-%d %H:%M:%S.%f} UTC"
                  f"{' (no zone given: UTC assumed)' if self.utc_assumed else ''}"
                  if self.target else "the end of the shipped WAL")
        return (f"restored base {self.base} + {self.wal_objects} WAL object(s) into "
                f"{self.target_dir} in {self.duration_s:.1f} s; recoverable window "
                f"{self.window}\nrecovery target: {target}\nstart it with: pg_ctl -D "
                f"{self.target_dir} start   (it recovers, then promotes; chown -R it to the "
                "postgres user first if you are root)")


def _check_target_dir(target_dir: Path) -> bool:
    """Refuse a non-empty target; make it (0700). Whether it was created here."""
    created = not target_dir.exists()
    if not created:
        if not target_dir.is_dir():
            raise PitrRefused(f"--target-dir {target_dir} exists and is not a directory")
        if any(target_dir.iterdir()):
            raise PitrRefused(f"--target-dir {target_dir} is not empty; restore into a new or "
                              "empty directory")
    target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target_dir.chmod(0o700)
    return created


def _undo_target_dir(target_dir: Path, created: bool) -> None:
    """Back to how the restore found it: gone if it made it, else empty."""
    if created:
        shutil.rmtree(target_dir, ignore_errors=True)
        return
    for entry in target_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _plain_stream(path: Path, identities: Sequence[x25519.Identity]) -> Any:
    if is_age_file(path):
        return plain_reader(path, identities)

    @contextlib.contextmanager
    def zstd_reader() -> Any:
        with path.open("rb") as raw:
            yield zstandard.ZstdDecompressor().stream_reader(raw, read_size=1024 * 1024)
    return zstd_reader()


def extract_base(path: Path, target_dir: Path, identities: Sequence[x25519.Identity]) -> None:
    """Blocking: the base backup's tar (age opened, zstd decoded) into ``target_dir``."""
    with _plain_stream(path, identities) as plain, \
            tarfile.open(fileobj=cast("IO[bytes]", plain), mode="r|") as tar:
        tar.extractall(target_dir, filter="data")


def recovery_settings(target_dir: Path, target: datetime | None) -> str:
    wal_dir = (target_dir / WAL_SUBDIR).resolve()
    lines = ["", "# written by mt5backupd restore --pitr",
             f"restore_command = 'cp \"{wal_dir}/%f\" \"%p\"'",
             "recovery_target_action = 'promote'"]
    if target is not None:
        lines.append(f"recovery_target_time = '{target.astimezone(UTC).isoformat(sep=' ')}'")
    return "\n".join(lines) + "\n"


async def restore_pitr(cfg: Config, ref: str, target_dir: Path, *, to_time: str | None,
                       source: str = "local",
                       identity_files: Sequence[Path] = ()) -> PitrResult:
    t0 = time.monotonic()
    target, utc_assumed = parse_target(to_time) if to_time else (None, False)
    identities = load_identities(cfg.encryption.identity_file, identity_files)
    client = receiver_client(cfg) if source == "remote" else None
    if source == "remote" and client is None:
        raise ConfigError("[remote] url is not set: there is no receiver to restore from")
    try:
        cat = await remote_catalog(client) if client is not None else local_catalog(cfg)
        if ref == LATEST:
            base = choose_base(cat.bases, cat.wal, target)
        else:
            named = [b for b in cat.bases if ref in (b.id, spool.stem_of(b.id))]
            if not named:
                raise PitrRefused(f"no base backup {ref!r} ({source}); "
                                  f"there are: {', '.join(b.id for b in cat.bases) or 'none'}")
            base = named[0]
            choose_base([base], cat.wal, target)  # the window check, for this base
        win = window(cat.bases, cat.wal)
        assert win is not None
        if (base.id.endswith(".age") or any(w.id.endswith(".age") for w in cat.wal)) \
                and not identities:
            raise NoIdentityError(f"{base.id} or its WAL is encrypted (age); give --identity "
                                  "PATH or set [encryption] identity_file; nothing was written")
        created = _check_target_dir(target_dir)
        try:
            chain = await _restore_into(cat, client, base, target_dir, target, identities)
        except BaseException:
            # a half-restored data directory must not be mistaken for a restore (started by
            # hand it would come up wrong or not at all): it was new or empty, so it is again
            await asyncio.to_thread(_undo_target_dir, target_dir, created)
            logger.error("PITR restore into {} failed; the directory was emptied", target_dir)
            raise
    finally:
        if client is not None:
            await client.close()
    logger.info("PITR restore of {} ready in {}", base.id, target_dir)
    return PitrResult(base.id, target_dir, target, utc_assumed, len(chain), win.text(),
                      time.monotonic() - t0, chain[-1].segment, chain[-1].upto,
                      cat.segment_bytes.get(base.id, DEFAULT_SEGMENT_BYTES))


async def _restore_into(cat: Catalog, client: ReceiverClient | None, base: BaseRef,
                        target_dir: Path, target: datetime | None,
                        identities: Sequence[x25519.Identity]) -> list[WalRef]:
    """Base, WAL and recovery settings into the (new or empty) ``target_dir``; the WAL chain."""
    staging = target_dir / DOWNLOAD_SUBDIR
    staging.mkdir(mode=0o700)
    base_path = await _fetch(cat, client, base.id, base.sha256, staging)
    logger.info("extracting base backup {} into {}", base.id, target_dir)
    await asyncio.to_thread(extract_base, base_path, target_dir, identities)
    manifest = (target_dir / MANIFEST_MEMBER).read_bytes()
    segment_bytes = cat.segment_bytes.get(base.id, DEFAULT_SEGMENT_BYTES)
    needs = wal_range(manifest, segment_bytes)
    chain = wal_chain(needs["start_segment"], needs["end_segment"], cat.wal, target,
                      segment_bytes)
    wal_dir = target_dir / WAL_SUBDIR
    wal_dir.mkdir(mode=0o700)
    # two at a time: hashing and decoding release the GIL, so both cores work (and two
    # 16 MiB segments is all the memory it takes)
    slots = asyncio.Semaphore(WAL_FETCH_CONCURRENCY)

    async def fetch_segment(obj: WalRef) -> None:
        async with slots:
            path = await _fetch(cat, client, obj.id, obj.sha256, staging)
            data = await asyncio.to_thread(read_plain, path, identities)
            await asyncio.to_thread((wal_dir / obj.segment).write_bytes, data)
            if client is not None:
                path.unlink()

    tasks = [asyncio.create_task(fetch_segment(obj)) for obj in chain]
    try:
        await asyncio.gather(*tasks)
    except BaseException:  # the first failure (a sha256 mismatch...) stops the rest
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    shutil.rmtree(staging)
    (target_dir / "recovery.signal").touch()
    with (target_dir / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
        conf.write(recovery_settings(target_dir, target))
    return chain


async def _fetch(cat: Catalog, client: ReceiverClient | None, object_id: str, sha256: str,
                 staging: Path) -> Path:
    """The object's file (downloaded when remote), its sha256 proven."""
    if client is not None:
        path = staging / object_id
        await client.download(object_id, path)
    else:
        path = cat.paths[object_id]
        if not path.exists():
            raise Mt5BackupError(f"{path}: file missing (its manifest exists)")
    actual = await asyncio.to_thread(sha256_file, path)
    if actual != sha256:
        raise ChecksumMismatchError(f"{object_id}: sha256 mismatch, expected {sha256}, got "
                                    f"{actual}; not restoring")
    return path
