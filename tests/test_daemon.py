"""The real daemon as a process: schedules, live metrics, /health, systemd notify, signals,
reload, misfire."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mt5backupd.backup import spool
from mt5backupd.backup.run import run_backup
from tests.backup_fixtures import BackupSetup
from tests.daemon_harness import DaemonProcess, daemon_toml
from tests.pg_fixtures import process_gone
from tests.waits import log_offset, wait_for_log, wait_until

REQUIRED = [
    "mt5backup_last_run_success", "mt5backup_last_success_timestamp_seconds",
    "mt5backup_last_run_timestamp_seconds", "mt5backup_last_duration_seconds",
    "mt5backup_last_size_bytes", "mt5backup_runs_total", "mt5backup_upload_retries_total",
    "mt5backup_uploaded_bytes_total", "mt5backup_pending_uploads", "mt5backup_local_backups",
    "mt5backup_local_bytes", "mt5backup_next_run_timestamp_seconds", "mt5backup_in_progress",
    "mt5backup_size_anomaly", "mt5backup_build_info", "mt5backup_last_verify_success",
    "mt5backup_last_verify_timestamp_seconds", "mt5backup_last_verify_duration_seconds",
]


@pytest.fixture
async def daemons() -> AsyncIterator[list[DaemonProcess]]:
    """Daemons a test starts; all stopped at teardown, whatever the test did."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        await daemon.stop()


async def test_scheduled_runs_update_metrics_and_health(backup_setup: BackupSetup,
                                                        tmp_path: Path,
        daemons: list[DaemonProcess]) -> None:
    """Every name exists from start-up; a job every 3 s produces verified backups, /metrics and
    /health follow; a failing run turns /health 503 until the next good run."""
    daemon = DaemonProcess(tmp_path / "daemon.toml")
    daemons.append(daemon)
    daemon.write_config(daemon_toml(backup_setup, database="*/3 * * * * *"))
    await daemon.start()
    try:
        metrics = await daemon.metrics()
        names = {name for name, _labels in metrics}
        for name in REQUIRED:
            assert any(n == name for n in names), name
        for job in ("database", "repository", "verify"):
            assert metrics[("mt5backup_last_run_success", (("job", job),))] == 0
        code, _ = await daemon.get("/health")
        assert code == 503  # nothing backed up yet

        async def one_success() -> bool:
            m = await daemon.metrics()
            return m[("mt5backup_runs_total", (("job", "database"), ("result", "success")))] >= 1

        await wait_until(one_success, 30, "a scheduled backup")
        m = await daemon.metrics()
        assert m[("mt5backup_last_run_success", (("job", "database"),))] == 1
        assert m[("mt5backup_local_backups", (("job", "database"),))] >= 1
        assert m[("mt5backup_last_size_bytes", (("job", "database"),))] > 0
        assert m[("mt5backup_next_run_timestamp_seconds", (("job", "database"),))] > 0
        manifests = spool.load_manifests(backup_setup.cfg.local.dir)
        assert manifests[-1].upload.state == "uploaded"
        code, body = await daemon.get("/health")
        assert code == 200, body

        # a broken config (valid TOML, database that does not exist) -> failing runs -> 503
        daemon.write_config(daemon_toml(backup_setup, database="*/3 * * * * *",
                                      dbname="no_such_db"))
        daemon.signal(signal.SIGHUP)

        async def unhealthy() -> bool:
            code, _ = await daemon.get("/health")
            return code == 503

        await wait_until(unhealthy, 30, "/health to turn 503 after a failed run")
        _code, body = await daemon.get("/health")
        assert "last database run failed" in body
        assert "no_such_db" in body
        daemon.write_config(daemon_toml(backup_setup, database="*/3 * * * * *"))
        daemon.signal(signal.SIGHUP)

        async def healthy() -> bool:
            code, _ = await daemon.get("/health")
            return code == 200

        await wait_until(healthy, 30, "/health to recover after a good run")
        status = await daemon.status()
        assert status["jobs"]["database"]["schedule"] == "*/3 * * * * *"
        assert status["jobs"]["database"]["last_run"]["result"] == "success"
    finally:
        await daemon.stop()
    assert "[database " in daemon.log()  # run lines carry job and run id


async def test_health_late_and_run_now_from_another_process(backup_setup: BackupSetup,
                                                            tmp_path: Path,
        daemons: list[DaemonProcess]) -> None:
    """A --run-now in another process shows in the daemon's next scrape; once the last
    success is older than max_age_s, /health is 503 "late"."""
    config = tmp_path / "daemon.toml"
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    daemon.write_config(daemon_toml(backup_setup, database="0 3 1 1 *", max_age_s=4))
    await daemon.start()
    try:
        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mt5backupd", "--run-now", "--config", str(config),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert await run.wait() == 0
        m = await daemon.metrics()
        assert m[("mt5backup_runs_total", (("job", "database"), ("result", "success")))] == 1
        assert m[("mt5backup_last_success_timestamp_seconds", (("job", "database"),))] > 0
        code, _ = await daemon.get("/health")
        assert code == 200

        async def late() -> bool:
            code, _ = await daemon.get("/health")
            return code == 503

        # max_age_s = 4: the success has to age past it, which takes those seconds of real time
        await wait_until(late, 15, "/health to turn 503 once the last success is 4 s old")
        _code, body = await daemon.get("/health")
        assert "late" in body
    finally:
        await daemon.stop()


async def test_systemd_notify_ready_watchdog_stopping(backup_setup: BackupSetup,
                                                     tmp_path: Path,
        daemons: list[DaemonProcess]) -> None:
    """READY=1 after start-up, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM,
    and exit 0."""
    daemon = DaemonProcess(tmp_path / "daemon.toml", env={"WATCHDOG_USEC": "400000"})
    daemons.append(daemon)
    daemon.write_config(daemon_toml(backup_setup, database="0 3 * * *"))
    await daemon.start()  # returns once READY=1 arrived on the harness's notify socket
    try:
        def watchdogs() -> int:
            return sum(m == "WATCHDOG=1" for m in daemon.notifications)

        await wait_until(lambda: watchdogs() >= 3, 10, "three WATCHDOG=1 (one every 0.2 s)")
        received = list(daemon.notifications)
        assert any("READY=1" in m for m in received), received
        assert any(m.startswith("STATUS=") for m in received)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(15) == 0
        await wait_until(lambda: any("STOPPING=1" in m for m in daemon.notifications), 5,
                         "STOPPING=1 after SIGTERM")
    finally:
        await daemon.stop()


def slow_pg_dump(tmp_path: Path, real: str) -> Path:
    """A pg_dump that streams the real one at ~250 KB/s (a long dump to interrupt)."""
    script = tmp_path / "pg_dump"
    script.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = --version ]; then exec "{real}" --version; fi\n'
        f"echo $$ >> {tmp_path}/pids\n"
        f'"{real}" "$@" | {sys.executable} -c "'
        "import sys,time\n"
        "while b := sys.stdin.buffer.read(65536):\n"
        "    sys.stdout.buffer.write(b); sys.stdout.buffer.flush(); time.sleep(0.25)\n"
        '"\n'
    )
    script.chmod(0o755)
    return script


async def test_sigterm_mid_dump_aborts_cleanly(backup_setup: BackupSetup, tmp_path: Path,
        daemons: list[DaemonProcess]) -> None:
    """SIGTERM while a dump streams: exit 0 within the grace period (+ cleanup), no partial
    file, no pg_dump left, nothing committed or left half-uploaded on the receiver."""
    fake = slow_pg_dump(tmp_path, backup_setup.cfg.database.pg_dump)
    daemon = DaemonProcess(tmp_path / "daemon.toml")
    daemons.append(daemon)
    daemon.write_config(daemon_toml(backup_setup, database="*/2 * * * * *", pg_dump=str(fake),
                                    grace_s=1.0, compression="none"))
    await daemon.start()
    partial = backup_setup.cfg.local.dir / spool.PARTIAL_DIR

    async def dumping() -> bool:
        return partial.is_dir() and any(p.stat().st_size > 100_000 for p in partial.iterdir())

    await wait_until(dumping, 30, "a dump in progress")
    daemon.signal(signal.SIGTERM)
    started = asyncio.get_running_loop().time()
    assert await daemon.wait(20) == 0
    assert asyncio.get_running_loop().time() - started < 1.0 + 10.0
    assert not any(partial.iterdir())
    assert spool.load_manifests(backup_setup.cfg.local.dir) == []
    for pid in (tmp_path / "pids").read_text().split():
        assert process_gone(int(pid))
    out = subprocess.run(["pgrep", "-f", f"dbname={backup_setup.dbname}"], capture_output=True,
                         text=True)
    assert all(process_gone(int(p)) for p in out.stdout.split())
    assert list((backup_setup.receiver.cfg.data_dir / "partial").rglob("*.data")) == []
    assert not list((backup_setup.receiver.cfg.data_dir / "backups").rglob("meta.json"))
    assert "aborting it" in daemon.log()


async def test_sighup_with_broken_config_keeps_running(backup_setup: BackupSetup,
                                                       tmp_path: Path,
        daemons: list[DaemonProcess]) -> None:
    """SIGHUP with an invalid config logs the error and keeps the old one; a valid one
    reschedules."""
    config = tmp_path / "daemon.toml"
    daemon = DaemonProcess(config)
    daemons.append(daemon)
    daemon.write_config(daemon_toml(backup_setup, database="0 3 * * *"))
    await daemon.start()
    try:
        before = (await daemon.status())["jobs"]["database"]["next_run"]
        config.write_text("[schedule]\ndatabase = 'every night'\n")
        assert daemon.log_path is not None
        offset = log_offset(daemon.log_path)
        daemon.signal(signal.SIGHUP)
        await wait_for_log(daemon.log_path, "config reload failed", 10, after=offset)
        assert daemon.proc is not None and daemon.proc.returncode is None
        assert (await daemon.status())["jobs"]["database"]["next_run"] == before
        daemon.write_config(daemon_toml(backup_setup, database="30 4 * * *"))
        offset = log_offset(daemon.log_path)
        daemon.signal(signal.SIGHUP)
        await wait_for_log(daemon.log_path, "config reloaded from", 10, after=offset)
        status = await daemon.status()
        assert status["jobs"]["database"]["schedule"] == "30 4 * * *"
        assert status["jobs"]["database"]["next_run"].endswith("04:30:00+00:00")
    finally:
        await daemon.stop()


async def test_missed_run_made_up_once_at_start(backup_setup: BackupSetup,
                                                tmp_path: Path,
        daemons: list[DaemonProcess]) -> None:
    """A daemon started 20 s after a scheduled time (within misfire_grace_s) runs it once."""
    missed = datetime.now(UTC) - timedelta(seconds=20)
    expr = f"{missed.second} {missed.minute} {missed.hour} * * *"
    daemon = DaemonProcess(tmp_path / "daemon.toml")
    daemons.append(daemon)
    daemon.write_config(daemon_toml(backup_setup, database=expr).replace(
        "[schedule]\n", "[schedule]\nmisfire_grace_s = 300\n"))
    await daemon.start()
    try:
        async def ran() -> bool:
            m = await daemon.metrics()
            key = ("mt5backup_runs_total", (("job", "database"), ("result", "success")))
            return m[key] >= 1

        await wait_until(ran, 30, "the made-up run")
        # "made up once" is the absence of a second run, which only time can show: a duplicate
        # would be queued at start-up behind the first and start at once after it.
        await asyncio.sleep(3)
        m = await daemon.metrics()
        assert m[("mt5backup_runs_total", (("job", "database"), ("result", "success")))] == 1
        assert len(spool.load_manifests(backup_setup.cfg.local.dir)) == 1
    finally:
        await daemon.stop()
    assert "missed while the daemon was down" in daemon.log()
    assert json.loads((backup_setup.cfg.local.dir / ".mt5backupd-state.json").read_text())


async def test_daemon_verify_job(backup_setup: BackupSetup, tmp_path: Path,
        daemons: list[DaemonProcess]) -> None:
    """The daemon's verify job test-restores the newest backup and sets the verify metrics."""
    assert (await run_backup(backup_setup.cfg)).ok
    daemon = DaemonProcess(tmp_path / "daemon.toml")
    daemons.append(daemon)
    daemon.write_config(daemon_toml(backup_setup, database="0 3 1 1 *").replace(
        'verify = ""', 'verify = "*/2 * * * * *"'))
    await daemon.start()

    async def verified() -> bool:
        m = await daemon.metrics()
        return m[("mt5backup_last_verify_success", ())] == 1

    await wait_until(verified, 30, "a scheduled test restore")
    m = await daemon.metrics()
    assert m[("mt5backup_last_verify_timestamp_seconds", ())] > 0
    assert m[("mt5backup_last_verify_duration_seconds", ())] > 0
