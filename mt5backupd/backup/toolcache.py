"""``pg_dump --version`` and ``pg_restore --version``, cached by the binary's path, size and
mtime in ``<local.dir>/.mt5backupd-tools.json``: each is a process start (~10 ms, more through
a wrapper) on every run, for an answer that changes only when the binary does.

Only real executables are cached. A script (Debian's ``/usr/bin/pg_dump`` is ``pg_wrapper``,
which picks the newest installed PostgreSQL) answers for binaries elsewhere, which may change
while the script does not, so it is asked every time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from mt5backupd.backup.dump import tool_version
from mt5backupd.fsutil import atomic_write_json

CACHE_FILE = ".mt5backupd-tools.json"
_ELF = b"\x7fELF"


def binary_key(binary: str) -> str | None:
    """``path:size:mtime_ns`` of the executable ``binary`` names, or None when it is not a
    real executable (not found, or a script)."""
    found = shutil.which(binary)
    if found is None:
        return None
    path = os.path.realpath(found)
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != _ELF:
                return None
            st = os.fstat(fh.fileno())
    except OSError:
        return None
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _load(path: Path) -> dict[str, list[object]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


async def cached_tool_version(binary: str, key: str, cache_dir: Path | None) -> tuple[int, str]:
    """(major, "15.18") for ``binary``; from the cache when its path, size and mtime match."""
    ident = binary_key(binary) if cache_dir is not None else None
    if ident is None or cache_dir is None:
        return await tool_version(binary, key)
    cache_path = cache_dir / CACHE_FILE
    cache = _load(cache_path)
    hit = cache.get(ident)
    if (isinstance(hit, list) and len(hit) == 2 and isinstance(hit[0], int)
            and isinstance(hit[1], str)):
        return hit[0], hit[1]
    major, version = await tool_version(binary, key)
    cache = {k: v for k, v in cache.items() if not k.startswith(ident.split(":")[0] + ":")}
    cache[ident] = [major, version]
    with contextlib.suppress(OSError):  # a cache that cannot be written is only slower
        atomic_write_json(cache_path, cache, 0o640)
    return major, version
