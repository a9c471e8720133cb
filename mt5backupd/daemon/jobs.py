"""Jobs as the daemon and the CLI run them: one run plus its record in the state file.

Every run is recorded, including failures before any dump (database down, bad token), so
/health and the metrics see them; a run refused because another holds the lock is not a run.
After each record the node_exporter textfile (``[metrics] textfile``) is rewritten, here, so
the daemon and ``--run-now`` both keep it current.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mt5backupd import runstate as state
from mt5backupd.backup.pending import pending_command
from mt5backupd.backup.result import BackupResult
from mt5backupd.backup.run import run_backup, run_base, run_repository
from mt5backupd.backup.runstart import RunStart
from mt5backupd.config import Config
from mt5backupd.errors import EXIT_OK, LockHeldError, Mt5BackupError
from mt5backupd.wal.shipper import prune_shipped, rotate_bases

if TYPE_CHECKING:  # `--run-now` never verifies: it does not import the restore side
    from mt5backupd.ops.verify import VerifyOutcome


async def export_textfile(cfg: Config) -> None:
    """Rewrite the textfile (if configured) off the event loop; never raises."""
    if cfg.metrics.textfile is not None:
        # imported here: prometheus_client is ~20 ms of every --run-now that has no textfile
        from mt5backupd.daemon import textfile

        await asyncio.to_thread(textfile.update, cfg)


@dataclass
class JobOutcome:
    """What the daemon needs of a job's run: good or not, and a summary for notifications."""

    ok: bool
    summary: dict[str, Any]


async def _run_and_record(cfg: Config, job: str, run: Callable[[], Awaitable[BackupResult]],
                          began: tuple[datetime, float] | None = None) -> BackupResult:
    """``began``: when the run really began, if before this call (``--run-now`` starts
    pg_dump first)."""
    started, t0 = began or (datetime.now(UTC), time.monotonic())
    try:
        result = await run()
    except LockHeldError:
        raise
    except Exception as exc:  # recorded whatever it is, so /health and metrics see it
        error = str(exc) if isinstance(exc, Mt5BackupError) else \
            f"{exc.__class__.__name__}: {exc}"
        state.record_run(cfg.local.dir, state.RunRecord(
            job=job, id="", started=started.isoformat(),
            finished=datetime.now(UTC).isoformat(), result="failure",
            duration_s=round(time.monotonic() - t0, 3), error=error))
        await export_textfile(cfg)
        raise
    # a good local backup whose upload did not happen (receiver down: exit 3, not trusted:
    # exit 4) is "pending"; the receiver's state is recorded apart (state.record_receiver)
    outcome = ("success" if result.exit_code == EXIT_OK else
               "pending" if result.ok else "failure")
    state.record_run(cfg.local.dir, state.RunRecord(
        job=job, id=result.id, started=started.isoformat(),
        finished=datetime.now(UTC).isoformat(), result=outcome,
        duration_s=round(result.duration_s, 3), size=result.size, error=result.error),
        upload_retries=result.upload_retries, uploaded_bytes=result.uploaded_bytes)
    await export_textfile(cfg)
    return result


async def run_database(cfg: Config, *, show_progress: bool = False,
                       start: RunStart | None = None) -> BackupResult:
    """A database backup, recorded; ``start`` as for ``run_backup``."""
    return await _run_and_record(
        cfg, "database", lambda: run_backup(cfg, show_progress=show_progress, start=start),
        start.began if start is not None and start.begun else None)


async def database_job(cfg: Config) -> JobOutcome:
    result = await run_database(cfg)
    return JobOutcome(result.exit_code == EXIT_OK, result.to_json())


async def run_repository_now(cfg: Config) -> BackupResult:
    return await _run_and_record(cfg, "repository", lambda: run_repository(cfg))


async def repository_job(cfg: Config) -> JobOutcome:
    result = await run_repository_now(cfg)
    return JobOutcome(result.exit_code == EXIT_OK, result.to_json())


async def run_base_now(cfg: Config) -> BackupResult:
    """A base backup; then the local base rotation (never away the newest base whose WAL
    chain is complete), then the local WAL older than the oldest base left."""
    result = await _run_and_record(cfg, "base", lambda: run_base(cfg))
    if result.ok:
        result.rotated = await asyncio.to_thread(rotate_bases, cfg)
        await asyncio.to_thread(prune_shipped, cfg)
    return result


async def base_job(cfg: Config) -> JobOutcome:
    result = await run_base_now(cfg)
    return JobOutcome(result.exit_code == EXIT_OK, result.to_json())


async def run_verify(cfg: Config, ref: str = "latest",
                     identity_files: Sequence[Path] = (), *, pitr: bool = False) -> VerifyOutcome:
    """A test restore, recorded as a run of job "verify" (its duration: the restore's, our
    measured recovery time); "skipped" when the backup is encrypted and no identity is here."""
    started, t0 = datetime.now(UTC), time.monotonic()
    try:
        from mt5backupd.ops.pitrverify import verify_pitr
        from mt5backupd.ops.verify import verify

        outcome = await (verify_pitr(cfg, identity_files) if pitr
                         else verify(cfg, ref, identity_files))
    except LockHeldError:
        raise
    except Exception as exc:
        state.record_run(cfg.local.dir, state.RunRecord(
            job="verify", id="", started=started.isoformat(),
            finished=datetime.now(UTC).isoformat(), result="failure",
            duration_s=round(time.monotonic() - t0, 3), error=str(exc)))
        await export_textfile(cfg)
        raise
    state.record_run(cfg.local.dir, state.RunRecord(
        job="verify", id=outcome.id, started=started.isoformat(),
        finished=datetime.now(UTC).isoformat(),
        result="skipped" if outcome.skipped else "success" if outcome.passed else "failure",
        duration_s=round(outcome.restore_s, 3), error="; ".join(outcome.reasons)))
    await export_textfile(cfg)
    return outcome


async def verify_job(cfg: Config) -> JobOutcome:
    outcome = await run_verify(cfg)
    return JobOutcome(outcome.passed or outcome.skipped, outcome.to_json())


async def upload_pending_now(cfg: Config) -> tuple[int, int]:
    """Upload pending backups; (uploaded, still pending). The textfile follows, since the
    pending counts changed."""
    try:
        return await pending_command(cfg)
    finally:
        await export_textfile(cfg)


async def upload_pending_job(cfg: Config) -> JobOutcome:
    done, left = await upload_pending_now(cfg)
    return JobOutcome(left == 0, {"uploaded": done, "pending": left})


DAEMON_JOBS = {
    "database": database_job,
    "repository": repository_job,
    "verify": verify_job,
    "upload_pending": upload_pending_job,
    "base": base_job,
}
