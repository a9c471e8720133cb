"""One backup identity and one wire contract: the id is the file name everywhere, typed upload
state, BackupRecord/UploadSession from JSON, one metadata builder, one sidecar line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from mt5backupd import runstate as state
from mt5backupd.backup import spool
from mt5backupd.backup.pending import pending_command
from mt5backupd.backup.run import run_backup
from mt5backupd.backup.runstart import check_database_names
from mt5backupd.backup.upload_state import UploadState
from mt5backupd.config import RepositoryConfig, parse_compression
from mt5backupd.daemon.jobs import run_database, run_repository_now
from mt5backupd.errors import ConfigError, Mt5BackupError
from mt5backupd.ops.listing import BackupEntry, local_entries, remote_entries, resolve
from mt5backupd.records import (
    BackupRecord,
    InvalidRecord,
    UploadSession,
    find_same,
    parse_sidecar,
    sidecar_line,
)
from mt5backupd.testkit.pghost import free_port
from tests.backup_fixtures import BackupSetup

SHA = "ab" * 32
DB1 = "mt5_trading-20261125-030000.dump.zst"
DB2 = "mt5_trading-20261126-030000.dump.zst"
DB2_GZ = "mt5_trading-20261126-030000.dump.gz"
REPO = "repository-20261125-030000.tar.zst"


def entry(backup_id: str, kind: str = "database") -> BackupEntry:
    return BackupEntry(backup_id, backup_id, kind, 1, SHA, "2026-11-25T03:00:00+00:00",
                       "uploaded", "")


# --- stems ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("backup_id", "stem"), [
    (DB1, "mt5_trading-20261125-030000"),
    ("mt5_trading-20261125-030000-2.dump.zst", "mt5_trading-20261125-030000-2"),
    ("mt5_trading-20261125-030000.dump", "mt5_trading-20261125-030000"),
    (REPO, "repository-20261125-030000"),
    ("my.db-20261125-030000.dump.gz", "my.db-20261125-030000"),  # a dot in the dbname
    ("old-20200101-000000-20261125-030000.dump", "old-20200101-000000-20261125-030000"),
    ("handmade.dump", "handmade"),  # not a generated name: up to its first dot
])
def test_stem_of(backup_id: str, stem: str) -> None:
    """The manifest's name is the id without its file suffix, whatever the dbname holds."""
    assert spool.stem_of(backup_id) == stem


# --- the resolver --------------------------------------------------------------------------

ENTRIES = [entry(DB1), entry(REPO, "repository"), entry(DB2)]


@pytest.mark.parametrize(("entries", "ref", "found"), [
    (ENTRIES, "latest", DB2),
    (ENTRIES, DB1, DB1),  # the id
    (ENTRIES, "mt5_trading-20261125-030000", DB1),  # the short id earlier versions printed
    (ENTRIES, DB2, DB2),
    ([entry(DB2), entry(DB2_GZ)], DB2_GZ, DB2_GZ),  # a full id is never ambiguous
    ([entry(DB1), entry(REPO, "repository")], "latest", DB1),  # latest is of the kind
])
def test_resolve_finds(entries: list[BackupEntry], ref: str, found: str) -> None:
    """latest, a full id and the short id each name exactly one database backup."""
    assert resolve(entries, ref, "here").id == found


@pytest.mark.parametrize(("entries", "ref", "message"), [
    ([], "latest", "no database backups here"),
    ([entry(REPO, "repository")], "latest", "no database backups here"),
    (ENTRIES, "mt5_trading-20261127-030000", f"no database backup "
     f"'mt5_trading-20261127-030000' here; newest is '{DB2}'"),
    (ENTRIES, "mt5_trading-20261125", "no database backup"),  # no prefix guessing
    (ENTRIES, REPO, "is a repository backup, not a database backup"),
    (ENTRIES, "repository-20261125-030000", "is a repository backup"),
    ([entry(DB2), entry(DB2_GZ)], "mt5_trading-20261126-030000",
     f"names 2 backups here: {DB2}, {DB2_GZ}; give one of them in full"),
])
def test_resolve_refuses(entries: list[BackupEntry], ref: str, message: str) -> None:
    """No match, another kind or an ambiguous short id: an error saying what there is."""
    with pytest.raises(Mt5BackupError) as err:
        resolve(entries, ref, "here")
    assert message in str(err.value)


# --- upload state --------------------------------------------------------------------------

@pytest.mark.parametrize("old_json", [
    {"state": "pending"},
    {"state": "disabled"},
    {"state": "pending", "session": "0" * 32},
    {"state": "pending", "session": "0" * 32, "error": "receiver down"},
    {"state": "uploaded", "remote_id": DB1, "uploaded_at": "2026-11-25T03:00:09+00:00",
     "retries": 2},
])
def test_upload_state_round_trip(old_json: dict[str, Any]) -> None:
    """Every upload object manifests have carried loads and is written back the same."""
    assert UploadState.from_json(old_json).to_json() == old_json


@pytest.mark.parametrize(("old_json", "written"), [
    ({"state": "pending", "session": None}, {"state": "pending"}),  # null and absent: alike
    ({"state": "pending", "session": None, "error": "x"}, {"state": "pending", "error": "x"}),
    ({"state": "uploaded", "remote_id": None, "uploaded_at": "t", "retries": 0},
     {"state": "uploaded", "uploaded_at": "t", "retries": 0}),
    ({}, {"state": "pending"}),
    (None, {"state": "pending"}),
    ({"state": "pending", "retries": True, "session": 5}, {"state": "pending"}),  # junk dropped
])
def test_upload_state_normalises(old_json: Any, written: dict[str, Any]) -> None:
    """Nulls, a missing object and fields of the wrong type read as absent."""
    assert UploadState.from_json(old_json).to_json() == written


def test_upload_state_constructors() -> None:
    """pending/uploaded/disabled write the JSON the old dict literals wrote."""
    assert UploadState.pending("s", "e").to_json() == {"state": "pending", "session": "s",
                                                         "error": "e"}
    assert UploadState.uploaded(DB1, 3, "t").to_json() == {
        "state": "uploaded", "remote_id": DB1, "uploaded_at": "t", "retries": 3}
    assert UploadState.disabled().to_json() == {"state": "disabled"}
    assert UploadState.initial(True).is_pending and not UploadState.initial(False).is_pending
    assert UploadState.pending(error="e").with_session("s") == UploadState.pending("s", "e")


OLD_MANIFEST = {
    "manifest_version": 1, "id": "mt5_trading-20261125-030000", "file": DB1,
    "kind": "database", "database": "mt5_trading", "size": 123, "sha256": SHA,
    "compression": "zstd:1", "started": "2026-11-25T03:00:00+00:00",
    "finished": "2026-11-25T03:00:09+00:00", "duration_s": 9.0, "dump_duration_s": 8.0,
    "raw_bytes": 456, "pg_dump_version": "15.4", "server_version": "15.4",
    "size_anomaly": False,
    "upload": {"state": "uploaded", "remote_id": DB1, "uploaded_at": "2026-11-25T03:00:09+00:00",
               "retries": 0},
    "extra": {"row_counts": {}},
}


def test_old_manifest_loads_with_the_one_id(tmp_path: Path) -> None:
    """A manifest an earlier version wrote (short id) loads with the file name as its id and
    is saved back under its own name, not a second one."""
    path = tmp_path / "mt5_trading-20261125-030000.json"
    path.write_text(json.dumps(OLD_MANIFEST))
    (manifest,) = spool.load_manifests(tmp_path)
    assert manifest.id == DB1
    assert manifest.upload == UploadState.uploaded(DB1, 0, "2026-11-25T03:00:09+00:00")
    assert spool.manifest_path(tmp_path, manifest.id) == path
    spool.save_manifest(tmp_path, manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert json.loads(path.read_text()) == {**OLD_MANIFEST, "id": DB1}


# --- the wire contract ---------------------------------------------------------------------

RECORD = {"id": DB1, "client": "alice", "name": DB1, "kind": "database", "size": 10,
          "sha256": SHA, "created": "2026-11-25T03:00:10+00:00",
          "metadata": {"started": "2026-11-25T03:00:00+00:00"}}


def test_backup_record_round_trip() -> None:
    """What the receiver sends is what the client reads back."""
    record = BackupRecord.from_json(RECORD)
    assert record.to_json() == RECORD
    assert BackupRecord.from_json({**RECORD, "metadata": None}).metadata == {}


@pytest.mark.parametrize(("change", "message"), [
    ({"id": "../etc"}, "invalid id"),
    ({"id": "x.sha256"}, "invalid id"),
    ({"id": 5}, "field 'id' is missing or not a string"),
    ({"size": "10"}, "field 'size' is missing or not an integer"),
    ({"size": True}, "field 'size'"),
    ({"size": -1}, "negative size"),
    ({"sha256": "AB" * 32}, "sha256 is not 64 lowercase hex digits"),
    ({"created": "yesterday"}, "created is not an ISO 8601 time"),
    ({"metadata": []}, "metadata is not a JSON object"),
    ({"client": None}, "field 'client'"),
])
def test_backup_record_refuses(change: dict[str, Any], message: str) -> None:
    """Bad JSON from the receiver is one clear error naming the field."""
    with pytest.raises(InvalidRecord) as err:
        BackupRecord.from_json({**RECORD, **change})
    assert message in str(err.value)


def test_backup_record_refuses_non_object() -> None:
    """A list, a string or null is not a record."""
    junk: Any
    for junk in ([], "x", None):
        with pytest.raises(InvalidRecord, match="not a JSON object"):
            BackupRecord.from_json(junk)


@pytest.mark.parametrize(("backup_id", "sha256", "size", "same"), [
    (DB1, SHA, 10, True),
    (DB1, SHA, 11, False),  # same bytes' hash but another size: not the same backup
    (DB1, "cd" * 32, 10, False),
    (DB2, SHA, 10, False),
])
def test_one_rule_for_already_on_the_receiver(backup_id: str, sha256: str, size: int,
                                              same: bool) -> None:
    """Same id AND sha256 AND size, nothing less."""
    record = BackupRecord.from_json(RECORD)
    assert record.is_same(backup_id, sha256, size) is same
    assert (find_same([record], backup_id, sha256, size) is not None) is same


@pytest.mark.parametrize(("data", "ok"), [
    ({"upload_id": "0" * 32, "offset": 0, "url": "/api/v1/uploads/" + "0" * 32}, True),
    ({"upload_id": "nothex", "offset": 0, "url": "/u"}, False),
    ({"upload_id": "0" * 32, "offset": -1, "url": "/u"}, False),
    ({"upload_id": "0" * 32, "url": "/u"}, False),
    ({"upload_id": "0" * 32, "offset": 0}, False),
    ("0" * 32, False),
])
def test_upload_session_from_json(data: Any, ok: bool) -> None:
    """The create-upload answer is typed; anything else is InvalidRecord."""
    if ok:
        assert UploadSession.from_json(data).to_json() == data
    else:
        with pytest.raises(InvalidRecord):
            UploadSession.from_json(data)


def test_sidecar_line() -> None:
    """One sidecar format both sides write: what `sha256sum -c` reads."""
    assert sidecar_line(SHA, DB1) == f"{SHA}  {DB1}\n"
    assert parse_sidecar(sidecar_line(SHA, DB1)) == (SHA, DB1)
    for junk in ("", f"{SHA} {DB1}\n", f"xyz  {DB1}\n", f"{SHA}  \n"):
        with pytest.raises(InvalidRecord):
            parse_sidecar(junk)


# --- the metadata builder ------------------------------------------------------------------

def manifest_of(kind: str, **fields: Any) -> spool.Manifest:
    base = {k: v for k, v in OLD_MANIFEST.items() if k not in ("manifest_version", "upload")}
    return spool.Manifest(**{**base, "kind": kind, **fields})


@pytest.mark.parametrize(("manifest", "metadata"), [
    (manifest_of("database"),
     {"kind": "database", "started": "2026-11-25T03:00:00+00:00", "compression": "zstd:1",
      "database": "mt5_trading", "pg_dump_version": "15.4", "server_version": "15.4"}),
    (manifest_of("repository", id=REPO, file=REPO, database="", compression="zstd:3",
                 pg_dump_version="", server_version="",
                 extra={"path": "/srv/repo", "exclude": ["*.pyc"]}),
     {"kind": "repository", "started": "2026-11-25T03:00:00+00:00", "compression": "zstd:3",
      "path": "/srv/repo"}),
])
def test_upload_metadata_by_kind(manifest: spool.Manifest, metadata: dict[str, Any]) -> None:
    """A repository archive carries its path and no empty database field."""
    assert spool.upload_metadata(manifest) == metadata


# --- generated names -----------------------------------------------------------------------

@pytest.mark.parametrize(("dbname", "ok"), [
    ("mt5_trading", True), ("MT5.Trading+x", True), ("my db", False), ("a..b", False),
    ("-leading", False), (".hidden", False), ("ü", False), ("x" * 170, True), ("x" * 190, False),
])
def test_dbname_must_give_valid_ids(pg_dbname_config: Any, dbname: str, ok: bool) -> None:
    """A dbname whose backup ids the receiver would refuse is a config error naming it."""
    db = dataclasses.replace(pg_dbname_config, dbname=dbname)
    if ok:
        check_database_names(db)
    else:
        with pytest.raises(ConfigError, match=r"\[database\] dbname"):
            check_database_names(db)


@pytest.fixture
def pg_dbname_config() -> Any:
    from mt5backupd.config import DatabaseConfig
    return DatabaseConfig(compression=parse_compression("zstd:1"))


async def test_invalid_dbname_refused_before_anything(backup_setup: BackupSetup) -> None:
    """run_backup refuses such a dbname before it takes the lock or touches the database."""
    cfg = backup_setup.with_(database={"dbname": "trading db"})
    with pytest.raises(ConfigError, match=r"\[database\] dbname 'trading db'"):
        await run_backup(cfg)
    assert spool.load_manifests(cfg.local.dir) == []


# --- end to end ----------------------------------------------------------------------------

async def test_one_id_everywhere(backup_setup: BackupSetup) -> None:
    """For one backup, the run result, run record, manifest, sidecar, local list and remote
    list show the same id, and the short id resolves to it on both sides."""
    cfg = backup_setup.cfg
    result = await run_database(cfg)
    assert result.ok, result.error
    assert result.file is not None
    backup = result.id
    assert backup == result.file.name
    record = state.last_run(state.load_state(cfg.local.dir), "database")
    assert record is not None and record.id == backup
    manifest_file = spool.manifest_path(cfg.local.dir, backup)
    assert manifest_file.name == spool.stem_of(backup) + ".json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["id"] == manifest["file"] == backup
    assert manifest["upload"]["remote_id"] == backup
    sidecar = result.file.with_name(result.file.name + ".sha256").read_text()
    assert parse_sidecar(sidecar) == (result.sha256, backup)
    local = local_entries(cfg)
    remote = await remote_entries(cfg)
    assert [e.id for e in local] == [e.id for e in remote] == [backup]
    short = spool.stem_of(backup)
    assert resolve(local, short, "locally").id == resolve(remote, short, "remotely").id == backup


async def test_late_repository_upload_carries_its_path(backup_setup: BackupSetup,
                                                       tmp_path: Path) -> None:
    """A repository archive uploaded by upload-pending sends the same metadata as a live run:
    its path, no empty database field."""
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("print(1)\n")
    down = dataclasses.replace(
        backup_setup.with_(remote={"url": f"http://127.0.0.1:{free_port()}"}),
        repository=RepositoryConfig(path=repo))
    result = await run_repository_now(down)
    assert result.ok and result.upload_state == "pending"
    assert await pending_command(backup_setup.cfg) == (1, 0)
    (record,) = [e for e in await _remote_records(backup_setup) if e.kind == "repository"]
    assert record.id == result.id
    assert record.metadata["path"] == str(repo)
    assert "database" not in record.metadata
    assert record.metadata["kind"] == "repository"


async def _remote_records(setup: BackupSetup) -> list[BackupRecord]:
    from mt5backupd.backup.remote import receiver_client
    client = receiver_client(setup.cfg)
    assert client is not None
    async with client:
        return await client.list_backups()

