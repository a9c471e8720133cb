"""The /health rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mt5backupd import runstate as state
from mt5backupd.config import Config, LocalConfig
from mt5backupd.daemon.health import HealthInput, WalHealth, evaluate, wal_reasons
from mt5backupd.daemon.service import Daemon
from mt5backupd.daemon.walmetrics import wal_health

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


def _wal(**kw: float | str) -> WalHealth:
    base: dict[str, Any] = {"lag_s": 0.5, "max_lag_s": 10.0, "status_age_s": 2.0,
                            "stale_after_s": 30.0, "receiver_down_s": 0.0, "failing_s": 0.0}
    return WalHealth(**{**base, **kw})


@pytest.mark.parametrize(("wal", "fragment"), [
    (_wal(), ""),
    (_wal(lag_s=29.0), ""),  # within 3 x max_lag_s
    (_wal(lag_s=31.0, remote_error="401 unauthorized"),
     "31 s of received WAL is not on the receiver (over 3 x [wal] max_lag_s = 30 s): 401"),
    (_wal(receiver_down_s=120.0), ""),  # a restart, not an outage yet
    (_wal(receiver_down_s=600.0), "pg_receivewal has been down for 10 min"),
    (_wal(status_age_s=45.0, lag_s=999.0), "no status from the WAL service for 45 s"),
    (_wal(failing_s=20.0, round_error="OSError: disk"), ""),  # a failed round or two
    (_wal(failing_s=40.0, round_error="OSError: disk"),
     "shipping has failed for 40 s: OSError: disk"),
])
def test_wal_health_rules(wal: WalHealth, fragment: str) -> None:
    """With [wal] on, /health also fails when WAL lags past 3 x max_lag_s (saying why the
    receiver did not take it), when pg_receivewal stays down 5 minutes, or when the WAL
    service stopped writing its status (then that is the one reason given)."""
    result = evaluate(HealthInput(now=UTC_NOW, last_success=UTC_NOW - timedelta(hours=1),
                                  last_run_failed=False, last_run_error="",
                                  oldest_pending=None, max_age_s=26 * 3600,
                                  max_pending_age_s=6 * 3600, wal=wal))
    assert result.ok is (fragment == ""), result.reasons
    assert fragment in " ".join(result.reasons)
    assert len(result.reasons) <= 1


NOW_TS = UTC_NOW.timestamp()


def _iso(ago_s: float) -> str:
    return datetime.fromtimestamp(NOW_TS - ago_s, UTC).isoformat()


@pytest.mark.parametrize(("status", "lag_s", "age_s", "down_s", "error"), [
    (None, 0.0, 600.0, 0.0, ""),  # no status yet: aged from the daemon's start
    ({"updated": _iso(3), "last_received": NOW_TS - 5, "receiver_up": True,
      "newest_uploaded_received_at": _iso(65), "pending": 3}, 60.0, 3.0, 0.0, ""),
    # the receiver never took any WAL: the lag runs from the oldest WAL waiting, not from 1970
    ({"updated": _iso(3), "last_received": NOW_TS - 5, "receiver_up": True,
      "newest_uploaded_received_at": "", "oldest_pending_received_at": _iso(125),
      "pending": 9, "remote_error": "401 unauthorized"}, 120.0, 3.0, 0.0, "401 unauthorized"),
    ({"updated": _iso(1), "last_received": 0, "receiver_up": False,
      "receiver_down_since": _iso(400)}, 0.0, 1.0, 400.0, ""),
    # nothing shipped or even stored yet (local shipping fails): from the oldest raw WAL
    ({"updated": _iso(2), "last_received": NOW_TS - 1, "oldest_received": NOW_TS - 91,
      "pending_error": "receiver https://ops:s3cret@rx.example:9101 answered 503"},
     90.0, 2.0, 0.0, "receiver https://rx.example:9101 answered 503"),
    ({"updated": "not a time", "last_received": "junk"}, 0.0, 600.0, 0.0, ""),
])
def test_wal_health_from_the_status_file(status: dict[str, Any] | None, lag_s: float,
                                         age_s: float, down_s: float, error: str) -> None:
    health = wal_health(status, NOW_TS, NOW_TS - 600, 10.0)
    assert (round(health.lag_s), round(health.status_age_s), round(health.receiver_down_s),
            health.remote_error) == (lag_s, age_s, down_s, error)
    assert health.stale_after_s == 30.0


def test_wal_health_follows_the_running_services_max_lag() -> None:
    """After a reload changed [wal] max_lag_s, the WAL service still runs with its start-up
    value (written in its status): /health judges by that one."""
    status = {"updated": _iso(50), "max_lag_s": 60.0, "last_received": NOW_TS - 1,
              "newest_uploaded_received_at": _iso(100)}
    health = wal_health(status, NOW_TS, NOW_TS - 600, 10.0)
    assert (health.max_lag_s, health.stale_after_s) == (60.0, 180.0)
    assert wal_reasons(health) == []


def test_public_health_texts_hide_url_credentials(tmp_path: Path) -> None:
    """/health answers anyone who can reach it: an error that quotes a URL with
    user:password@ in it is shown without them (/status, behind the same port, is for
    operators and keeps the whole text)."""
    cfg = Config(local=LocalConfig(dir=tmp_path))
    state.record_run(tmp_path, state.RunRecord(
        job="database", id="", started=UTC_NOW.isoformat(), finished=UTC_NOW.isoformat(),
        result="failure", duration_s=1.0,
        error="upload to https://ops:s3cret@rx.example:9101 failed: 503"))
    ok, body = Daemon(cfg, None, None, {}).health()
    assert not ok
    text = " ".join(body["reasons"])
    assert "https://rx.example:9101 failed: 503" in text and "s3cret" not in text
