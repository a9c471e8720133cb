"""One database backup end to end: real PostgreSQL, real pg_dump/pg_restore, real receiver."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from mt5backupd.backup import spool
from mt5backupd.backup.pending import pending_command
from mt5backupd.backup.run import run_backup
from mt5backupd.backup.upload_state import UploadState
from mt5backupd.config import Config, parse_compression
from mt5backupd.errors import EXIT_OK, EXIT_PENDING, ConfigError
from mt5backupd.testkit.dbcontent import table_checksums, table_row_counts
from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.sampledata import generate
from tests.backup_fixtures import BackupSetup, config_toml, database_config, write_token
from tests.pg_fixtures import process_gone
from tests.waits import wait_until


def sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def remote_list(setup: BackupSetup) -> list[dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(
        f"{setup.receiver.url}/api/backup/list",
        headers=setup.receiver.auth(setup.receiver.tokens.alice),
    ) as resp:
        body = await resp.json()
        return list(body["backups"])


def final_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def restore_into(pg: PgCluster, archive: Path, dbname: str) -> None:
    pg.create_database(dbname)
    pg_restore = str(pg.bin_dir / "pg_restore")
    env = {**os.environ, **pg.env(dbname)}
    if archive.name.endswith(".zst"):
        cmd = f"zstd -dc '{archive}' | '{pg_restore}' --exit-on-error --no-owner -d {dbname}"
        subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, env=env)
    else:
        subprocess.run([pg_restore, "--exit-on-error", "--no-owner", "-d", dbname, str(archive)],
                       check=True, env=env)


@pytest.mark.parametrize("compression", ["zstd:1", "zstd:5", "gzip:6", "none"])
async def test_backup_verified_everywhere_and_restores(backup_setup: BackupSetup,
                                                       compression: str, tmp_path: Path) -> None:
    """Local file, .sha256, manifest and the receiver's copy carry one sha256; the downloaded
    copy restores with pg_restore (the README one-liner for zstd) to equal contents."""
    cfg = backup_setup.with_(database={"compression": parse_compression(compression)})
    result = await run_backup(cfg)
    assert result.ok, result.error
    assert result.exit_code == EXIT_OK
    assert result.file is not None
    directory = cfg.local.dir
    suffix = ".dump.zst" if compression.startswith("zstd") else ".dump"
    assert result.id == result.file.name  # the one id: the file name, as on the receiver
    assert re.fullmatch(rf"{backup_setup.dbname}-\d{{8}}-\d{{6}}{re.escape(suffix)}", result.id)
    assert sha_file(result.file) == result.sha256
    check = subprocess.run(["sha256sum", "-c", result.file.name + ".sha256"], cwd=directory,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    manifest = json.loads(spool.manifest_path(directory, result.id).read_text())
    assert manifest["sha256"] == result.sha256
    assert manifest["size"] == result.file.stat().st_size
    assert manifest["upload"]["state"] == "uploaded"
    assert manifest["compression"] == compression
    assert manifest["server_version"].startswith("15")
    remote = {b["id"]: b for b in await remote_list(backup_setup)}
    assert remote[result.file.name]["sha256"] == result.sha256

    downloaded = tmp_path / result.file.name
    async with aiohttp.ClientSession() as http, http.get(
        f"{backup_setup.receiver.url}/api/backup/download/{result.file.name}",
        headers=backup_setup.receiver.auth(backup_setup.receiver.tokens.alice),
    ) as resp:
        downloaded.write_bytes(await resp.read())
    assert sha_file(downloaded) == result.sha256
    copy = f"copy_{compression.replace(':', '')}"
    await asyncio.to_thread(restore_into, backup_setup.pg, downloaded, copy)
    pg = backup_setup.pg
    assert await table_row_counts(pg.dsn(copy)) == await table_row_counts(
        pg.dsn(backup_setup.dbname))
    assert await table_checksums(pg.dsn(copy)) == await table_checksums(
        pg.dsn(backup_setup.dbname))
    pg.drop_database(copy)
    assert not (directory / spool.PARTIAL_DIR).exists() or not any(
        (directory / spool.PARTIAL_DIR).iterdir())


async def test_server_killed_mid_dump_leaves_nothing(receiver: object, tmp_path: Path) -> None:
    """PostgreSQL killed while pg_dump streams: the run fails, nothing has a final name locally,
    the remote session is aborted and nothing is listed remotely."""
    from tests.receiver_harness import Receiver

    assert isinstance(receiver, Receiver)
    with PgCluster.create(tmp_path / "pgkill") as pg:
        pg.create_database("big")
        await generate(pg.dsn("big"), target_bytes=60 * 1024 * 1024)
        token_file = write_token(tmp_path / "tok", receiver.tokens.alice)
        from mt5backupd.config import LocalConfig, RemoteConfig

        cfg = Config(database=database_config(pg, "big"),
                     local=LocalConfig(dir=tmp_path / "backups"),
                     remote=RemoteConfig(url=receiver.url, token_file=token_file,
                                         retry_delay_s=0.1, max_retries=1))
        cfg = Config(database=cfg.database.__class__(**{**cfg.database.__dict__,
                                                        "compression": parse_compression("none")}),
                     local=cfg.local, remote=cfg.remote)
        partial_dir = cfg.local.dir / spool.PARTIAL_DIR

        def dumped_2_mib() -> bool:
            files = list(partial_dir.glob("*")) if partial_dir.exists() else []
            return bool(files) and files[0].stat().st_size > 2 * 1024 * 1024

        async def killer() -> None:
            # polled often: the dump of 60 MB must still be streaming when the server dies
            await wait_until(dumped_2_mib, 120, "2 MiB dumped", poll_s=0.005)
            await asyncio.to_thread(pg.kill)

        kill_task = asyncio.create_task(killer())
        result = await run_backup(cfg)
        await kill_task
        assert not result.ok
        assert "pg_dump" in result.error
        assert final_files(cfg.local.dir) == []
        assert not any(partial_dir.iterdir())
    async with aiohttp.ClientSession() as http:
        h = receiver.auth(receiver.tokens.alice)
        async with http.get(f"{receiver.url}/api/backup/list", headers=h) as resp:
            assert (await resp.json())["backups"] == []
    leftovers = list((receiver.cfg.data_dir / "partial").rglob("*.data"))
    assert leftovers == []


async def test_receiver_down_then_upload_pending(backup_setup: BackupSetup,
                                                 dead_port: int) -> None:
    """Receiver unreachable at start: local backup kept as pending with exit 3; once the
    receiver is back, upload-pending commits it (and a later run would do the same first)."""

    down_url = f"http://127.0.0.1:{dead_port}"
    cfg = backup_setup.with_(remote={"url": down_url})
    result = await run_backup(cfg)
    assert result.ok
    assert result.exit_code == EXIT_PENDING
    assert result.upload_state == "pending"
    manifest = json.loads(spool.manifest_path(cfg.local.dir, result.id).read_text())
    assert manifest["upload"]["state"] == "pending"
    done, left = await pending_command(backup_setup.cfg)
    assert (done, left) == (1, 0)
    manifest = json.loads(spool.manifest_path(cfg.local.dir, result.id).read_text())
    assert manifest["upload"]["state"] == "uploaded"
    remote = {b["id"]: b for b in await remote_list(backup_setup)}
    assert result.file is not None
    assert remote[result.file.name]["sha256"] == result.sha256


async def test_abort_policy_takes_no_backup(backup_setup: BackupSetup, dead_port: int) -> None:
    """on_unavailable = "abort" (the legacy behaviour) fails before dumping."""
    from mt5backupd.errors import Mt5BackupError

    cfg = backup_setup.with_(remote={"url": f"http://127.0.0.1:{dead_port}",
                                     "on_unavailable": "abort"})
    with pytest.raises(Mt5BackupError, match="on_unavailable = abort"):
        await run_backup(cfg)
    assert final_files(cfg.local.dir) == []


async def test_wrong_token_fails_before_dump(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """A token the receiver refuses is a config error before anything is dumped."""
    bad = write_token(tmp_path / "bad-token", "mt5b_not-a-real-token")
    cfg = backup_setup.with_(remote={"token_file": bad})
    with pytest.raises(ConfigError, match="refused the token"):
        await run_backup(cfg)
    assert final_files(cfg.local.dir) == []


async def test_world_readable_token_or_password_file_refused(backup_setup: BackupSetup,
                                                             tmp_path: Path) -> None:
    """Secret files readable by group/others are refused with the path and the chmod fix."""
    os.chmod(backup_setup.token_file, 0o644)
    with pytest.raises(ConfigError, match=r"token_file .*chmod 600"):
        await run_backup(backup_setup.cfg)
    os.chmod(backup_setup.token_file, 0o600)
    pw = tmp_path / "pw"
    pw.write_text("secret")
    os.chmod(pw, 0o640)
    with pytest.raises(ConfigError, match=r"password_file .*chmod 600"):
        await run_backup(backup_setup.with_(database={"password_file": pw}))
    assert final_files(backup_setup.cfg.local.dir) == []


async def test_wrong_db_password_fails_before_dump(backup_setup: BackupSetup,
                                                   tmp_path: Path) -> None:
    """With password auth on, a wrong password is a clear config error and nothing is dumped;
    the right one (from a 0600 password_file, via PGPASSWORD) works."""
    pg = backup_setup.pg
    await asyncio.to_thread(pg.set_password, "postgres", "right-password")
    await asyncio.to_thread(pg.require_password)
    try:
        pw = tmp_path / "pw"
        pw.write_text("wrong-password\n")
        os.chmod(pw, 0o600)
        with pytest.raises(ConfigError, match="authentication failed"):
            await run_backup(backup_setup.with_(database={"password_file": pw}))
        assert final_files(backup_setup.cfg.local.dir) == []
        pw.write_text("right-password\n")
        result = await run_backup(backup_setup.with_(database={"password_file": pw}))
        assert result.ok, result.error
    finally:
        await asyncio.to_thread(pg.allow_trust)


async def test_missing_or_old_pg_dump_refused(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """A missing pg_dump and one older than the server are clear errors before any dump."""
    with pytest.raises(ConfigError, match="pg_dump: '/nonexistent/pg_dump' not found"):
        await run_backup(backup_setup.with_(database={"pg_dump": "/nonexistent/pg_dump"}))
    fake = tmp_path / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 13.4'\n")
    fake.chmod(0o755)
    with pytest.raises(ConfigError, match="version 13 but the server is 15"):
        await run_backup(backup_setup.with_(database={"pg_dump": str(fake)}))
    assert final_files(backup_setup.cfg.local.dir) == []


async def test_stalled_pg_dump_is_killed_with_its_group(backup_setup: BackupSetup,
                                                        tmp_path: Path) -> None:
    """A pg_dump that goes silent for stall_timeout_s is killed with its whole process group."""
    fake = tmp_path / "pg_dump"
    marker = tmp_path / "child.pid"
    fake.write_text(
        "#!/bin/bash\n"
        "if [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) 15.0'; exit 0; fi\n"
        f"sleep 300 & echo $! > {marker}\n"
        "printf 'PGDMP'\n"
        "wait\n"
    )
    fake.chmod(0o755)
    cfg = backup_setup.with_(database={"pg_dump": str(fake), "stall_timeout_s": 1.0})
    result = await run_backup(cfg)
    assert not result.ok
    assert "no output for 1 s" in result.error
    child = int(marker.read_text())
    # the grandchild got the group's signal too
    await wait_until(lambda: process_gone(child), 5, f"pg_dump's grandchild {child} to exit")
    assert final_files(cfg.local.dir) == []


async def test_rotation_keeps_newest_and_pending(backup_setup: BackupSetup,
                                                 dead_port: int) -> None:
    """keep=2 leaves the two newest; a pending backup is never rotated away."""

    pending = await run_backup(backup_setup.with_(remote={"url": f"http://127.0.0.1:{dead_port}"}))
    assert pending.upload_state == "pending"
    ids = []
    for _ in range(3):
        result = await run_backup(backup_setup.with_(local={"keep": 2}))
        assert result.ok
        ids.append(result.id)
    remaining = [m.id for m in spool.load_manifests(backup_setup.cfg.local.dir)]
    # the pending one was uploaded first by the later runs, so it became ordinary and old
    assert remaining == ids[-2:]
    assert len(set(ids)) == 3  # same-second runs get distinct ids


async def test_pending_backup_survives_rotation(backup_setup: BackupSetup,
                                                dead_port: int) -> None:
    """While the receiver stays down, rotation never deletes a pending (only) copy."""

    down = backup_setup.with_(remote={"url": f"http://127.0.0.1:{dead_port}"},
                              local={"keep": 1})
    ids = [(await run_backup(down)).id for _ in range(3)]
    remaining = [m.id for m in spool.load_manifests(backup_setup.cfg.local.dir)]
    assert remaining == ids


async def test_size_anomaly_flagged(backup_setup: BackupSetup) -> None:
    """A dump under half the previous one is flagged in the result and the manifest."""
    first = await run_backup(backup_setup.cfg)
    assert not first.size_anomaly
    await asyncio.to_thread(backup_setup.pg.psql, "DELETE FROM ticks; DELETE FROM bars;",
                            backup_setup.dbname)
    second = await run_backup(backup_setup.cfg)
    assert second.ok
    assert second.size_anomaly
    assert "size anomaly" in second.summary()
    manifest = json.loads(spool.manifest_path(backup_setup.cfg.local.dir, second.id).read_text())
    assert manifest["size_anomaly"] is True


def test_lock_held_refuses_second_run(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """While another process holds the run lock, --run-now exits 5 with one clear line."""
    backup_setup.cfg.local.dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from pathlib import Path; from mt5backupd.backup.runlock import RunLock;"
         f"l=RunLock(Path({str(backup_setup.cfg.local.dir)!r})); l.acquire();"
         "print('held', flush=True); time.sleep(30)"],  # holds the lock until killed
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        toml = tmp_path / "c.toml"
        toml.write_text(config_toml(backup_setup))
        run = subprocess.run([sys.executable, "-m", "mt5backupd", "--run-now", "--config",
                              str(toml)], capture_output=True, text=True)
        assert run.returncode == 5, run.stderr
        assert "holds the lock" in run.stderr.strip().splitlines()[-1]
    finally:
        holder.kill()
        holder.wait()


async def test_cli_run_now_json_and_legacy_env_file(backup_setup: BackupSetup,
                                                    tmp_path: Path) -> None:
    """`--run-now --json` prints the result; an operator with only the legacy env file (no
    TOML at all) gets a successful, uploaded backup."""
    toml = tmp_path / "c.toml"
    toml.write_text(config_toml(backup_setup))
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "mt5backupd", "--run-now", "--json", "--config",
                         str(toml)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["ok"] is True
    assert out["upload_state"] == "uploaded"

    db = backup_setup.cfg.database
    legacy = tmp_path / "mt5-backup"
    legacy.write_text(
        "# /etc/default/mt5-backup\n"
        f"POSTGRES_DB={db.dbname}\nPOSTGRES_USER=postgres\nPOSTGRES_PASSWORD=''\n"
        f"POSTGRES_HOST={db.host}\nPOSTGRES_PORT={db.port}\n"
        f'BACKUP_DIR="{tmp_path / "legacy-backups"}"\nKEEP_LOCAL_BACKUPS=3\n'
        f"BACKUP_API_URL={backup_setup.receiver.url}/api/backup/upload\n"
        f"BACKUP_API_TOKEN={backup_setup.receiver.tokens.alice}\nMAX_RETRIES=3\nRETRY_DELAY=1\n"
    )
    legacy.chmod(0o600)  # it holds the token: readable by others would be refused
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MT5BACKUPD"))}
    env["PATH"] = f"{backup_setup.pg.bin_dir}:{env['PATH']}"  # pg_dump of the server's version
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "mt5backupd", "--run-now", "--env-file",
                         str(legacy)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "upload    uploaded" in run.stdout
    assert backup_setup.receiver.tokens.alice not in run.stdout + run.stderr
    files = final_files(tmp_path / "legacy-backups")
    assert any(f.endswith(".dump.zst") for f in files)


async def test_upload_pending_resumes_recorded_session(backup_setup: BackupSetup,
                                                       dead_port: int) -> None:
    """A pending backup whose session already holds part of the file is continued from the
    receiver's offset, not sent again from zero."""
    from mt5backupd.backup.upload import ReceiverClient
    from mt5backupd.config import Secret

    result = await run_backup(backup_setup.with_(remote={"url": f"http://127.0.0.1:{dead_port}"}))
    assert result.upload_state == "pending"
    assert result.file is not None
    data = result.file.read_bytes()
    half = len(data) // 2

    async def first_half() -> object:
        yield data[:half]

    async with ReceiverClient(backup_setup.receiver.url,
                              Secret(backup_setup.receiver.tokens.alice), timeout_s=10) as client:
        uid = (await client.create_upload(result.file.name, "database", None, {})).upload_id
        assert await client.append(uid, 0, first_half()) == half  # type: ignore[arg-type]
    manifest = spool.load_manifests(backup_setup.cfg.local.dir)[-1]
    manifest.upload = manifest.upload.with_session(uid)
    spool.save_manifest(backup_setup.cfg.local.dir, manifest)
    received_before = backup_setup.receiver.metrics.bytes_received._value.get()
    assert await pending_command(backup_setup.cfg) == (1, 0)
    received = backup_setup.receiver.metrics.bytes_received._value.get() - received_before
    assert received == len(data) - half
    remote = {b["id"]: b for b in await remote_list(backup_setup)}
    assert remote[result.file.name]["sha256"] == result.sha256


async def test_pending_backup_already_on_receiver_is_recognised(backup_setup: BackupSetup) -> None:
    """A backup the receiver already holds (the commit's answer was lost) is marked uploaded by
    upload-pending instead of staying pending forever behind a name conflict."""
    result = await run_backup(backup_setup.cfg)
    assert result.upload_state == "uploaded"
    manifest = spool.load_manifests(backup_setup.cfg.local.dir)[-1]
    manifest.upload = UploadState.pending()
    spool.save_manifest(backup_setup.cfg.local.dir, manifest)
    assert await pending_command(backup_setup.cfg) == (1, 0)
    assert spool.load_manifests(backup_setup.cfg.local.dir)[-1].upload.state == "uploaded"
