#!/usr/bin/env bash
# Installs the system tools the tests and the demo use, when missing: PostgreSQL server binaries
# (initdb/pg_ctl/pg_dump/pg_restore), curl (the legacy client flow), zstd (manual restore one-liner),
# promtool (alert rules), systemd-analyze (unit files) and age (the stock-tool restore of an
# encrypted backup: age -d | zstd -d | pg_restore).
set -euo pipefail

need=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    need+=(postgresql postgresql-contrib)
fi
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)          # promtool: alert rule tests
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)     # unit file verification
command -v age >/dev/null 2>&1 || need+=(age)                     # stock-tool decryption test

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
    exit 1
fi
echo "installing system packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
