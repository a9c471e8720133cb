"""`mt5backupd check`: the legacy test-backup.sh as one command — every precondition of a good
backup, one line each, with the fix for each failure. arq-style: it returns an exit code."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import aiohttp

from mt5backupd.backup import spool
from mt5backupd.backup.database import connect_db, db_preflight
from mt5backupd.backup.dump import check_dump_compatible, tool_version
from mt5backupd.backup.remote import receiver_client
from mt5backupd.backup.runstart import check_database_names
from mt5backupd.config import Config, FileProblem
from mt5backupd.config.secretfiles import check_pgpass, database_password, remote_token
from mt5backupd.errors import EXIT_CONFIG, EXIT_OK, EXIT_VERIFY, Mt5BackupError
from mt5backupd.fsutil import free_bytes
from mt5backupd.ops.checks_model import Check
from mt5backupd.ops.keycheck import encryption_checks
from mt5backupd.ops.walcheck import wal_checks

__all__ = ["Check", "refused_files_report", "report", "run_checks"]


async def _guard(name: str, fix: str, probe: Callable[[], Awaitable[str]]) -> Check:
    try:
        return Check(name, True, await probe())
    except (Mt5BackupError, OSError, aiohttp.ClientError, TimeoutError) as exc:
        return Check(name, False, str(exc) or exc.__class__.__name__, fix)


async def run_checks(cfg: Config) -> list[Check]:
    db, results = cfg.database, []
    versions: dict[str, int] = {}

    async def tool(key: str, binary: str) -> str:
        major, full = await tool_version(binary, key)
        versions[key] = major
        return f"{binary} {full}"

    results.append(await _guard("pg_dump", "install the PostgreSQL client of the server's "
                                "version, or set [database] pg_dump", lambda: tool("pg_dump",
                                                                                   db.pg_dump)))
    results.append(await _guard("pg_restore", "install the PostgreSQL client, or set "
                                "[database] pg_restore", lambda: tool("pg_restore",
                                                                      db.pg_restore)))

    password_holder: list[Any] = []

    async def secrets_probe() -> str:
        password_holder.append(database_password(db))
        with contextlib.suppress(RuntimeError):
            pgpass = check_pgpass()
            if pgpass is not None:
                return f"password from {db.password_file or 'libpq'}; {pgpass} is protected"
        return "protected" if db.password_file else "no password file (libpq/peer auth)"

    results.append(await _guard("password file", "chmod 600 the file named above",
                                secrets_probe))
    password = password_holder[0] if password_holder else None

    server_major: list[int] = []

    async def database_probe() -> str:
        server = await db_preflight(db, password)
        server_major.append(server.major)
        return f"connected to {db.dbname}, PostgreSQL {server.version}"

    results.append(await _guard(
        "database connection", "is PostgreSQL running? check [database] host/port/user/dbname "
        "and the password", database_probe))
    async def compatible_probe() -> str:
        check_dump_compatible(versions["pg_dump"], server_major[0], db.pg_dump)
        return f"pg_dump {versions['pg_dump']} >= server {server_major[0]}"

    if server_major and "pg_dump" in versions:
        results.append(await _guard(
            "pg_dump version", "install a pg_dump of at least the server's major version",
            compatible_probe))

    async def privilege_probe() -> str:
        conn = await connect_db(db, password, db.dbname)
        try:
            if await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
                return "superuser"
            missing = await conn.fetch(
                "SELECT c.oid::regclass::text AS t FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.relkind IN ('r','p','S','m') AND "
                "n.nspname NOT IN ('pg_catalog','information_schema') AND "
                "n.nspname NOT LIKE 'pg_toast%' AND NOT has_table_privilege(c.oid, 'SELECT') "
                "LIMIT 5")
        finally:
            await conn.close()
        if missing:
            raise Mt5BackupError("no SELECT on " + ", ".join(r["t"] for r in missing))
        return "SELECT on every table"

    if server_major:
        results.append(await _guard(
            "dump privileges", "GRANT pg_read_all_data TO the backup role (or SELECT on the "
            "tables named)", privilege_probe))

    async def dir_probe() -> str:
        directory = cfg.local.dir
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        probe = directory / f".check-{secrets.token_hex(4)}"
        probe.write_bytes(b"x")
        probe.unlink()
        free = free_bytes(directory)
        newest = spool.load_manifests(directory, "database")
        need = 2 * newest[-1].size if newest else 0
        if free < need:
            raise Mt5BackupError(f"{directory}: {free / 1e9:.1f} GB free, under twice the last "
                                 f"backup ({need / 2e9:.1f} GB)")
        return f"{directory} writable, {free / 1e9:.1f} GB free"

    results.append(await _guard(
        "backup dir", f"create {cfg.local.dir} writable by this user, with room for two "
        "backups", dir_probe))

    if cfg.remote.url:
        results.append(await _guard(
            "backup names", "choose a [database] dbname of letters, digits and . _ + - (the "
            "receiver's id rules), or take local-only backups", lambda: _names_probe(cfg)))
        results += await _remote_checks(cfg)
    if cfg.metrics.textfile is not None:
        results.append(await _guard(
            "metrics textfile", f"create {cfg.metrics.textfile.parent} writable by this user "
            "(and readable by node_exporter)", lambda: _textfile_probe(cfg)))
    results += await encryption_checks(cfg)
    results += await wal_checks(cfg)
    results.append(await _guard(
        "daemon", "start it: systemctl start mt5backupd (or mt5backupd run)",
        lambda: _daemon_probe(cfg)))
    return results


async def _names_probe(cfg: Config) -> str:
    check_database_names(cfg.database)  # a ConfigError names [database] dbname
    return f"ids like {spool.backup_stem(cfg.database.dbname, datetime.now().astimezone())}" \
        f"{cfg.database.compression.suffix} are valid on the receiver"


async def _textfile_probe(cfg: Config) -> str:
    """The directory the textfile is replaced in must take a new file (the temp file); the
    textfile itself is written after each run, so its absence here is fine."""
    path = cfg.metrics.textfile
    assert path is not None
    probe = path.parent / f".check-{secrets.token_hex(4)}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise Mt5BackupError(f"{path.parent}: cannot write there ({exc.strerror})") from None
    return f"{path.parent} writable; {path.name} is replaced after every run"


async def _remote_checks(cfg: Config) -> list[Check]:
    results = []

    async def token_file_probe() -> str:
        token = remote_token(cfg.remote)
        if token is None:
            raise Mt5BackupError("no token: set [remote] token_file")
        return f"{cfg.remote.token_file or 'token'} is protected"

    token_check = await _guard("token file", "chmod 600 the token file (and keep it owned by "
                               "the backup user)", token_file_probe)
    results.append(token_check)
    url = cfg.remote.url or ""

    async def health_probe() -> str:
        client = receiver_client(cfg) if token_check.ok else None
        if client is None:
            from mt5backupd.backup.upload import ReceiverClient

            client = ReceiverClient(url, None, timeout_s=cfg.remote.timeout_s,
                                    ca_file=cfg.remote.ca_file)
        async with client:
            body = await client.health()
        return f"{url} ok (receiver {body.get('version', '?')})"

    health = await _guard("receiver health", f"is `mt5backupd receiver` running and reachable "
                          f"at {url}?", health_probe)
    results.append(health)
    if url.startswith("https://") and health.ok:
        results.append(Check("TLS", True, "certificate chain and host name verified"
                             + (f" against {cfg.remote.ca_file}" if cfg.remote.ca_file else "")))
    elif url.startswith("https://"):
        results.append(Check("TLS", False, "not verified (receiver unreachable or certificate "
                             "refused; see above)", "check [remote] ca_file and the receiver's "
                             "certificate"))
    if health.ok and token_check.ok:
        async def token_probe() -> str:
            client = receiver_client(cfg)
            assert client is not None
            async with client:
                who = await client.whoami()
            return f"accepted as client {who.get('client')!r}"

        results.append(await _guard("token", "mint one on the receiver: mt5backupd receiver "
                                    "token add NAME, and put it in [remote] token_file",
                                    token_probe))
    return results


async def _daemon_probe(cfg: Config) -> str:
    host = cfg.http.listen_host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
    url = f"http://{host}:{cfg.http.listen_port}/status"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
            http.get(url) as resp:
        status = await resp.json()
    nxt = status["jobs"]["database"]["next_run"]
    when = datetime.fromisoformat(nxt).astimezone().isoformat(timespec="minutes") if nxt \
        else "not scheduled"
    return f"running (version {status['version']}), next database backup {when}"


def refused_files_report(problems: Sequence[FileProblem], as_json: bool) -> tuple[str, int]:
    """One failing line per refused file; nothing else is checked (the other checks run the
    tools that file names), and the exit code is the one the other commands give: 4."""
    results = [Check(f"{p.what} {p.path}", False, p.message, p.fix) for p in problems]
    results.append(Check("other checks", False, "not run: a file above could change what "
                         "they execute", "fix the files above, then run check again"))
    text, _code = report(results, as_json)
    return text, EXIT_CONFIG


def report(results: list[Check], as_json: bool) -> tuple[str, int]:
    code = EXIT_OK if all(r.ok for r in results) else EXIT_VERIFY
    if as_json:
        return json.dumps({"ok": code == EXIT_OK,
                           "checks": [r.to_json() for r in results]}, indent=2), code
    failed = sum(not r.ok for r in results)
    tail = "all checks passed" if not failed else f"{failed} check(s) failed"
    return "\n".join([*(r.line() for r in results), tail]), code

