"""Streamed, compressed tar of a directory (the trading repository), and its check.

The tar stream goes straight into zstd and the spool file: nothing is staged, memory stays
bounded whatever the tree's size. Symlinks are stored as links (never followed out of the tree);
sockets, FIFOs and devices are skipped.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, cast

import zstandard
from loguru import logger
from pyrage import x25519

from mt5backupd.backup.compress import READ_BYTES, Writable
from mt5backupd.backup.encryption import is_age_file, plain_reader
from mt5backupd.errors import ArchiveUnreadableError, Mt5BackupError


def is_excluded(relative: str, patterns: Sequence[str]) -> bool:
    """A path is excluded when a pattern matches the whole relative path or any one component
    ("node_modules" excludes every node_modules directory; "logs/*.log" a path pattern)."""
    parts = relative.split("/")
    for pattern in patterns:
        if fnmatch.fnmatchcase(relative, pattern):
            return True
        if "/" not in pattern and any(fnmatch.fnmatchcase(p, pattern) for p in parts):
            return True
    return False


def walk(root: Path, patterns: Sequence[str]) -> Iterator[tuple[Path, str]]:
    """(absolute path, relative path) of everything to archive, parents before children,
    in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        kept_dirs = []
        for name in sorted(dirnames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if is_excluded(rel, patterns):
                continue
            kept_dirs.append(name)
            yield Path(dirpath) / name, rel
        dirnames[:] = kept_dirs  # prune excluded directories from the walk
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if not is_excluded(rel, patterns):
                yield Path(dirpath) / name, rel


class _Counting:
    """Counts the tar bytes on their way into zstd."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        self.inner.write(data)
        return len(data)


def write_tar(root: Path, patterns: Sequence[str], sink: Writable, level: int) -> int:
    """Blocking (run in a thread): tar ``root`` minus ``patterns`` into zstd into ``sink``.
    Returns the uncompressed tar size."""
    cctx = zstandard.ZstdCompressor(level=level)
    with cctx.stream_writer(cast("IO[bytes]", sink), write_size=READ_BYTES,
                            closefd=False) as zwriter:
        counting = _Counting(cast("IO[bytes]", zwriter))
        with tarfile.open(fileobj=cast("IO[bytes]", counting), mode="w|",
                          format=tarfile.PAX_FORMAT) as tar:
            for path, rel in walk(root, patterns):
                try:
                    mode = path.lstat().st_mode
                except FileNotFoundError:
                    continue  # vanished while we walked
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                    logger.info("repository archive: skipping special file {}", rel)
                    continue
                try:
                    tar.add(path, arcname=rel, recursive=False)
                except FileNotFoundError:
                    continue
                except PermissionError:
                    logger.warning("repository archive: cannot read {}; skipped", rel)
        return counting.count


def _read_members(reader: IO[bytes]) -> int:
    members = 0
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for member in tar:
            members += 1
            if member.isfile():
                extracted = tar.extractfile(member)
                if extracted is not None:
                    while extracted.read(READ_BYTES):
                        pass
    return members


def check_tar(path: Path, identities: Sequence[x25519.Identity] = ()) -> int:
    """Read the whole archive back (age when encrypted, zstd frame, every tar header/member);
    return the member count. ArchiveUnreadableError when it cannot be read to the end."""
    try:
        if is_age_file(path):
            with plain_reader(path, identities) as plain:
                return _read_members(plain)
        with path.open("rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=READ_BYTES)
            return _read_members(cast("IO[bytes]", reader))
    except (tarfile.TarError, zstandard.ZstdError, OSError, EOFError,
            Mt5BackupError) as exc:
        raise ArchiveUnreadableError(f"archive {path.name} cannot be read back: {exc}") from None
