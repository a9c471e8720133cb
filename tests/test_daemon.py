"""The daemon: schedules, live metrics, /health, systemd notify, signals, reload, misfire."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mt5backupd.backup import spool
from mt5backupd.backup.run import run_backup
from mt5backupd.daemon.health import HealthInput, evaluate
from mt5backupd.daemon.schedule import crontab_weekdays, make_trigger, missed_fire, next_fire
from mt5backupd.sdnotify import SystemdNotifier
from tests.backup_fixtures import BackupSetup
from tests.daemon_harness import DaemonProcess, daemon_toml
from tests.test_backup import process_gone

REQUIRED = [
    "mt5backup_last_run_success", "mt5backup_last_success_timestamp_seconds",
    "mt5backup_last_run_timestamp_seconds", "mt5backup_last_duration_seconds",
    "mt5backup_last_size_bytes", "mt5backup_runs_total", "mt5backup_upload_retries_total",
    "mt5backup_uploaded_bytes_total", "mt5backup_pending_uploads", "mt5backup_local_backups",
    "mt5backup_local_bytes", "mt5backup_next_run_timestamp_seconds", "mt5backup_in_progress",
    "mt5backup_size_anomaly", "mt5backup_build_info", "mt5backup_last_verify_success",
    "mt5backup_last_verify_timestamp_seconds", "mt5backup_last_verify_duration_seconds",
]
UTC_NOW = datetime(2026, 11, 25, 3, 0, 30, tzinfo=UTC)


# ------------------------------------------------------------------ pure


@pytest.mark.parametrize(
    ("field", "expected"),
    [("*", "*"), ("0", "sun"), ("7", "sun"), ("1-5", "mon,tue,wed,thu,fri"),
     ("0,6", "sun,sat"), ("*/2", "sun,tue,thu,sat"), ("mon-fri", "mon-fri"),
     ("5-7", "fri,sat,sun")],
)
def test_crontab_weekdays(field: str, expected: str) -> None:
    """Crontab weekday numbers (0/7 = Sunday) are translated for APScheduler (0 = Monday)."""
    assert crontab_weekdays(field) == expected


@pytest.mark.parametrize(
    ("expr", "tz", "now", "expected"),
    [
        ("0 3 * * *", "UTC", UTC_NOW, datetime(2026, 11, 26, 3, 0, tzinfo=UTC)),
        # 03:00 in Athens is 01:00 UTC
        ("0 3 * * *", "Europe/Athens", UTC_NOW, datetime(2026, 11, 26, 1, 0, tzinfo=UTC)),
        ("0 4 * * 0", "UTC", UTC_NOW, datetime(2026, 11, 29, 4, 0, tzinfo=UTC)),  # a Sunday
        ("*/10 * * * * *", "UTC", UTC_NOW, datetime(2026, 11, 25, 3, 0, 30, tzinfo=UTC)),
    ],
)
def test_next_fire(expr: str, tz: str, now: datetime, expected: datetime) -> None:
    """Next run times honour the operator's time zone and crontab's Sunday = 0."""
    fire = next_fire(make_trigger(expr, tz), now)
    assert fire is not None
    assert fire == expected


@pytest.mark.parametrize(
    ("last_run", "grace_s", "missed"),
    [
        (None, 3600, True),  # never ran, 03:00 passed 30 s ago
        (UTC_NOW - timedelta(days=1), 3600, True),  # yesterday's run does not cover today
        (UTC_NOW - timedelta(seconds=20), 3600, False),  # today's ran already
        (None, 10, False),  # outside the grace period: wait for the next one
    ],
)
def test_missed_fire(last_run: datetime | None, grace_s: float, missed: bool) -> None:
    """A run missed while down is made up once, only within misfire_grace_s."""
    fire = missed_fire(make_trigger("0 3 * * *", "UTC"), UTC_NOW, last_run, grace_s)
    assert (fire is not None) is missed


@pytest.mark.parametrize(
    ("last_success_age_h", "failed", "pending_age_h", "ok", "fragment"),
    [
        (1, False, None, True, ""),
        (None, False, None, False, "no successful database backup yet"),
        (27, False, None, False, "late"),
        (1, True, None, False, "last database run failed"),
        (1, False, 7, False, "pending"),
        (1, False, 2, True, ""),
    ],
)
def test_health_rules(last_success_age_h: float | None, failed: bool,
                      pending_age_h: float | None, ok: bool, fragment: str) -> None:
    """503 when late, when the last run failed, or when an upload is pending too long."""
    now = UTC_NOW
    result = evaluate(HealthInput(
        now=now,
        last_success=None if last_success_age_h is None else now - timedelta(
            hours=last_success_age_h),
        last_run_failed=failed, last_run_error="boom",
        oldest_pending=None if pending_age_h is None else now - timedelta(hours=pending_age_h),
        max_age_s=26 * 3600, max_pending_age_s=6 * 3600))
    assert result.ok is ok
    assert fragment in " ".join(result.reasons)


def test_sd_notify_path_and_abstract_socket(tmp_path: Path) -> None:
    """Datagrams reach a filesystem socket and an abstract (@) one; no socket is a no-op."""
    fs = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fs.bind(str(tmp_path / "n.sock"))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"mt5backupd-test-{os.getpid()}"
    abstract.bind(b"\0" + name.encode())
    try:
        assert SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock")}).send("READY=1")
        assert fs.recv(100) == b"READY=1"
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1", "STATUS=x")
        assert abstract.recv(100) == b"READY=1\nSTATUS=x"
        assert not SystemdNotifier({}).send("READY=1")
        assert SystemdNotifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval_s == 1.5
        assert SystemdNotifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
                               ).watchdog_interval_s is None
    finally:
        fs.close()
        abstract.close()


# ------------------------------------------------------------------ the real daemon


@pytest.fixture
async def daemons() -> AsyncIterator[list[DaemonProcess]]:
    """Daemons a test starts; all stopped at teardown, whatever the test did."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        await daemon.stop()


async def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


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

        await wait_for(one_success, 30, "a scheduled backup")
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

        await wait_for(unhealthy, 30, "/health to turn 503 after a failed run")
        _code, body = await daemon.get("/health")
        assert "last database run failed" in body
        assert "no_such_db" in body
        daemon.write_config(daemon_toml(backup_setup, database="*/3 * * * * *"))
        daemon.signal(signal.SIGHUP)

        async def healthy() -> bool:
            code, _ = await daemon.get("/health")
            return code == 200

        await wait_for(healthy, 30, "/health to recover after a good run")
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
        await asyncio.sleep(4.5)
        code, body = await daemon.get("/health")
        assert code == 503
        assert "late" in body
    finally:
        await daemon.stop()


async def test_systemd_notify_ready_watchdog_stopping(backup_setup: BackupSetup,
                                                     tmp_path: Path,
        daemons: list[DaemonProcess]) -> None:
    """READY=1 after start-up, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM,
    and exit 0."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.setblocking(False)
    daemon = DaemonProcess(tmp_path / "daemon.toml",
                           env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    daemons.append(daemon)
    daemon.write_config(daemon_toml(backup_setup, database="0 3 * * *"))
    loop = asyncio.get_running_loop()
    try:
        await daemon.start()
        await asyncio.sleep(1.0)
        received: list[str] = []
        while True:
            try:
                received.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.1)
                                 ).decode())
            except TimeoutError:
                break
        assert any("READY=1" in m for m in received), received
        assert sum(m == "WATCHDOG=1" for m in received) >= 3  # every 0.2 s
        assert any(m.startswith("STATUS=") for m in received)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(15) == 0
        rest = []
        while True:
            try:
                rest.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
        assert any("STOPPING=1" in m for m in rest), rest
    finally:
        await daemon.stop()
        sock.close()


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

    await wait_for(dumping, 30, "a dump in progress")
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
        daemon.signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert daemon.proc is not None and daemon.proc.returncode is None
        assert (await daemon.status())["jobs"]["database"]["next_run"] == before
        assert "config reload failed" in daemon.log()
        daemon.write_config(daemon_toml(backup_setup, database="30 4 * * *"))
        daemon.signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
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

        await wait_for(ran, 30, "the made-up run")
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

    await wait_for(verified, 30, "a scheduled test restore")
    m = await daemon.metrics()
    assert m[("mt5backup_last_verify_timestamp_seconds", ())] > 0
    assert m[("mt5backup_last_verify_duration_seconds", ())] > 0
