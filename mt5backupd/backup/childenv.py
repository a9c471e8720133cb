"""The environment and argv of the PostgreSQL tools we start: what a child inherits of ours
(never a token or a URL), libpq's settings from [database], and the password as a private
passfile, never argv or environment. Light (no asyncio): ``--run-now`` starts pg_dump with it
before its heavy imports (backup/runstart)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from mt5backupd.config import DatabaseConfig, Secret
from mt5backupd.errors import ConfigError

# What a child may inherit from our environment. Everything else (BACKUP_API_TOKEN, the
# receiver's token, webhook URLs, whatever systemd or a shell put there) stays with us.
CHILD_ENV_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "HOME", "TMPDIR"})
# libpq's own variables (https://www.postgresql.org/docs/current/libpq-envars.html), minus
# PGPASSWORD: a password goes into a 0600 passfile instead (see pg_child_env).
LIBPQ_ENV_NAMES = frozenset({
    "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSFILE", "PGSERVICE",
    "PGSERVICEFILE", "PGSYSCONFDIR", "PGOPTIONS", "PGAPPNAME", "PGSSLMODE", "PGREQUIRESSL",
    "PGSSLCOMPRESSION", "PGSSLCERT", "PGSSLKEY", "PGSSLCERTMODE", "PGSSLROOTCERT", "PGSSLCRL",
    "PGSSLCRLDIR", "PGSSLSNI", "PGSSLNEGOTIATION", "PGREQUIREPEER", "PGSSLMINPROTOCOLVERSION",
    "PGSSLMAXPROTOCOLVERSION", "PGGSSENCMODE", "PGKRBSRVNAME", "PGGSSLIB", "PGGSSDELEGATION",
    "PGCONNECT_TIMEOUT", "PGCLIENTENCODING", "PGTARGETSESSIONATTRS", "PGLOADBALANCEHOSTS",
    "PGCHANNELBINDING", "PGREQUIREAUTH", "PGDATESTYLE", "PGTZ", "PGGEQO", "PGLOCALEDIR",
})


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every child process starts from: locale, PATH, TZ, HOME and libpq's
    variables; never a token, a password or a URL of ours."""
    base = os.environ if base is None else base
    return {k: v for k, v in base.items()
            if k in CHILD_ENV_NAMES or k.startswith("LC_") or k in LIBPQ_ENV_NAMES}


def libpq_env(cfg: DatabaseConfig, passfile: Path | None = None,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for libpq tools: the clean child environment, config winning over
    inherited PG* variables, and the password only as a passfile (never argv, never env)."""
    env = child_env(base)
    if cfg.host:
        env["PGHOST"] = cfg.host
    if cfg.port:
        env["PGPORT"] = str(cfg.port)
    if cfg.user:
        env["PGUSER"] = cfg.user
    env["PGDATABASE"] = cfg.dbname
    env.setdefault("PGAPPNAME", "mt5backupd")
    if passfile is not None:
        env["PGPASSFILE"] = str(passfile)
    return env


def passfile_line(password: str) -> str:
    """A .pgpass line matching every host, port, database and user (``:`` and ``\\``
    escaped as libpq expects)."""
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:*:*:{escaped}\n"


@contextlib.contextmanager
def pg_child_env(cfg: DatabaseConfig, password: Secret | None,
                 base: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """libpq_env with the password (ours, else an inherited PGPASSWORD) in a 0600 passfile in a
    0700 directory private to this run, removed afterwards: a child's environment is readable
    in /proc by its user and inherited by everything it starts, a passfile is not."""
    base = os.environ if base is None else base
    secret = password.reveal() if password is not None else base.get("PGPASSWORD")
    if not secret:
        yield libpq_env(cfg, None, base)
        return
    if "\n" in secret or "\r" in secret:
        raise ConfigError("[database] password contains a line break, which libpq cannot "
                          "take from a password file")
    with tempfile.TemporaryDirectory(prefix="mt5backupd-run-") as private:  # mode 0700
        passfile = Path(private) / "pgpass"
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(passfile_line(secret))
        yield libpq_env(cfg, passfile, base)


def pg_dump_argv(cfg: DatabaseConfig, snapshot: str | None = None) -> list[str]:
    level = cfg.compression.level if cfg.compression.kind == "gzip" else 0
    argv = [cfg.pg_dump, "--format=custom", f"--compress={level}", "--no-password",
            f"--dbname={cfg.dbname}"]
    if snapshot:
        argv.append(f"--snapshot={snapshot}")
    return argv
