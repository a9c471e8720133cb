"""pg_dump started before the preflight (backup/runstart): used when the run goes on, stopped
when it does not, never started where it would wait or where another dump is wanted."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from loguru import logger

from mt5backupd.backup import spool
from mt5backupd.backup.childenv import pg_dump_argv
from mt5backupd.backup.dump import run_dump
from mt5backupd.backup.run import run_backup
from mt5backupd.backup.runlock import RunLock
from mt5backupd.backup.runstart import RunStart, dump_may_start_early
from mt5backupd.backup.toolproc import start_tool
from mt5backupd.backup.upload_state import UploadState
from mt5backupd.config import parse_compression
from mt5backupd.errors import ConfigError, LockHeldError, Mt5BackupError
from mt5backupd.testkit.dbcontent import table_row_counts
from tests.backup_fixtures import BackupSetup, config_toml, write_token
from tests.pg_fixtures import process_gone
from tests.waits import wait_until


def recording_pg_dump(tmp_path: Path, real: str) -> tuple[Path, Path]:
    """A pg_dump that records its pid (one line per dump, not per --version probe), then
    becomes the real one."""
    log = tmp_path / "pg_dump.pids"
    wrapper = tmp_path / "pg_dump"
    wrapper.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] || echo $$ >> '{log}'\n"
                       f"exec '{real}' \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper, log


def started_pids(log: Path) -> list[int]:
    """pids of the pg_dump runs that dump."""
    if not log.exists():
        return []
    return [int(line) for line in log.read_text().split()]


def pending_manifest(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    spool.save_manifest(directory, spool.Manifest(
        id="db-20261101-030000.dump.zst", file="db-20261101-030000.dump.zst",
        kind=spool.KIND_DATABASE, database="db", size=1, sha256="0" * 64, compression="zstd:1",
        started="2026-11-01T03:00:00+00:00", finished="2026-11-01T03:00:01+00:00",
        duration_s=1.0, dump_duration_s=1.0, raw_bytes=1, upload=UploadState.pending()))


@pytest.mark.parametrize(("compression", "remote", "pending", "early"), [
    ("zstd:1", True, False, True),
    ("none", True, False, True),
    ("gzip:6", True, False, False),  # pg_dump waits for the exported snapshot's name
    ("zstd:1", True, True, False),  # the pending upload goes first: pg_dump would wait
    ("zstd:1", False, True, True),  # no receiver: nothing goes before the dump
])
def test_when_pg_dump_starts_early(backup_setup: BackupSetup, tmp_path: Path, compression: str,
                                   remote: bool, pending: bool, early: bool) -> None:
    """Early only where the run pumps that very pg_dump at once after its preflight."""
    cfg = backup_setup.with_(database={"compression": parse_compression(compression)},
                             local={"dir": tmp_path / "spool"})
    if not remote:
        cfg = backup_setup.with_(database={"compression": parse_compression(compression)},
                                 local={"dir": tmp_path / "spool"}, remote={"url": ""})
    if pending:
        pending_manifest(cfg.local.dir)
    assert dump_may_start_early(cfg) is early


async def test_early_pg_dump_is_the_one_pumped(backup_setup: BackupSetup,
                                               tmp_path: Path) -> None:
    """One pg_dump per run: the one begun before the preflight is the backup's."""
    wrapper, log = recording_pg_dump(tmp_path, backup_setup.cfg.database.pg_dump)
    cfg = backup_setup.with_(database={"pg_dump": str(wrapper)})
    start = RunStart(cfg)
    start.begin()
    # started before any preflight step ran (the wrapper writes its pid once it runs)
    await wait_until(lambda: len(started_pids(log)) == 1, 10, "the early pg_dump")
    result = await run_backup(cfg, start=start)
    assert result.ok, result.error
    assert len(started_pids(log)) == 1
    manifest = spool.load_manifests(cfg.local.dir)[0]
    assert manifest.extra["row_counts_source"] == "stream"
    # its first bytes went through the drain's scratch file: counts still equal the source's
    source = await table_row_counts(backup_setup.pg.dsn(backup_setup.dbname))
    assert {k.removeprefix("public."): v["rows"]
            for k, v in manifest.extra["row_counts"].items()} == source
    # the backup's time and duration count from the start of pg_dump, not after the preflight
    assert manifest.dump_duration_s <= manifest.duration_s


async def test_preflight_failure_stops_the_early_pg_dump(backup_setup: BackupSetup,
                                                         tmp_path: Path) -> None:
    """A receiver refusing the token fails the run after pg_dump began: it is stopped, its
    passfile removed, the lock released, and nothing is left in the backup directory."""
    wrapper, log = recording_pg_dump(tmp_path, backup_setup.cfg.database.pg_dump)
    bad_token = write_token(tmp_path / "bad-token", "not-a-token-the-receiver-knows")
    cfg = backup_setup.with_(database={"pg_dump": str(wrapper)},
                             remote={"token_file": bad_token})
    with pytest.raises(Mt5BackupError):
        await run_backup(cfg)
    (pid,) = started_pids(log)
    assert process_gone(pid)
    assert [p.name for p in cfg.local.dir.iterdir() if not p.name.startswith(".")] == []
    RunLock(cfg.local.dir).acquire()  # released: a second run could take it


async def test_a_dump_that_fails_before_its_pump_is_ended_and_heard(
        backup_setup: BackupSetup, tmp_path: Path) -> None:
    """Handed over and then never pumped (the pump fails at once): run_dump still ends it, its
    pipe and drain file closed; stopped before any pump, its stderr is logged, not lost."""
    wrapper, log = recording_pg_dump(tmp_path, backup_setup.cfg.database.pg_dump)
    cfg = backup_setup.with_(database={"pg_dump": str(wrapper)})
    start = RunStart(cfg)
    start.begin()
    spawned = await start.take_dump(pg_dump_argv(cfg.database))
    assert spawned is not None and spawned.drain is not None

    def failing_pump(_source: object, _on_read: object) -> int:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await run_dump(spawned.argv, {}, failing_pump, stall_timeout_s=60, spawned=spawned)
    (pid,) = started_pids(log)
    assert process_gone(pid)
    assert spawned.closed
    assert not spawned.drain._thread.is_alive()
    await spawned.stop()  # idempotent
    await start.close()

    talker = tmp_path / "talker"
    real = backup_setup.cfg.database.pg_dump
    talker.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && exec '{real}' \"$@\"\n"
                      "echo 'pg_dump: error: the reason it failed' >&2\nexit 1\n")
    talker.chmod(0o755)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        start = RunStart(backup_setup.with_(database={"pg_dump": str(talker)}))
        start.begin()
        assert start._dump is not None
        assert await asyncio.wait_for(start._dump.proc.wait(), 10) == 1  # it failed by itself
        await start.close()
    finally:
        logger.remove(sink)
    assert any("stopped before use" in line and "the reason it failed" in line for line in lines)


async def test_no_pg_dump_while_another_run_holds_the_lock(backup_setup: BackupSetup,
                                                           tmp_path: Path) -> None:
    """A run refused by the lock never starts pg_dump."""
    wrapper, log = recording_pg_dump(tmp_path, backup_setup.cfg.database.pg_dump)
    cfg = backup_setup.with_(database={"pg_dump": str(wrapper)})
    with RunLock(cfg.local.dir), pytest.raises(LockHeldError):
        await run_backup(cfg)
    assert started_pids(log) == []


def test_run_now_failing_to_begin_is_recorded(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """`--run-now` begins before its imports; a failure there is still the run's recorded
    failure (exit 4, one line naming the key, a failed run in the state /health reads)."""
    config = tmp_path / "config.toml"
    config.write_text(config_toml(backup_setup).replace(
        f'dbname = "{backup_setup.dbname}"', 'dbname = "no/slashes"'))
    config.chmod(0o600)
    proc = subprocess.run([sys.executable, "-m", "mt5backupd", "--config", str(config),
                           "--run-now"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NO_COLOR": "1"}, check=False)
    assert proc.returncode == 4, proc.stderr
    assert "[database] dbname" in proc.stderr
    state = json.loads((backup_setup.cfg.local.dir / ".mt5backupd-state.json").read_text())
    last = state["jobs"]["database"]["last_run"]
    assert last["result"] == "failure"
    assert "[database] dbname" in last["error"]


def test_nothing_heavy_is_imported_before_pg_dump_starts() -> None:
    """What `--run-now` imports before it starts pg_dump (the CLI, the config loader, the run's
    start; the scheduler's checks of [schedule] come after) pulls in no event loop, logging
    library or client: those load while pg_dump runs."""
    probe = ("import sys\n"
             "import mt5backupd.cli, mt5backupd.backup.runstart\n"
             "mt5backupd.cli._load(mt5backupd.cli.build_parser().parse_args(['--run-now']),\n"
             "                     check_modes=False, check_schedule_now=False)\n"
             "heavy = ('asyncio', 'loguru', 'aiohttp', 'asyncpg', 'numpy', 'prometheus_client')\n"
             "print(' '.join(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == [], out.stdout


async def test_a_tool_started_without_a_loop_is_awaited_and_heard(tmp_path: Path) -> None:
    """toolproc: started before any event loop, a tool is waited for through a pidfd (or a
    thread where there is none), its stderr read as a stream and its stdout from the pipe."""
    for pidfd in (True, False):
        spawned = start_tool(["/bin/sh", "-c", "echo out; echo 'the reason' >&2; exit 3"],
                             {"PATH": os.environ["PATH"]})
        if not pidfd:
            spawned.proc._pidfd = False  # as on a kernel without pidfd_open
        assert await spawned.proc.wait() == 3
        assert spawned.proc.returncode == 3
        assert (await (await spawned.proc.stderr()).read()).strip() == b"the reason"
        assert os.read(spawned.read_fd, 100) == b"out\n"
        await spawned.stop()
        await spawned.stop()  # idempotent
        assert spawned.closed
    with pytest.raises(ConfigError, match=r"\[database\] pg_dump: .* not found"):
        start_tool([str(tmp_path / "missing")], {})


def test_run_now_refuses_a_bad_schedule_after_starting(backup_setup: BackupSetup,
                                                       tmp_path: Path) -> None:
    """`--run-now` checks [schedule] once pg_dump runs: a bad cron still fails it (exit 4, one
    line naming the key), and the pg_dump begun for it is stopped, the lock released."""
    wrapper, log = recording_pg_dump(tmp_path, backup_setup.cfg.database.pg_dump)
    config = tmp_path / "config.toml"
    config.write_text(config_toml(backup_setup).replace(
        f'pg_dump = "{backup_setup.cfg.database.pg_dump}"', f'pg_dump = "{wrapper}"')
        + '[schedule]\ndatabase = "0 3 * *"\n')
    config.chmod(0o600)
    proc = subprocess.run([sys.executable, "-m", "mt5backupd", "--config", str(config),
                           "--run-now"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NO_COLOR": "1"}, check=False)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {config}: [schedule] database")
    (pid,) = started_pids(log)
    assert process_gone(pid)
    RunLock(backup_setup.cfg.local.dir).acquire()
