"""One backup run: the only module that wires dump, spool, upload and rotation together.

    pg_dump ─pipe─▶ pump thread (zstd) ─▶ [age thread] ─▶ SpoolFile (.partial, sha256)
                                              │ follows          then: fsync, pg_restore --list,
                                              ▼                  rename, .sha256, manifest,
                                        uploader ─▶ receiver     commit(sha256, size), rotation

The parts live beside it: ``database`` and ``repository`` (what a kind makes), ``remote`` (the
receiver), ``pending`` (late uploads), ``result`` (what a run reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger
from pyrage import x25519

from mt5backupd import runstate as state
from mt5backupd.backup import spool
from mt5backupd.backup.basebackup import base_spec
from mt5backupd.backup.compress import Writable
from mt5backupd.backup.database import database_spec
from mt5backupd.backup.encryption import (
    AGE_FORMAT,
    AGE_SUFFIX,
    EncryptingSink,
    parse_recipients,
)
from mt5backupd.backup.pending import upload_pending
from mt5backupd.backup.remote import (
    PREFLIGHT_DOWN,
    PREFLIGHT_NOT_TRUSTED,
    PREFLIGHT_OK,
    abort_remote,
    find_remote,
    journal_session,
    receiver_client,
    remote_ids,
    remote_preflight,
    settle_journal,
    settle_orphans,
)
from mt5backupd.backup.repository import repository_spec
from mt5backupd.backup.result import BackupResult, RunObserver
from mt5backupd.backup.runlock import RunLock
from mt5backupd.backup.runstart import RunStart
from mt5backupd.backup.shipspec import ProduceStats, ShipSpec
from mt5backupd.backup.upload import (
    GrowingSource,
    ReceiverClient,
    ReceiverNotTrusted,
    UploadProgress,
    commit_with_retries,
    send_following,
)
from mt5backupd.backup.upload_state import UploadState
from mt5backupd.config import Config
from mt5backupd.config.secretfiles import database_password
from mt5backupd.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PENDING,
    ConfigError,
    Mt5BackupError,
)
from mt5backupd.retention import LocalItem, select_rotation

ANOMALY_RATIO = 0.5
PROGRESS_LINE_INTERVAL_S = 0.5


async def run_backup(cfg: Config, observer: RunObserver | None = None, *,
                     show_progress: bool = False, start: RunStart | None = None) -> BackupResult:
    """Take one database backup. Raises Mt5BackupError for failures before any dump (config,
    lock, preflight); failures after that are reported in the result and cleaned up.

    ``start``: the run's lock and pg_dump, begun before this call (``--run-now`` begins it
    before its heavy imports); this call ends it. Without one it begins here."""
    async with start or RunStart(cfg) as opened:
        return await _run_locked(cfg, observer or RunObserver(), show_progress,
                                 lambda: database_spec(cfg, opened))


async def run_repository(cfg: Config, observer: RunObserver | None = None) -> BackupResult:
    """The weekly archive of the trading repository (legacy backup-full-repo.sh)."""
    repo = cfg.repository
    if repo.path is None:
        raise ConfigError("[repository] path is not set")
    cfg.local.dir.mkdir(parents=True, exist_ok=True, mode=0o750)

    async def make_spec() -> ShipSpec:
        return repository_spec(repo)

    with RunLock(cfg.local.dir):
        return await _run_locked(cfg, observer or RunObserver(), False, make_spec)


async def run_base(cfg: Config, observer: RunObserver | None = None) -> BackupResult:
    """A base backup for point-in-time recovery (pg_basebackup; backup/basebackup)."""
    cfg.local.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    with RunLock(cfg.local.dir):
        password = database_password(cfg.database)
        return await _run_locked(cfg, observer or RunObserver(), False,
                                 lambda: base_spec(cfg, password))


def rotate(directory: Path, keep: int, kind: str = spool.KIND_DATABASE) -> list[str]:
    manifests = spool.load_manifests(directory, kind)
    by_id = {m.id: m for m in manifests}
    doomed = select_rotation([LocalItem(m.id, m.created, m.pending) for m in manifests], keep)
    for backup in doomed:
        spool.remove_backup(directory, by_id[backup])
        logger.info("rotated out local backup {}", backup)
    return doomed


async def _run_locked(cfg: Config, observer: RunObserver, show_progress: bool,
                      make_spec: Callable[[], Awaitable[ShipSpec]]) -> BackupResult:
    """Shared by every kind, under the run lock: preflight, pending uploads, produce, ship."""
    directory = cfg.local.dir
    if spool.clean_partials(directory):
        logger.warning("removed leftovers of an interrupted run from {}/{}", directory,
                       spool.PARTIAL_DIR)
    client = receiver_client(cfg)
    try:
        # the receiver's preflight and the kind's (database connection, tool versions) wait
        # on different machines: at once, then the first failure in this order is reported
        remote_outcome, spec = await asyncio.gather(
            remote_preflight(client, cfg.remote.on_unavailable, directory)
            if client is not None else _no_remote(), make_spec(), return_exceptions=True)
        if isinstance(remote_outcome, BaseException):
            raise remote_outcome
        if isinstance(spec, BaseException):
            raise spec
        remote, remote_error = remote_outcome
        remote_ok = client is not None and remote == PREFLIGHT_OK
        pending_done = 0
        if client is not None and remote_ok:
            await settle_orphans(client, directory)
            pending_done, _left = await upload_pending(client, cfg, observer)
        result = await _ship(cfg, client if remote_ok else None, spec, observer, show_progress)
        result.pending_uploaded = pending_done
        if client is not None and not remote_ok and result.ok:
            result.upload_state = UploadState.pending().state
            result.exit_code = EXIT_PENDING
        if remote == PREFLIGHT_NOT_TRUSTED and result.ok:
            result.exit_code = EXIT_CONFIG
            result.error = remote_error
        return result
    finally:
        if client is not None:
            await client.close()


async def _no_remote() -> tuple[str, str]:
    return PREFLIGHT_DOWN, ""


@dataclass
class _Run:
    """One backup in flight: what the steps of ``_ship`` share."""

    cfg: Config
    spec: ShipSpec
    client: ReceiverClient | None
    draft: spool.Manifest  # everything known before the bytes; _publish completes it
    previous: list[spool.Manifest]  # earlier backups of the kind, for the size check
    spooled: spool.SpoolFile
    source: GrowingSource
    progress: UploadProgress
    t0: float
    sink: Writable  # what the kind produces into: the spool file, or age in front of it
    # The read-back check's key: the file is encrypted to it too, and it lives in this process
    # only (which holds the plaintext anyway), so the run can prove what it stored opens.
    check_identities: list[x25519.Identity]
    upload_task: asyncio.Task[UploadProgress] | None = None
    line_task: asyncio.Task[None] | None = None
    kept: bool = False  # published: the files stay whatever happens next

    @property
    def directory(self) -> Path:
        return self.cfg.local.dir

    @property
    def backup(self) -> str:
        return self.draft.id


async def _ship(cfg: Config, client: ReceiverClient | None, spec: ShipSpec,
                observer: RunObserver, show_progress: bool) -> BackupResult:
    """Produce, check, publish and upload one backup, then rotate. The three ways out: it
    fails before it is published (everything discarded, a failed result), it is cancelled
    after (kept, upload pending and resumable), or it is complete (upload outcome recorded)."""
    run = await _start(cfg, client, spec, observer, show_progress)
    try:
        stats = await spec.produce(run.sink)
        if isinstance(run.sink, EncryptingSink):  # age's last chunk, before the file is read
            await asyncio.get_running_loop().run_in_executor(None, run.sink.finish)
        manifest = await _publish(run, stats)
    except BaseException as exc:
        if run.kept:
            raise
        await _discard(run)
        if not isinstance(exc, Mt5BackupError | OSError):
            raise
        error = str(exc) if isinstance(exc, Mt5BackupError) else \
            f"{exc.strerror or exc} ({exc.filename or run.directory})"
        logger.error("backup {} failed: {}", run.backup, error)
        return BackupResult(ok=False, exit_code=EXIT_FAILURE, id=run.backup, error=error,
                            compression=spec.compression, duration_s=time.monotonic() - run.t0)
    if manifest.size_anomaly:
        logger.warning("size anomaly: {} is {} bytes, previous {} was {}", run.backup,
                       manifest.size, run.previous[-1].id, run.previous[-1].size)
    exit_code = await _finish_upload(run, manifest)
    _end_progress_line(run)
    result = BackupResult(
        ok=True, exit_code=exit_code, id=manifest.id, file=run.directory / manifest.file,
        size=manifest.size, raw_bytes=stats.raw_bytes, sha256=manifest.sha256,
        compression=spec.compression, duration_s=time.monotonic() - run.t0,
        dump_duration_s=stats.duration_s, upload_state=manifest.upload.state,
        upload_retries=run.progress.retries, uploaded_bytes=run.progress.sent_bytes,
        resumed_at=run.progress.resumed_at, size_anomaly=manifest.size_anomaly,
        rotated=rotate(run.directory, spec.keep, spec.kind) if spec.keep else [],
    )
    logger.info("backup {} ok: {} bytes sha256 {} in {:.1f} s, upload {}", result.id,
                result.size, result.sha256[:12], result.duration_s, result.upload_state)
    return result


async def ship(cfg: Config, client: ReceiverClient | None, spec: ShipSpec,
               observer: RunObserver | None = None) -> BackupResult:
    """One object through the same path as every backup, for a caller that holds its own
    client and ordering (the WAL shipper): produce, spool, sha256, upload, publish, commit."""
    return await _ship(cfg, client, spec, observer or RunObserver(), False)


async def _start(cfg: Config, client: ReceiverClient | None, spec: ShipSpec,
                 observer: RunObserver, show_progress: bool) -> _Run:
    """Name the backup, open its spool file and start the upload that follows it."""
    directory = cfg.local.dir
    started, t0 = spec.began or (datetime.now(UTC), time.monotonic())
    encryption = cfg.encryption
    suffix = spec.suffix + (AGE_SUFFIX if encryption.enabled else "")
    backup = spec.name + suffix if spec.name else spool.unique_backup_name(
        directory, spec.prefix, started, suffix, await remote_ids(client))
    draft = spool.Manifest(
        id=backup, file=backup, kind=spec.kind, size=0, sha256="", compression=spec.compression,
        started=started.isoformat(), finished="", duration_s=0.0, dump_duration_s=0.0,
        raw_bytes=0, upload=UploadState.initial(bool(cfg.remote.url)),
        encryption={"format": AGE_FORMAT, "recipients": list(encryption.recipients)}
        if encryption.enabled else {},
        **{"database": "", **spec.manifest_fields})
    previous = [] if spec.name else spool.load_manifests(directory, spec.kind)
    spooled = spool.SpoolFile(directory, backup)
    source = GrowingSource(spooled.path, lambda: spooled.size)
    spooled.on_write = source.notify_threadsafe
    sink: Writable = spooled
    check_identities: list[x25519.Identity] = []
    if encryption.enabled:
        check_identities.append(x25519.Identity.generate())
        sink = EncryptingSink(spooled, [*parse_recipients(encryption.recipients),
                                        check_identities[0].to_public()])
    progress = UploadProgress(on_retry=observer.on_upload_retry,
                              on_bytes=observer.on_uploaded_bytes,
                              on_session=journal_session(directory, backup))
    run = _Run(cfg, spec, client, draft, previous, spooled, source, progress, t0, sink,
               check_identities)
    if client is not None:
        run.upload_task = asyncio.create_task(send_following(
            client, source, name=backup, kind=spec.kind, metadata=spool.upload_metadata(draft),
            max_retries=cfg.remote.max_retries, retry_delay_s=cfg.remote.retry_delay_s,
            progress=progress))
    if show_progress:
        run.line_task = asyncio.create_task(_progress_line(spooled, progress))
    logger.info("backup {} started: {} ({}{})", backup, spec.describe, spec.compression,
                f", age to {len(encryption.recipients)} recipient(s)" if encryption.enabled
                else "")
    return run


async def _publish(run: _Run, stats: ProduceStats) -> spool.Manifest:
    """Flush and read back the finished file, then give it its final name, sidecar and
    manifest. Cancelled after the publication happened, the backup is kept, upload pending."""
    loop = asyncio.get_running_loop()
    spooled, previous = run.spooled, run.previous
    # every byte is written: the upload sends its last ones and ends its PATCH meanwhile (the
    # commit still waits for the checks below)
    run.source.close(spooled.size)
    # the read-back check reads from the page cache; it need not wait for the flush (but
    # both must be over before the file is discarded or published)
    outcomes = await asyncio.gather(loop.run_in_executor(None, spooled.sync),
                                    run.spec.verify(spooled.path, run.check_identities),
                                    return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    manifest = dataclasses.replace(
        run.draft, size=spooled.size, sha256=spooled.sha256,
        finished=datetime.now(UTC).isoformat(), duration_s=round(time.monotonic() - run.t0, 3),
        dump_duration_s=round(stats.duration_s, 3), raw_bytes=stats.raw_bytes,
        # objects with fixed names (WAL) are not runs of one thing: their sizes vary by design
        size_anomaly=bool(not run.spec.name and previous
                          and previous[-1].compression == run.spec.compression
                          and spooled.size < previous[-1].size * ANOMALY_RATIO),
        extra={**run.draft.extra, **stats.extra})
    publishing = loop.run_in_executor(None, spool.publish, spooled,
                                      run.directory / manifest.file, manifest, run.directory)
    try:
        await asyncio.shield(publishing)
    except BaseException:
        # cancelled while the publish thread runs: it must end before the files are judged
        with contextlib.suppress(BaseException):
            await publishing
        if publishing.done() and not publishing.cancelled() \
                and publishing.exception() is None:
            _keep_pending(run, manifest)
        raise
    return manifest


def _keep_pending(run: _Run, manifest: spool.Manifest) -> None:
    """The backup is complete locally but the run is being cancelled (daemon shutdown): keep
    it with its session recorded, so `upload-pending` resumes instead of starting over."""
    run.kept = True
    if run.upload_task is not None:
        run.upload_task.cancel()
    manifest.upload = UploadState.pending(run.progress.uid)
    spool.save_manifest(run.directory, manifest)


async def _discard(run: _Run) -> None:
    """Undo a run that failed before publication: upload stopped and aborted, file removed."""
    if run.upload_task is not None and run.client is not None:
        run.upload_task.cancel()
        with contextlib.suppress(BaseException):
            await run.upload_task
        await asyncio.shield(abort_remote(run.client, run.progress, run.directory))
    if isinstance(run.sink, EncryptingSink):
        await asyncio.get_running_loop().run_in_executor(None, run.sink.abort)
    run.spooled.discard()
    _end_progress_line(run)


async def _finish_upload(run: _Run, manifest: spool.Manifest) -> int:
    """Wait for the upload, commit it and record the outcome in the manifest; the exit code."""
    if run.upload_task is None or run.client is None:
        return EXIT_PENDING if run.cfg.remote.url else EXIT_OK
    remote = run.cfg.remote
    exit_code = EXIT_OK
    try:
        await run.upload_task
        record = await commit_with_retries(
            run.client, run.progress, name=manifest.id, sha256=manifest.sha256,
            size=manifest.size, max_retries=remote.max_retries,
            retry_delay_s=remote.retry_delay_s)
        manifest.upload = UploadState.uploaded(record.id, run.progress.retries)
    except Mt5BackupError as exc:
        found = await find_remote(run.client, manifest)
        if found is not None:  # committed, only the answer was lost
            manifest.upload = UploadState.uploaded(found.id, run.progress.retries)
        else:
            exit_code = _upload_failed(run, manifest, exc)
    except BaseException:
        _keep_pending(run, manifest)
        raise
    spool.save_manifest(run.directory, manifest)
    settle_journal(run.directory, manifest, run.progress.uid)
    return exit_code


def _upload_failed(run: _Run, manifest: spool.Manifest, exc: Mt5BackupError) -> int:
    logger.error("upload of {} failed, kept locally as pending: {}", manifest.id, exc)
    manifest.upload = UploadState.pending(run.progress.uid, str(exc))
    if isinstance(exc, ReceiverNotTrusted):
        state.record_receiver(run.directory, state.RECEIVER_NOT_TRUSTED, str(exc))
        return EXIT_CONFIG
    return EXIT_PENDING


def _end_progress_line(run: _Run) -> None:
    if run.line_task is not None:
        run.line_task.cancel()
        run.line_task = None
        sys.stderr.write("\n")


async def _progress_line(spooled: spool.SpoolFile, progress: UploadProgress) -> None:
    """A live line on a terminal; silent under systemd."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(PROGRESS_LINE_INTERVAL_S)
        elapsed = time.monotonic() - started
        sys.stderr.write(f"\r  {elapsed:6.1f} s  stored {spooled.size / 1e6:8.1f} MB  "
                         f"uploaded {progress.sent_bytes / 1e6:8.1f} MB ")
        sys.stderr.flush()
