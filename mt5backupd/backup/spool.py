"""Local backup files: the growing spool file, atomic publication, sidecar, manifest, rotation.

Nothing incomplete carries a final name: bytes go to ``<dir>/.partial/<file>`` and reach
``<dir>/<file>`` by one rename after pg_dump succeeded, the file was fsynced and pg_restore read it.
The manifest ``<dir>/<stem>.json`` is written last, so a backup "exists" exactly when its manifest
does; listing, rotation and upload-pending all go by manifests.

A backup's id is its file name (``mt5_trading-20261125-030000.dump.zst``), the same id the
receiver gives it; the manifest keeps the name it always had, the id without its suffix
(``mt5_trading-20261125-030000.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mt5backupd.backup.upload_state import UploadState
from mt5backupd.errors import Mt5BackupError
from mt5backupd.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, is_disk_full
from mt5backupd.names import SIDECAR_SUFFIX
from mt5backupd.records import sidecar_line

PARTIAL_DIR = ".partial"
MANIFEST_SUFFIX = ".json"
KIND_DATABASE = "database"
KIND_REPOSITORY = "repository"
# the end of a generated stem: -YYYYMMDD-HHMMSS, maybe -n, then the file suffix
_STEM_END = re.compile(r"-\d{8}-\d{6}(?:-\d+)?(?=\.)")


class LocalDiskFull(Mt5BackupError):
    pass


def backup_stem(prefix: str, when: datetime) -> str:
    """``mt5_trading-20261125-030000`` (UTC, so DST never makes two runs share a name): the
    id without its file suffix, and the name of the manifest."""
    return f"{prefix}-{when.astimezone(UTC):%Y%m%d-%H%M%S}"


def stem_of(backup_id: str) -> str:
    """``mt5_trading-20261125-030000`` of ``mt5_trading-20261125-030000.dump.zst`` (pure)."""
    ends = list(_STEM_END.finditer(backup_id))
    if ends:
        return backup_id[:ends[-1].end()]
    return backup_id.split(".", 1)[0] or backup_id  # not a name we generate: up to its suffix


def unique_backup_name(directory: Path, prefix: str, when: datetime, suffix: str,
                       taken_remotely: frozenset[str] = frozenset()) -> str:
    """The new backup's id (its file name): ``backup_stem`` + ``suffix``, with ``-1``,
    ``-2``... when a run in the same second already took it, here or (``taken_remotely``) on
    the receiver."""
    base = candidate = backup_stem(prefix, when)
    n = 0
    while (manifest_path(directory, candidate + suffix).exists()
           or (directory / f"{candidate}{suffix}").exists()
           or f"{candidate}{suffix}" in taken_remotely):
        n += 1
        candidate = f"{base}-{n}"
    return candidate + suffix


class SpoolFile:
    """The file being written. ``write`` runs in the pump thread; everyone else reads ``size``."""

    def __init__(self, directory: Path, file_name: str,
                 on_write: Callable[[], None] | None = None) -> None:
        partial = directory / PARTIAL_DIR
        partial.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = partial / file_name
        self.partial_path = self.path  # never changes: discard() may only ever remove this
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._hasher = hashlib.sha256()
        self.on_write = on_write  # called in the writer thread after each write
        self.size = 0

    def write(self, data: bytes | bytearray) -> int:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            if is_disk_full(exc):
                raise LocalDiskFull(f"local disk full writing {self.path}") from None
            raise
        self._hasher.update(data)
        self.size += len(data)
        if self.on_write is not None:
            self.on_write()
        return len(data)

    @property
    def sha256(self) -> str:
        return self._hasher.hexdigest()

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            if is_disk_full(exc):
                raise LocalDiskFull(f"local disk full syncing {self.path}") from None
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.partial_path.unlink()

    def publish(self, final_path: Path) -> None:
        """Rename into place (after sync + verification) and make the rename durable."""
        self.close()
        os.link(self.path, final_path)  # unlike rename, never replaces an existing backup
        self.path.unlink()
        fsync_dir(final_path.parent)
        self.path = final_path


@dataclass
class Manifest:
    id: str  # == file: the one backup id (older manifests said the stem; loading fixes that)
    file: str
    kind: str
    database: str
    size: int
    sha256: str
    compression: str
    started: str
    finished: str
    duration_s: float
    dump_duration_s: float
    raw_bytes: int
    pg_dump_version: str = ""
    server_version: str = ""
    size_anomaly: bool = False
    upload: UploadState = field(default_factory=UploadState.pending)
    extra: dict[str, Any] = field(default_factory=dict)
    # {"format": "age-encryption.org/v1", "recipients": [...]}; empty: not encrypted
    encryption: dict[str, Any] = field(default_factory=dict)

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.started)

    @property
    def encrypted(self) -> bool:
        return bool(self.encryption)

    @property
    def recipients(self) -> list[str]:
        return [str(r) for r in self.encryption.get("recipients", [])]

    @property
    def pending(self) -> bool:
        return self.upload.is_pending

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"manifest_version": 1}
        for name in self.__dataclass_fields__:
            data[name] = getattr(self, name)
        data["upload"] = self.upload.to_json()
        if not self.encryption:  # an unencrypted backup's manifest is what it always was
            del data["encryption"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in data.items() if k in known}
        fields["upload"] = UploadState.from_json(data.get("upload"))
        fields["id"] = str(data["file"])  # the id is the file name, also in older manifests
        return cls(**fields)


def upload_metadata(manifest: Manifest) -> dict[str, Any]:
    """What the receiver stores with a backup, by kind: the one builder, for the live run and
    for a late upload alike."""
    metadata: dict[str, Any] = {"kind": manifest.kind, "started": manifest.started,
                                "compression": manifest.compression}
    if manifest.kind == KIND_DATABASE:
        metadata.update(database=manifest.database, pg_dump_version=manifest.pg_dump_version,
                        server_version=manifest.server_version)
    if "path" in manifest.extra:
        metadata["path"] = manifest.extra["path"]
    if "wal" in manifest.extra:  # a WAL object's segment and time: what a remote PITR plans by
        metadata["wal"] = manifest.extra["wal"]
    if manifest.encryption:
        metadata["encryption"] = manifest.encryption
    return metadata


def publish(spooled: SpoolFile, final: Path, manifest: Manifest, directory: Path) -> None:
    """File, then sidecar, then manifest (from which point the backup exists). If any step
    fails (a full disk, typically) whatever was published is removed again."""
    try:
        try:
            spooled.publish(final)
        except FileExistsError:
            # the name is another backup's: leave that one alone, only ours goes
            spooled.discard()
            raise
        write_sidecar(final, manifest.sha256)
        save_manifest(directory, manifest)
    except FileExistsError:
        raise
    except OSError as exc:
        remove_backup(directory, manifest)
        spooled.discard()
        if is_disk_full(exc):
            raise LocalDiskFull(f"local disk full publishing {final.name}") from None
        raise


def manifest_path(directory: Path, backup_id: str) -> Path:
    return directory / f"{stem_of(backup_id)}{MANIFEST_SUFFIX}"


def write_sidecar(final_path: Path, sha256: str) -> Path:
    """``<sha256>  <file>`` next to the file: ``sha256sum -c`` accepts it as is."""
    sidecar = final_path.with_name(final_path.name + SIDECAR_SUFFIX)
    atomic_write_bytes(sidecar, sidecar_line(sha256, final_path.name).encode(), mode=0o640)
    return sidecar


def save_manifest(directory: Path, manifest: Manifest) -> None:
    atomic_write_json(manifest_path(directory, manifest.id), manifest.to_json(), mode=0o640)


def load_manifests(directory: Path, kind: str | None = None) -> list[Manifest]:
    """Every complete backup in ``directory``, oldest first."""
    found: list[Manifest] = []
    if not directory.is_dir():
        return found
    for path in directory.glob(f"*{MANIFEST_SUFFIX}"):
        if path.name.startswith("."):
            continue
        try:
            manifest = Manifest.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            continue  # removed since the listing (rotation or WAL pruning in another task)
        except (ValueError, TypeError, KeyError):
            continue  # not one of ours
        if kind is None or manifest.kind == kind:
            found.append(manifest)
    return sorted(found, key=lambda m: (m.started, m.id))


def remove_backup(directory: Path, manifest: Manifest) -> None:
    """Data and sidecar first, manifest last: a crash midway leaves a visible loss, not a
    hidden one."""
    data = directory / manifest.file
    for path in (data.with_name(data.name + SIDECAR_SUFFIX), data):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(FileNotFoundError):
        manifest_path(directory, manifest.id).unlink()
    fsync_dir(directory)


def clean_partials(directory: Path) -> int:
    """Remove leftovers of runs that died (the lock guarantees none is running)."""
    partial = directory / PARTIAL_DIR
    removed = 0
    if partial.is_dir():
        for leftover in partial.iterdir():
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                leftover.unlink()
                removed += 1
    return removed
