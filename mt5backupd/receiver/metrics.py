"""Receiver metrics, on a registry of their own (tests get a fresh one each)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
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
    "store_unavailable",  # the object store did not answer (503, Retry-After)
    "object_locked",  # a delete refused: the backup is under Object Lock retention
    "method_not_allowed",  # a path that exists, with a method it does not take (405)
)
STORAGE_OPS = ("put", "get", "head", "list", "delete", "create_multipart", "upload_part",
               "upload_part_copy", "complete_multipart", "abort_multipart", "retention")


class _StorageCollector(Collector):
    """Reads usage at scrape time, so the numbers are never stale."""

    def __init__(self, usage: Callable[[], tuple[int, int | None]],
                 partials: Callable[[], int]) -> None:
        self._usage = usage
        self._partials = partials

    def collect(self) -> Iterable[Metric]:
        used, free = self._usage()
        yield GaugeMetricFamily(f"{PREFIX}_storage_used_bytes",
                                "Bytes held by committed backups", value=used)
        if free is not None:  # an object store has no "free": the gauge is absent there
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
        self.storage_requests = Counter(
            f"{PREFIX}_storage_requests", "Requests to the object store, by operation and "
            "result (ok, refused: a 4xx the receiver expects and handles, unavailable)",
            ["op", "result"], registry=r)
        self.storage_request_seconds = Histogram(
            f"{PREFIX}_storage_request_seconds", "Object store request latency", ["op"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r)
        for kind in ("database", "repository"):
            self.commits.labels(kind=kind)
        Info(f"{PREFIX}_build", "Receiver version", registry=r).info({"version": __version__})

    def storage_request(self, op: str, result: str, seconds: float) -> None:
        """One object store request, as the S3 backend reports it."""
        self.storage_requests.labels(op=op, result=result).inc()
        self.storage_request_seconds.labels(op=op).observe(seconds)

    def watch_storage(self, usage: Callable[[], tuple[int, int | None]],
                      partials: Callable[[], int]) -> None:
        self.registry.register(_StorageCollector(usage, partials))
