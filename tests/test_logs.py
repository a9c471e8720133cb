"""Logs: secrets masked."""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from mt5backupd.logs import register_secret, setup_logging


def test_secrets_masked_in_logs(tmp_path: Path) -> None:
    """A registered secret never reaches the JSON log file or stderr, even via stdlib logging."""
    from mt5backupd.config import LogConfig

    setup_logging(LogConfig(dir=tmp_path / "logs"), "test")
    register_secret("hunter2-very-secret")
    logger.info("token is hunter2-very-secret")
    import logging

    logging.getLogger("aiohttp.server").warning("header had hunter2-very-secret")
    logger.complete()
    text = (tmp_path / "logs" / "mt5backupd-test.jsonl").read_text()
    assert "hunter2-very-secret" not in text
    assert text.count("***") >= 2
