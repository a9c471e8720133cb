"""Point-in-time recovery against the real programs: pg_basebackup and pg_receivewal on a
wal_level=replica cluster, our receiver, restore to a second, and PostgreSQL started on it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mt5backupd import runstate as state
from mt5backupd.backup import spool
from mt5backupd.backup.encryption import NoIdentityError, generate_identity, write_identity_file
from mt5backupd.backup.remote import receiver_client
from mt5backupd.backup.run import run_base
from mt5backupd.cli import main
from mt5backupd.config import Config, EncryptionConfig, LocalConfig, RemoteConfig, WalConfig
from mt5backupd.daemon.jobs import run_base_now, run_verify
from mt5backupd.daemon.service import Daemon
from mt5backupd.errors import ChecksumMismatchError, ConfigError
from mt5backupd.ops.pitr import restore_pitr
from mt5backupd.ops.pitrplan import PitrRefused
from mt5backupd.ops.walcheck import wal_checks
from mt5backupd.pgtext import quote_literal
from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.pghost import free_port, make_root
from mt5backupd.wal.service import WalService
from mt5backupd.wal.shipper import (
    ShippedIndex,
    WalShipper,
    chain_complete,
    received_dir,
    shipped_dir,
)
from mt5backupd.walnames import SEGMENT_RE
from tests.backup_fixtures import BackupSetup, database_config, write_token
from tests.daemon_harness import DaemonProcess, daemon_toml
from tests.pg_fixtures import live_processes_mentioning, process_gone
from tests.receiver_harness import Receiver
from tests.waits import wait_until

DB = "trades"


@dataclass
class Pitr:
    pg: PgCluster
    cfg: Config
    receiver: Receiver


@pytest.fixture
async def pitr(pitr_cluster: PgCluster, receiver: Receiver,
               tmp_path: Path) -> AsyncIterator[Pitr]:
    pg = pitr_cluster
    pg.drop_database(DB)
    pg.create_database(DB)
    pg.psql("CREATE TABLE deals (id serial PRIMARY KEY, note text, "
            "committed timestamptz DEFAULT clock_timestamp())", DB)
    token_file = write_token(tmp_path / "remote-token", receiver.tokens.alice)
    cfg = Config(
        database=database_config(pg, DB),
        local=LocalConfig(dir=tmp_path / "backups", keep=3),
        remote=RemoteConfig(url=receiver.url, token_file=token_file, retry_delay_s=0.2,
                            max_retries=5, timeout_s=10.0),
        wal=WalConfig(enabled=True, slot="mt5test", max_lag_s=1.0,
                      pg_receivewal=str(pg.bin_dir / "pg_receivewal"),
                      pg_basebackup=str(pg.bin_dir / "pg_basebackup")),
    )
    yield Pitr(pg, cfg, receiver)


async def test_base_backup_ships_with_its_wal_range(pitr: Pitr) -> None:
    """`--job base`: pg_basebackup's tar goes through zstd, the spool and the receiver, and the
    manifest records the WAL range the backup needs (from its backup_manifest)."""
    result = await run_base(pitr.cfg)
    assert result.ok and result.exit_code == 0, result.error
    assert result.id.startswith("base-") and result.id.endswith(".tar.zst")
    [manifest] = spool.load_manifests(pitr.cfg.local.dir, "base")
    wal = manifest.extra["wal"]
    assert wal["timeline"] == 1 and wal["segment_bytes"] == 16 * 1024 * 1024
    assert wal["start_segment"] <= wal["end_segment"]
    assert manifest.upload.state == "uploaded"
    remote = json.loads((pitr.receiver.cfg.data_dir / "backups" / "alice" / result.id /
                         "meta.json").read_text())
    assert remote["kind"] == "base" and remote["sha256"] == manifest.sha256


async def test_base_backup_refused_without_wal(pitr: Pitr) -> None:
    """A base backup alone cannot be restored: without [wal] enabled the job refuses."""
    cfg = dataclasses.replace(pitr.cfg, wal=WalConfig(enabled=False))
    with pytest.raises(ConfigError, match=r"\[wal\] enabled is false"):
        await run_base(cfg)


def _insert(pg: PgCluster, note: str) -> datetime:
    """One row in its own transaction; its commit time as the server saw it."""
    out = pg.psql(f"INSERT INTO deals (note) VALUES ({quote_literal(note)}) "  # noqa: S608
                  "RETURNING committed", DB)
    return datetime.fromisoformat(out.strip())


def _start_restored(root: Path) -> PgCluster:
    server = PgCluster.adopt(root)
    server.start()
    return server


async def _promoted(server: PgCluster) -> bool:
    return server.psql("SELECT pg_is_in_recovery()").strip() == "f"


@pytest.fixture
async def wal_service(pitr: Pitr) -> AsyncIterator[WalService]:
    service = WalService(pitr.cfg)
    service.start()
    try:
        await wait_until(lambda: service.receivewal.running, 20, "pg_receivewal running")
        yield service
    finally:
        await service.stop()
        pitr.pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")


def _chain_on_receiver(cfg: Config) -> bool:
    """The newest base backup's whole WAL chain is stored and nothing stored waits for its
    upload. (WAL shipped after a commit's time can still be a snapshot of the segment before
    the base's last one, read before pg_receivewal got the rest.)"""
    bases = spool.load_manifests(cfg.local.dir, "base")
    index = ShippedIndex.load(shipped_dir(cfg))
    return bool(bases) and chain_complete(bases[-1].extra["wal"], index) and index.pending == 0


def _uploaded_beyond(cfg: Config, when: datetime) -> bool:
    newest = ShippedIndex.load(shipped_dir(cfg)).newest_uploaded_at
    return bool(newest) and datetime.fromisoformat(newest) > when


async def test_restore_to_a_time_and_to_the_end_of_shipped_wal(
        pitr: Pitr, wal_service: WalService, tmp_path: Path) -> None:
    """Rows, base backup, more rows, T, more rows: a restore to T holds exactly the rows
    committed before T; a restore to latest (no pg_switch_wal) holds the last row too, shipped
    within max_lag_s from the growing segment."""
    pg, cfg = pitr.pg, pitr.cfg
    _insert(pg, "before-base")
    assert (await run_base(cfg)).ok
    before = [_insert(pg, f"before-T-{i}") for i in range(3)]
    target = datetime.now(UTC)
    await asyncio.sleep(0.05)  # the target falls strictly between two commits
    after = _insert(pg, "after-T")
    assert before[-1] < target < after
    await wait_until(lambda: _uploaded_beyond(cfg, after), 10 * cfg.wal.max_lag_s,
                     "the WAL holding the last commit shipped")

    root = make_root(tmp_path / "pitr-t")
    result = await restore_pitr(cfg, "latest", root / "data", source="remote",
                                to_time=target.replace(tzinfo=None).isoformat())
    assert result.utc_assumed and result.wal_objects >= 1
    server = _start_restored(root)
    try:
        await wait_until(lambda: _promoted(server), 30, "recovery to T and promotion")
        notes = server.psql("SELECT note FROM deals ORDER BY id", DB).split()
        assert notes == ["before-base", "before-T-0", "before-T-1", "before-T-2"]
    finally:
        server.destroy()

    root = make_root(tmp_path / "pitr-latest")
    await restore_pitr(cfg, "latest", root / "data", source="remote", to_time=None)
    server = _start_restored(root)
    try:
        await wait_until(lambda: _promoted(server), 30, "recovery to the end and promotion")
        notes = server.psql("SELECT note FROM deals ORDER BY id", DB).split()
        assert notes[-1] == "after-T" and len(notes) == 5
    finally:
        server.destroy()


async def test_restore_refuses_a_non_empty_dir_and_a_time_outside_the_window(
        pitr: Pitr, wal_service: WalService, tmp_path: Path) -> None:
    """A non-empty target and a target before the first base backup are refused, the latter
    naming the recoverable window."""
    cfg = pitr.cfg
    assert (await run_base(cfg)).ok
    marker = _insert(pitr.pg, "x")
    await wait_until(lambda: _uploaded_beyond(cfg, marker), 10, "WAL shipped")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(PitrRefused, match="is not empty"):
        await restore_pitr(cfg, "latest", busy, to_time=None)
    with pytest.raises(PitrRefused, match=r"outside the recoverable window .* \(UTC\)"):
        await restore_pitr(cfg, "latest", tmp_path / "new", to_time="2001-01-01 00:00:00+02")
    assert not (tmp_path / "new").exists()


async def test_pg_receivewal_killed_is_restarted_and_nothing_is_lost(
        pitr: Pitr, wal_service: WalService) -> None:
    """kill -9 of pg_receivewal: the supervisor restarts it, and a row committed while it was
    dead still reaches the receiver (the slot kept its WAL)."""
    proc = wal_service.receivewal._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    await wait_until(lambda: not wal_service.receivewal.running, 10, "the supervisor noticed")
    committed = _insert(pitr.pg, "while-dead")
    await wait_until(lambda: wal_service.receivewal.running
                     and wal_service.receivewal.restarts > 0,
                     20, "pg_receivewal restarted")
    await wait_until(lambda: _uploaded_beyond(pitr.cfg, committed), 20,
                     "the row's WAL shipped after the restart")


async def test_receiver_away_wal_piles_up_locally_then_ships_in_order(
        pitr: Pitr, tmp_path: Path) -> None:
    """With the receiver unreachable WAL is still received and stored locally (pending); once
    it is back everything is uploaded, oldest first, and nothing is left pending."""
    dead = dataclasses.replace(pitr.cfg, remote=dataclasses.replace(
        pitr.cfg.remote, url=f"http://127.0.0.1:{free_port()}", max_retries=0))
    service = WalService(dead)
    service.start()
    try:
        await wait_until(lambda: service.receivewal.running, 20, "pg_receivewal running")
        for i in range(3):
            committed = _insert(pitr.pg, f"offline-{i}")
            pitr.pg.psql("SELECT pg_switch_wal()")
        await wait_until(lambda: ShippedIndex.load(shipped_dir(dead)).pending >= 3, 20,
                         "WAL stored locally as pending")
    finally:
        await service.stop()
    assert not _uploaded_beyond(dead, committed)
    shipper = WalShipper(pitr.cfg, receiver_client(pitr.cfg))
    try:
        index = await shipper.ship_round()
    finally:
        assert shipper.client is not None
        await shipper.client.close()
    assert index.pending == 0 and _uploaded_beyond(pitr.cfg, committed)
    local = [m.id for m in spool.load_manifests(shipped_dir(pitr.cfg), "wal")]
    remote_dir = pitr.receiver.cfg.data_dir / "backups" / "alice"
    remote = sorted((json.loads((d / "meta.json").read_text()) for d in remote_dir.iterdir()
                     if (d / "meta.json").exists() and d.name.endswith(".wal.zst")),
                    key=lambda r: r["created"])
    assert set(local) <= {r["id"] for r in remote}
    shipped_order = [r["id"] for r in remote]
    assert shipped_order == sorted(shipped_order), "uploaded out of order"
    pitr.pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")


async def test_health_says_when_the_receiver_refuses_wal(pitr: Pitr, tmp_path: Path) -> None:
    """A receiver that refuses the WAL (a revoked token): WAL piles up locally, and once it
    lags past 3 x max_lag_s the daemon's /health is unhealthy, naming the lag and the refusal;
    its body says how far WAL lags."""
    revoked = write_token(tmp_path / "revoked-token", "mt5b_this-token-was-revoked")
    cfg = dataclasses.replace(pitr.cfg, remote=dataclasses.replace(
        pitr.cfg.remote, token_file=revoked, max_retries=0))
    service = WalService(cfg)
    daemon = Daemon(cfg, None, None, {})
    service.start()
    try:
        await wait_until(lambda: service.receivewal.running, 20, "pg_receivewal running")
        _insert(pitr.pg, "refused-1")
        pitr.pg.psql("SELECT pg_switch_wal()")
        await wait_until(lambda: ShippedIndex.load(shipped_dir(cfg)).pending >= 1, 20,
                         "WAL stored locally as pending")
        assert daemon.health()[1]["wal"]["lag_s"] <= 3.0
        await asyncio.sleep(3.5)  # later WAL, still refused: the lag passes 3 x 1 s
        _insert(pitr.pg, "refused-2")
        pitr.pg.psql("SELECT pg_switch_wal()")

        def wal_reasons() -> list[str]:
            return [r for r in daemon.health()[1]["reasons"] if r.startswith("WAL:")]

        await wait_until(lambda: bool(wal_reasons()), 20, "/health to report the WAL lag")
    finally:
        await service.stop()
    ok, body = daemon.health()
    assert not ok
    (reason,) = wal_reasons()
    assert "not on the receiver" in reason and "401" in reason, reason
    assert body["wal"]["lag_s"] > 3.0
    pitr.pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")


async def test_wal_status_keeps_coming_while_a_round_hangs(pitr: Pitr, tmp_path: Path) -> None:
    """A receiver that accepts connections and never answers holds a shipping round for its
    whole timeout; the WAL status is still written every max_lag_s / 2, so /health does not
    call the WAL service stuck."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = dataclasses.replace(pitr.cfg, remote=dataclasses.replace(
        pitr.cfg.remote, url=f"http://127.0.0.1:{port}", timeout_s=30.0, max_retries=0))
    service = WalService(cfg)
    daemon = Daemon(cfg, None, None, {})
    status_file = cfg.local.dir / "wal" / "status.json"
    service.start()
    try:
        await wait_until(status_file.exists, 10, "the first WAL status")
        seen = set()
        for _ in range(6):
            seen.add(json.loads(status_file.read_text())["updated"])
            await asyncio.sleep(0.5)
        assert service.shipper.client is not None and not service._fields  # round still held
        assert len(seen) >= 3, seen
        assert not [r for r in daemon.health()[1]["reasons"] if r.startswith("WAL:")]
    finally:
        await service.stop()
        server.close()
    pitr.pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")


async def test_check_reports_the_wal_preconditions(pitr: Pitr) -> None:
    """`check` with [wal]: tools, wal_level, the replication privilege (missing for a plain
    role), the slot (not there yet: a warning) and the unset max_slot_wal_keep_size warning."""
    lines = {c.name: c for c in await wal_checks(pitr.cfg)}
    assert lines["pg_receivewal"].ok and lines["pg_basebackup"].ok
    assert lines["wal_level"].ok and "replica" in lines["wal_level"].detail
    assert lines["replication privilege"].ok
    slot = lines["replication slot"]
    assert slot.warning and "does not exist" in slot.detail
    assert lines["max_slot_wal_keep_size"].warning
    pitr.pg.psql("DROP ROLE IF EXISTS plain_role; CREATE ROLE plain_role LOGIN")
    plain = dataclasses.replace(pitr.cfg, database=dataclasses.replace(pitr.cfg.database,
                                                                       user="plain_role"))
    lines = {c.name: c for c in await wal_checks(plain)}
    assert not lines["replication privilege"].ok
    assert "ALTER ROLE plain_role REPLICATION" in lines["replication privilege"].fix


async def test_list_shows_base_backups_and_the_window(pitr: Pitr, wal_service: WalService,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`list` (local and --remote) shows the base backup and the recoverable window."""
    base = await run_base(pitr.cfg)
    marker = _insert(pitr.pg, "x")
    await wait_until(lambda: _uploaded_beyond(pitr.cfg, marker), 10, "WAL shipped")
    config = tmp_path / "config.toml"
    db = pitr.cfg.database
    config.write_text(
        f'[database]\nhost = "{db.host}"\nport = {db.port}\nuser = "{db.user}"\n'
        f'dbname = "{db.dbname}"\n[local]\ndir = "{pitr.cfg.local.dir}"\n'
        f'[remote]\nurl = "{pitr.cfg.remote.url}"\ntoken_file = "{pitr.cfg.remote.token_file}"\n'
        f'[wal]\nenabled = true\n')
    config.chmod(0o600)
    for extra in ([], ["--remote"]):
        assert await asyncio.to_thread(main, ["--config", str(config), "list", *extra]) == 0
        out = capsys.readouterr().out
        assert base.id in out and ".wal.zst" not in out
        assert re.search(r"1 base backup\(s\), \d+ WAL object\(s\); recoverable window "
                         r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \.\. .* \(UTC\)", out), out


async def test_daemon_kill_9_takes_pg_receivewal_along_and_loses_nothing(
        pitr: Pitr, tmp_path: Path) -> None:
    """The real daemon streams WAL; kill -9 of the daemon takes its pg_receivewal with it (no
    orphan holding the slot), a row committed while both are dead reaches the receiver once
    the daemon is back, and /metrics shows the WAL series."""
    assert pitr.cfg.remote.token_file is not None
    setup = BackupSetup(pitr.pg, DB, pitr.cfg, pitr.receiver, pitr.cfg.remote.token_file)
    wal = pitr.cfg.wal
    daemon = DaemonProcess(tmp_path / "daemon.toml")
    daemon.write_config(daemon_toml(setup, database="", extra=(
        f'[wal]\nenabled = true\nslot = "{wal.slot}"\nmax_lag_s = 1.0\n'
        f'pg_receivewal = "{wal.pg_receivewal}"\npg_basebackup = "{wal.pg_basebackup}"\n')))
    # the streaming child, not the short --create-slot run before it
    marker = f"--directory={received_dir(pitr.cfg)} --slot={wal.slot} --no-password --no-loop"
    try:
        await daemon.start()
        await wait_until(lambda: bool(live_processes_mentioning(marker)), 20,
                         "pg_receivewal started by the daemon")
        [child] = live_processes_mentioning(marker)
        daemon.signal(signal.SIGKILL)
        await daemon.wait(10)
        await wait_until(lambda: process_gone(child), 10, "pg_receivewal gone with the daemon")
        committed = _insert(pitr.pg, "daemon-dead")
        await daemon.start()
        await wait_until(lambda: _uploaded_beyond(pitr.cfg, committed), 30,
                         "the WAL of the row committed while down shipped")

        async def receiving() -> bool:
            return (await daemon.metrics())[("mt5backup_wal_receiver_up", ())] == 1.0

        await wait_until(receiving, 10, "mt5backup_wal_receiver_up 1")
        metrics = await daemon.metrics()
        assert metrics[("mt5backup_wal_enabled", ())] == 1.0
        assert metrics[("mt5backup_wal_last_shipped_timestamp_seconds", ())] > committed.timestamp()
    finally:
        await daemon.stop()
        pitr.pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE NOT active")


async def test_encrypted_base_and_wal_restore_with_the_identity(pitr: Pitr,
                                                                tmp_path: Path) -> None:
    """With [encryption] the base and every WAL object are age files (ids end in .age); a PITR
    restore without an identity is refused before anything is written, with it the data
    directory recovers to the end of the shipped WAL."""
    identity, recipient = generate_identity()
    key = tmp_path / "key.txt"
    write_identity_file(key, identity, recipient, "now")
    cfg = dataclasses.replace(pitr.cfg, encryption=EncryptionConfig(recipients=(recipient,)))
    service = WalService(cfg)
    service.start()
    try:
        await wait_until(lambda: service.receivewal.running, 20, "pg_receivewal running")
        base = await run_base(cfg)
        assert base.ok and base.id.endswith(".tar.zst.age")
        committed = _insert(pitr.pg, "secret-row")
        await wait_until(lambda: _uploaded_beyond(cfg, committed), 10, "WAL shipped")
        await wait_until(lambda: _chain_on_receiver(cfg), 10, "the base's WAL chain uploaded")
    finally:
        await service.stop()
        pitr.pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    assert all(m.id.endswith(".wal.zst.age")
               for m in spool.load_manifests(shipped_dir(cfg), "wal"))
    root = make_root(tmp_path / "enc")
    with pytest.raises(NoIdentityError):
        await restore_pitr(cfg, "latest", root / "data", source="remote", to_time=None)
    assert not (root / "data").exists()
    await restore_pitr(cfg, "latest", root / "data", source="remote", to_time=None,
                       identity_files=[key])
    server = _start_restored(root)
    try:
        await wait_until(lambda: _promoted(server), 30, "recovery and promotion")
        assert server.psql("SELECT note FROM deals", DB).split() == ["secret-row"]
    finally:
        server.destroy()


async def test_verify_pitr_starts_a_scratch_server_on_base_and_wal(
        pitr: Pitr, wal_service: WalService) -> None:
    """`verify --pitr`: base + all local WAL into a scratch data directory, a scratch server
    recovers to the newest shipped WAL and answers; the result is recorded, nothing is left."""
    base = await run_base(pitr.cfg)
    committed = _insert(pitr.pg, "verify-me")
    await wait_until(lambda: _uploaded_beyond(pitr.cfg, committed), 10, "WAL shipped")
    await wait_until(lambda: _chain_on_receiver(pitr.cfg), 10, "the base's WAL chain stored")
    outcome = await run_verify(pitr.cfg, pitr=True)
    assert outcome.passed, outcome.reasons
    assert outcome.id == base.id and outcome.tables == 1
    [manifest] = spool.load_manifests(pitr.cfg.local.dir, "base")
    assert manifest.extra["verify"]["result"] == "passed" and manifest.extra["verify"]["pitr"]
    record = state.last_run(state.load_state(pitr.cfg.local.dir), "verify")
    assert record is not None and record.succeeded and record.id == base.id
    assert not list(Path(tempfile.gettempdir()).glob("mt5backupd-pitr-verify-*"))


async def test_local_wal_goes_with_the_rotated_base_backups(
        pitr: Pitr, wal_service: WalService) -> None:
    """keep_base = 1: a new base whose WAL is not all stored yet keeps the one before it; the
    oldest base is rotated out and the local WAL before the oldest kept base's start segment
    goes with it, never to be shipped again."""
    cfg = dataclasses.replace(pitr.cfg, wal=dataclasses.replace(pitr.cfg.wal, keep_base=1))
    first = await run_base_now(cfg)
    for i in range(2):
        committed = _insert(pitr.pg, f"between-{i}")
        pitr.pg.psql("SELECT pg_switch_wal()")
    await wait_until(lambda: _uploaded_beyond(cfg, committed), 10, "WAL shipped")
    shipped = spool.load_manifests(shipped_dir(cfg), "wal")  # before any pruning
    second = await run_base_now(cfg)
    committed = _insert(pitr.pg, "after-second")
    await wait_until(lambda: _uploaded_beyond(cfg, committed), 10, "WAL shipped")

    def caught_up() -> bool:
        """The second base's WAL is all stored, and so is every finished raw segment."""
        index = ShippedIndex.load(shipped_dir(cfg))
        second_wal = next(m for m in spool.load_manifests(cfg.local.dir, "base")
                          if m.id == second.id).extra.get("wal", {})
        finished = [p.name for p in received_dir(cfg).iterdir() if SEGMENT_RE.fullmatch(p.name)]
        return chain_complete(second_wal, index) and set(finished) <= index.full

    await wait_until(caught_up, 20, "the shipper caught up with the second base's WAL")
    third = await run_base_now(cfg)
    # The oldest goes, by the second base's run or the third's; a base stays exactly while the
    # next one's WAL is not all stored yet, which depends on whether a shipping round (every
    # max_lag_s/2) ran in between: only the outcome is pinned, not the round it happened in.
    rotated = set(second.rotated) | set(third.rotated)
    assert first.id in rotated
    kept = {m.id: m for m in spool.load_manifests(cfg.local.dir, "base")}
    assert third.id in kept
    assert rotated | set(kept) == {first.id, second.id, third.id}
    assert not rotated & set(kept)
    start = min(kept.values(), key=lambda m: m.started).extra["wal"]["start_segment"]
    older = {m.id for m in shipped if m.extra["wal"]["segment"] < start}
    assert older
    committed = _insert(pitr.pg, "after-third")
    await wait_until(lambda: _uploaded_beyond(cfg, committed), 10, "WAL shipped")
    left = {m.id: m for m in spool.load_manifests(shipped_dir(cfg), "wal")}
    assert not older & set(left), "WAL before the kept base was not pruned (or came back)"
    assert any(m.extra["wal"]["segment"] >= start for m in left.values())


async def test_a_changed_wal_object_is_refused_by_its_sha256(
        pitr: Pitr, wal_service: WalService, tmp_path: Path) -> None:
    """Every object's sha256 is checked: one changed byte in a stored WAL object stops the
    restore with exit 6, naming the object, and leaves no half-restored data directory."""
    assert (await run_base(pitr.cfg)).ok
    committed = _insert(pitr.pg, "x")
    await wait_until(lambda: _uploaded_beyond(pitr.cfg, committed), 10, "WAL shipped")
    await wal_service.stop()
    victim = spool.load_manifests(shipped_dir(pitr.cfg), "wal")[-1]
    path = shipped_dir(pitr.cfg) / victim.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=f"{victim.id}: sha256 mismatch") as info:
        await restore_pitr(pitr.cfg, "latest", tmp_path / "target", to_time=None)
    assert info.value.exit_code == 6
    assert not (tmp_path / "target").exists()  # made by the restore: removed, no half data dir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ChecksumMismatchError):
        await restore_pitr(pitr.cfg, "latest", empty, to_time=None)
    assert list(empty.iterdir()) == []  # given empty: left empty
