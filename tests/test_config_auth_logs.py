"""Config loading, token storage and log masking."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from loguru import logger

from mt5backupd.config import Secret, load_config
from mt5backupd.errors import EXIT_CONFIG, ConfigError
from mt5backupd.logs import register_secret, setup_logging
from mt5backupd.receiver.auth import TokenStore, add_token, digest_token


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    """No config file at all gives the documented defaults (port 9101, all interfaces)."""
    cfg = load_config(None, env={})
    assert (cfg.receiver.listen_host, cfg.receiver.listen_port) == ("0.0.0.0", 9101)
    assert cfg.legacy_receiver_token is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[receiver]\nlisten = 'nonsense'\n", "[receiver] listen"),
        ("[receiver]\nmax_upload_bytes = 'big'\n", "[receiver] max_upload_bytes: expected int"),
        ("[receiver]\nmax_upload_bytes = 0\n", "[receiver] max_upload_bytes: must be >= 1"),
        ("[receiver]\nmin_free_bytes = true\n", "[receiver] min_free_bytes: expected int"),
        ("[receiver]\nlisten_port = 1\n", "[receiver] listen_port: unknown key"),
        ("[reciever]\n", "[reciever]: unknown section"),
        ("[receiver]\ntls_cert = '/x.pem'\n", "[receiver] tls_key: tls_cert and tls_key"),
        ("[receiver.retention]\nauto = true\n", "[receiver.retention] auto"),
        ("[receiver.retention]\nkeep_last = -1\n", "[receiver.retention] keep_last"),
        ("[log]\nlevel = 'LOUD'\n", "[log] level"),
        ("[receiver\n", "invalid TOML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    """Every config error names the file and the key at fault; unknown keys are errors."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(path) in str(err.value)
    assert fragment in str(err.value)
    assert err.value.exit_code == EXIT_CONFIG


def test_full_receiver_section_and_legacy_env(tmp_path: Path) -> None:
    """All [receiver] keys load into typed values; LOG_DIR and BACKUP_API_TOKEN still work."""
    path = write(tmp_path, """
[receiver]
listen = "[::1]:9200"
data_dir = "/srv/backups"
tokens_file = "/etc/t.json"
max_upload_bytes = 1000
min_free_bytes = 10
partial_ttl_s = 60
[receiver.retention]
keep_last = 3
keep_daily = 7
auto = true
""")
    cfg = load_config(path, env={"LOG_DIR": "/var/log/x", "BACKUP_API_TOKEN": "legacy-token-1"})
    r = cfg.receiver
    assert (r.listen_host, r.listen_port) == ("::1", 9200)
    assert r.data_dir == Path("/srv/backups")
    assert r.partial_ttl_s == 60.0
    assert r.retention.keep_last == 3
    assert r.retention.auto
    assert cfg.log.dir == Path("/var/log/x")
    assert cfg.legacy_receiver_token == Secret("legacy-token-1")
    assert "legacy-token-1" not in repr(cfg)


def test_token_add_stores_only_hash_0600(tmp_path: Path) -> None:
    """`token add` stores a hash in a 0600 file and the token authenticates as its client."""
    tokens_file = tmp_path / "tokens.json"
    token = add_token(tokens_file, "alice", admin=False)
    admin = add_token(tokens_file, "ops", admin=True)
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    text = tokens_file.read_text()
    assert token not in text
    assert digest_token(token) in text
    store = TokenStore(tokens_file)
    principal = store.authenticate(f"Bearer {token}")
    assert principal is not None
    assert (principal.name, principal.admin) == ("alice", False)
    admin_principal = store.authenticate(f"Bearer {admin}")
    assert admin_principal is not None
    assert admin_principal.admin
    with pytest.raises(ConfigError, match="exists"):
        add_token(tokens_file, "alice", admin=False)


def test_token_store_reloads_and_refuses_writable_file(tmp_path: Path) -> None:
    """A token added while serving works at once; a group-writable tokens file is refused."""
    tokens_file = tmp_path / "tokens.json"
    add_token(tokens_file, "alice", admin=False)
    store = TokenStore(tokens_file)
    later = add_token(tokens_file, "bob", admin=False)
    os.utime(tokens_file, ns=(1, 1))  # mtime change detection must not depend on clock ticks
    principal = store.authenticate(f"Bearer {later}")
    assert principal is not None
    assert principal.name == "bob"
    os.chmod(tokens_file, 0o664)
    with pytest.raises(ConfigError, match="writable by group/others"):
        TokenStore(tokens_file)


def test_legacy_env_token_is_client_default(tmp_path: Path) -> None:
    """BACKUP_API_TOKEN authenticates as the client token named "default"."""
    store = TokenStore(tmp_path / "absent.json", Secret("legacy-secret-token"))
    principal = store.authenticate("Bearer legacy-secret-token")
    assert principal is not None
    assert (principal.name, principal.admin) == ("default", False)
    assert store.authenticate("Bearer other") is None


def test_secrets_masked_in_logs(tmp_path: Path) -> None:
    """A registered secret never reaches the JSON log file or stderr, even via stdlib logging."""
    from mt5backupd.config import LogConfig

    setup_logging(LogConfig(dir=tmp_path / "logs"), "test")
    register_secret("hunter2-very-secret")
    logger.info("token is hunter2-very-secret")
    import logging

    logging.getLogger("aiohttp.server").warning("header had hunter2-very-secret")
    logger.complete()
    text = (tmp_path / "logs" / "mt5backupd-test.jsonl").read_text()
    assert "hunter2-very-secret" not in text
    assert text.count("***") >= 2


def test_cli_token_add_prints_once_and_config_error_exit(tmp_path: Path) -> None:
    """The CLI prints the new token on stdout only; a bad config is one line and exit 4."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[receiver]\ntokens_file = "{tmp_path / "t.json"}"\n')
    run = subprocess.run([sys.executable, "-m", "mt5backupd", "receiver", "token", "add", "alice",
                          "--config", str(cfg)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip()
    assert token.startswith("mt5b_")
    assert token not in run.stderr
    assert token not in (tmp_path / "t.json").read_text()
    cfg.write_text("[receiver]\nmax_upload_bytes = -5\n")
    bad = subprocess.run([sys.executable, "-m", "mt5backupd", "--config", str(cfg), "receiver"],
                         capture_output=True, text=True)
    assert bad.returncode == EXIT_CONFIG
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "max_upload_bytes" in lines[0]
    assert str(cfg) in lines[0]


def test_example_config_parses_and_every_key_is_documented() -> None:
    """config.example.toml loads as is, and docs/configuration.md documents each of its keys."""
    import re
    import tomllib

    root = Path(__file__).resolve().parent.parent
    example = root / "config.example.toml"
    load_config(example, env={})
    # commented-out example keys count too: they are part of the documented surface
    text = re.sub(r"^# ?(\w+ =)", r"\1", example.read_text(), flags=re.M)
    data = tomllib.loads(text)
    docs = (root / "docs" / "configuration.md").read_text()

    def keys(table: dict[str, object], prefix: str) -> list[tuple[str, str]]:
        out = []
        for key, value in table.items():
            if isinstance(value, dict):
                out += keys(value, f"{prefix}.{key}" if prefix else key)
            else:
                out.append((prefix, key))
        return out

    for section, key in keys(data, ""):
        assert f"## `[{section}]`" in docs, section
        body = docs.split(f"## `[{section}]`", 1)[1].split("\n## ", 1)[0]
        assert re.search(rf"^\|[^|]*`{key}`", body, flags=re.M), f"[{section}] {key}"
