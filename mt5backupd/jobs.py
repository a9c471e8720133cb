"""Jobs as the daemon and the CLI run them: one run plus its record in the state file.

Every run is recorded, including failures before any dump (database down, bad token), so
/health and the metrics see them; a run refused because another holds the lock is not a run.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from mt5backupd import state
from mt5backupd.backup import BackupResult, pending_command, run_backup
from mt5backupd.config import Config
from mt5backupd.daemon import JobOutcome
from mt5backupd.errors import EXIT_OK, EXIT_PENDING, LockHeldError, Mt5BackupError


def _record_failure(cfg: Config, job: str, started: datetime, t0: float, error: str) -> None:
    state.record_run(cfg.local.dir, state.RunRecord(
        job=job, id="", started=started.isoformat(), finished=datetime.now(UTC).isoformat(),
        result="failure", duration_s=round(time.monotonic() - t0, 3), error=error))


async def run_database(cfg: Config, *, show_progress: bool = False) -> BackupResult:
    started, t0 = datetime.now(UTC), time.monotonic()
    try:
        result = await run_backup(cfg, show_progress=show_progress)
    except LockHeldError:
        raise
    except Mt5BackupError as exc:
        _record_failure(cfg, "database", started, t0, str(exc))
        raise
    outcome = ("success" if result.exit_code == EXIT_OK else
               "pending" if result.exit_code == EXIT_PENDING else "failure")
    state.record_run(cfg.local.dir, state.RunRecord(
        job="database", id=result.id, started=started.isoformat(),
        finished=datetime.now(UTC).isoformat(), result=outcome,
        duration_s=round(result.duration_s, 3), size=result.size, error=result.error),
        upload_retries=result.upload_retries, uploaded_bytes=result.uploaded_bytes)
    return result


async def database_job(cfg: Config) -> JobOutcome:
    result = await run_database(cfg)
    return JobOutcome(result.exit_code == EXIT_OK, result.to_json())


async def upload_pending_job(cfg: Config) -> JobOutcome:
    done, left = await pending_command(cfg)
    return JobOutcome(left == 0, {"uploaded": done, "pending": left})
