"""Row counts recorded with a backup, and `mt5backupd verify` test restores."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mt5backupd import runstate as state
from mt5backupd.backup import spool
from mt5backupd.backup.rowcounts import compare
from mt5backupd.backup.run import run_backup
from mt5backupd.config import parse_compression
from mt5backupd.daemon.jobs import run_verify
from mt5backupd.ops.verify import SCRATCH_PREFIX
from mt5backupd.testkit.dbcontent import table_row_counts
from tests.backup_fixtures import BackupSetup, config_toml


def scratch_databases(setup: BackupSetup) -> list[str]:
    assert SCRATCH_PREFIX == "mt5backupd_verify_"
    out = setup.pg.psql("SELECT datname FROM pg_database WHERE datname LIKE "
                        "'mt5backupd_verify_%'")
    return out.split()


@pytest.mark.parametrize(
    ("expected", "restored", "problems"),
    [
        ({"public.a": {"rows": 3, "exact": True}}, {"public.a": 3}, []),
        ({"public.a": {"rows": 3, "exact": True}}, {"public.a": 2}, ["public.a: 2 rows"]),
        ({"public.a": {"rows": 3, "exact": True}}, {}, ["table public.a is missing"]),
        ({"public.t": {"rows": 100_000, "exact": False}}, {"public.t": 95_000}, []),
        ({"public.t": {"rows": 100_000, "exact": False}}, {"public.t": 50_000},
         ["about 100000 estimated"]),
    ],
)
def test_compare_counts(expected: dict[str, dict[str, object]], restored: dict[str, int],
                        problems: list[str]) -> None:
    """Exact counts must match; estimates within 10%; a missing table is a problem."""
    found = compare(expected, restored)
    assert len(found) == len(problems)
    for got, fragment in zip(found, problems, strict=True):
        assert fragment in got


async def test_counts_recorded_from_the_stream_or_the_snapshot(
        backup_setup: BackupSetup) -> None:
    """By default the manifest carries exact per-table counts read off the dump stream, equal
    to the source's, whatever exact_count_max_bytes says; with pg_dump's own gzip they are
    counted in the dump's snapshot, and tables over exact_count_max_bytes are estimates."""
    result = await run_backup(backup_setup.with_(database={"exact_count_max_bytes": 0}))
    manifest = spool.load_manifests(backup_setup.cfg.local.dir)[-1]
    counts = manifest.extra["row_counts"]
    source = await table_row_counts(backup_setup.pg.dsn(backup_setup.dbname))
    assert {k.removeprefix("public."): v["rows"] for k, v in counts.items()} == source
    assert all(v["exact"] for v in counts.values())
    assert manifest.extra["row_counts_source"] == "stream"
    assert "snapshot" not in manifest.extra
    assert result.ok
    estimated = await run_backup(backup_setup.with_(
        database={"exact_count_max_bytes": 0, "compression": parse_compression("gzip:1")}))
    assert estimated.ok
    manifest = spool.load_manifests(backup_setup.cfg.local.dir)[-1]
    assert manifest.extra["row_counts_source"] == "snapshot"
    assert not any(v["exact"] for v in manifest.extra["row_counts"].values())


async def test_verify_passes_and_records_metrics(backup_setup: BackupSetup) -> None:
    """A good backup verifies; the result and the restore time land in the manifest and the
    state the daemon's metrics read; no scratch database is left."""
    assert (await run_backup(backup_setup.cfg)).ok
    outcome = await run_verify(backup_setup.cfg)
    assert outcome.passed, outcome.reasons
    assert outcome.tables == 7
    assert outcome.restore_s > 0
    manifest = spool.load_manifests(backup_setup.cfg.local.dir)[-1]
    assert manifest.extra["verify"]["result"] == "passed"
    run = state.last_run(state.load_state(backup_setup.cfg.local.dir), "verify")
    assert run is not None
    assert run.succeeded
    assert scratch_databases(backup_setup) == []


async def test_verify_fails_on_missing_table_data(backup_setup: BackupSetup,
                                                  tmp_path: Path) -> None:
    """A backup whose ticks data is missing (a pg_dump that left it out) fails verification
    with the table named; the scratch database is gone afterwards."""
    real = backup_setup.cfg.database.pg_dump
    fake = tmp_path / "pg_dump"
    fake.write_text(f'#!/bin/sh\nexec "{real}" "$@" --exclude-table-data=public.ticks\n')
    fake.chmod(0o755)
    assert (await run_backup(backup_setup.with_(database={"pg_dump": str(fake)}))).ok
    outcome = await run_verify(backup_setup.cfg)
    assert not outcome.passed
    assert any("public.ticks" in r and "0 rows restored" in r for r in outcome.reasons)
    assert scratch_databases(backup_setup) == []


async def test_verify_fails_on_truncated_file_and_cli_exit(backup_setup: BackupSetup,
                                                           tmp_path: Path) -> None:
    """A truncated backup fails with expected and actual sha256; the CLI exits 6."""
    result = await run_backup(backup_setup.cfg)
    assert result.file is not None
    size = result.file.stat().st_size
    os.truncate(result.file, size // 2)
    outcome = await run_verify(backup_setup.cfg)
    assert not outcome.passed
    assert result.sha256 in outcome.reasons[0]
    toml = tmp_path / "c.toml"
    toml.write_text(config_toml(backup_setup))
    run = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "mt5backupd", "verify", "latest", "--config", str(toml)],
        capture_output=True, text=True)
    assert run.returncode == 6, run.stdout + run.stderr
    assert "FAILED" in run.stdout
    assert scratch_databases(backup_setup) == []
