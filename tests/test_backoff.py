"""Upload retries: backoff delays and which HTTP statuses are retried."""

from __future__ import annotations

import pytest

from mt5backupd.backoff import backoff_delays, is_retryable_status


@pytest.mark.parametrize(
    ("retries", "base", "rng", "expected"),
    [
        (3, 1.0, 0.0, [0.5, 1.0, 2.0]),
        (3, 1.0, 1.0, [1.0, 2.0, 4.0]),
        (4, 100.0, 1.0, [100.0, 200.0, 300.0, 300.0]),  # capped at 300 s
        (0, 5.0, 0.5, []),
    ],
)
def test_backoff_delays(retries: int, base: float, rng: float, expected: list[float]) -> None:
    """Delays double, carry 50% jitter and stop at the cap."""
    assert backoff_delays(retries, base, cap_s=300.0, rng=lambda: rng) == expected


@pytest.mark.parametrize(("status", "retryable"),
                         [(408, True), (429, True), (500, True), (503, True), (507, True),
                          (400, False), (401, False), (404, False), (409, False), (413, False)])
def test_retryable_statuses(status: int, retryable: bool) -> None:
    """Only timeouts, throttling and server errors are retried; other 4xx fail at once."""
    assert is_retryable_status(status) is retryable
