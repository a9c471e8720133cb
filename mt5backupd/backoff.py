"""Retry delays (pure): exponential with "equal jitter", capped.

Half of each delay is fixed and half random, so retries from many clients spread out, yet a
single client never retries almost immediately after a failure.
"""

from __future__ import annotations

import random
from collections.abc import Callable

RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))


def backoff_delays(
    max_retries: int,
    base_s: float,
    *,
    cap_s: float = 300.0,
    rng: Callable[[], float] = random.random,
) -> list[float]:
    """Delay before retry 1..max_retries."""
    delays = []
    for attempt in range(max_retries):
        ceiling = min(cap_s, base_s * (2**attempt))
        delays.append(ceiling / 2 + rng() * ceiling / 2)
    return delays


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS
