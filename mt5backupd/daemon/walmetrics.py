"""The ``mt5backup_wal_*`` families, read at each scrape from the WAL service's status file
(``<local dir>/wal/status.json``, rewritten every ``max_lag_s`` / 2 by ``wal/service``).

Always exported (zeros while WAL is off, ``mt5backup_wal_enabled`` says which), so dashboards
and rules see the names on every host; the rules alert only where it is 1. A status file that
stopped being rewritten (daemon dead or hung) counts as pg_receivewal down.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mt5backupd.daemon.health import WalHealth
from mt5backupd.redact import public_text

P = "mt5backup_wal"
STALE_FACTOR = 3.0  # the status is stale after this many max_lag_s without a rewrite
MIN_STALE_S = 30.0


def _ts(iso: object) -> float:
    if not isinstance(iso, str) or not iso:
        return 0.0
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:  # a damaged status file: as if the field were missing
        return 0.0


def _num(value: object) -> float:
    """A number of the status file; 0 for what is missing or damaged."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def wal_values(status: dict[str, Any] | None, now: float) -> dict[str, float]:
    """The gauges from a status (pure); all zero without one."""
    if not status:
        return {"receiver_up": 0.0, "last_received": 0.0, "last_shipped": 0.0, "lag": 0.0,
                "slot_retained": 0.0, "pending": 0.0, "max_lag": 0.0}
    stale_after = max(MIN_STALE_S, STALE_FACTOR * (_num(status.get("max_lag_s")) or 10.0))
    fresh = now - _ts(status.get("updated")) <= stale_after
    received = _num(status.get("last_received"))
    shipped = _ts(status.get("newest_uploaded_received_at"))
    # WAL received but not yet on the receiver, in seconds of its arrival times; a receiver
    # that holds all of it has no lag whatever the clock says. Before the receiver ever took
    # any, the span since the oldest WAL waiting for it (not since 1970)
    since = (shipped or _ts(status.get("oldest_pending_received_at"))
             or _num(status.get("oldest_received")))
    lag = max(0.0, received - since) if received and since else 0.0
    return {"receiver_up": 1.0 if fresh and status.get("receiver_up") else 0.0,
            "last_received": received, "last_shipped": shipped, "lag": lag,
            "slot_retained": _num(status.get("slot_retained_bytes")),
            "pending": _num(status.get("pending")),
            "max_lag": _num(status.get("max_lag_s"))}


def load_status(directory: Path) -> dict[str, Any] | None:
    """The WAL service's status file under ``directory`` (the [local] dir), None if it has
    none yet or it cannot be read."""
    try:
        status = json.loads((directory / "wal" / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def wal_health(status: dict[str, Any] | None, now: float, running_since: float,
               max_lag_s: float) -> WalHealth:
    """/health's view of WAL (pure): ``running_since`` (the daemon's start, epoch seconds)
    stands in for the status's time until the first status is written; the status's own
    ``max_lag_s`` (what the running WAL service uses) wins over the configured one."""
    status = status or {}
    v = wal_values(status, now)
    max_lag_s = _num(status.get("max_lag_s")) or max_lag_s
    since = {key: _ts(status.get(key)) for key in
             ("updated", "receiver_down_since", "round_failing_since")}
    return WalHealth(
        lag_s=v["lag"], max_lag_s=max_lag_s,
        status_age_s=max(0.0, now - max(since["updated"], running_since)),
        stale_after_s=max(MIN_STALE_S, STALE_FACTOR * max_lag_s),
        receiver_down_s=max(0.0, now - since["receiver_down_since"])
        if since["receiver_down_since"] else 0.0,
        failing_s=max(0.0, now - since["round_failing_since"])
        if since["round_failing_since"] else 0.0,
        remote_error=public_text(str(status.get("remote_error") or status.get("pending_error")
                                     or "")),
        round_error=public_text(str(status.get("round_error") or "")))


class WalCollector(Collector):
    def __init__(self, directory: Callable[[], Path], enabled: Callable[[], bool]) -> None:
        self._directory = directory
        self._enabled = enabled

    def collect(self) -> Iterable[Metric]:
        enabled = self._enabled()
        status = load_status(self._directory()) if enabled else None
        v = wal_values(status, time.time())
        yield GaugeMetricFamily(f"{P}_enabled", "1 when [wal] enabled (WAL streaming for PITR)",
                                value=1.0 if enabled else 0.0)
        yield GaugeMetricFamily(f"{P}_receiver_up", "1 while pg_receivewal runs under the daemon",
                                value=v["receiver_up"])
        yield GaugeMetricFamily(f"{P}_last_received_timestamp_seconds",
                                "When pg_receivewal last wrote WAL locally",
                                value=v["last_received"])
        yield GaugeMetricFamily(f"{P}_last_shipped_timestamp_seconds",
                                "Arrival time of the newest WAL the receiver holds",
                                value=v["last_shipped"])
        yield GaugeMetricFamily(f"{P}_lag_seconds",
                                "WAL received locally but not on the receiver, in seconds",
                                value=v["lag"])
        yield GaugeMetricFamily(f"{P}_max_lag_seconds", "[wal] max_lag_s (for the lag alert)",
                                value=v["max_lag"])
        yield GaugeMetricFamily(f"{P}_slot_retained_bytes",
                                "WAL the server keeps for the replication slot",
                                value=v["slot_retained"])
        yield GaugeMetricFamily(f"{P}_pending_objects",
                                "WAL objects stored locally, upload pending", value=v["pending"])
