"""The node_exporter textfile (``[metrics] textfile``): the metrics rewritten after every run,
for hosts whose Prometheus cannot scrape the daemon, and for the legacy dashboards that read
``backup_metrics.prom``.

The file is replaced, never rewritten in place: a temp file in the same directory (a name that
does not end in ``.prom``, so node_exporter never reads it), fsync, rename, fsync of the
directory. A scrape sees the old file or the whole new one. A failure to write is a WARNING:
the metrics of a backup must never fail the backup.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from prometheus_client import generate_latest

from mt5backupd.config import Config
from mt5backupd.daemon.metrics import textfile_registry
from mt5backupd.fsutil import atomic_write_bytes

# node_exporter runs as its own user: the file must be readable by others. Set with fchmod,
# because the daemon's umask (0077 in its unit) would strip the bits from os.open's mode.
TEXTFILE_MODE = 0o644


def render(directory: Path) -> bytes:
    """The textfile's content for the backups and run records in ``directory``."""
    return generate_latest(textfile_registry(directory))


def replace_file(path: Path, data: bytes, mode: int = TEXTFILE_MODE) -> None:
    """Write ``data`` to ``path`` atomically, with exactly ``mode`` (node_exporter must read it)."""
    atomic_write_bytes(path, data, mode)


def update(cfg: Config) -> None:
    """Rewrite the textfile if one is configured; never raises."""
    path = cfg.metrics.textfile
    if path is None:
        return
    try:
        replace_file(path, render(cfg.local.dir))
    except OSError as exc:
        logger.warning("[metrics] textfile {}: not written: {}", path, exc.strerror or exc)
    except Exception as exc:  # noqa: BLE001 - the metrics of a backup never fail the backup
        logger.warning("[metrics] textfile {}: not written: {}: {}", path,
                       exc.__class__.__name__, exc)
