"""Logging: loguru, human lines on stderr (journald adds its own timestamps), JSON lines on disk.

Known secret values (registered in ``redact``) are masked in every message, including messages that
arrive from stdlib loggers (aiohttp, apscheduler), so a token can never reach a log file.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from loguru import logger

from mt5backupd.redact import MASK, mask, register_secret

if TYPE_CHECKING:
    from loguru import Record


class LogSettings(Protocol):
    """What logging needs of ``[log]`` (config's LogConfig has it): a protocol, so this leaf
    imports nothing of the config package above it."""

    @property
    def dir(self) -> Path | None: ...
    @property
    def level(self) -> str: ...
    @property
    def rotation_bytes(self) -> int: ...
    @property
    def retention_files(self) -> int: ...

def _patch(record: Record) -> None:
    record["message"] = mask(record["message"])


class _InterceptHandler(logging.Handler):
    """Route stdlib logging records into loguru, keeping the original logger name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).bind(source=record.name).log(
            level, record.getMessage()
        )


def _human(record: Record) -> str:
    """``LEVEL component [job run]: message`` — the job and run id appear on every line of a run
    (they are bound with ``logger.contextualize`` by the daemon)."""
    extra = record["extra"]
    tag = " ".join(str(extra[k]) for k in ("job", "run", "client") if k in extra)
    where = f"{extra.get('component', '-')}" + (f" [{tag}]" if tag else "")
    return f"<level>{{level: <7}}</level> {where.replace('{', '{{').replace('}', '}}')}: " \
        "{message}\n{exception}"


def setup_logging(cfg: LogSettings | None, component: str, *, verbose: bool = False) -> None:
    """Configure sinks once per process. ``component`` names the process (backup, receiver, ...)."""
    logger.remove()
    logger.configure(extra={"component": component}, patcher=_patch)
    level = "DEBUG" if verbose else (cfg.level if cfg else "INFO")
    logger.add(sys.stderr, level=level, format=_human, colorize=None, backtrace=False,
               diagnose=False)
    if cfg is not None and cfg.dir is not None:
        log_dir = Path(cfg.dir)
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        logger.add(
            log_dir / f"mt5backupd-{component}.jsonl",
            level=level,
            serialize=True,
            rotation=cfg.rotation_bytes,
            retention=cfg.retention_files,
            enqueue=False,
            backtrace=False,
            diagnose=False,  # diagnose would print local variables, secrets included
        )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)
    for noisy in ("aiohttp.access", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


__all__ = ["MASK", "mask", "register_secret", "setup_logging"]
