"""Is the backup system healthy? (pure) — the logic behind the daemon's /health."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class HealthInput:
    now: datetime
    last_success: datetime | None  # finish time of the newest good database backup
    last_run_failed: bool
    last_run_error: str
    oldest_pending: datetime | None  # start time of the oldest backup whose upload is pending
    max_age_s: float
    max_pending_age_s: float
    receiver_status: str = ""  # state.RECEIVER_*: "" unknown, ok, down, not_trusted
    receiver_error: str = ""


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def evaluate(h: HealthInput) -> HealthResult:
    reasons = []
    if h.last_success is None:
        reasons.append("no successful database backup yet")
    else:
        age_s = (h.now - h.last_success).total_seconds()
        if age_s > h.max_age_s:
            reasons.append(f"late: last successful database backup {_hours(age_s)} ago "
                           f"(max_age_s allows {_hours(h.max_age_s)})")
    if h.last_run_failed:
        reasons.append(f"last database run failed: {h.last_run_error or 'unknown error'}")
    if h.oldest_pending is not None:
        pending_s = (h.now - h.oldest_pending).total_seconds()
        if pending_s > h.max_pending_age_s:
            reasons.append(f"an upload has been pending for {_hours(pending_s)} "
                           f"(max_pending_age_s allows {_hours(h.max_pending_age_s)})")
    if h.receiver_status == "not_trusted":
        # not an outage that heals by itself: an operator must fix the CA or the certificate
        reasons.append(h.receiver_error or "receiver not trusted (TLS verification failed)")
    return HealthResult(ok=not reasons, reasons=reasons)
