"""`mt5backupd verify`: a real test restore into a scratch database, compared with the row
counts recorded at dump time. The scratch database is always dropped, pass or fail."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from loguru import logger
from pyrage import x25519

from mt5backupd.backup import spool
from mt5backupd.backup.childenv import pg_child_env
from mt5backupd.backup.database import connect_db
from mt5backupd.backup.pgrestore import failure_reason, list_archive, run_pg_restore
from mt5backupd.backup.rowcounts import compare, table_key
from mt5backupd.backup.runlock import RunLock
from mt5backupd.config import Config
from mt5backupd.config.encryption import load_identities
from mt5backupd.config.secretfiles import database_password
from mt5backupd.errors import Mt5BackupError
from mt5backupd.ops.listing import BackupEntry, local_entries, resolve
from mt5backupd.ops.restore import check_encrypted, sha256_file
from mt5backupd.pgtext import quote_ident

SCRATCH_PREFIX = "mt5backupd_verify_"
CANNOT_VERIFY_ENCRYPTED = "cannot verify encrypted backups here"


@dataclass
class VerifyOutcome:
    id: str
    passed: bool
    reasons: list[str] = field(default_factory=list)
    restore_s: float = 0.0
    tables: int = 0
    checked_at: str = ""
    # nothing was checked: the backup is encrypted and no identity is configured here; not a
    # failure of the backup
    skipped: bool = False

    @property
    def result(self) -> str:
        return "skipped" if self.skipped else "passed" if self.passed else "failed"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "result": self.result,
                "reasons": self.reasons, "restore_duration_s": round(self.restore_s, 3),
                "tables": self.tables, "at": self.checked_at}

    def summary(self) -> str:
        if self.skipped:
            return f"verify {self.id}: SKIPPED ({'; '.join(self.reasons)})"
        head = (f"verify {self.id}: {'PASSED' if self.passed else 'FAILED'} "
                f"({self.tables} tables, restore {self.restore_s:.1f} s)")
        return "\n".join([head, *(f"  - {r}" for r in self.reasons)])


def _toc_tables(toc: list[str]) -> set[str]:
    """``schema.table`` of every TABLE entry in a pg_restore --list."""
    tables = set()
    for line in toc:
        # "215; 1259 16390 TABLE public ticks postgres"
        parts = line.split()
        if len(parts) >= 6 and parts[3] == "TABLE" and parts[4] != "DATA":
            tables.add(table_key(parts[4], parts[5]))
    return tables


async def _restored_counts(conn: Any) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT n.nspname, c.relname, c.oid::regclass::text AS q FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND "
        "n.nspname NOT IN ('pg_catalog', 'information_schema') AND "
        "n.nspname NOT LIKE 'pg_toast%'")
    return {table_key(r["nspname"], r["relname"]):
            int(await conn.fetchval(f"SELECT count(*) FROM {r['q']}"))  # noqa: S608
            for r in rows}


async def verify(cfg: Config, ref: str = "latest",
                 identity_files: Sequence[Path] = ()) -> VerifyOutcome:
    """Test-restore a local backup; the result is also written into its manifest. An encrypted
    backup without any identity here is skipped (``CANNOT_VERIFY_ENCRYPTED``), not failed."""
    directory = cfg.local.dir
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    identities = load_identities(cfg.encryption.identity_file, identity_files)
    with RunLock(directory):  # never alongside a backup run (or its rotation)
        entry = resolve(local_entries(cfg), ref, f"in {directory}")
        manifest = next(m for m in spool.load_manifests(directory) if m.id == entry.id)
        if entry.encrypted and not identities:
            outcome = VerifyOutcome(
                manifest.id, passed=False, skipped=True,
                checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
                reasons=[f"{CANNOT_VERIFY_ENCRYPTED}: {manifest.id} is encrypted and no "
                         "[encryption] identity_file (or --identity) is configured"])
            logger.warning("verify {}: {}", outcome.id, outcome.reasons[0])
            return outcome
        outcome = await _verify_locked(cfg, manifest, entry, identities)
        manifest.extra["verify"] = outcome.to_json()
        spool.save_manifest(directory, manifest)
    log = logger.info if outcome.passed else logger.error
    log("verify {}: {}{}", outcome.id, "passed" if outcome.passed else "FAILED: ",
        "; ".join(outcome.reasons))
    return outcome


async def _verify_locked(cfg: Config, manifest: spool.Manifest, entry: BackupEntry,
                         identities: Sequence[x25519.Identity]) -> VerifyOutcome:
    db = cfg.database
    outcome = VerifyOutcome(manifest.id, passed=False,
                            checked_at=datetime.now(UTC).isoformat(timespec="seconds"))
    path = cfg.local.dir / manifest.file
    if not path.exists():
        outcome.reasons.append(f"{path} is missing")
        return outcome
    actual = await asyncio.to_thread(sha256_file, path)
    if actual != manifest.sha256:
        outcome.reasons.append(f"sha256 mismatch: expected {manifest.sha256}, got {actual} "
                               "(file corrupt or truncated)")
        return outcome
    await check_encrypted(entry, path, identities)  # a wrong identity: a config error
    password = database_password(db)
    expected: dict[str, dict[str, Any]] = manifest.extra.get("row_counts") or {}
    try:
        toc_tables = _toc_tables(await list_archive(db.pg_restore, path, identities))
    except Mt5BackupError as exc:
        outcome.reasons.append(str(exc))
        return outcome
    scratch = SCRATCH_PREFIX + secrets.token_hex(4)
    admin = await connect_db(db, password, "postgres")
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(scratch)}")
        try:
            t0 = time.monotonic()
            with pg_child_env(db, password) as env:
                env["PGDATABASE"] = scratch
                try:
                    rc, _out, err = await run_pg_restore(
                        db.pg_restore, path, ["--exit-on-error", "--no-owner",
                                              "--no-privileges", f"--dbname={scratch}"],
                        env=env, identities=identities)
                except Mt5BackupError as exc:  # age authentication failed mid-stream
                    outcome.reasons.append(str(exc))
                    return outcome
            outcome.restore_s = time.monotonic() - t0
            if rc != 0:
                outcome.reasons.append(f"pg_restore failed: {failure_reason(rc, err)}")
                return outcome
            conn = await connect_db(db, password, scratch)
            try:
                restored = await _restored_counts(conn)
            finally:
                await conn.close()
            outcome.tables = len(restored)
            outcome.reasons += [f"table {t} of the dump is missing from the restore"
                                for t in sorted(toc_tables - set(restored))]
            outcome.reasons += compare(expected, restored)
            if not expected:
                logger.warning("{} has no row counts (an older backup): restore checked only",
                               manifest.id)
            outcome.passed = not outcome.reasons
            return outcome
        finally:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(scratch)} WITH (FORCE)")
    finally:
        await admin.close()
