"""The daemon's Prometheus metrics, derived at each scrape from the run records and manifests on
disk (so runs by `--run-now` in another process and daemon restarts lose nothing), plus the few
live values only the daemon knows (in progress, next run).

The legacy ``backup.sh`` textfile series (``mt5_backup_*``) are derived from the same records,
for dashboards and alerts built on the old system (``[http] legacy_metrics``, ``[metrics]
textfile``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mt5backupd import __version__
from mt5backupd import runstate as state
from mt5backupd.backup import spool
from mt5backupd.daemon.walmetrics import WalCollector

disable_created_metrics()  # type: ignore[no-untyped-call]

P = "mt5backup"
JOB_KINDS = {"database": "database", "repository": "repository", "verify": None,
             "base": "base"}


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
    """The ``mt5backup_*`` families. Without ``live`` (a textfile written at the end of a run,
    by any process) the live-only families (in progress, next run) are left out: a file cannot
    keep them true."""

    def __init__(self, directory: Callable[[], Path], live: LiveState | None) -> None:
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
            if self._live is not None:
                next_run.add_metric([job], self._live.next_run.get(job, 0.0))
                in_progress.add_metric([job], 1.0 if self._live.in_progress.get(job) else 0.0)
            anomaly.add_metric([job], 1.0 if newest and newest.size_anomaly else 0.0)
            for result in state.RESULTS:
                runs.add_metric([job, result], float(entry["runs"].get(result, 0)))
            retries.add_metric([job], float(entry["upload_retries"]))
            uploaded.add_metric([job], float(entry["uploaded_bytes"]))
        yield from (last_ok, last_success, last_run, duration, size, pending, oldest_pending,
                    local, local_bytes)
        if self._live is not None:
            yield from (next_run, in_progress)
        yield from (anomaly, runs, retries, uploaded)
        check = state.last_run(st, "verify")
        skipped = check is not None and check.result == "skipped"
        yield GaugeMetricFamily(f"{P}_last_verify_skipped",
                                "1 if the last test restore could not run here: cannot verify "
                                "encrypted backups here (no [encryption] identity_file)",
                                value=1.0 if skipped else 0.0)
        if skipped:  # the figures below stay those of the last test restore that ran
            check = state.last_run(st, "verify", "last_checked")
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


@dataclass(frozen=True)
class LegacyValues:
    """The legacy series' values; ``last_timestamp`` is None before the first database run."""

    status: float
    db_size_bytes: float
    repo_size_bytes: float
    duration_s: float
    last_timestamp: str | None


def legacy_values(st: dict[str, Any], manifests: list[spool.Manifest]) -> LegacyValues:
    """What the legacy ``backup-metrics-exporter.sh`` read from backup.sh's newest log and
    files: status 1 only for a run that did everything (so a backup whose upload is pending is
    0, as an upload failure was), sizes of the newest complete local backups, and duration and
    time of the last database run, good or not."""
    run = state.last_run(st, "database")
    databases = [m for m in manifests if m.kind == "database"]
    repositories = [m for m in manifests if m.kind == "repository"]

    def newest_size(found: list[spool.Manifest], job: str) -> float:
        if found:
            return float(found[-1].size)
        good = state.last_run(st, job, "last_success")
        return float(good.size) if good else 0.0

    newest = databases[-1] if databases else None
    if run is not None:
        status = 1.0 if run.result == "success" else 0.0
        duration_s, finished = run.duration_s, run.finished
    elif newest is not None:  # run records lost (state file removed): the files tell
        status = 0.0 if newest.pending else 1.0
        duration_s, finished = newest.duration_s, newest.finished
    else:
        status, duration_s, finished = 0.0, 0.0, ""
    stamp = (datetime.fromisoformat(finished).astimezone(UTC).isoformat(timespec="seconds")
             if finished else None)
    return LegacyValues(status, newest_size(databases, "database"),
                        newest_size(repositories, "repository"), duration_s, stamp)


class LegacyCollector(Collector):
    """The series the legacy ``backup.sh`` wrote to ``backup_metrics.prom``, with their old
    names, help texts and meaning. ``mt5_backup_last_timestamp`` carries the time in a label
    (``ts``), against Prometheus practice, because the old dashboards read it from there; it
    exists only here, never in the ``mt5backup_*`` families."""

    def __init__(self, directory: Callable[[], Path], enabled: Callable[[], bool]) -> None:
        self._directory = directory
        self._enabled = enabled

    def collect(self) -> Iterable[Metric]:
        if not self._enabled():
            return
        directory = self._directory()
        values = legacy_values(state.load_state(directory), spool.load_manifests(directory))
        yield GaugeMetricFamily("mt5_backup_status", "1=success, 0=failure",
                                value=values.status)
        yield GaugeMetricFamily("mt5_backup_db_size_bytes", "Size of last DB dump in bytes",
                                value=values.db_size_bytes)
        yield GaugeMetricFamily("mt5_backup_repo_size_bytes",
                                "Size of last repo backup in bytes", value=values.repo_size_bytes)
        yield GaugeMetricFamily("mt5_backup_duration_seconds",
                                "Duration of last backup in seconds", value=values.duration_s)
        if values.last_timestamp is not None:
            stamp = GaugeMetricFamily("mt5_backup_last_timestamp",
                                      "ISO8601 timestamp of last backup", labels=["ts"])
            stamp.add_metric([values.last_timestamp], 1.0)
            yield stamp


def make_registry(directory: Callable[[], Path], live: LiveState,
                  legacy: Callable[[], bool] = lambda: False,
                  wal: Callable[[], bool] = lambda: False) -> CollectorRegistry:
    """The daemon's /metrics; ``legacy`` and ``wal`` are asked at each scrape."""
    registry = CollectorRegistry()
    registry.register(DiskCollector(directory, live))
    registry.register(LegacyCollector(directory, legacy))
    registry.register(WalCollector(directory, wal))
    return registry


def textfile_registry(directory: Path) -> CollectorRegistry:
    """What the node_exporter textfile holds: the ``mt5backup_*`` families that a file written
    at the end of a run can keep true, and the legacy series."""
    registry = CollectorRegistry()
    registry.register(DiskCollector(lambda: directory, None))
    registry.register(LegacyCollector(lambda: directory, lambda: True))
    return registry
