#!/usr/bin/env bash
# mt5backupd installer (successor of the legacy setup-backup.sh). Idempotent.
#
#   packaging/install.sh                 install the backup daemon on this machine
#   packaging/install.sh --receiver      install the receiver instead
#   packaging/install.sh --uninstall     remove what was installed (never backups, config, secrets)
#   packaging/install.sh --root DIR      install into a staging root (no users, no systemctl)
#
# It installs the package into its own virtualenv under /opt/mt5backupd, creates the mt5backup
# user and directories, writes /etc/mt5backupd/config.toml from config.example.toml (mode 0600)
# unless one exists — importing the legacy /etc/default/mt5-backup into it (values, and the
# password and token as systemd credentials; nothing secret is printed) — installs and enables
# the systemd units, and runs `mt5backupd check`.
set -euo pipefail

ROOT=""
ROLE="daemon"
UNINSTALL=0
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="$(realpath -m "$2")"; shift 2 ;;
        --receiver) ROLE="receiver"; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

PREFIX="$ROOT/opt/mt5backupd"
VENV="$PREFIX/venv"
ETC="$ROOT/etc/mt5backupd"
UNITDIR="$ROOT/etc/systemd/system"
LIBDIR="$ROOT/usr/lib"
LIVE=0
[ -z "$ROOT" ] && LIVE=1
say() { printf 'install.sh: %s\n' "$*" >&2; }
changed=0
put() {  # put SRC DEST MODE: copy only when different (keeps the second run a no-op)
    if ! cmp -s "$1" "$2"; then
        install -D -m "$3" "$1" "$2"
        changed=1
        say "wrote ${2#"$ROOT"}"
    fi
}

if [ "$LIVE" = 1 ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or use --root DIR for a staging install)" >&2
    exit 1
fi

if [ "$UNINSTALL" = 1 ]; then
    for unit in mt5backupd.service mt5backupd-receiver.service; do
        if [ -f "$UNITDIR/$unit" ]; then
            [ "$LIVE" = 1 ] && systemctl disable --now "$unit" 2>/dev/null || true
            rm -f "$UNITDIR/$unit"
            say "removed $unit"
        fi
    done
    rm -rf "$PREFIX"
    rm -f "$LIBDIR/sysusers.d/mt5backupd.conf" "$LIBDIR/tmpfiles.d/mt5backupd.conf"
    [ "$LIVE" = 1 ] && systemctl daemon-reload 2>/dev/null || true
    say "removed /opt/mt5backupd and the units; kept /etc/mt5backupd (config, secrets) and every backup"
    exit 0
fi

# --- user and directories
put "$SRC/packaging/sysusers.d/mt5backupd.conf" "$LIBDIR/sysusers.d/mt5backupd.conf" 0644
put "$SRC/packaging/tmpfiles.d/mt5backupd.conf" "$LIBDIR/tmpfiles.d/mt5backupd.conf" 0644
if [ "$LIVE" = 1 ]; then
    if ! id mt5backup >/dev/null 2>&1; then
        if command -v systemd-sysusers >/dev/null 2>&1; then
            systemd-sysusers "$LIBDIR/sysusers.d/mt5backupd.conf"
        else
            useradd --system --home-dir /var/lib/mt5backupd --shell /usr/sbin/nologin mt5backup
        fi
    fi
    systemd-tmpfiles --create "$LIBDIR/tmpfiles.d/mt5backupd.conf" 2>/dev/null || true
fi
install -d -m 0750 "$ETC"
install -d -m 0700 "$ETC/credentials"
[ "$ROLE" = daemon ] && install -d -m 0750 "$ROOT/var/backups/mt5"

# --- the package, in its own virtualenv
want_version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SRC/mt5backupd/__init__.py")"
have_version="$("$VENV/bin/mt5backupd" --version 2>/dev/null | awk '{print $2}' || true)"
if [ "$have_version" != "$want_version" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q "$SRC"
    changed=1
    say "installed mt5backupd $want_version into ${VENV#"$ROOT"}"
fi
install -d "$PREFIX/share"
for doc in operations.md receiver.md configuration.md; do
    put "$SRC/docs/$doc" "$PREFIX/share/docs/$doc" 0644
done

# --- configuration (never overwritten), legacy import, secrets as credentials
if [ "$ROLE" = daemon ]; then
    config="$ETC/config.toml"
    legacy="$ROOT/etc/default/mt5-backup"
    # the legacy backup-metrics-exporter.sh wrote this node_exporter textfile (path fixed in it);
    # dashboards and alerts read it, so the daemon keeps writing it
    legacy_prom=/var/backups/mt5/backup_metrics.prom
    if [ ! -f "$config" ]; then
        if [ -f "$legacy" ] || [ -f "$ROOT$legacy_prom" ]; then
            import=(--example "$SRC/config.example.toml" --config-out "$config"
                    --credentials "$ETC/credentials")
            from="config.example.toml"
            if [ -f "$legacy" ]; then
                import+=(--env-file "$legacy")
                from="$from and ${legacy#"$ROOT"}"
            fi
            if [ -f "$ROOT$legacy_prom" ]; then
                import+=(--metrics-textfile "$legacy_prom")
                from="$from; [metrics] textfile = $legacy_prom (it existed)"
            fi
            "$VENV/bin/python" -m mt5backupd.config.legacy_import "${import[@]}"
            say "wrote ${config#"$ROOT"} from $from"
            if grep -q '^allow_http = true' "$config"; then
                # legacy_import wrote it, with a comment on moving to TLS
                say "NOTE: BACKUP_API_URL is plain http:// to another host; kept working with" \
                    "[remote] allow_http = true — move the receiver to TLS (docs/operations.md)"
            fi
        else
            install -m 0600 "$SRC/config.example.toml" "$config"
            say "wrote ${config#"$ROOT"} from config.example.toml (edit it)"
        fi
        changed=1
    fi
    for cred in db-password remote-token; do
        [ -f "$ETC/credentials/$cred" ] || install -m 0600 /dev/null "$ETC/credentials/$cred"
    done
    unit=mt5backupd.service
else
    config="$ETC/receiver.toml"
    if [ ! -f "$config" ]; then
        {
            printf '# mt5backupd receiver; every key: docs/configuration.md\n[receiver]\n'
            printf 'listen = "0.0.0.0:9101"\ndata_dir = "/var/lib/mt5backupd-receiver"\n'
            printf 'tokens_file = "/etc/mt5backupd/receiver-tokens.json"\n'
        } > "$config"
        chmod 0600 "$config"
        changed=1
        say "wrote ${config#"$ROOT"}"
    fi
    tokens="$ETC/receiver-tokens.json"
    [ -f "$tokens" ] || { printf '{"tokens": []}\n' > "$tokens"; chmod 0600 "$tokens"; }
    unit=mt5backupd-receiver.service
fi
if [ "$LIVE" = 1 ]; then
    # the service reads its config (and the receiver its tokens) as mt5backup
    chown mt5backup:mt5backup "$config"
    [ "$ROLE" = receiver ] && chown mt5backup:mt5backup "$ETC/receiver-tokens.json"
    chgrp mt5backup "$ETC"
    [ "$ROLE" = daemon ] && chown mt5backup:mt5backup "$ROOT/var/backups/mt5"
fi

# --- systemd
put "$SRC/packaging/systemd/$unit" "$UNITDIR/$unit" 0644
if [ "$LIVE" = 1 ]; then
    systemctl daemon-reload
    systemctl enable "$unit" >/dev/null
    if [ "$ROLE" = daemon ]; then
        "$VENV/bin/mt5backupd" check --config "$config" || say "check found problems: fix them, then: systemctl start $unit"
    fi
    systemctl restart "$unit" || say "could not start $unit yet (see: journalctl -u $unit)"
fi
[ "$changed" = 0 ] && say "nothing to change"
say "done ($ROLE${ROOT:+, staged in $ROOT})"
