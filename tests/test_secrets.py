"""Where secrets come from: config files, systemd credentials, legacy variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from mt5backupd.errors import ConfigError


def test_secrets_from_systemd_credentials_and_legacy(tmp_path: Path) -> None:
    """The config's file wins, then $CREDENTIALS_DIRECTORY, then the legacy variable; an
    unprotected credential file is refused."""
    import os

    from mt5backupd.config import DatabaseConfig, RemoteConfig, Secret
    from mt5backupd.config.secretfiles import database_password, remote_token

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db-password").write_text("from-credential\n")
    os.chmod(creds / "db-password", 0o600)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    legacy = DatabaseConfig(password=Secret("from-env"))
    got = database_password(legacy, env)
    assert got is not None
    assert got.reveal() == "from-credential"
    assert database_password(legacy, {}) == Secret("from-env")
    own = tmp_path / "pw"
    own.write_text("from-file")
    os.chmod(own, 0o400)
    got = database_password(DatabaseConfig(password_file=own), env)
    assert got is not None
    assert got.reveal() == "from-file"
    (creds / "remote-token").write_text("tok")
    os.chmod(creds / "remote-token", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        remote_token(RemoteConfig(), env)
    assert remote_token(RemoteConfig(), {}) is None
