"""The receiver as a run sees it: the client for [remote], its preflight, "is this backup
already there", and the upload sessions a killed run left open (the journal)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from mt5backupd import runstate as state
from mt5backupd.backup import spool, upload_journal
from mt5backupd.backup.upload import (
    ReceiverAuthError,
    ReceiverClient,
    ReceiverNotTrusted,
    ReceiverRejected,
    ReceiverUnavailable,
    UploadProgress,
)
from mt5backupd.config import Config, is_plain_http_remote
from mt5backupd.config.secretfiles import remote_token
from mt5backupd.errors import ConfigError, Mt5BackupError
from mt5backupd.records import BackupRecord, find_same

ABORT_TIMEOUT_S = 10.0
PREFLIGHT_OK, PREFLIGHT_DOWN, PREFLIGHT_NOT_TRUSTED = "ok", "down", "not_trusted"


def receiver_client(cfg: Config) -> ReceiverClient | None:
    """A client for [remote], or None when no receiver is configured."""
    if not cfg.remote.url:
        return None
    token = remote_token(cfg.remote)
    if token is None:
        raise ConfigError("[remote] url is set but there is no token: set [remote] token_file "
                          "(or BACKUP_API_TOKEN)")
    if is_plain_http_remote(cfg.remote.url):
        # allowed ([remote] allow_http, or the legacy BACKUP_API_URL), but said on every run
        logger.warning("receiver {} is plain http:// to a host that is not loopback: the token "
                       "and the backups travel unencrypted; serve the receiver over TLS "
                       "([receiver] tls_cert/tls_key), switch [remote] url to https:// and "
                       "drop allow_http", cfg.remote.url)
    return ReceiverClient(cfg.remote.url, token, timeout_s=cfg.remote.timeout_s,
                          ca_file=cfg.remote.ca_file)


async def remote_preflight(client: ReceiverClient, on_unavailable: str,
                           directory: Path | None = None) -> tuple[str, str]:
    """(status, error): PREFLIGHT_OK when the receiver is healthy and takes the token; a bad
    token always fails. A receiver whose certificate does not verify is not an outage: the
    backup is still taken locally (whatever on_unavailable says) and the run ends with exit 4.
    The outcome is recorded in the state file (``directory``) for /health and the metrics."""
    status, error = PREFLIGHT_OK, ""
    try:
        await client.health()
        await client.whoami()
    except ReceiverNotTrusted as exc:
        logger.error("{}; taking the backup locally, upload stays pending", exc)
        status, error = PREFLIGHT_NOT_TRUSTED, str(exc)
    except ReceiverAuthError:
        raise
    except (ReceiverUnavailable, ReceiverRejected) as exc:
        if directory is not None:
            state.record_receiver(directory, state.RECEIVER_DOWN, str(exc))
        if on_unavailable == "abort":
            raise Mt5BackupError(f"{exc} ([remote] on_unavailable = abort: no backup taken)"
                                 ) from None
        logger.warning("{}; taking the backup locally, upload stays pending", exc)
        return PREFLIGHT_DOWN, str(exc)
    if directory is not None:
        state.record_receiver(directory, status, error)
    return status, error


async def remote_ids(client: ReceiverClient | None) -> frozenset[str]:
    """The ids the receiver already holds (empty when it cannot say: a name clash then shows
    at upload, as pending)."""
    if client is None:
        return frozenset()
    try:
        return frozenset(r.id for r in await client.list_backups())
    except Mt5BackupError:
        return frozenset()


async def find_remote(client: ReceiverClient, manifest: spool.Manifest) -> BackupRecord | None:
    """The receiver's record of exactly this backup, if it has one (a commit whose answer was
    lost, or a name conflict that is really the same bytes): ``records.find_same``."""
    try:
        records = await client.list_backups()
    except Mt5BackupError:
        return None
    return find_same(records, manifest.id, manifest.sha256, manifest.size)


def journal_session(directory: Path, file: str) -> Callable[[str], None]:
    return lambda uid: upload_journal.add(directory, uid, file)


def settle_journal(directory: Path, manifest: spool.Manifest, uid: str | None) -> None:
    """Once the manifest says what became of the session, the journal need not."""
    if uid is not None and (not manifest.pending or manifest.upload.session == uid):
        upload_journal.discard(directory, [uid])


async def settle_orphans(client: ReceiverClient, directory: Path) -> None:
    """Deal with the upload sessions a killed run left open on the receiver: resume the one of
    a complete local backup, abort the others (before, they lingered for partial_ttl_s)."""
    sessions = upload_journal.load(directory)
    if not sessions:
        return
    manifests = spool.load_manifests(directory)
    todo = upload_journal.plan(sessions, manifests)
    by_file = {m.file: m for m in manifests}
    done = list(todo.settled)
    for file, uid in todo.resume.items():
        manifest = by_file[file]
        manifest.upload = manifest.upload.with_session(uid)
        spool.save_manifest(directory, manifest)
        logger.info("upload session {} of {} (left by an interrupted run) will be resumed",
                    uid, file)
        done.append(uid)
    for uid in todo.abort:
        try:
            await asyncio.wait_for(client.abort(uid), ABORT_TIMEOUT_S)
        except (Mt5BackupError, TimeoutError) as exc:
            logger.warning("could not abort orphaned upload session {} (next run retries): {}",
                           uid, exc)
            continue
        logger.info("aborted upload session {} left open on the receiver by an interrupted "
                    "run ({})", uid, sessions[uid])
        done.append(uid)
    upload_journal.discard(directory, done)


async def abort_remote(client: ReceiverClient, progress: UploadProgress,
                       directory: Path) -> None:
    """Abort the session of a run that failed, so the receiver frees its partial at once."""
    if progress.uid is None:
        return
    try:
        await asyncio.wait_for(client.abort(progress.uid), ABORT_TIMEOUT_S)
        logger.info("remote upload {} aborted", progress.uid)
    except (Mt5BackupError, TimeoutError) as exc:
        logger.warning("could not abort remote upload {} (the next run retries): {}",
                       progress.uid, exc)
        return
    upload_journal.discard(directory, [progress.uid])
