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

from mt5backupd.config.legacy_env import (
    LEGACY_SECRETS,
    LEGACY_SETTINGS,
    LEGACY_TOKEN,
    read_env_file,
)
from mt5backupd.config.loader import load_config
from mt5backupd.config.secret import CREDENTIAL_REMOTE_TOKEN
from mt5backupd.config.urls import is_plain_http_remote, normalize_remote_url
from mt5backupd.errors import Mt5BackupError
from mt5backupd.fsutil import atomic_write_bytes


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
    where = str(env_file)
    text = example.read_text()
    for var in LEGACY_SETTINGS:  # the same table the daemon's --env-file overlay reads
        raw = env.get(var.name)
        if not raw:
            continue
        text = set_key(text, var.section, var.key, var.toml(raw, where))
        if var.kind == "url" and is_plain_http_remote(url := normalize_remote_url(raw)):
            text = allow_plain_http(text, url)
    credentials.mkdir(parents=True, exist_ok=True, mode=0o700)
    for secret in LEGACY_SECRETS:  # into credential files, never into the TOML
        if env.get(secret.name):
            atomic_write_bytes(credentials / secret.credential, env[secret.name].encode(),
                               mode=0o600)
    if env.get(LEGACY_TOKEN):
        text = set_key(text, "remote", "token_file", json.dumps(str(credentials /
                                                                     CREDENTIAL_REMOTE_TOKEN)))
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
