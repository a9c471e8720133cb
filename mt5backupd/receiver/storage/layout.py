"""The directories under ``data_dir``, every path validated and confined to the root, safe
opens of what is there, and the free-space rule. The other storage parts build on this."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from loguru import logger

from mt5backupd.fsutil import free_bytes
from mt5backupd.names import (
    InvalidName,
    validate_backup_id,
    validate_client_name,
    validate_upload_id,
)
from mt5backupd.receiver.storage.errors import BadEntry, InsufficientStorage, InvalidId, NotFound

MAX_METADATA_BYTES = 16 * 1024
# A meta.json or session description is small; a bigger one is not ours (never read it whole).
MAX_RECORD_FILE_BYTES = 4 * MAX_METADATA_BYTES + 64 * 1024
ONESHOT_PREFIX = "oneshot-"
MAX_WARNED_ENTRIES = 10_000
AREAS = ("backups", "partial", "staging", "trash")


def open_regular(path: Path) -> int:
    """An fd for reading ``path``: never through a symlink (O_NOFOLLOW on the last component),
    never blocking on a FIFO, and only a regular file. Raises BadEntry otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP (a symlink), EACCES, ENXIO ...
        raise BadEntry(f"cannot open ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadEntry("not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small_json(path: Path) -> Any:
    """The JSON in a small regular file (meta.json, a session description); BadEntry when it is
    not one (FileNotFoundError passes through: a missing file is not a bad one)."""
    fd = open_regular(path)
    try:
        if os.fstat(fd).st_size > MAX_RECORD_FILE_BYTES:
            raise BadEntry(f"larger than {MAX_RECORD_FILE_BYTES} bytes")
        raw = os.read(fd, MAX_RECORD_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise BadEntry("not valid JSON") from None


def real_subdirs(path: Path) -> list[Path]:
    """Subdirectories of ``path`` that are directories themselves, not symlinks to one (nor
    files, nor dot-entries): what the receiver created."""
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                found.append(path / entry.name)
    return found


class Layout:
    """The root and its areas. Creating one sweeps what a crash left half done."""

    def __init__(self, root: Path, *, min_free_bytes: int) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        for sub in AREAS:
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o750)
        self._real_root = os.path.realpath(root)
        self._warned: set[tuple[str, str]] = set()
        # A crash mid-publish or mid-delete leaves these; neither is ever visible as a backup.
        for sub in ("staging", "trash"):
            for leftover in (root / sub).iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        # A one-shot upload cannot be resumed (its client got an error and sends it again), so a
        # kill -9 mid-body leaves dead bytes: remove them, like the staging dir.
        for leftover in (root / "partial").glob(f"*/{ONESHOT_PREFIX}*.data"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def warn_once(self, where: str, why: str) -> None:
        """Log a bad entry the first time it is met (a list is served often; the log stays
        readable). The set is bounded: past it, entries are simply not logged again."""
        key = (where, why)
        if key in self._warned:
            return
        if len(self._warned) < MAX_WARNED_ENTRIES:
            self._warned.add(key)
        logger.warning("skipping {} under data_dir: {}", where, why)

    # ---- paths, always validated and confined to the root ----

    def inside(self, path: Path) -> Path:
        """``path`` if it resolves inside the root, else NotFound (a request never learns
        what lies outside)."""
        real = os.path.realpath(path)
        if os.path.commonpath([real, self._real_root]) != self._real_root:
            raise NotFound("not found")
        return path

    def confined(self, path: Path) -> Path:
        """``path`` if it resolves inside the root (every component, symlinks followed), else
        BadEntry: a symlinked client or backup directory leads out of data_dir."""
        try:
            return self.inside(path)
        except NotFound:
            raise BadEntry("resolves outside data_dir") from None

    def client_dir(self, area: str, client: str) -> Path:
        try:
            validate_client_name(client)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None
        return self.inside(self.root / area / client)

    def backup_path(self, client: str, backup_id: str) -> Path:
        """The validated, not yet confined, path of a backup (readers check what is there)."""
        try:
            validate_client_name(client)
            validate_backup_id(backup_id)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None
        return self.root / "backups" / client / backup_id

    def backup_dir(self, client: str, backup_id: str) -> Path:
        return self.inside(self.backup_path(client, backup_id))

    def partial_paths(self, client: str, uid: str) -> tuple[Path, Path]:
        """(data, session description) of a resumable upload."""
        try:
            validate_upload_id(uid)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None
        base = self.client_dir("partial", client)
        return self.inside(base / f"{uid}.data"), self.inside(base / f"{uid}.json")

    # ---- space ----

    def check_free(self, needed_bytes: int) -> None:
        free = free_bytes(self.root)
        if free - needed_bytes < self.min_free_bytes:
            raise InsufficientStorage(
                f"receiver has {free} bytes free; {needed_bytes} more would go below "
                f"min_free_bytes={self.min_free_bytes}"
            )

    def usage(self) -> tuple[int, int]:
        """(bytes used by committed backups, bytes free on the filesystem). Only real
        directories and regular files count: a planted symlink or file never breaks /health."""
        used = 0
        for client_dir in real_subdirs(self.root / "backups"):
            for backup in real_subdirs(client_dir):
                with contextlib.suppress(OSError):
                    st = os.lstat(backup / "data")
                    if stat.S_ISREG(st.st_mode):
                        used += st.st_size
        return used, free_bytes(self.root)

    def partial_count(self) -> int:
        """Resumable uploads (their description) plus one-shot uploads being received or left
        by a crash, until they are swept."""
        partial = self.root / "partial"
        return (sum(1 for _ in partial.glob("*/*.json"))
                + sum(1 for _ in partial.glob(f"*/{ONESHOT_PREFIX}*.data")))
