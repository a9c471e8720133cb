"""Rate-limited logging of what strangers and flaky networks cause (malformed requests, clients
that go away): a few lines a minute, never a flood, never a client's bytes at length."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from mt5backupd.receiver.metrics import ReceiverMetrics

NOISE_LINES_PER_WINDOW = 10
NOISE_WINDOW_S = 60.0
MAX_LOGGED_CHARS = 120


class LogBudget:
    """At most ``lines`` log lines per ``window_s`` for one kind of noise a stranger can cause
    (malformed requests, clients that go away); the rest are only counted, and the count rides
    on the next line allowed. Pure: the caller passes the clock."""

    def __init__(self, lines: int, window_s: float) -> None:
        self.lines = lines
        self.window_s = window_s
        self._window_start = float("-inf")
        self._used = 0
        self._suppressed = 0

    def take(self, now: float) -> int | None:
        """None: stay silent. Otherwise log, mentioning the returned number of lines dropped
        since the last one."""
        if now - self._window_start >= self.window_s:
            self._window_start = now
            self._used = 0
        if self._used >= self.lines:
            self._suppressed += 1
            return None
        self._used += 1
        dropped, self._suppressed = self._suppressed, 0
        return dropped


@dataclass
class NoiseLog:
    """The receiver's rate-limited INFO lines for what strangers and flaky networks cause."""

    metrics: ReceiverMetrics
    malformed: LogBudget = field(
        default_factory=lambda: LogBudget(NOISE_LINES_PER_WINDOW, NOISE_WINDOW_S))
    gone: LogBudget = field(
        default_factory=lambda: LogBudget(NOISE_LINES_PER_WINDOW, NOISE_WINDOW_S))

    def info(self, budget: LogBudget, message: str, *args: Any) -> None:
        dropped = budget.take(time.monotonic())
        if dropped is None:
            return
        suffix = f" ({dropped} similar lines suppressed)" if dropped else ""
        logger.opt(exception=None).info(message + suffix, *args)


def short(text: object) -> str:
    """A client-controlled value cut to a size fit for a log line (paths can be 8 KiB)."""
    value = str(text)
    return value if len(value) <= MAX_LOGGED_CHARS else value[:MAX_LOGGED_CHARS] + "..."
