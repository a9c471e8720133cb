"""`mt5backupd check`: all green with everything up; each broken piece named with its fix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from mt5backupd.ops.checks import Check, run_checks
from tests.backup_fixtures import BackupSetup, write_token
from tests.daemon_harness import DaemonProcess, daemon_toml


def failed(results: list[Check]) -> dict[str, str]:
    return {r.name: r.detail for r in results if not r.ok}


async def test_check_all_up_exits_zero(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """With database, receiver and daemon up, every check passes and the CLI exits 0."""
    daemon = DaemonProcess(tmp_path / "daemon.toml")
    daemon.write_config(daemon_toml(backup_setup, database="0 3 * * *"))
    await daemon.start()
    try:
        run = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "mt5backupd", "check", "--json", "--config",
            str(daemon.bound_config(tmp_path / "check.toml"))], capture_output=True, text=True)
    finally:
        await daemon.stop()
    report = json.loads(run.stdout)
    assert run.returncode == 0, run.stdout
    names = {c["check"] for c in report["checks"]}
    assert {"pg_dump", "pg_restore", "database connection", "dump privileges", "backup dir",
            "receiver health", "token", "token file", "daemon"} <= names


async def test_check_names_each_failure(backup_setup: BackupSetup, tmp_path: Path,
                                        dead_port: int) -> None:
    """Receiver down, bad token, database down, unwritable backup dir and a world-readable
    token file each fail their own check, with a fix; the CLI exits 6."""
    base = backup_setup
    down = failed(await run_checks(base.with_(remote={"url": f"http://127.0.0.1:{dead_port}"})))
    assert "receiver health" in down

    bad = write_token(tmp_path / "bad", "mt5b_wrong")
    assert "token" in failed(await run_checks(base.with_(remote={"token_file": bad})))

    no_db = failed(await run_checks(base.with_(database={"port": dead_port})))
    assert "database connection" in no_db

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    unwritable = failed(await run_checks(base.with_(local={"dir": blocker / "backups"})))
    assert "backup dir" in unwritable

    os.chmod(base.token_file, 0o644)
    readable = await run_checks(base.cfg)
    assert "token file" in failed(readable)
    assert any("chmod 600" in r.fix for r in readable if r.name == "token file")
    os.chmod(base.token_file, 0o600)

    toml = tmp_path / "c.toml"
    toml.write_text(daemon_toml(base, database="0 3 * * *", port=dead_port))
    run = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "mt5backupd", "check", "--config", str(toml)],
        capture_output=True, text=True)
    assert run.returncode == 6
    assert "[FAIL] daemon" in run.stdout
    assert "fix:" in run.stdout


async def test_check_backup_names_and_textfile(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """A dbname whose backup ids the receiver would refuse, and a [metrics] textfile in a
    directory that cannot take a file, each fail their own line; good ones pass."""
    base = backup_setup
    good = {r.name: r for r in await run_checks(base.with_(
        metrics={"textfile": tmp_path / "backup_metrics.prom"}))}
    assert good["backup names"].ok
    assert good["metrics textfile"].ok

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = failed(await run_checks(base.with_(
        database={"dbname": "trading db"},
        metrics={"textfile": blocker / "backup_metrics.prom"})))
    assert "[database] dbname 'trading db'" in bad["backup names"]
    assert str(blocker) in bad["metrics textfile"]
