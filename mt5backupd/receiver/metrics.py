"""Receiver metrics, on a registry of their own (tests get a fresh one each)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mt5backupd import __version__

# `_created` series double the output and no alert or dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "mt5backup_receiver"
REJECTION_REASONS = (
    "unauthorized",
    "forbidden",
    "bad_request",
    "invalid_id",
    "not_found",
    "conflict",
    "upload_busy",
    "offset_mismatch",
    "too_large",
    "insufficient_storage",
    "checksum_mismatch",
    "size_mismatch",
    "request_timeout",  # a body that stopped arriving (408)
    "malformed_request",  # not parseable as HTTP (400 before any route or auth)
)


class _StorageCollector(Collector):
    """Reads usage at scrape time, so the numbers are never stale."""

    def __init__(self, usage: Callable[[], tuple[int, int]], partials: Callable[[], int]) -> None:
        self._usage = usage
        self._partials = partials

    def collect(self) -> Iterable[Metric]:
        used, free = self._usage()
        yield GaugeMetricFamily(f"{PREFIX}_storage_used_bytes",
                                "Bytes held by committed backups", value=used)
        yield GaugeMetricFamily(f"{PREFIX}_storage_free_bytes",
                                "Bytes free on the data_dir filesystem", value=free)
        yield GaugeMetricFamily(f"{PREFIX}_partial_uploads",
                                "Uploads not yet committed or aborted: resumable ones, and "
                                "one-shot ones being received (or left by a crash until the "
                                "next start)",
                                value=self._partials())


class ReceiverMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.bytes_received = Counter(f"{PREFIX}_bytes_received", "Body bytes written to disk",
                                      registry=r)
        self.uploads_in_flight = Gauge(f"{PREFIX}_uploads_in_flight",
                                       "Request bodies being received now", registry=r)
        self.commits = Counter(f"{PREFIX}_commits", "Backups committed (verified, published)",
                               ["kind"], registry=r)
        self.rejections = Counter(f"{PREFIX}_rejections", "Requests refused, by reason",
                                  ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        for kind in ("database", "repository"):
            self.commits.labels(kind=kind)
        Info(f"{PREFIX}_build", "Receiver version", registry=r).info({"version": __version__})

    def watch_storage(self, usage: Callable[[], tuple[int, int]],
                      partials: Callable[[], int]) -> None:
        self.registry.register(_StorageCollector(usage, partials))
