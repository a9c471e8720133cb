"""Import the legacy /etc/default/mt5-backup into a new config (used by packaging/install.sh).

Values go into the TOML written from config.example.toml; the password and the token go into
0600 credential files (loaded by systemd with LoadCredential=), never into the TOML, never
printed. ``--metrics-textfile PATH`` (given by install.sh when the legacy exporter's
``/var/backups/mt5/backup_metrics.prom`` exists) sets ``[metrics] textfile``, so node_exporter
and the dashboards built on that file keep getting it.

    python -m mt5backupd.config.legacy_import --example config.example.toml \\
        --env-file /etc/default/mt5-backup --config-out /etc/mt5backupd/config.toml \\
        --credentials /etc/mt5backupd/credentials \\
        [--metrics-textfile /var/backups/mt5/backup_metrics.prom]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mt5backupd.config import (
    is_plain_http_remote,
    load_config,
    normalize_remote_url,
    read_env_file,
)
from mt5backupd.errors import Mt5BackupError
from mt5backupd.fsutil import atomic_write_bytes

# legacy variable -> (section, key, kind)
MAPPING = {
    "POSTGRES_DB": ("database", "dbname", str),
    "POSTGRES_USER": ("database", "user", str),
    "POSTGRES_HOST": ("database", "host", str),
    "POSTGRES_PORT": ("database", "port", int),
    "BACKUP_DIR": ("local", "dir", str),
    "KEEP_LOCAL_BACKUPS": ("local", "keep", int),
    "BACKUP_API_URL": ("remote", "url", str),
    "MAX_RETRIES": ("remote", "max_retries", int),
    "RETRY_DELAY": ("remote", "retry_delay_s", float),
}


def set_key(text: str, section: str, key: str, value: str) -> str:
    """Set ``key = value`` in ``[section]`` of a TOML text, replacing an active or commented-out
    line for that key, or adding one under the section header."""
    header = re.search(rf"^\[{re.escape(section)}\]\s*$", text, flags=re.M)
    if header is None:
        return text.rstrip("\n") + f"\n\n[{section}]\n{key} = {value}\n"
    start = header.end()
    nxt = re.search(r"^\[", text[start:], flags=re.M)
    end = start + nxt.start() if nxt else len(text)
    body = text[start:end]
    line = re.compile(rf"^#? ?{re.escape(key)} = .*$", flags=re.M)
    body = line.sub(f"{key} = {value}", body, count=1) if line.search(body) else \
        f"\n{key} = {value}" + body
    return text[:start] + body + text[end:]


def allow_plain_http(text: str, url: str) -> str:
    """The legacy setup used plain http:// to another host; a config refuses that unless
    ``allow_http = true``. Keep the backups flowing, and say why and how to end it."""
    text = set_key(text, "remote", "allow_http", "true")
    why = (f"# Imported: the legacy BACKUP_API_URL ({url}) is plain http:// to another host, so\n"
           "# the token and the backups cross the network unencrypted. To move to TLS: give the\n"
           "# receiver [receiver] tls_cert/tls_key, set url to https://..., point ca_file at its\n"
           "# CA (if not a public one), then delete this line (docs/operations.md).\n")
    return text.replace("\nallow_http = true", "\n" + why + "allow_http = true", 1)


def import_legacy(example: Path, env_file: Path | None, config_out: Path, credentials: Path,
                  metrics_textfile: Path | None = None) -> None:
    env = read_env_file(env_file) if env_file is not None else {}
    text = example.read_text()
    for var, (section, key, kind) in MAPPING.items():
        raw = env.get(var)
        if not raw:
            continue
        if var == "BACKUP_API_URL":
            raw = normalize_remote_url(raw)
        value = json.dumps(raw) if kind is str else str(kind(raw))
        text = set_key(text, section, key, value)
        if var == "BACKUP_API_URL" and is_plain_http_remote(raw):
            text = allow_plain_http(text, raw)
    credentials.mkdir(parents=True, exist_ok=True, mode=0o700)
    for var, name in (("POSTGRES_PASSWORD", "db-password"), ("BACKUP_API_TOKEN", "remote-token")):
        if env.get(var):
            atomic_write_bytes(credentials / name, env[var].encode(), mode=0o600)
    if env.get("BACKUP_API_TOKEN"):
        text = set_key(text, "remote", "token_file", json.dumps(str(credentials /
                                                                     "remote-token")))
    if metrics_textfile is not None:
        text = set_key(text, "metrics", "textfile", json.dumps(str(metrics_textfile)))
    atomic_write_bytes(config_out, text.encode(), mode=0o600)
    load_config(config_out, env={})  # the result must load; an error names the key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="import /etc/default/mt5-backup")
    parser.add_argument("--example", type=Path, required=True)
    parser.add_argument("--env-file", type=Path, help="the legacy /etc/default/mt5-backup")
    parser.add_argument("--config-out", type=Path, required=True)
    parser.add_argument("--credentials", type=Path, required=True)
    parser.add_argument("--metrics-textfile", type=Path,
                        help="set [metrics] textfile (the legacy exporter's file existed)")
    args = parser.parse_args(argv)
    try:
        import_legacy(args.example, args.env_file, args.config_out, args.credentials,
                      args.metrics_textfile)
    except Mt5BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
