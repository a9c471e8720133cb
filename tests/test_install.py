"""packaging/install.sh into staging roots, and the systemd units it installs."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mt5backupd.config import load_config

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "packaging" / "install.sh"


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(INSTALL), "--root", str(root), *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file outside the virtualenv: mode and content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.startswith("opt/mt5backupd/venv") or not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out[rel] = (stat.S_IMODE(path.stat().st_mode), digest)
    return out


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stage")
    install(root)
    return root


def test_staged_tree(staged: Path) -> None:
    """Units, sysusers/tmpfiles, a 0600 config, empty 0600 credentials and a working venv."""
    assert (staged / "etc/systemd/system/mt5backupd.service").is_file()
    assert (staged / "usr/lib/sysusers.d/mt5backupd.conf").is_file()
    assert (staged / "usr/lib/tmpfiles.d/mt5backupd.conf").is_file()
    config = staged / "etc/mt5backupd/config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert load_config(config, env={}).metrics.textfile is None  # no legacy textfile here
    for cred in ("db-password", "remote-token"):
        assert stat.S_IMODE((staged / "etc/mt5backupd/credentials" / cred).stat().st_mode) == 0o600
    version = subprocess.run([str(staged / "opt/mt5backupd/venv/bin/mt5backupd"), "--version"],
                             capture_output=True, text=True, check=True)
    assert version.stdout.startswith("mt5backupd ")


def test_second_install_changes_nothing(staged: Path) -> None:
    """Running the installer again leaves every file as it was."""
    before = snapshot(staged)
    venv_bin = staged / "opt/mt5backupd/venv/bin/mt5backupd"
    mtime = venv_bin.stat().st_mtime_ns
    again = install(staged)
    assert snapshot(staged) == before
    assert venv_bin.stat().st_mtime_ns == mtime
    assert "nothing to change" in again.stderr


def test_units_pass_systemd_analyze_verify(staged: Path, tmp_path: Path) -> None:
    """Both units pass `systemd-analyze verify` (ExecStart pointed at the staged venv)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    binary = staged / "opt/mt5backupd/venv/bin/mt5backupd"
    for unit in ("mt5backupd.service", "mt5backupd-receiver.service"):
        text = (REPO / "packaging/systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/mt5backupd/venv/bin/mt5backupd",
                                                  str(binary)))
        result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "Unknown" not in result.stderr, result.stderr


def test_legacy_file_imported(tmp_path: Path) -> None:
    """With a legacy /etc/default/mt5-backup in the root, the new config carries its values and
    the secrets land in 0600 credential files, never in the TOML or the output."""
    root = tmp_path / "root"
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/mt5-backup").write_text(
        "POSTGRES_DB=mt5_live\nPOSTGRES_USER=trader\nPOSTGRES_PASSWORD='pw#with hash'\n"
        "POSTGRES_HOST=10.0.0.5\nPOSTGRES_PORT=5433\nBACKUP_DIR=/srv/mt5-backups\n"
        "KEEP_LOCAL_BACKUPS=7\nBACKUP_API_URL=http://backup.example:9101/api/backup/upload\n"
        "BACKUP_API_TOKEN=legacy-token-value\nMAX_RETRIES=5\nRETRY_DELAY=15\n")
    result = install(root)
    config_path = root / "etc/mt5backupd/config.toml"
    text = config_path.read_text()
    assert "legacy-token-value" not in text + result.stdout + result.stderr
    assert "pw#with hash" not in text + result.stdout + result.stderr
    cfg = load_config(config_path, env={})
    assert (cfg.database.dbname, cfg.database.user, cfg.database.host, cfg.database.port) == (
        "mt5_live", "trader", "10.0.0.5", 5433)
    assert (cfg.local.dir, cfg.local.keep) == (Path("/srv/mt5-backups"), 7)
    assert cfg.remote.url == "http://backup.example:9101"
    assert (cfg.remote.max_retries, cfg.remote.retry_delay_s) == (5, 15.0)
    assert cfg.metrics.textfile is None  # the legacy exporter's file did not exist
    creds = root / "etc/mt5backupd/credentials"
    assert (creds / "db-password").read_text() == "pw#with hash"
    assert (creds / "remote-token").read_text() == "legacy-token-value"
    assert stat.S_IMODE((creds / "remote-token").stat().st_mode) == 0o600
    # receiver next to it, then uninstall: units and venv go, config and secrets stay
    install(root, "--receiver")
    assert (root / "etc/systemd/system/mt5backupd-receiver.service").is_file()
    assert (root / "etc/mt5backupd/receiver.toml").is_file()
    install(root, "--uninstall")
    assert not (root / "opt/mt5backupd").exists()
    assert not (root / "etc/systemd/system/mt5backupd.service").exists()
    assert config_path.exists()
    assert (creds / "db-password").exists()


LEGACY_PROM = "/var/backups/mt5/backup_metrics.prom"


@pytest.mark.parametrize(("env_file", "prom"), [(True, True), (False, True), (True, False)])
def test_legacy_textfile_imported(staged: Path, tmp_path: Path, env_file: bool,
                                  prom: bool) -> None:
    """The import sets [metrics] textfile to the legacy exporter's file exactly when that file
    exists (with or without /etc/default/mt5-backup), and the config still loads."""
    root = tmp_path / "root"
    # the staged venv is current, so the installer's version check skips pip (seconds saved)
    shutil.copytree(staged / "opt", root / "opt", symlinks=True)
    if env_file:
        (root / "etc/default").mkdir(parents=True)
        (root / "etc/default/mt5-backup").write_text("POSTGRES_DB=mt5_live\n")
    if prom:
        (root / "var/backups/mt5").mkdir(parents=True)
        (root / LEGACY_PROM.lstrip("/")).write_text("mt5_backup_status 1\n")
    result = install(root)
    assert "installed mt5backupd" not in result.stderr  # the copied venv was reused
    cfg = load_config(root / "etc/mt5backupd/config.toml", env={})
    assert cfg.metrics.textfile == (Path(LEGACY_PROM) if prom else None)
    assert cfg.database.dbname == ("mt5_live" if env_file else "mt5_trading")
    assert ("[metrics] textfile" in result.stderr) == prom
