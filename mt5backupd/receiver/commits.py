"""After a backup is committed (resumable or one-shot): count it, log it, and apply the
retention policy when [receiver] retention is automatic."""

from __future__ import annotations

from aiohttp import web
from loguru import logger

from mt5backupd.receiver.context import CONFIG_KEY, METRICS_KEY, STORAGE_KEY, principal
from mt5backupd.receiver.storage import StorageError
from mt5backupd.records import BackupRecord
from mt5backupd.retention import Policy


async def after_commit(request: web.Request, record: BackupRecord) -> None:
    request.app[METRICS_KEY].commits.labels(kind=record.kind).inc()
    client = principal(request).name
    log = logger.bind(client=client)
    log.info("committed {} ({} bytes, {})", record.id, record.size, record.kind)
    retention = request.app[CONFIG_KEY].retention
    if retention.auto:
        policy = Policy(retention.keep_last, retention.keep_daily, retention.keep_weekly,
                        retention.keep_monthly)
        try:
            pruned = await request.app[STORAGE_KEY].prune(client, policy)
        except (StorageError, OSError) as exc:
            # the backup is committed: a failed clean-up must never turn its answer into an error
            log.warning("retention after committing {} failed: {}", record.id, exc)
            return
        for gone in pruned.removed:
            log.info("retention removed {}", gone.id)
        for kept in pruned.locked:
            log.info("retention kept {}: under object lock", kept.id)
