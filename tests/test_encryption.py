"""Encrypted backups (age in the stream): real pg_dump, receiver, pg_restore and the stock `age`."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard
from pyrage import x25519

from mt5backupd.backup import spool
from mt5backupd.backup.archive import check_tar
from mt5backupd.backup.encryption import (
    AGE_MAGIC,
    DecryptionFailedError,
    EncryptingSink,
    NoIdentityError,
    WrongIdentityError,
)
from mt5backupd.backup.run import run_backup
from mt5backupd.config import EncryptionConfig, RepositoryConfig, load_config
from mt5backupd.config.encryption import (
    check_recipients,
    key_lines,
    read_identity_file,
    recipient_problem,
)
from mt5backupd.daemon.jobs import run_repository_now, run_verify
from mt5backupd.daemon.metrics import textfile_registry
from mt5backupd.errors import ChecksumMismatchError, ConfigError
from mt5backupd.ops.keycheck import encryption_checks
from mt5backupd.ops.listing import format_table, local_entries, remote_entries
from mt5backupd.ops.restore import restore
from mt5backupd.records import sidecar_line
from tests.backup_fixtures import BackupSetup, config_toml
from tests.test_restore import same_contents

pytestmark = pytest.mark.skipif(shutil.which("age") is None,
                                reason="the stock age tool is installed by "
                                "scripts/ensure-system-deps.sh")


def new_key(directory: Path, name: str) -> tuple[Path, str]:
    """A fresh identity file (0600) and its recipient, as `mt5backupd keygen --out` makes."""
    identity = x25519.Identity.generate()
    path = directory / name
    path.write_text(f"# public key: {identity.to_public()}\n{identity}\n")
    os.chmod(path, 0o600)
    return path, str(identity.to_public())


def encrypted(setup: BackupSetup, *recipients: str) -> BackupSetup:
    return dataclasses.replace(setup, cfg=dataclasses.replace(
        setup.cfg, encryption=EncryptionConfig(recipients=recipients)))


def database_exists(setup: BackupSetup, name: str) -> bool:
    out = subprocess.run([str(setup.pg.bin_dir / "psql"), "-h", setup.pg.host, "-p",
                          str(setup.pg.port), "-U", setup.pg.user, "-d", "postgres", "-Atc",
                          f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],  # noqa: S608
                         capture_output=True, text=True, check=True)
    return out.stdout.strip() == "1"


RECIPIENT = str(x25519.Identity.generate().to_public())


@pytest.mark.parametrize(("value", "problem"), [
    (RECIPIENT, None),
    ("age1notbech32", "not a valid age recipient"),
    ("ssh-ed25519 AAAAC3Nza", "ssh and plugin recipients are not supported"),
    ("", "not an X25519 age recipient"),
])
def test_recipient_problem(value: str, problem: str | None) -> None:
    """Only well-formed X25519 `age1…` recipients are accepted; the reason says why not."""
    found = recipient_problem(value)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_key_lines_and_duplicates() -> None:
    """The `age -R` format: comments and blank lines skipped; a repeated recipient kept once."""
    assert key_lines(f"# ops key\n\n  {RECIPIENT}  \n#{RECIPIENT}\n") == [RECIPIENT]
    assert check_recipients([RECIPIENT, RECIPIENT], "x") == (RECIPIENT,)


def test_config_recipients_and_bad_input(tmp_path: Path) -> None:
    """[encryption] merges recipients and recipients_file; a malformed recipient, a writable
    recipients file and a readable identity file are config errors naming them."""
    other = str(x25519.Identity.generate().to_public())
    rfile = tmp_path / "recipients.txt"
    rfile.write_text(f"# escrow\n{other}\n{RECIPIENT}\n")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[encryption]\nrecipients = ["{RECIPIENT}"]\nrecipients_file = "{rfile}"\n')
    cfg = load_config(toml, env={})
    assert cfg.encryption.recipients == (RECIPIENT, other)
    assert cfg.encryption.enabled
    toml.write_text('[encryption]\nrecipients = ["age1bogus"]\n')
    with pytest.raises(ConfigError, match=r"\[encryption\] recipients: recipient 'age1bogus'"):
        load_config(toml, env={})
    os.chmod(rfile, 0o666)  # noqa: S103 - the refusal under test
    toml.write_text(f'[encryption]\nrecipients_file = "{rfile}"\n')
    with pytest.raises(ConfigError, match="recipients_file is writable by group/others"):
        load_config(toml, env={})
    key, _ = new_key(tmp_path, "key.txt")
    os.chmod(key, 0o644)
    toml.write_text(f'[encryption]\nidentity_file = "{key}"\n')
    with pytest.raises(ConfigError, match=r"identity_file holds a secret.*chmod 600"):
        load_config(toml, env={})
    bad = tmp_path / "bad.txt"
    bad.write_text("AGE-SECRET-KEY-1NOTAKEY\n")
    os.chmod(bad, 0o600)
    with pytest.raises(ConfigError, match="key 1 is not a valid age identity") as info:
        read_identity_file(bad, "--identity")
    assert "NOTAKEY" not in str(info.value)


def test_sink_error_reaches_the_producer() -> None:
    """A failing sink behind age (a full disk) stops the producer with the sink's own error."""
    class Full:
        def write(self, data: bytes | bytearray, /) -> int:
            raise OSError(28, "No space left on device")

    sink = EncryptingSink(Full(), [x25519.Recipient.from_str(RECIPIENT)])
    with pytest.raises(OSError, match="No space left"):
        for _ in range(64):
            sink.write(b"x" * 1024 * 1024)
        sink.finish()


async def test_encrypted_backup_stock_tools_and_restore(backup_setup: BackupSetup,
                                                        tmp_path: Path) -> None:
    """An encrypted run stores and uploads only ciphertext under an `.age` id; the stock
    `age -d | zstd -d | pg_restore` opens it; `restore` needs an identity (old keys too)."""
    old_key, old_recipient = new_key(tmp_path, "old.txt")
    key, recipient = new_key(tmp_path, "ops.txt")
    old = await run_backup(encrypted(backup_setup, old_recipient).cfg)
    setup = encrypted(backup_setup, recipient)
    result = await run_backup(setup.cfg)
    assert result.ok and result.file is not None, result.error
    assert result.id.endswith(".dump.zst.age") and old.id.endswith(".dump.zst.age")
    data = result.file.read_bytes()
    assert data.startswith(AGE_MAGIC)
    assert hashlib.sha256(data).hexdigest() == result.sha256
    manifest = spool.load_manifests(setup.cfg.local.dir)[-1]
    assert manifest.recipients == [recipient]
    # the receiver holds the same ciphertext, and says to whom it is encrypted
    stored = list(Path(setup.receiver.cfg.data_dir).rglob("data"))
    assert stored and all(p.read_bytes().startswith(AGE_MAGIC) for p in stored)
    remote = {e.id: e for e in await remote_entries(setup.cfg)}
    assert remote[result.id].recipients == (recipient,)
    assert "age (1 recipients)" in format_table(local_entries(setup.cfg))
    # stock tools, as the runbook says
    setup.pg.create_database("copy_stock")
    pipeline = (f"age -d -i {key} {result.file} | zstd -d | "
                f"{setup.pg.bin_dir / 'pg_restore'} --exit-on-error --no-owner "
                f"-h {setup.pg.host} -p {setup.pg.port} -U {setup.pg.user} -d copy_stock")
    done = await asyncio.to_thread(subprocess.run, ["bash", "-o", "pipefail", "-c", pipeline],
                                   capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    await same_contents(setup, "copy_stock")
    setup.pg.drop_database("copy_stock")
    # no identity, a wrong one: refused before any database is created
    with pytest.raises(NoIdentityError, match="is encrypted"):
        await restore(setup.cfg, "latest", "copy_none", create=True)
    with pytest.raises(WrongIdentityError, match=f"encrypted to {recipient}"):
        await restore(setup.cfg, "latest", "copy_none", create=True, identity_files=[old_key])
    with pytest.raises(NoIdentityError):
        await restore(setup.cfg, "latest", "copy_none", source="remote", create=True)
    assert not database_exists(setup, "copy_none")
    # from the receiver, with the current and an old identity (several --identity)
    for ref, name in ((result.id, "copy_new"), (spool.stem_of(old.id), "copy_old")):
        done_restore = await restore(setup.cfg, ref, name, source="remote", create=True,
                                     identity_files=[old_key, key])
        assert done_restore.created
        await same_contents(setup, name)
        setup.pg.drop_database(name)
    # parallel restore decrypts to a private file first, and removes it
    await restore(setup.cfg, "latest", "copy_jobs", create=True, jobs=2, identity_files=[key])
    await same_contents(setup, "copy_jobs")
    setup.pg.drop_database("copy_jobs")
    assert not list((setup.cfg.local.dir / ".restore").glob("*"))


async def test_tampered_ciphertext(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """A flipped byte fails the sha256 before anything is touched; with the sidecar and the
    manifest rewritten too, age's authentication stops the restore mid-stream and the target
    database this restore created is dropped."""
    key, recipient = new_key(tmp_path, "ops.txt")
    setup = encrypted(backup_setup, recipient)
    result = await run_backup(setup.cfg)
    assert result.file is not None
    data = bytearray(result.file.read_bytes())
    data[len(data) // 2] ^= 0x01
    result.file.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        await restore(setup.cfg, "latest", "copy_bad", create=True, identity_files=[key])
    assert not database_exists(setup, "copy_bad")
    forged = hashlib.sha256(bytes(data)).hexdigest()
    result.file.with_name(result.file.name + ".sha256").write_text(
        sidecar_line(forged, result.file.name))
    manifest_file = spool.manifest_path(setup.cfg.local.dir, result.id)
    manifest = json.loads(manifest_file.read_text())
    manifest["sha256"] = forged
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(DecryptionFailedError, match=r"age authentication failed.*dropped "
                       r"copy_bad"):
        await restore(setup.cfg, "latest", "copy_bad", create=True, identity_files=[key])
    assert not database_exists(setup, "copy_bad")
    outcome = await run_verify(setup.cfg, identity_files=[key])
    assert not outcome.passed and "age authentication failed" in " ".join(outcome.reasons)


async def test_verify_with_and_without_identity(backup_setup: BackupSetup,
                                                tmp_path: Path) -> None:
    """Without an identity the verify job reports "cannot verify encrypted backups here" (a
    skip, in its metric), not a failure; with identity_file it test-restores and passes."""
    key, recipient = new_key(tmp_path, "ops.txt")
    setup = encrypted(backup_setup, recipient)
    assert (await run_backup(setup.cfg)).ok
    skipped = await run_verify(setup.cfg)
    assert skipped.skipped and not skipped.passed
    assert "cannot verify encrypted backups here" in skipped.reasons[0]
    metrics = textfile_registry(setup.cfg.local.dir)
    assert metrics.get_sample_value("mt5backup_last_verify_skipped") == 1.0
    assert metrics.get_sample_value("mt5backup_runs_total",
                                    {"job": "verify", "result": "skipped"}) == 1.0
    cfg = dataclasses.replace(setup.cfg, encryption=dataclasses.replace(
        setup.cfg.encryption, identity_file=key))
    passed = await run_verify(cfg)
    assert passed.passed, passed.reasons
    assert metrics.get_sample_value("mt5backup_last_verify_skipped") == 0.0
    assert metrics.get_sample_value("mt5backup_last_verify_success") == 1.0
    # check: the identity opens the newest backup, with a warning that it sits beside it
    lines = {c.name: c for c in await encryption_checks(cfg)}
    assert lines["encryption"].ok and "1 recipient" in lines["encryption"].detail
    assert lines["identity"].ok and "opens" in lines["identity"].detail
    assert lines["identity location"].warning
    other, _ = new_key(tmp_path, "other.txt")
    wrong = dataclasses.replace(cfg, encryption=dataclasses.replace(cfg.encryption,
                                                                    identity_file=other))
    lines = {c.name: c for c in await encryption_checks(wrong)}
    assert not lines["identity"].ok and "none of the 1 identities" in lines["identity"].detail


async def test_encrypted_repository_archive(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """The repository job is encrypted too (`.tar.zst.age`), read back through age."""
    key, recipient = new_key(tmp_path, "ops.txt")
    tree = tmp_path / "repo"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "strategy.py").write_text("print('buy')\n" * 1000)
    cfg = dataclasses.replace(encrypted(backup_setup, recipient).cfg,
                              repository=RepositoryConfig(path=tree))
    result = await run_repository_now(cfg)
    assert result.ok and result.file is not None, result.error
    assert result.id.endswith(".tar.zst.age")
    identities = read_identity_file(key, "--identity")
    assert check_tar(result.file, identities) == 2
    plain = subprocess.run(["age", "-d", "-i", str(key), str(result.file)],
                           capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(zstandard.ZstdDecompressor().decompressobj()
                                         .decompress(plain)), mode="r") as tar:
        assert sorted(tar.getnames()) == ["src", "src/strategy.py"]


async def test_cli_keygen_restore_exit_codes(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """`keygen --out` writes a 0600 identity and prints its recipient, refuses to overwrite;
    `restore` of an encrypted backup without an identity exits 4 and touches no database;
    `--identity` restores it; a malformed recipient in the config exits 4 naming it."""
    key = tmp_path / "key.txt"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mt5backupd", *args],
                              capture_output=True, text=True)

    made = await asyncio.to_thread(cli, "keygen", "--out", str(key))
    assert made.returncode == 0, made.stderr
    recipient = made.stdout.strip()
    assert recipient.startswith("age1") and oct(key.stat().st_mode & 0o777) == "0o600"
    assert recipient in key.read_text()
    again = await asyncio.to_thread(cli, "keygen", "--out", str(key))
    assert again.returncode == 4 and "never overwrites" in again.stderr
    toml = tmp_path / "c.toml"
    toml.write_text(config_toml(backup_setup) + f'[encryption]\nrecipients = ["{recipient}"]\n')
    backup = await asyncio.to_thread(cli, "--run-now", "--config", str(toml))
    assert backup.returncode == 0, backup.stderr
    listed = await asyncio.to_thread(cli, "list", "--json", "--config", str(toml))
    assert json.loads(listed.stdout)[-1]["encrypted"] is True
    refused = await asyncio.to_thread(cli, "restore", "latest", "--target-db", "copy_cli",
                                      "--create", "--config", str(toml))
    assert refused.returncode == 4 and "is encrypted" in refused.stderr
    assert not database_exists(backup_setup, "copy_cli")
    done = await asyncio.to_thread(cli, "restore", "latest", "--target-db", "copy_cli",
                                   "--create", "--identity", str(key), "--config", str(toml))
    assert done.returncode == 0, done.stderr
    await same_contents(backup_setup, "copy_cli")
    backup_setup.pg.drop_database("copy_cli")
    toml.write_text(config_toml(backup_setup) + '[encryption]\nrecipients = ["age1typo"]\n')
    bad = await asyncio.to_thread(cli, "--run-now", "--config", str(toml))
    assert bad.returncode == 4 and "'age1typo'" in bad.stderr
