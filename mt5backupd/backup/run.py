"""One database backup run: the only module that wires dump, spool, upload and rotation together.

    pg_dump ─pipe─▶ pump thread (zstd) ─▶ SpoolFile (.partial, sha256)
                                              │ follows          then: fsync, pg_restore --list,
                                              ▼                  rename, .sha256, manifest,
                                        uploader ─▶ receiver     commit(sha256, size), rotation
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from loguru import logger

from mt5backupd.backup import archive, compress, spool, upload_journal
from mt5backupd.backup.dump import (
    check_dump_compatible,
    pg_child_env,
    pg_dump_argv,
    run_dump,
    server_major,
    tool_version,
)
from mt5backupd.backup.pgrestore import list_archive
from mt5backupd.backup.rowcounts import count_rows
from mt5backupd.backup.runlock import RunLock
from mt5backupd.backup.upload import (
    GrowingSource,
    ReceiverAuthError,
    ReceiverClient,
    ReceiverNotTrusted,
    ReceiverRejected,
    ReceiverUnavailable,
    UploadProgress,
    commit_with_retries,
    send_following,
)
from mt5backupd.config import Config, DatabaseConfig, Secret, is_plain_http_remote
from mt5backupd.config.secretfiles import check_pgpass, database_password, remote_token
from mt5backupd.daemon import state
from mt5backupd.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PENDING,
    ConfigError,
    Mt5BackupError,
    UploadPendingError,
)
from mt5backupd.retention import LocalItem, select_rotation

KIND = "database"
ANOMALY_RATIO = 0.5
ABORT_TIMEOUT_S = 10.0


@dataclass
class RunObserver:
    """Hooks for live progress (TTY line, daemon metrics); all optional."""

    on_uploaded_bytes: Callable[[int], None] = field(default=lambda _n: None)
    on_upload_retry: Callable[[], None] = field(default=lambda: None)


@dataclass
class BackupResult:
    ok: bool
    exit_code: int
    id: str = ""
    file: Path | None = None
    size: int = 0
    raw_bytes: int = 0
    sha256: str = ""
    compression: str = ""
    duration_s: float = 0.0
    dump_duration_s: float = 0.0
    upload_state: str = ""
    upload_retries: int = 0
    uploaded_bytes: int = 0
    resumed_at: list[int] = field(default_factory=list)
    size_anomaly: bool = False
    pending_uploaded: int = 0
    rotated: list[str] = field(default_factory=list)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "exit_code": self.exit_code, "id": self.id,
            "file": str(self.file) if self.file else None, "size": self.size,
            "raw_bytes": self.raw_bytes, "sha256": self.sha256, "compression": self.compression,
            "duration_s": round(self.duration_s, 3),
            "dump_duration_s": round(self.dump_duration_s, 3),
            "upload_state": self.upload_state, "upload_retries": self.upload_retries,
            "uploaded_bytes": self.uploaded_bytes, "resumed_at": self.resumed_at,
            "size_anomaly": self.size_anomaly,
            "pending_uploaded": self.pending_uploaded, "rotated": self.rotated,
            "error": self.error or None,
        }

    def summary(self) -> str:
        if not self.ok:
            return f"backup FAILED: {self.error}"
        mb = 1e6
        rate = self.raw_bytes / mb / self.dump_duration_s if self.dump_duration_s else 0.0
        lines = [
            f"backup {self.id}  OK" + ("  (upload PENDING)" if self.upload_state == "pending"
                                       else ""),
            f"  file      {self.file}",
            f"  size      {self.size / mb:.1f} MB ({self.compression}; pg_dump output "
            f"{self.raw_bytes / mb:.1f} MB)",
            f"  sha256    {self.sha256}",
            f"  duration  {self.duration_s:.1f} s (pg_dump {self.dump_duration_s:.1f} s, "
            f"{rate:.1f} MB/s)",
            f"  upload    {self.upload_state}"
            + (f" ({self.upload_retries} retries)" if self.upload_retries else ""),
        ]
        if self.error:  # a good local backup, but e.g. the receiver is not trusted
            lines.append(f"  ERROR     {self.error}")
        if self.size_anomaly:
            lines.append("  WARNING   size anomaly: less than half of the previous backup")
        if self.pending_uploaded:
            lines.append(f"  pending   {self.pending_uploaded} earlier backup(s) uploaded first")
        if self.rotated:
            lines.append(f"  rotated   {', '.join(self.rotated)}")
        return "\n".join(lines)


@dataclass
class ServerInfo:
    version: str
    major: int


async def connect_db(cfg: DatabaseConfig, password: Secret | None, dbname: str) -> Any:
    """An asyncpg connection with the configured credentials; errors as one clear line."""
    where = (f"{cfg.user or 'default user'}@{cfg.host or 'default host'}:"
             f"{cfg.port or 'default port'}")
    try:
        return await asyncpg.connect(
            host=cfg.host, port=cfg.port, user=cfg.user, database=dbname,
            password=password.reveal() if password else None, timeout=15,
        )
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise ConfigError(f"[database] authentication failed for {where}: {exc}") from None
    except asyncpg.InvalidCatalogNameError:
        raise ConfigError(f"[database] dbname: database {dbname!r} does not exist on "
                          f"{where}") from None
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise Mt5BackupError(f"database unreachable ({where}): {exc}") from None


async def db_preflight(cfg: DatabaseConfig, password: Secret | None) -> ServerInfo:
    """Connect once with asyncpg: proves credentials and reads the server version."""
    conn = await connect_db(cfg, password, cfg.dbname)
    try:
        version = str(await conn.fetchval("SHOW server_version"))
        num = int(await conn.fetchval("SHOW server_version_num"))
    finally:
        await conn.close()
    return ServerInfo(version.split()[0], server_major(num))


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


PREFLIGHT_OK, PREFLIGHT_DOWN, PREFLIGHT_NOT_TRUSTED = "ok", "down", "not_trusted"


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
        manifest.upload = {**manifest.upload, "session": uid}
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


def _journal_session(directory: Path, file: str) -> Callable[[str], None]:
    return lambda uid: upload_journal.add(directory, uid, file)


def _settle_journal(directory: Path, manifest: spool.Manifest, uid: str | None) -> None:
    """Once the manifest says what became of the session, the journal need not."""
    if uid is not None and (not manifest.pending or manifest.upload.get("session") == uid):
        upload_journal.discard(directory, [uid])


async def _find_remote(client: ReceiverClient, name: str, sha256: str,
                       size: int) -> dict[str, Any] | None:
    """The receiver's record of exactly this backup, if it has one (a commit whose answer was
    lost, or a name conflict that is really the same bytes)."""
    try:
        records = await client.list_backups()
    except Mt5BackupError:
        return None
    for record in records:
        if record.get("id") == name and record.get("sha256") == sha256 \
                and record.get("size") == size:
            return record
    return None


UPLOADED, RETRY_LATER, REJECTED = "uploaded", "retry-later", "rejected"


async def upload_one(client: ReceiverClient, cfg: Config, directory: Path,
                     manifest: spool.Manifest, observer: RunObserver) -> str:
    """Upload a finished local backup, resuming its recorded session; update its manifest.
    Returns UPLOADED, RETRY_LATER (receiver unavailable) or REJECTED (refused for this backup:
    the others may still go)."""
    path = directory / manifest.file
    progress = UploadProgress(uid=manifest.upload.get("session"),
                              on_retry=observer.on_upload_retry,
                              on_bytes=observer.on_uploaded_bytes,
                              on_session=_journal_session(directory, manifest.file))
    try:
        await send_following(client, GrowingSource.complete(path), name=manifest.file,
                             kind=manifest.kind, metadata=_remote_metadata(manifest),
                             max_retries=cfg.remote.max_retries,
                             retry_delay_s=cfg.remote.retry_delay_s, progress=progress)
        record = await commit_with_retries(client, progress, name=manifest.file,
                                           sha256=manifest.sha256, size=manifest.size,
                                           max_retries=cfg.remote.max_retries,
                                           retry_delay_s=cfg.remote.retry_delay_s)
    except ReceiverAuthError:  # also ReceiverNotTrusted: the next one would fail the same way
        raise
    except Mt5BackupError as exc:
        found = await _find_remote(client, manifest.file, manifest.sha256, manifest.size)
        if found is None:
            manifest.upload = {"state": spool.UPLOAD_PENDING,
                               "session": progress.uid if isinstance(exc, ReceiverUnavailable)
                               else None, "error": str(exc)}
            spool.save_manifest(directory, manifest)
            _settle_journal(directory, manifest, progress.uid)
            return RETRY_LATER if isinstance(exc, ReceiverUnavailable) else REJECTED
        record = found
    manifest.upload = _uploaded(record, progress)
    spool.save_manifest(directory, manifest)
    _settle_journal(directory, manifest, progress.uid)
    return UPLOADED


def _remote_metadata(manifest: spool.Manifest) -> dict[str, Any]:
    return {"database": manifest.database, "compression": manifest.compression,
            "started": manifest.started, "pg_dump_version": manifest.pg_dump_version,
            "server_version": manifest.server_version}


def _uploaded(record: dict[str, Any], progress: UploadProgress) -> dict[str, Any]:
    return {"state": spool.UPLOAD_UPLOADED, "remote_id": record.get("id"),
            "uploaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "retries": progress.retries}


async def upload_pending(client: ReceiverClient, cfg: Config,
                         observer: RunObserver | None = None) -> tuple[int, int]:
    """Upload every pending local backup, oldest first. Returns (uploaded, still pending)."""
    observer = observer or RunObserver()
    pending = [m for m in spool.load_manifests(cfg.local.dir) if m.pending]
    done = 0
    for manifest in pending:
        if not (cfg.local.dir / manifest.file).exists():
            logger.error("pending backup {} has no file any more; skipped", manifest.file)
            continue
        logger.info("uploading pending backup {}", manifest.file)
        outcome = await upload_one(client, cfg, cfg.local.dir, manifest, observer)
        if outcome == UPLOADED:
            done += 1
            continue
        logger.warning("pending backup {} still not uploaded: {}", manifest.file,
                       manifest.upload.get("error"))
        if outcome == RETRY_LATER:
            break  # the receiver is not taking uploads; the rest would fail the same way
    return done, len(pending) - done


def rotate(directory: Path, keep: int, kind: str = KIND) -> list[str]:
    manifests = spool.load_manifests(directory, kind)
    by_id = {m.id: m for m in manifests}
    doomed = select_rotation([LocalItem(m.id, m.created, m.pending) for m in manifests], keep)
    for backup in doomed:
        spool.remove_backup(directory, by_id[backup])
        logger.info("rotated out local backup {}", backup)
    return doomed


async def _abort_remote(client: ReceiverClient, progress: UploadProgress,
                        directory: Path) -> None:
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


async def _progress_line(spooled: spool.SpoolFile, progress: UploadProgress) -> None:
    """A live line on a terminal; silent under systemd."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(0.5)
        elapsed = time.monotonic() - started
        sys.stderr.write(f"\r  {elapsed:6.1f} s  stored {spooled.size / 1e6:8.1f} MB  "
                         f"uploaded {progress.sent_bytes / 1e6:8.1f} MB ")
        sys.stderr.flush()


@dataclass
class ProduceStats:
    raw_bytes: int  # bytes before our compression (pg_dump's output, the tar stream)
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)  # into the manifest's "extra"


@dataclass
class ShipSpec:
    """What one run makes and how it is checked; everything else (spool, upload, publication,
    rotation) is the same for every kind."""

    kind: str
    prefix: str  # backup name prefix (the database name, "repository")
    suffix: str  # file suffix (.dump.zst, .tar.zst, ...)
    compression: str  # as recorded in the manifest
    keep: int
    produce: Callable[[spool.SpoolFile], Awaitable[ProduceStats]]
    verify: Callable[[Path], Awaitable[None]]
    describe: str  # "mt5_trading" / "/srv/trading-repo" for the log line
    metadata: dict[str, Any] = field(default_factory=dict)  # to the receiver and the manifest
    manifest_fields: dict[str, Any] = field(default_factory=dict)  # Manifest attributes


async def run_backup(cfg: Config, observer: RunObserver | None = None, *,
                     show_progress: bool = False) -> BackupResult:
    """Take one database backup. Raises Mt5BackupError for failures before any dump (config,
    lock, preflight); failures after that are reported in the result and cleaned up."""
    observer = observer or RunObserver()
    directory = cfg.local.dir
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    with RunLock(directory):
        return await _locked_run(cfg, observer, show_progress)


async def _database_spec(cfg: Config, password: Secret | None) -> ShipSpec:
    """Preflight of the database side, then the spec of its dump."""
    db = cfg.database
    server = await db_preflight(db, password)
    dump_major, dump_version = await tool_version(db.pg_dump, "pg_dump")
    check_dump_compatible(dump_major, server.major, db.pg_dump)
    await tool_version(db.pg_restore, "pg_restore")

    async def produce(spooled: spool.SpoolFile) -> ProduceStats:
        def pump(read_fd: int, on_read: Callable[[int], None]) -> int:
            return compress.pump(read_fd, spooled, db.compression, db.compression_threads,
                                 on_read)

        # Counts and dump share one exported snapshot; the exporting transaction stays open
        # until pg_dump is done with it.
        conn = await connect_db(db, password, db.dbname)
        transaction = conn.transaction(isolation="repeatable_read", readonly=True)
        try:
            try:
                await transaction.start()
                snapshot = str(await conn.fetchval("SELECT pg_export_snapshot()"))
                counts = await count_rows(conn, db.exact_count_max_bytes)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                raise Mt5BackupError(f"snapshot and row counts failed: {exc}") from None
            with pg_child_env(db, password) as env:
                stats = await run_dump(pg_dump_argv(db, snapshot), env, pump,
                                       stall_timeout_s=db.stall_timeout_s)
        finally:
            # the server may be gone (that is what failed the dump): never mask the reason
            with contextlib.suppress(Exception):
                await asyncio.wait_for(transaction.rollback(), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 10)
        return ProduceStats(stats.raw_bytes, stats.duration_s,
                            {"row_counts": counts, "snapshot": snapshot})

    async def verify(path: Path) -> None:
        await list_archive(db.pg_restore, path)

    return ShipSpec(
        kind=KIND, prefix=db.dbname, suffix=db.compression.suffix,
        compression=str(db.compression), keep=cfg.local.keep, produce=produce, verify=verify,
        describe=db.dbname,
        metadata={"database": db.dbname, "compression": str(db.compression),
                  "pg_dump_version": dump_version, "server_version": server.version},
        manifest_fields={"database": db.dbname, "pg_dump_version": dump_version,
                         "server_version": server.version},
    )


async def _locked_run(cfg: Config, observer: RunObserver, show_progress: bool) -> BackupResult:
    password = database_password(cfg.database)
    with contextlib.suppress(RuntimeError):  # no home directory: no ~/.pgpass to check
        check_pgpass()
    return await _run_locked(cfg, observer, show_progress,
                             lambda: _database_spec(cfg, password))


async def _run_locked(cfg: Config, observer: RunObserver, show_progress: bool,
                      make_spec: Callable[[], Awaitable[ShipSpec]]) -> BackupResult:
    """Shared by every kind, under the run lock: preflight, pending uploads, produce, ship."""
    directory = cfg.local.dir
    if spool.clean_partials(directory):
        logger.warning("removed leftovers of an interrupted run from {}/{}", directory,
                       spool.PARTIAL_DIR)
    client = receiver_client(cfg)
    try:
        remote, remote_error = PREFLIGHT_DOWN, ""
        if client is not None:
            remote, remote_error = await remote_preflight(client, cfg.remote.on_unavailable,
                                                          directory)
        remote_ok = client is not None and remote == PREFLIGHT_OK
        spec = await make_spec()
        pending_done = 0
        if client is not None and remote_ok:
            await settle_orphans(client, directory)
            pending_done, _left = await upload_pending(client, cfg, observer)
        result = await _ship(cfg, client if remote_ok else None, spec, observer, show_progress)
        result.pending_uploaded = pending_done
        if client is not None and not remote_ok and result.ok:
            result.upload_state = spool.UPLOAD_PENDING
            result.exit_code = EXIT_PENDING
        if remote == PREFLIGHT_NOT_TRUSTED and result.ok:
            result.exit_code = EXIT_CONFIG
            result.error = remote_error
        return result
    finally:
        if client is not None:
            await client.close()


async def _ship(cfg: Config, client: ReceiverClient | None, spec: ShipSpec,
                observer: RunObserver, show_progress: bool) -> BackupResult:
    directory = cfg.local.dir
    started = datetime.now(UTC)
    t0 = time.monotonic()
    taken: frozenset[str] = frozenset()
    if client is not None:
        with contextlib.suppress(Mt5BackupError):  # a name clash then shows at upload, as pending
            taken = frozenset(str(r.get("id")) for r in await client.list_backups())
    backup = spool.unique_backup_id(directory, spec.prefix, started, spec.suffix, taken)
    file_name = backup + spec.suffix
    previous = spool.load_manifests(directory, spec.kind)
    spooled = spool.SpoolFile(directory, file_name)
    source = GrowingSource(spooled.path, lambda: spooled.size)
    spooled.on_write = source.notify_threadsafe
    progress = UploadProgress(on_retry=observer.on_upload_retry,
                              on_bytes=observer.on_uploaded_bytes,
                              on_session=_journal_session(directory, file_name))
    metadata = {**spec.metadata, "kind": spec.kind, "started": started.isoformat()}
    upload_task: asyncio.Task[UploadProgress] | None = None
    if client is not None:
        upload_task = asyncio.create_task(send_following(
            client, source, name=file_name, kind=spec.kind, metadata=metadata,
            max_retries=cfg.remote.max_retries, retry_delay_s=cfg.remote.retry_delay_s,
            progress=progress))
    line_task = asyncio.create_task(_progress_line(spooled, progress)) if show_progress else None

    logger.info("backup {} started: {} -> {} ({})", backup, spec.describe, file_name,
                spec.compression)
    publishing: asyncio.Future[None] | None = None
    try:
        stats = await spec.produce(spooled)
        loop = asyncio.get_running_loop()
        # the read-back check reads from the page cache; it need not wait for the flush (but
        # both must be over before the file is discarded or published)
        outcomes = await asyncio.gather(loop.run_in_executor(None, spooled.sync),
                                        spec.verify(spooled.path), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        source.close(spooled.size)
        anomaly = bool(previous and previous[-1].compression == spec.compression
                       and spooled.size < previous[-1].size * ANOMALY_RATIO)
        manifest = spool.Manifest(
            id=backup, file=file_name, kind=spec.kind, size=spooled.size,
            sha256=spooled.sha256, compression=spec.compression, started=started.isoformat(),
            finished=datetime.now(UTC).isoformat(), duration_s=round(time.monotonic() - t0, 3),
            dump_duration_s=round(stats.duration_s, 3), raw_bytes=stats.raw_bytes,
            size_anomaly=anomaly,
            upload={"state": spool.UPLOAD_PENDING if cfg.remote.url else spool.UPLOAD_DISABLED},
            **{"database": "", **spec.manifest_fields,
               "extra": {**spec.manifest_fields.get("extra", {}), **stats.extra}},
        )
        final = directory / file_name
        publishing = loop.run_in_executor(None, spool.publish, spooled, final, manifest,
                                          directory)
        await publishing
    except BaseException as exc:
        if publishing is not None and not publishing.done():
            # cancelled while the publish thread runs: it must end before we judge the files
            with contextlib.suppress(BaseException):
                await publishing
        if publishing is not None and publishing.done() and not publishing.cancelled() \
                and publishing.exception() is None:
            # the backup is complete locally: keep it, resumable, and let the cancel through
            manifest.upload = {"state": spool.UPLOAD_PENDING, "session": progress.uid}
            spool.save_manifest(directory, manifest)
            if upload_task is not None:
                upload_task.cancel()
            raise
        if upload_task is not None:
            upload_task.cancel()
            with contextlib.suppress(BaseException):
                await upload_task
            assert client is not None
            await asyncio.shield(_abort_remote(client, progress, directory))
        spooled.discard()
        if line_task is not None:
            line_task.cancel()
            sys.stderr.write("\n")
        if isinstance(exc, Mt5BackupError | OSError):
            error = str(exc) if isinstance(exc, Mt5BackupError) else \
                f"{exc.strerror or exc} ({exc.filename or directory})"
            logger.error("backup {} failed: {}", backup, error)
            return BackupResult(ok=False, exit_code=EXIT_FAILURE, id=backup, error=error,
                                compression=spec.compression,
                                duration_s=time.monotonic() - t0)
        raise
    sha256 = spooled.sha256
    if anomaly:
        logger.warning("size anomaly: {} is {} bytes, previous {} was {}", backup,
                       spooled.size, previous[-1].id, previous[-1].size)
    exit_code = EXIT_OK
    if upload_task is not None and client is not None:
        try:
            await upload_task
            record = await commit_with_retries(
                client, progress, name=file_name, sha256=sha256, size=spooled.size,
                max_retries=cfg.remote.max_retries, retry_delay_s=cfg.remote.retry_delay_s)
            manifest.upload = _uploaded(record, progress)
        except Mt5BackupError as exc:
            found = await _find_remote(client, file_name, sha256, spooled.size)
            if found is not None:  # committed, only the answer was lost
                manifest.upload = _uploaded(found, progress)
            else:
                logger.error("upload of {} failed, kept locally as pending: {}", file_name, exc)
                manifest.upload = {"state": spool.UPLOAD_PENDING, "session": progress.uid,
                                   "error": str(exc)}
                exit_code = EXIT_PENDING
                if isinstance(exc, ReceiverNotTrusted):
                    exit_code = EXIT_CONFIG
                    state.record_receiver(directory, state.RECEIVER_NOT_TRUSTED, str(exc))
        except BaseException:
            # cancelled (daemon shutdown) while uploading: the backup is complete locally and
            # its session is recorded, so `upload-pending` resumes it instead of starting over
            upload_task.cancel()
            manifest.upload = {"state": spool.UPLOAD_PENDING, "session": progress.uid}
            spool.save_manifest(directory, manifest)
            raise
        spool.save_manifest(directory, manifest)
        _settle_journal(directory, manifest, progress.uid)
    elif cfg.remote.url:
        exit_code = EXIT_PENDING
    if line_task is not None:
        line_task.cancel()
        sys.stderr.write("\n")
    rotated = rotate(directory, spec.keep, spec.kind)
    result = BackupResult(
        ok=True, exit_code=exit_code, id=backup, file=final, size=spooled.size,
        raw_bytes=stats.raw_bytes, sha256=sha256, compression=spec.compression,
        duration_s=time.monotonic() - t0, dump_duration_s=stats.duration_s,
        upload_state=str(manifest.upload["state"]), upload_retries=progress.retries,
        uploaded_bytes=progress.sent_bytes, resumed_at=progress.resumed_at,
        size_anomaly=anomaly, rotated=rotated,
    )
    logger.info("backup {} ok: {} bytes sha256 {} in {:.1f} s, upload {}", backup, result.size,
                sha256[:12], result.duration_s, result.upload_state)
    return result


async def run_repository(cfg: Config, observer: RunObserver | None = None) -> BackupResult:
    """The weekly archive of the trading repository (legacy backup-full-repo.sh)."""
    repo = cfg.repository
    if repo.path is None:
        raise ConfigError("[repository] path is not set")
    observer = observer or RunObserver()
    cfg.local.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    label = f"zstd:{repo.compression_level}"

    async def make_spec() -> ShipSpec:
        if repo.path is None or not repo.path.is_dir():
            raise ConfigError(f"[repository] path {repo.path}: not a directory")
        root = repo.path

        async def produce(spooled: spool.SpoolFile) -> ProduceStats:
            t0 = time.monotonic()
            raw = await asyncio.get_running_loop().run_in_executor(
                None, archive.write_tar, root, repo.exclude, spooled, repo.compression_level)
            return ProduceStats(raw, time.monotonic() - t0)

        async def verify(path: Path) -> None:
            await asyncio.get_running_loop().run_in_executor(None, archive.check_tar, path)

        return ShipSpec(kind="repository", prefix="repository", suffix=".tar.zst",
                        compression=label, keep=repo.keep, produce=produce, verify=verify,
                        describe=str(root), metadata={"path": str(root)},
                        manifest_fields={"extra": {"path": str(root),
                                                   "exclude": list(repo.exclude)}})

    with RunLock(cfg.local.dir):
        return await _run_locked(cfg, observer, False, make_spec)


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
