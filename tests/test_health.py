"""The /health rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mt5backupd.daemon.health import HealthInput, evaluate

UTC_NOW = datetime(2026, 11, 25, 3, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("last_success_age_h", "failed", "pending_age_h", "ok", "fragment"),
    [
        (1, False, None, True, ""),
        (None, False, None, False, "no successful database backup yet"),
        (27, False, None, False, "late"),
        (1, True, None, False, "last database run failed"),
        (1, False, 7, False, "pending"),
        (1, False, 2, True, ""),
    ],
)
def test_health_rules(last_success_age_h: float | None, failed: bool,
                      pending_age_h: float | None, ok: bool, fragment: str) -> None:
    """503 when late, when the last run failed, or when an upload is pending too long."""
    now = UTC_NOW
    result = evaluate(HealthInput(
        now=now,
        last_success=None if last_success_age_h is None else now - timedelta(
            hours=last_success_age_h),
        last_run_failed=failed, last_run_error="boom",
        oldest_pending=None if pending_age_h is None else now - timedelta(hours=pending_age_h),
        max_age_s=26 * 3600, max_pending_age_s=6 * 3600))
    assert result.ok is ok
    assert fragment in " ".join(result.reasons)
