"""Backups whose upload did not happen: upload them later, oldest first, resuming their
recorded sessions (the hourly job, `mt5backupd upload-pending`, and the start of every run)."""

from __future__ import annotations

from loguru import logger

from mt5backupd import runstate as state
from mt5backupd.backup import spool
from mt5backupd.backup.remote import (
    find_remote,
    journal_session,
    receiver_client,
    settle_journal,
    settle_orphans,
)
from mt5backupd.backup.result import RunObserver
from mt5backupd.backup.runlock import RunLock
from mt5backupd.backup.upload import (
    GrowingSource,
    ReceiverAuthError,
    ReceiverClient,
    ReceiverNotTrusted,
    ReceiverUnavailable,
    UploadProgress,
    commit_with_retries,
    send_following,
)
from mt5backupd.backup.upload_state import UploadState
from mt5backupd.config import Config
from mt5backupd.errors import ConfigError, Mt5BackupError, UploadPendingError

UPLOADED, RETRY_LATER, REJECTED = "uploaded", "retry-later", "rejected"


async def upload_one(client: ReceiverClient, cfg: Config, manifest: spool.Manifest,
                     observer: RunObserver) -> str:
    """Upload a finished local backup, resuming its recorded session; update its manifest.
    Returns UPLOADED, RETRY_LATER (receiver unavailable) or REJECTED (refused for this backup:
    the others may still go)."""
    directory = cfg.local.dir
    progress = UploadProgress(uid=manifest.upload.session, on_retry=observer.on_upload_retry,
                              on_bytes=observer.on_uploaded_bytes,
                              on_session=journal_session(directory, manifest.file))
    try:
        await send_following(client, GrowingSource.complete(directory / manifest.file),
                             name=manifest.id, kind=manifest.kind,
                             metadata=spool.upload_metadata(manifest),
                             max_retries=cfg.remote.max_retries,
                             retry_delay_s=cfg.remote.retry_delay_s, progress=progress)
        record = await commit_with_retries(client, progress, name=manifest.id,
                                           sha256=manifest.sha256, size=manifest.size,
                                           max_retries=cfg.remote.max_retries,
                                           retry_delay_s=cfg.remote.retry_delay_s)
    except ReceiverAuthError:  # also ReceiverNotTrusted: the next one would fail the same way
        raise
    except Mt5BackupError as exc:
        found = await find_remote(client, manifest)
        if found is None:
            down = isinstance(exc, ReceiverUnavailable)
            manifest.upload = UploadState.pending(progress.uid if down else None, str(exc))
            spool.save_manifest(directory, manifest)
            settle_journal(directory, manifest, progress.uid)
            return RETRY_LATER if down else REJECTED
        record = found
    manifest.upload = UploadState.uploaded(record.id, progress.retries)
    spool.save_manifest(directory, manifest)
    settle_journal(directory, manifest, progress.uid)
    return UPLOADED


async def upload_pending(client: ReceiverClient, cfg: Config,
                         observer: RunObserver | None = None) -> tuple[int, int]:
    """Upload every pending local backup, oldest first. Returns (uploaded, still pending)."""
    observer = observer or RunObserver()
    pending = [m for m in spool.load_manifests(cfg.local.dir) if m.pending]
    done = 0
    for manifest in pending:
        if not (cfg.local.dir / manifest.file).exists():
            logger.error("pending backup {} has no file any more; skipped", manifest.id)
            continue
        logger.info("uploading pending backup {}", manifest.id)
        outcome = await upload_one(client, cfg, manifest, observer)
        if outcome == UPLOADED:
            done += 1
            continue
        logger.warning("pending backup {} still not uploaded: {}", manifest.id,
                       manifest.upload.error)
        if outcome == RETRY_LATER:
            break  # the receiver is not taking uploads; the rest would fail the same way
    return done, len(pending) - done


async def pending_command(cfg: Config) -> tuple[int, int]:
    """`mt5backupd upload-pending`: under the run lock, so it never races a backup run."""
    client = receiver_client(cfg)
    if client is None:
        raise ConfigError("[remote] url is not set: there is nowhere to upload to")
    cfg.local.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    directory = cfg.local.dir
    with RunLock(directory):
        try:
            try:
                await client.health()
                await client.whoami()
            except ReceiverNotTrusted as exc:
                state.record_receiver(directory, state.RECEIVER_NOT_TRUSTED, str(exc))
                raise
            except ReceiverUnavailable as exc:
                # an outage, not a failure: the backups are safe locally, like --run-now's 3
                state.record_receiver(directory, state.RECEIVER_DOWN, str(exc))
                left = sum(m.pending for m in spool.load_manifests(directory))
                raise UploadPendingError(f"{exc}; {left} backup(s) still pending") from None
            state.record_receiver(directory, state.RECEIVER_OK)
            await settle_orphans(client, directory)
            return await upload_pending(client, cfg)
        finally:
            await client.close()
