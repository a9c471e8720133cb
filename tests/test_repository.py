"""The repository archive job."""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from pathlib import Path

import aiohttp
import pytest
import zstandard

from mt5backupd import runstate as state
from mt5backupd.backup.archive import check_tar, is_excluded
from mt5backupd.config import RepositoryConfig
from mt5backupd.daemon.jobs import run_repository_now
from mt5backupd.errors import ArchiveUnreadableError
from tests.backup_fixtures import BackupSetup


@pytest.mark.parametrize(
    ("path", "patterns", "excluded"),
    [
        ("node_modules", ["node_modules"], True),
        ("web/node_modules/x.js", ["node_modules"], True),
        ("src/a.pyc", ["*.pyc"], True),
        ("src/a.py", ["*.pyc"], False),
        ("logs/today.log", ["logs/*.log"], True),
        ("src/logs/today.log", ["logs/*.log"], False),
        (".venv/bin/python", [".venv"], True),
        ("venv-notes.md", [".venv"], False),
    ],
)
def test_is_excluded(path: str, patterns: list[str], excluded: bool) -> None:
    """Name patterns match any path component; patterns with a slash match the whole path."""
    assert is_excluded(path, patterns) is excluded


def make_tree(root: Path) -> dict[str, bytes]:
    """A small repository; returns the files expected in the archive."""
    files = {
        "README.md": b"# trading\n",
        "src/strategy.py": b"print('buy')\n" * 100,
        "src/deep/nested/config.json": b"{}",
        "data/big.bin": os.urandom(3 * 1024 * 1024),
        "empty.txt": b"",
    }
    skipped = {
        "src/strategy.pyc": b"\0compiled",
        "node_modules/lib/index.js": b"x",
        ".venv/bin/python": b"#!",
    }
    for rel, data in {**files, **skipped}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "link-to-readme").symlink_to("README.md")
    return files


async def test_repository_archive_round_trip(backup_setup: BackupSetup, tmp_path: Path) -> None:
    """The archive uploaded to the receiver extracts to the source tree minus the excludes,
    links kept as links, and is recorded as a run of job "repository"."""
    repo = tmp_path / "repo"
    expected = make_tree(repo)
    cfg = dataclasses.replace(backup_setup.cfg, repository=RepositoryConfig(
        path=repo, exclude=("*.pyc", "node_modules", ".venv"), keep=2))
    result = await run_repository_now(cfg)
    assert result.ok, result.error
    assert result.upload_state == "uploaded"
    assert result.file is not None
    assert result.file.name.endswith(".tar.zst")
    async with aiohttp.ClientSession() as http, http.get(
        f"{backup_setup.receiver.url}/api/backup/download/{result.file.name}",
        headers=backup_setup.receiver.auth(backup_setup.receiver.tokens.alice),
    ) as resp:
        blob = await resp.read()
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    out = tmp_path / "extracted"
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(out, filter="tar")
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
           if p.is_file() and not p.is_symlink()}
    assert got == expected
    assert os.readlink(out / "link-to-readme") == "README.md"
    st = state.load_state(cfg.local.dir)
    assert st["jobs"]["repository"]["last_run"]["result"] == "success"
    # the repository's own rotation count
    for _ in range(2):
        assert (await run_repository_now(cfg)).ok
    from mt5backupd.backup.spool import load_manifests

    assert len(load_manifests(cfg.local.dir, "repository")) == 2


def test_check_tar_refuses_truncated(tmp_path: Path) -> None:
    """A truncated archive fails the read-back check."""
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w") as tar:
        data = os.urandom(200_000)
        info = tarfile.TarInfo("x.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    packed = zstandard.ZstdCompressor().compress(blob.getvalue())
    good = tmp_path / "good.tar.zst"
    good.write_bytes(packed)
    assert check_tar(good) == 1
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ArchiveUnreadableError):
        check_tar(bad)
