"""Config loading: defaults, typed sections, errors that name file and key, the example config."""

from __future__ import annotations

from pathlib import Path

import pytest

from mt5backupd.config import (
    Secret,
    load_config,
    normalize_remote_url,
)
from mt5backupd.errors import EXIT_CONFIG, ConfigError


@pytest.mark.parametrize(
    ("url", "expected"),
    [("http://h:9101", "http://h:9101"), ("http://h:9101/", "http://h:9101"),
     ("http://h:9101/api/backup/upload", "http://h:9101"),
     ("https://h/base/api/backup/upload/", "https://h/base")],
)
def test_normalize_remote_url(url: str, expected: str) -> None:
    """The legacy BACKUP_API_URL (full upload URL) and a base URL both work."""
    assert normalize_remote_url(url) == expected


def test_backup_sections_validated(tmp_path: Path) -> None:
    """[database]/[local]/[remote] keys are typed and checked with the key named."""
    cases = {
        "[database]\ncompression = 'lz4'\n": "[database] compression",
        "[local]\nkeep = 0\n": "[local] keep: must be >= 1",
        "[remote]\nurl = 'backup:9101'\n": "[remote] url",
        "[remote]\non_unavailable = 'retry'\n": "[remote] on_unavailable",
        "[database]\npassword = 'x'\n": "[database] password: unknown key",
    }
    for text, fragment in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            load_config(path, env={})


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


@pytest.mark.parametrize(("body", "message"), [
    ('backend = "s3"', "[receiver.storage] bucket: is required"),
    ('backend = "s3"\nbucket = "b"\npart_size_bytes = 1048576',
     "part_size_bytes: must be >= 5242880"),
    ('backend = "gcs"', "backend: must be one of filesystem, s3"),
    ('backend = "s3"\nbucket = "b"\naws_access_key_id = "AKIA"', "aws_access_key_id: bucket "
     "credentials never go in the config file"),
    ('backend = "s3"\nbucket = "b"\nobject_lock_mode = "STRICT"', "object_lock_mode: must be one"),
    ('backend = "s3"\nbucket = "b"\nendpoint_url = "minio:9000"', "endpoint_url: expected http"),
])
def test_receiver_storage_refusals(tmp_path: Path, body: str, message: str) -> None:
    """Bad [receiver.storage] values, and any credential in it, are refused naming the key."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[receiver.storage]\n{body}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, env={})
    assert message in str(err.value)
    assert "AKIA" not in str(err.value)


def test_receiver_storage_s3_loads(tmp_path: Path) -> None:
    """A full s3 table loads into StorageConfig."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[receiver.storage]\nbackend = "s3"\nbucket = "b"\nprefix = "mt5/"\n'
                   'endpoint_url = "http://127.0.0.1:9000"\naddressing_style = "path"\n'
                   'object_lock_days = 30\nobject_lock_mode = "COMPLIANCE"\n')
    storage = load_config(cfg, env={}).receiver.storage
    assert (storage.backend, storage.bucket, storage.prefix, storage.object_lock_days,
            storage.object_lock_mode, storage.part_size_bytes) == (
        "s3", "b", "mt5/", 30, "COMPLIANCE", 16 * 1024**2)
