"""Config parts wired from outside: the scheduler's [schedule] checks handed to load_config (config
imports no scheduler), and the one table of legacy variables read by both the --env-file overlay
and the installer's import."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from mt5backupd.config import load_config
from mt5backupd.config.legacy_env import LEGACY_SECRETS, LEGACY_SETTINGS, LegacySecret, LegacyVar
from mt5backupd.config.legacy_import import import_legacy
from mt5backupd.config.model import Config
from mt5backupd.daemon.schedule import SCHEDULE_CHECKS
from mt5backupd.errors import EXIT_CONFIG, ConfigError

EXAMPLE = Path(__file__).parents[1] / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[schedule]\ndatabase = 'every night'\n", "[schedule] database: expected 5 cron"),
        ("[schedule]\nrepository = '0 25 * * *'\n", "[schedule] repository: invalid cron"),
        ("[schedule]\nverify = '0 5 * * 9'\n", "[schedule] verify: invalid cron"),
        ("[schedule]\nupload_pending = '61 * * * *'\n", "[schedule] upload_pending: invalid"),
        ("[schedule]\ntimezone = 'Mars/Olympus'\n", "[schedule] timezone: unknown time zone"),
    ],
)
def test_schedule_checks_name_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    """With the scheduler's checks a bad cron or zone is refused at load, naming file and key;
    without them [schedule] is type-checked only."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={}, schedule_checks=SCHEDULE_CHECKS)
    assert str(err.value).startswith(f"{path}: ")
    assert fragment in str(err.value)
    load_config(path, env={})


def test_schedule_checks_accept_valid(tmp_path: Path) -> None:
    """Valid expressions in a named zone load with the checks; empty ones mean "no job"."""
    path = write(tmp_path, "[schedule]\ntimezone = 'Europe/Athens'\ndatabase = '30 2 * * 1-5'\n"
                 "repository = ''\nverify = '0 0 3 * * 0'\n")
    cfg = load_config(path, env={}, schedule_checks=SCHEDULE_CHECKS)
    assert cfg.schedule.database == "30 2 * * 1-5" and cfg.schedule.repository == ""


@pytest.mark.parametrize("command", [["check"], ["--run-now"], ["list"]])
def test_cli_refuses_bad_cron_at_load(tmp_path: Path, command: list[str]) -> None:
    """Every CLI command loads with the scheduler's checks: exit 4, file and key named."""
    path = write(tmp_path, "[schedule]\ndatabase = 'every night'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MT5BACKUPD", "POSTGRES_"))}
    run = subprocess.run([sys.executable, "-m", "mt5backupd", *command, "--config", str(path)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == EXIT_CONFIG, run.stderr
    assert f"{path}: [schedule] database: expected 5 cron fields" in run.stderr


def test_legacy_table_names_real_fields() -> None:
    """Every legacy variable maps to a field of its section's dataclass (the overlay relies on
    it), and no variable is listed twice."""
    sections = {f.name for f in fields(Config)}
    mapped: list[LegacyVar | LegacySecret] = [*LEGACY_SETTINGS, *LEGACY_SECRETS]
    for var in mapped:
        assert var.section in sections, var
        section = getattr(Config(), var.section)
        assert var.key in {f.name for f in fields(section)}, var
    names = [v.name for v in mapped]
    assert len(names) == len(set(names))


LEGACY_FILE = """\
POSTGRES_DB=mt5_live
POSTGRES_USER=backup
POSTGRES_HOST=db.lan
POSTGRES_PORT=6432
POSTGRES_PASSWORD='pa ss#1'
BACKUP_DIR=/srv/mt5-backups
KEEP_LOCAL_BACKUPS=7
BACKUP_API_URL=https://backup.lan:9101/api/backup/upload
BACKUP_API_TOKEN=tok-123
MAX_RETRIES=0
RETRY_DELAY=9
"""


def test_import_and_overlay_agree(tmp_path: Path) -> None:
    """The installer's import and the daemon's --env-file overlay give the same settings for the
    same legacy file; the secrets go to 0600 credential files, never into the TOML."""
    legacy = tmp_path / "mt5-backup"
    legacy.write_text(LEGACY_FILE)
    legacy.chmod(0o600)
    out, credentials = tmp_path / "config.toml", tmp_path / "credentials"
    import_legacy(EXAMPLE, legacy, out, credentials)
    imported = load_config(out, env={})
    overlaid = load_config(None, env={}, env_file=legacy)
    for var in LEGACY_SETTINGS:
        section = var.section
        assert getattr(getattr(imported, section), var.key) == \
            getattr(getattr(overlaid, section), var.key), var.name
    assert "pa ss#1" not in out.read_text() and "tok-123" not in out.read_text()
    for secret in LEGACY_SECRETS:
        value = getattr(getattr(overlaid, secret.section), secret.key).reveal()
        assert (credentials / secret.credential).read_text() == value
        assert (credentials / secret.credential).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("POSTGRES_PORT=0", "POSTGRES_PORT: expected an integer >= 1"),
        ("KEEP_LOCAL_BACKUPS=many", "KEEP_LOCAL_BACKUPS: expected an integer >= 1"),
        ("RETRY_DELAY=-1", "RETRY_DELAY: expected an integer >= 0"),
        ("BACKUP_API_URL=backup.lan:9101", "BACKUP_API_URL: must start with http://"),
    ],
)
def test_bad_legacy_value_refused_alike(tmp_path: Path, line: str, fragment: str) -> None:
    """A bad legacy value is the same config error, naming the env file and the variable, in
    the overlay and in the import."""
    legacy = tmp_path / "mt5-backup"
    legacy.write_text(line + "\n")
    for attempt in (lambda: load_config(None, env={}, env_file=legacy),
                    lambda: import_legacy(EXAMPLE, legacy, tmp_path / "out.toml",
                                          tmp_path / "credentials")):
        with pytest.raises(ConfigError) as err:
            attempt()
        assert str(err.value).startswith(f"{legacy}: {fragment}")


def test_config_imports_no_scheduler() -> None:
    """Importing every config module loads neither the daemon nor APScheduler."""
    code = ("import sys, pkgutil, importlib, mt5backupd.config as c\n"
            "for m in pkgutil.iter_modules(c.__path__):\n"
            "    importlib.import_module('mt5backupd.config.' + m.name)\n"
            "print(sorted(m for m in sys.modules\n"
            "             if m.startswith(('apscheduler', 'mt5backupd.daemon'))))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert run.stdout.strip() == "[]"
