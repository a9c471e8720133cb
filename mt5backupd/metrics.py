"""The daemon's Prometheus metrics, derived at each scrape from the run records and manifests on
disk (so runs by `--run-now` in another process and daemon restarts lose nothing), plus the few
live values only the daemon knows (in progress, next run)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mt5backupd import __version__, spool, state

disable_created_metrics()  # type: ignore[no-untyped-call]

P = "mt5backup"
JOB_KINDS = {"database": "database", "repository": "repository", "verify": None}


def _ts(iso: str | None) -> float:
    if not iso:
        return 0.0
    return datetime.fromisoformat(iso).timestamp()


@dataclass
class LiveState:
    """What only the running daemon knows."""

    in_progress: dict[str, bool] = field(default_factory=dict)
    next_run: dict[str, float] = field(default_factory=dict)  # job -> unix time


class DiskCollector(Collector):
    def __init__(self, directory: Callable[[], Path], live: LiveState) -> None:
        self._directory = directory
        self._live = live

    def collect(self) -> Iterable[Metric]:
        directory = self._directory()
        st = state.load_state(directory)
        manifests = spool.load_manifests(directory)

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{P}_{name}", doc, labels=["job"])

        last_ok = gauge("last_run_success", "1 if the last run produced a good backup, else 0")
        last_success = gauge("last_success_timestamp_seconds", "End of the last good run")
        last_run = gauge("last_run_timestamp_seconds", "End of the last run, good or not")
        duration = gauge("last_duration_seconds", "Duration of the last run")
        size = gauge("last_size_bytes", "Size of the newest backup")
        pending = gauge("pending_uploads", "Local backups whose upload is pending")
        oldest_pending = gauge("oldest_pending_timestamp_seconds",
                               "Start of the oldest backup still pending upload (0: none)")
        local = gauge("local_backups", "Complete local backups")
        local_bytes = gauge("local_bytes", "Bytes of complete local backups")
        next_run = gauge("next_run_timestamp_seconds", "Next scheduled run (0: not scheduled)")
        in_progress = gauge("in_progress", "1 while a run of the job is in progress")
        anomaly = gauge("size_anomaly", "1 if the newest backup is under half the one before")
        runs = CounterMetricFamily(f"{P}_runs", "Runs by result", labels=["job", "result"])
        retries = CounterMetricFamily(f"{P}_upload_retries", "Upload retries", labels=["job"])
        uploaded = CounterMetricFamily(f"{P}_uploaded_bytes", "Bytes sent to the receiver",
                                       labels=["job"])
        for job, kind in JOB_KINDS.items():
            entry = state.job_state(st, job)
            run = state.last_run(st, job)
            good = state.last_run(st, job, "last_success")
            mine = [m for m in manifests if kind is not None and m.kind == kind]
            newest = mine[-1] if mine else None
            success_ts = max(_ts(good.finished) if good else 0.0,
                             _ts(newest.finished) if newest else 0.0)
            last_ok.add_metric([job], 1.0 if (run.succeeded if run else newest is not None)
                               else 0.0)
            last_success.add_metric([job], success_ts)
            last_run.add_metric([job], _ts(run.finished) if run else
                                (_ts(newest.finished) if newest else 0.0))
            duration.add_metric([job], run.duration_s if run else
                                (newest.duration_s if newest else 0.0))
            size.add_metric([job], float(newest.size) if newest else 0.0)
            waiting = [m for m in mine if m.pending]
            pending.add_metric([job], float(len(waiting)))
            oldest_pending.add_metric([job], _ts(waiting[0].started) if waiting else 0.0)
            local.add_metric([job], float(len(mine)))
            local_bytes.add_metric([job], float(sum(m.size for m in mine)))
            next_run.add_metric([job], self._live.next_run.get(job, 0.0))
            in_progress.add_metric([job], 1.0 if self._live.in_progress.get(job) else 0.0)
            anomaly.add_metric([job], 1.0 if newest and newest.size_anomaly else 0.0)
            for result in state.RESULTS:
                runs.add_metric([job, result], float(entry["runs"].get(result, 0)))
            retries.add_metric([job], float(entry["upload_retries"]))
            uploaded.add_metric([job], float(entry["uploaded_bytes"]))
        yield from (last_ok, last_success, last_run, duration, size, pending, oldest_pending,
                    local, local_bytes, next_run, in_progress, anomaly, runs, retries, uploaded)
        check = state.last_run(st, "verify")
        yield GaugeMetricFamily(f"{P}_last_verify_success",
                                "1 if the last test restore passed, else 0",
                                value=1.0 if check and check.succeeded else 0.0)
        yield GaugeMetricFamily(f"{P}_last_verify_timestamp_seconds",
                                "End of the last test restore (0: never)",
                                value=_ts(check.finished) if check else 0.0)
        yield GaugeMetricFamily(f"{P}_last_verify_duration_seconds",
                                "pg_restore time of the last test restore (recovery time)",
                                value=check.duration_s if check else 0.0)
        receiver, _error = state.receiver_status(st)
        yield GaugeMetricFamily(f"{P}_receiver_not_trusted",
                                "1 if the last contact with the receiver failed TLS verification "
                                "(unknown CA, wrong host name): needs an operator",
                                value=1.0 if receiver == state.RECEIVER_NOT_TRUSTED else 0.0)
        yield GaugeMetricFamily(f"{P}_receiver_down",
                                "1 if the last contact with the receiver found it unreachable "
                                "(an outage: uploads stay pending and are retried)",
                                value=1.0 if receiver == state.RECEIVER_DOWN else 0.0)
        info = GaugeMetricFamily(f"{P}_build_info", "mt5backupd version", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info


def make_registry(directory: Callable[[], Path], live: LiveState) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DiskCollector(directory, live))
    return registry
