"""The throwaway cluster as tests, benches and the demo use it: a :class:`PgServer` plus psql.

Administration on top of the lifecycle in :mod:`mt5backupd.testkit.pgserver`: run SQL scripts,
create and drop databases, give roles passwords and switch ``pg_hba.conf`` between trust and
scram-sha-256, so tests can prove what the product does with and without credentials.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable

from mt5backupd.pgtext import quote_ident, quote_literal
from mt5backupd.testkit.pghost import SUPERUSER, PgClusterError
from mt5backupd.testkit.pgserver import PgServer

__all__ = ["PgCluster", "PgClusterError"]


class PgCluster(PgServer):
    """One private PostgreSQL cluster with admin helpers; see :class:`PgServer` for its life.

    Build it with :meth:`create`. As a context manager it starts on enter and on exit stops the
    server and deletes everything it created, whatever happened inside the block.
    """

    # The superuser's password once one is set: the admin helpers keep working after
    # require_password(), while dsn() and env() still include a password only when asked.
    _admin_password: str | None = None

    def _client_env(self, dbname: str, user: str | None, password: str | None) -> dict[str, str]:
        # Inherited PG* variables (PGSERVICE, PGSSLMODE, a developer's PGPASSWORD...) would make
        # the helpers talk to, or authenticate as, something other than this cluster.
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if password is None and (user or SUPERUSER) == SUPERUSER:
            password = self._admin_password
        return {**base, **self.env(dbname, user=user, password=password)}


    def psql(
        self,
        sql: str,
        dbname: str = "postgres",
        *,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 300.0,
    ) -> str:
        """Run an SQL script with psql (stops at the first error) and return its output.

        Output is unaligned and tuples-only (``-A -t``), so ``psql("select 1").strip() == "1"``.
        The script is fed on stdin, so it may hold several statements and psql meta-commands.
        """
        return self._run_psql(["-f", "-"], sql, dbname, user, password, timeout)

    def _command(self, statement: str, dbname: str = "postgres") -> str:
        # -c sends the text verbatim: no psql variable interpolation of ':' in passwords, and a
        # single statement is not wrapped in a transaction (CREATE DATABASE needs that).
        return self._run_psql(["-c", statement], None, dbname, None, None, 120.0)

    def _run_psql(
        self,
        args: list[str],
        stdin: str | None,
        dbname: str,
        user: str | None,
        password: str | None,
        timeout: float,
    ) -> str:
        argv = [
            str(self._bin_dir / "psql"), "-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-w",
            *args,
        ]
        try:
            res = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                env=self._client_env(dbname, user, password),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PgClusterError(f"psql on {dbname!r} timed out after {timeout:.0f}s") from None
        if res.returncode != 0:
            raise PgClusterError(f"psql on {dbname!r} failed: {res.stderr.strip()}")
        return res.stdout

    def create_database(self, name: str, *, owner: str | None = None) -> None:
        stmt = f"CREATE DATABASE {quote_ident(name)}"
        if owner is not None:
            stmt += f" OWNER {quote_ident(owner)}"
        self._command(stmt)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, disconnecting any sessions still using it."""
        self._command(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")

    def set_password(self, user: str, password: str) -> None:
        """Give ``user`` a (SCRAM) password, creating it as a plain LOGIN role if missing.

        New roles get no privileges; grant what the test needs (e.g. ``pg_read_all_data``).
        Setting the superuser's password also lets the admin helpers keep working after
        :meth:`require_password`.
        """
        exists = self._command(
            f"SELECT 1 FROM pg_roles WHERE rolname = {quote_literal(user)}"  # noqa: S608 - quoted
        ).strip()
        if not exists:
            self._command(f"CREATE ROLE {quote_ident(user)} LOGIN")
        self._command(
            f"ALTER ROLE {quote_ident(user)} WITH LOGIN PASSWORD {quote_literal(password)}"
        )
        if user == SUPERUSER:
            self._admin_password = password

    def grant_replication(self, user: str) -> None:
        """Give ``user`` the REPLICATION attribute (pg_receivewal and pg_basebackup need it;
        ``pg_hba.conf`` here admits replication connections already)."""
        self._command(f"ALTER ROLE {quote_ident(user)} WITH REPLICATION")

    def require_password(self) -> None:
        """Make every connection (socket and TCP) authenticate with scram-sha-256.

        The superuser gets a random password first if it has none, so this object's own admin
        helpers keep working; :meth:`dsn` and :meth:`env` still include a password only when
        asked. Returns once new connections are actually refused without a password.
        """
        if self._admin_password is None:
            self.set_password(SUPERUSER, secrets.token_urlsafe(18))
        self._write_hba("scram-sha-256")
        self._reload_until(lambda: not self._passwordless_login_works())

    def allow_trust(self) -> None:
        """Undo :meth:`require_password`: every local and loopback connection is trusted again."""
        self._write_hba("trust")
        self._reload_until(self._passwordless_login_works)

    def _write_hba(self, method: str) -> None:
        lines = [
            "# written by mt5backupd.testkit.pgcluster",
            f"local all all {method}",
            f"host all all 127.0.0.1/32 {method}",
            f"host all all ::1/128 {method}",
            f"local replication all {method}",
            f"host replication all 127.0.0.1/32 {method}",
            f"host replication all ::1/128 {method}",
        ]
        # Rewriting in place keeps the file's owner (postgres) and mode.
        (self.data_dir / "pg_hba.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _passwordless_login_works(self) -> bool:
        env = {k: v for k, v in self._client_env("postgres", None, None).items()
               if k != "PGPASSWORD"}
        res = subprocess.run(
            [str(self._bin_dir / "psql"), "-X", "-q", "-w", "-c", "SELECT 1"],
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
        return res.returncode == 0

    def _reload_until(self, done: Callable[[], bool]) -> None:
        # pg_reload_conf() is asynchronous: the postmaster re-reads pg_hba.conf on SIGHUP some
        # time later, so a test connecting right away could still see the old rules.
        res = self._pg_ctl("reload", "-s", timeout=30)
        if res.returncode != 0:
            raise PgClusterError(f"pg_ctl reload failed: {res.stderr.strip()}")
        deadline = time.monotonic() + 10
        while not done():
            if time.monotonic() > deadline:
                raise PgClusterError(
                    f"pg_hba.conf change did not take effect; server log:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def server_version(self) -> str:
        """``server_version`` as the running server reports it, e.g. ``15.8 (Debian 15.8-1)``."""
        return self._command("SHOW server_version").strip()
