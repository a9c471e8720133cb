"""What the unauthenticated ``/health`` may say about the bucket: whether it answers.

Load balancers probe ``/health`` without a token, and so can anyone. Each answer is one
``HeadBucket`` at most every ``HEALTH_CACHE_S`` (concurrent probes share it), so a flood of
probes is not a flood of billed requests to the store; and the answer names neither the bucket
nor the endpoint nor the store's error text: those go to the log, once per change of state.
"""

from __future__ import annotations

import asyncio
import time

from loguru import logger

from mt5backupd.receiver.s3store.conn import Bucket
from mt5backupd.receiver.storage.errors import StoreUnavailable

HEALTH_CACHE_S = 2.0
PROBE_TIMEOUT_S = 5.0  # a load balancer's probe wants its answer in seconds
STATE_OK, STATE_UNREACHABLE = "ok", "unreachable"


class HealthProbe:
    def __init__(self, bucket: Bucket, cache_s: float = HEALTH_CACHE_S) -> None:
        self.bucket = bucket
        self.cache_s = cache_s
        self._state: str | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self._state is not None and time.monotonic() - self._at < self.cache_s

    async def state(self) -> str:
        if self._fresh():
            assert self._state is not None
            return self._state
        async with self._lock:  # the first prober asks the store; the others wait for it
            if not self._fresh():
                try:
                    await self.bucket.call("head", "head_bucket", timeout_s=PROBE_TIMEOUT_S)
                    state = STATE_OK
                except StoreUnavailable as exc:
                    state = STATE_UNREACHABLE
                    if self._state != state:
                        logger.warning("object store unreachable (bucket {}): {}",
                                       self.bucket.cfg.bucket, exc)
                if self._state == STATE_UNREACHABLE and state == STATE_OK:
                    logger.info("object store reachable again (bucket {})",
                                self.bucket.cfg.bucket)
                self._state, self._at = state, time.monotonic()
            assert self._state is not None
            return self._state
