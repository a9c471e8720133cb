"""The legacy backup.sh monitoring keeps working: the ``mt5_backup_*`` series on the daemon's
/metrics (``[http] legacy_metrics``) and the node_exporter textfile (``[metrics] textfile``),
against real ``--run-now`` processes, the real daemon, PostgreSQL and receiver.

(The install.sh import of ``[metrics] textfile`` is tested in tests/test_install.py, which has
the staged installation it reuses.)"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mt5backupd import runstate as state
from mt5backupd.backup import spool
from mt5backupd.backup.upload_state import UploadState
from mt5backupd.config import load_config
from mt5backupd.daemon.metrics import LegacyValues, legacy_values
from mt5backupd.errors import ConfigError
from tests.backup_fixtures import BackupSetup
from tests.daemon_harness import DaemonProcess, daemon_toml
from tests.waits import wait_until

LEGACY = ("mt5_backup_status", "mt5_backup_db_size_bytes", "mt5_backup_repo_size_bytes",
          "mt5_backup_duration_seconds", "mt5_backup_last_timestamp")
NEVER = "0 3 1 1 *"  # a schedule that does not fire during a test

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def daemons() -> AsyncIterator[list[DaemonProcess]]:
    """Daemons a test starts; all stopped at teardown, whatever the test did."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        await daemon.stop()


def make_repository(root: Path) -> Path:
    """A small directory for the repository job to archive."""
    (root / "src").mkdir(parents=True)
    (root / "README.md").write_text("# trading\n")
    (root / "src" / "strategy.py").write_text("print('buy')\n" * 200)
    return root


async def run_now(config: Path, *args: str, umask: int | None = None) -> tuple[int, str]:
    """``mt5backupd --run-now`` as its own process; (exit code, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MT5BACKUPD"))}
    cmd = [sys.executable, "-m", "mt5backupd", "--run-now", "--config", str(config), *args]
    if umask is not None:  # the systemd unit's UMask=0077: the textfile must stay 0644
        cmd = ["sh", "-c", f'umask {umask:04o} && exec "$@"', "sh", *cmd]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, env=env)
    _out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def legacy_of(samples: Samples) -> dict[str, Any]:
    """The legacy series of a scrape: name -> value, and ``ts`` -> the timestamp label."""
    out: dict[str, Any] = {}
    for (name, labels), value in samples.items():
        if name == "mt5_backup_last_timestamp":
            assert value == 1
            out["ts"] = dict(labels)["ts"]
        elif name.startswith("mt5_backup_"):
            out[name] = value
    return out


def expected_legacy(local_dir: Path) -> dict[str, Any]:
    """The legacy values as the old exporter defined them, read straight from the run records
    and the files on disk (not through mt5backupd.daemon.metrics)."""
    raw = json.loads((local_dir / state.STATE_FILE).read_text())["jobs"]["database"]["last_run"]

    def newest_file_size(kind: str) -> float:
        found = spool.load_manifests(local_dir, kind)
        return float((local_dir / found[-1].file).stat().st_size) if found else 0.0

    finished = datetime.fromisoformat(raw["finished"]).astimezone(UTC)
    return {
        "mt5_backup_status": 1.0 if raw["result"] == "success" else 0.0,
        "mt5_backup_db_size_bytes": newest_file_size("database"),
        "mt5_backup_repo_size_bytes": newest_file_size("repository"),
        "mt5_backup_duration_seconds": raw["duration_s"],
        "ts": finished.isoformat(timespec="seconds"),
    }


def test_config_defaults_off(tmp_path: Path) -> None:
    """Both are off unless configured; set, they load as given."""
    assert load_config(None, env={}).http.legacy_metrics is False
    assert load_config(None, env={}).metrics.textfile is None
    path = tmp_path / "c.toml"
    path.write_text('[http]\nlegacy_metrics = true\n[metrics]\ntextfile = "/x/m.prom"\n')
    cfg = load_config(path, env={})
    assert (cfg.http.legacy_metrics, cfg.metrics.textfile) == (True, Path("/x/m.prom"))


@pytest.mark.parametrize(("body", "message"), [
    ('[metrics]\ntextfile = "relative/m.prom"', "[metrics] textfile: must be an absolute path"),
    ('[metrics]\ntextfile = "/x/metrics.txt"', "[metrics] textfile: must end in .prom"),
    ('[metrics]\ntext_file = "/x/m.prom"', "[metrics] text_file: unknown key"),
    ("[http]\nlegacy_metrics = 1", "[http] legacy_metrics: expected bool"),
])
def test_config_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    """A textfile node_exporter would never read (not *.prom, relative) or a mistyped key is
    refused with the file and key named."""
    path = tmp_path / "c.toml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value).startswith(f"{path}: {message}"), err.value


def manifest(kind: str, size: int, finished: str, *, pending: bool = False) -> spool.Manifest:
    return spool.Manifest(
        id=f"{kind}-{size}", file=f"{kind}-{size}.dump", kind=kind, database="db", size=size,
        sha256="0" * 64, compression="none", started=finished, finished=finished,
        duration_s=2.5, dump_duration_s=2.0, raw_bytes=size,
        upload=UploadState.from_json({"state": "pending" if pending else "uploaded"}))


T1, T2 = "2025-10-19T17:19:17.250000+00:00", "2025-10-20T03:00:09+02:00"


@pytest.mark.parametrize(("records", "manifests", "expected"), [
    # nothing yet: zeros, and no timestamp series
    ({}, [], LegacyValues(0.0, 0.0, 0.0, 0.0, None)),
    # run records lost (state file removed): the newest files tell; pending is not success
    ({}, [manifest("database", 10, T1), manifest("repository", 7, T1)],
     LegacyValues(1.0, 10.0, 7.0, 2.5, "2025-10-19T17:19:17+00:00")),
    ({}, [manifest("database", 10, T1, pending=True)],
     LegacyValues(0.0, 10.0, 0.0, 2.5, "2025-10-19T17:19:17+00:00")),
    # the last run failed after files were rotated away: size of the last good run's record,
    # time of the failed run in UTC
    ({"last_run": {"job": "database", "id": "", "started": T2, "finished": T2,
                   "result": "failure", "duration_s": 0.5},
      "last_success": {"job": "database", "id": "x", "started": T1, "finished": T1,
                       "result": "success", "duration_s": 9.0, "size": 42}},
     [], LegacyValues(0.0, 42.0, 0.0, 0.5, "2025-10-20T01:00:09+00:00")),
])
def test_legacy_values(records: dict[str, Any], manifests: list[spool.Manifest],
                       expected: LegacyValues) -> None:
    """The legacy values from run records and manifests, including the fallbacks."""
    st = {"jobs": {"database": records} if records else {}}
    assert legacy_values(st, manifests) == expected


async def wait_for_legacy(daemon: DaemonProcess, timeout_s: float) -> Samples:
    scrapes: list[Samples] = []

    async def legacy_series() -> bool:
        scrapes.append(await daemon.metrics())
        return any(name == "mt5_backup_status" for name, _labels in scrapes[-1])

    await wait_until(legacy_series, timeout_s, "the legacy series after the reload")
    return scrapes[-1]


async def test_legacy_series_on_daemon_metrics(backup_setup: BackupSetup, tmp_path: Path,
                                               daemons: list[DaemonProcess],
                                               dead_port: int) -> None:
    """Off by default; with legacy_metrics on (applied by SIGHUP) /metrics carries the five
    legacy series with the old meaning for runs made by --run-now in other processes: status of
    the last database run (a pending upload is 0), sizes of the newest backup files, the last
    run's duration and ISO time."""
    local_dir = backup_setup.cfg.local.dir
    daemon_config = tmp_path / "daemon.toml"
    daemon = DaemonProcess(daemon_config)
    daemons.append(daemon)
    base = daemon_toml(backup_setup, database=NEVER)
    daemon.write_config(base)
    await daemon.start()
    runs = tmp_path / "run.toml"
    runs.write_text(base + f'[repository]\npath = "{make_repository(tmp_path / "repo")}"\n')

    code, err = await run_now(runs)
    assert code == 0, err
    samples = await daemon.metrics()
    assert samples[("mt5backup_runs_total", (("job", "database"), ("result", "success")))] == 1
    assert not [name for name, _ in samples if name.startswith("mt5_backup_")]

    daemon.write_config(base.replace("[http]\n", "[http]\nlegacy_metrics = true\n"))
    daemon.signal(signal.SIGHUP)
    legacy = legacy_of(await wait_for_legacy(daemon, 10))
    assert set(legacy) == {*LEGACY[:-1], "ts"}
    assert legacy == expected_legacy(local_dir)
    assert legacy["mt5_backup_status"] == 1
    assert legacy["mt5_backup_db_size_bytes"] > 0
    assert legacy["mt5_backup_repo_size_bytes"] == 0  # no repository archive yet
    first_ts = legacy["ts"]

    # a repository run: its archive's size, and the database series unchanged
    code, err = await run_now(runs, "--job", "repository")
    assert code == 0, err
    legacy = legacy_of(await daemon.metrics())
    assert legacy == expected_legacy(local_dir)
    assert legacy["mt5_backup_repo_size_bytes"] > 0
    assert (legacy["mt5_backup_status"], legacy["ts"]) == (1, first_ts)

    # a failed run: status 0, its duration and time; the size stays the last good file's
    good_size = legacy["mt5_backup_db_size_bytes"]
    broken = tmp_path / "broken.toml"
    broken.write_text(daemon_toml(backup_setup, database=NEVER, dbname="no_such_db"))
    code, err = await run_now(broken)
    assert code not in (0, 3), err  # a failed run (here: exit 4, the database is unknown)
    legacy = legacy_of(await daemon.metrics())
    assert legacy == expected_legacy(local_dir)
    assert legacy["mt5_backup_status"] == 0
    assert legacy["mt5_backup_db_size_bytes"] == good_size
    assert legacy["ts"] >= first_ts

    # a backup kept locally with its upload pending (receiver down): 0, as an upload failure
    # was in the legacy system; the size is the new file's
    down = tmp_path / "down.toml"
    down.write_text(base.replace(backup_setup.receiver.url, f"http://127.0.0.1:{dead_port}"))
    code, err = await run_now(down)
    assert code == 3, err
    legacy = legacy_of(await daemon.metrics())
    assert legacy == expected_legacy(local_dir)
    assert legacy["mt5_backup_status"] == 0
    assert spool.load_manifests(local_dir, "database")[-1].pending


def textfile_families(path: Path) -> dict[str, Samples]:
    """The textfile parsed by prometheus_client: family name -> its samples."""
    return {fam.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
            for fam in text_string_to_metric_families(path.read_text())}


async def test_textfile_written_after_run_now(backup_setup: BackupSetup,
                                              tmp_path: Path) -> None:
    """``--run-now`` (database and repository) rewrites the textfile: a missing directory is a
    WARNING and the backup still succeeds; then it is 0644 under umask 077, parses, holds the
    mt5backup_* families and the legacy series with the run's values, passes promtool, and is
    replaced by rename, never seen half-written, with no temp file left behind."""
    directory = tmp_path / "textfile"
    textfile = directory / "backup_metrics.prom"
    config = tmp_path / "run.toml"
    config.write_text(
        daemon_toml(backup_setup, database=NEVER)
        + f'[repository]\npath = "{make_repository(tmp_path / "repo")}"\n'
        + f'[metrics]\ntextfile = "{textfile}"\n')

    code, err = await run_now(config)
    assert code == 0, err  # the textfile cannot be written, the backup is still good
    assert "WARNING" in err
    assert f"[metrics] textfile {textfile}: not written" in err

    directory.mkdir()
    code, err = await run_now(config, umask=0o077)
    assert code == 0, err
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    families = textfile_families(textfile)
    assert set(LEGACY) <= set(families)
    for name in ("mt5backup_last_run_success", "mt5backup_runs", "mt5backup_local_bytes",
                 "mt5backup_build_info"):
        assert name in families, name
    # live-only families: a file cannot keep them true
    assert "mt5backup_in_progress" not in families
    samples = parse(textfile.read_text())
    assert samples[("mt5backup_runs_total", (("job", "database"), ("result", "success")))] == 2
    assert legacy_of(samples) == expected_legacy(backup_setup.cfg.local.dir)
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=textfile.read_bytes(),
                               capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr

    # the repository job rewrites it too; a reader polling throughout sees only whole files
    inode = textfile.stat().st_ino
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MT5BACKUPD"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mt5backupd", "--run-now", "--job", "repository", "--config",
        str(config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wait = asyncio.create_task(proc.communicate())
    reads = 0
    while not wait.done():
        text = textfile.read_text()
        assert text.endswith("\n")
        assert set(LEGACY) <= {f.name for f in text_string_to_metric_families(text)}
        reads += 1
        await asyncio.sleep(0.005)  # poll interval of the reader, not a synchronisation
    _out, err_bytes = await wait
    assert proc.returncode == 0, err_bytes.decode()
    assert reads > 0
    assert textfile.stat().st_ino != inode  # replaced by a rename, not rewritten in place
    assert sorted(p.name for p in directory.iterdir()) == [textfile.name]
    legacy = legacy_of(parse(textfile.read_text()))
    assert legacy == expected_legacy(backup_setup.cfg.local.dir)
    assert legacy["mt5_backup_repo_size_bytes"] > 0


async def test_daemon_runs_write_textfile(backup_setup: BackupSetup, tmp_path: Path,
                                          daemons: list[DaemonProcess]) -> None:
    """A scheduled run of the daemon writes the textfile too, with the run it just made."""
    textfile = tmp_path / "backup_metrics.prom"
    daemon = DaemonProcess(tmp_path / "daemon.toml")
    daemons.append(daemon)
    daemon.write_config(daemon_toml(backup_setup, database="*/2 * * * * *")
                        + f'[metrics]\ntextfile = "{textfile}"\n')
    await daemon.start()
    await wait_until(textfile.exists, 30, "the textfile after a daemon run")
    await daemon.stop()  # no further run may rewrite the file while it is checked
    samples = parse(textfile.read_text())
    assert samples[("mt5backup_runs_total", (("job", "database"), ("result", "success")))] >= 1
    legacy = legacy_of(samples)
    assert legacy == expected_legacy(backup_setup.cfg.local.dir)
    assert legacy["mt5_backup_status"] == 1
