"""Is the backup system healthy? (pure) — the logic behind the daemon's /health."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

# As the alert rules (packaging/prometheus/alerts.yml): WAL lagging more than 3 x max_lag_s,
# pg_receivewal down for 5 minutes (a restart after a dropped connection is not an outage).
WAL_LAG_FACTOR = 3.0
WAL_DOWN_GRACE_S = 300.0


@dataclass(frozen=True)
class WalHealth:
    """What /health needs of point-in-time recovery ([wal] enabled), from the WAL service's
    status file (daemon/walmetrics.wal_health)."""

    lag_s: float  # WAL received locally but not on the receiver, in seconds of its arrival
    max_lag_s: float
    status_age_s: float  # since the WAL service last wrote its status (or the daemon started)
    stale_after_s: float
    receiver_down_s: float  # how long pg_receivewal has been down; 0 while it runs
    failing_s: float = 0.0  # how long shipping rounds have been failing in a row; 0: they work
    remote_error: str = ""  # why the receiver did not take WAL (its answer), "" if it did
    round_error: str = ""  # why the last shipping round failed


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
    wal: WalHealth | None = None  # None: [wal] is off


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
    if h.wal is not None:
        reasons += wal_reasons(h.wal)
    return HealthResult(ok=not reasons, reasons=reasons)


def wal_reasons(w: WalHealth) -> list[str]:
    """Why point-in-time recovery is not keeping up, if it is not (pure)."""
    if w.status_age_s > w.stale_after_s:
        return [f"WAL: no status from the WAL service for {w.status_age_s:.0f} s (stuck or "
                "stopped): WAL is neither received nor shipped"]
    reasons = []
    if w.failing_s > w.stale_after_s:
        reasons.append(f"WAL: shipping has failed for {w.failing_s:.0f} s: {w.round_error}")
    if w.receiver_down_s > WAL_DOWN_GRACE_S:
        reasons.append(f"WAL: pg_receivewal has been down for {_minutes(w.receiver_down_s)}: "
                       "no WAL is received, the recovery point stands still")
    if w.lag_s > WAL_LAG_FACTOR * w.max_lag_s:
        why = f": {w.remote_error}" if w.remote_error else ""
        reasons.append(f"WAL: {w.lag_s:.0f} s of received WAL is not on the receiver (over "
                       f"{WAL_LAG_FACTOR:g} x [wal] max_lag_s = "
                       f"{WAL_LAG_FACTOR * w.max_lag_s:g} s){why}")
    return reasons


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"
