"""`mt5backupd restore`: find a backup (``listing.resolve``), get it (resuming a download),
prove its sha256 (and, encrypted, that an identity opens it) before any database is touched,
then pg_restore it into a target database."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from loguru import logger
from pyrage import x25519

from mt5backupd.backup import spool
from mt5backupd.backup.childenv import pg_child_env
from mt5backupd.backup.compress import is_zstd_file
from mt5backupd.backup.database import connect_db
from mt5backupd.backup.encryption import (
    DecryptionFailedError,
    NoIdentityError,
    check_opens,
    is_age_file,
)
from mt5backupd.backup.pgrestore import decode_file_to_fd, failure_reason, run_pg_restore
from mt5backupd.backup.remote import receiver_client
from mt5backupd.config import Config, DatabaseConfig, Secret
from mt5backupd.config.encryption import load_identities
from mt5backupd.config.secretfiles import database_password
from mt5backupd.errors import EXIT_USAGE, ChecksumMismatchError, Mt5BackupError
from mt5backupd.ops.listing import BackupEntry, local_entries, remote_entries, resolve
from mt5backupd.pgtext import quote_ident

RESTORE_DIR = ".restore"


class RestoreRefused(Mt5BackupError):
    """The command would overwrite something it must not (the source database)."""

    exit_code = EXIT_USAGE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1024 * 1024):
            h.update(block)
    return h.hexdigest()


@dataclass
class RestoreResult:
    id: str
    file: Path
    source: str
    target_db: str
    created: bool
    jobs: int
    sha256: str
    size: int
    download_s: float
    restore_s: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "file": str(self.file), "from": self.source,
                "target_db": self.target_db, "created": self.created, "jobs": self.jobs,
                "sha256": self.sha256, "size": self.size, "download_s": round(self.download_s, 3),
                "restore_s": round(self.restore_s, 3)}

    def summary(self) -> str:
        return "\n".join([
            f"restored {self.id} into {self.target_db}"
            + (" (created)" if self.created else " (cleaned and replaced)"),
            f"  file      {self.file} ({self.source}, {self.size / 1e6:.1f} MB)",
            f"  sha256    {self.sha256} (verified before restoring)",
            f"  time      download {self.download_s:.1f} s, pg_restore {self.restore_s:.1f} s"
            + (f" with {self.jobs} jobs" if self.jobs > 1 else ""),
        ])


async def _target_exists(db: DatabaseConfig, password: Secret | None, target: str) -> bool:
    conn = await _maintenance_connection(db, password)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", target))
    finally:
        await conn.close()


async def _maintenance_connection(db: DatabaseConfig, password: Secret | None) -> Any:
    return await connect_db(db, password, "postgres")


async def _create_database(db: DatabaseConfig, password: Secret | None, target: str) -> None:
    conn = await _maintenance_connection(db, password)
    try:
        await conn.execute(f"CREATE DATABASE {quote_ident(target)}")
    finally:
        await conn.close()


async def _drop_database(db: DatabaseConfig, password: Secret | None, target: str) -> None:
    conn = await _maintenance_connection(db, password)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(target)} WITH (FORCE)")
    finally:
        await conn.close()


async def check_encrypted(entry: BackupEntry, path: Path,
                          identities: Sequence[x25519.Identity]) -> None:
    """An encrypted backup opens with one of ``identities`` (age's header check), or a
    ConfigError (exit 4) says why, before any database is touched."""
    if is_age_file(path):
        await asyncio.to_thread(check_opens, path, identities, name=entry.id,
                                recipients=entry.recipients)


async def restore(cfg: Config, ref: str, target_db: str, *, source: str = "local",
                  create: bool = False, jobs: int = 1, force: bool = False,
                  no_owner: bool = False, identity_files: Sequence[Path] = ()) -> RestoreResult:
    db = cfg.database
    identities = load_identities(cfg.encryption.identity_file, identity_files)
    if target_db == db.dbname and not force:
        raise RestoreRefused(f"--target-db {target_db} is the configured source database; "
                             "restoring over it needs --force")
    if jobs < 1:
        raise RestoreRefused("--jobs must be >= 1")
    password = database_password(db)
    t0 = time.monotonic()
    restore_dir = cfg.local.dir / RESTORE_DIR
    if source == "remote":
        entry = resolve(await remote_entries(cfg), ref, "on the receiver")
        if entry.encrypted and not identities:  # say so before a long download
            raise NoIdentityError(f"{entry.id} is encrypted (age); give --identity PATH or "
                                  "set [encryption] identity_file; nothing was restored")
        restore_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = restore_dir / entry.file
        client = receiver_client(cfg)
        assert client is not None
        async with client:
            logger.info("downloading {} from the receiver", entry.file)
            await client.download(entry.file, path)
    else:
        entry = resolve(local_entries(cfg), ref, f"in {cfg.local.dir}")
        path = cfg.local.dir / entry.file
        if not path.exists():
            raise Mt5BackupError(f"{path}: backup file missing (its manifest exists)")
    download_s = time.monotonic() - t0
    actual = await asyncio.to_thread(sha256_file, path)
    if actual != entry.sha256:
        if source == "remote":
            path.unlink(missing_ok=True)
        raise ChecksumMismatchError(f"{entry.file}: sha256 mismatch, expected {entry.sha256}, "
                                    f"got {actual}; not restoring (the file is corrupt or "
                                    "truncated)")
    logger.info("sha256 of {} verified", entry.file)
    try:
        await check_encrypted(entry, path, identities)
    except Mt5BackupError:
        if source == "remote":
            path.unlink(missing_ok=True)
        raise

    existed = await _target_exists(db, password, target_db)
    if not existed:
        if not create:
            raise RestoreRefused(f"target database {target_db!r} does not exist; add --create")
        await _create_database(db, password, target_db)
    args = ["--exit-on-error", "--no-password", f"--dbname={target_db}"]
    if existed:
        args += ["--clean", "--if-exists"]
    if no_owner:
        args += ["--no-owner"]
    archive = path
    plain: Path | None = None
    if jobs > 1:
        args += [f"--jobs={jobs}"]
        if is_zstd_file(path) or is_age_file(path):
            # parallel pg_restore seeks in the archive: give it a plain file (0600, on the
            # restore host, removed after)
            restore_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            plain = restore_dir / (spool.stem_of(entry.id) + ".dump")
            archive = plain
    t1 = time.monotonic()
    try:
        if plain is not None:
            await asyncio.to_thread(_decode_to, path, plain, identities)
        with pg_child_env(db, password) as env:
            env["PGDATABASE"] = target_db
            rc, _out, err = await run_pg_restore(db.pg_restore, archive, args, env=env,
                                                 identities=identities)
    except DecryptionFailedError as exc:
        if existed:
            raise
        # half a database made from a changed file: nothing worth keeping
        with contextlib.suppress(Mt5BackupError, OSError, asyncpg.PostgresError):
            await _drop_database(db, password, target_db)
        raise DecryptionFailedError(f"{exc}; dropped {target_db}, which this restore had "
                                    "created") from None
    finally:
        if plain is not None:
            plain.unlink(missing_ok=True)
    restore_s = time.monotonic() - t1
    if rc != 0:
        raise Mt5BackupError(f"pg_restore into {target_db} failed: {failure_reason(rc, err)}")
    if source == "remote":
        with contextlib.suppress(OSError):
            path.unlink()
    return RestoreResult(entry.id, path, source, target_db, not existed, jobs, actual,
                         entry.size, download_s, restore_s)


def _decode_to(src: Path, dest: Path, identities: Sequence[x25519.Identity]) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        decode_file_to_fd(src, fd, identities)
    finally:
        os.close(fd)
