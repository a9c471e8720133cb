"""Command line: parse, load config, one call per command; errors become one line + exit code."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from mt5backupd import __version__
from mt5backupd.config import (
    Config,
    check_schedule,
    file_mode_problems,
    load_config,
    resolve_config_path,
)
from mt5backupd.errors import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_PENDING,
    EXIT_VERIFY,
    ConfigError,
    Mt5BackupError,
    UsageError,
)
from mt5backupd.tuning import tune_process

if TYPE_CHECKING:
    from mt5backupd.backup.result import BackupResult
    from mt5backupd.logs import LogSettings

# Nothing heavy is imported at the top: `--run-now` starts pg_dump right after the config is
# loaded (backup/runstart), and asyncio, loguru and the run's clients load while it runs.
T = TypeVar("T")


def _arun(main: Coroutine[Any, Any, T]) -> T:
    import asyncio

    return asyncio.run(main)


def setup_logging(cfg: LogSettings | None, component: str, *, verbose: bool = False) -> None:
    from mt5backupd.logs import setup_logging as setup

    setup(cfg, component, verbose=verbose)


def _add_common(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command; the subcommand copy must not reset the top one.
    default = None if top else argparse.SUPPRESS
    p.add_argument("--config", metavar="PATH", default=default,
                   help="TOML config (default: $MT5BACKUPD_CONFIG or /etc/mt5backupd/config.toml)")
    p.add_argument("-v", "--verbose", action="store_true", default=False if top else
                   argparse.SUPPRESS, help="debug logging and tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mt5backupd",
        description="Streaming, verified, resumable backups of the MT5 trading database.",
    )
    parser.add_argument("--version", action="version", version=f"mt5backupd {__version__}")
    _add_common(parser, top=True)
    parser.add_argument("--run-now", action="store_true",
                        help="take one database backup now, in the foreground, and exit")
    parser.add_argument("--job", choices=("database", "repository", "base"), default="database",
                        help="with --run-now: which job (default: database)")
    parser.add_argument("--env-file", metavar="PATH",
                        help="legacy /etc/default/mt5-backup style KEY=VALUE overrides")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon (the default when no command is given)")
    _add_common(run, top=False)

    lst = sub.add_parser("list", help="list backups (local, or the receiver's with --remote)")
    _add_common(lst, top=False)
    lst.add_argument("--remote", action="store_true", help="list the receiver's backups")
    lst.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    rst = sub.add_parser("restore", help="verify a backup's sha256, then pg_restore it")
    _add_common(rst, top=False)
    rst.add_argument("backup", metavar="ID|latest", help="backup id, file name or 'latest'")
    rst.add_argument("--target-db", metavar="NAME",
                     help="database to restore into (on the configured server)")
    rst.add_argument("--from", dest="source", choices=("local", "remote"), default="local",
                     help="take the backup from the local dir (default) or the receiver")
    rst.add_argument("--create", action="store_true", help="create the target database")
    rst.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="parallel pg_restore jobs (zstd archives are decompressed first)")
    rst.add_argument("--force", action="store_true",
                     help="allow restoring over the configured source database")
    rst.add_argument("--no-owner", action="store_true",
                     help="do not restore object ownership (target roles differ)")
    rst.add_argument("--identity", action="append", default=[], metavar="PATH",
                     help="age identity file (0600) for an encrypted backup; repeatable, "
                     "added to [encryption] identity_file")
    rst.add_argument("--pitr", action="store_true",
                     help="point-in-time: base backup ID|latest + WAL into --target-dir")
    rst.add_argument("--to-time", metavar="TIMESTAMP",
                     help="with --pitr: recover to this time (no zone: UTC); default: as far "
                          "as the shipped WAL goes")
    rst.add_argument("--target-dir", metavar="DIR",
                     help="with --pitr: a new or empty directory for the data directory")
    rst.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    chk = sub.add_parser("check", help="self-test: tools, database, dirs, secrets, receiver, "
                         "daemon (the legacy test-backup.sh)")
    _add_common(chk, top=False)
    chk.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    ver = sub.add_parser("verify", help="test-restore a backup into a scratch database")
    _add_common(ver, top=False)
    ver.add_argument("backup", metavar="ID|latest", nargs="?", default="latest")
    ver.add_argument("--identity", action="append", default=[], metavar="PATH",
                     help="age identity file (0600) for an encrypted backup; repeatable")
    ver.add_argument("--pitr", action="store_true",
                     help="restore the newest base backup + all shipped WAL into a scratch "
                          "data directory and start PostgreSQL on it")
    ver.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    pend = sub.add_parser("upload-pending", help="upload local backups whose upload is pending")
    _add_common(pend, top=False)

    keygen = sub.add_parser("keygen", help="new age identity for [encryption]; prints its "
                            "recipient")
    keygen.add_argument("--out", metavar="PATH",
                        help="write the identity here (0600, never overwrites); default: stdout")

    demo = sub.add_parser("demo", help="throwaway PostgreSQL + receiver + one verified backup")
    demo.add_argument("--size-mb", type=float, default=20.0,
                      help="size of the generated trading database (default 20)")
    demo.add_argument("--keep", metavar="DIR", help="keep the demo's files in DIR")

    rec = sub.add_parser("receiver", help="run the backup receiver (HTTP server)")
    _add_common(rec, top=False)
    rec_sub = rec.add_subparsers(dest="receiver_command", metavar="SUBCOMMAND")
    tok = rec_sub.add_parser("token", help="manage receiver tokens")
    _add_common(tok, top=False)
    tok_sub = tok.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    add = tok_sub.add_parser("add", help="create a token, print it once, store its hash")
    _add_common(add, top=False)
    add.add_argument("name", help="client name; also the client's storage namespace")
    add.add_argument("--admin", action="store_true", help="may list all, delete and prune")
    lst = tok_sub.add_parser("list", help="list token names (never the tokens)")
    _add_common(lst, top=False)
    rm = tok_sub.add_parser("remove", help="revoke a token")
    _add_common(rm, top=False)
    rm.add_argument("name")
    return parser


def _config_path(args: argparse.Namespace) -> Path | None:
    """The file to load (and to reload on SIGHUP); None when the default is absent."""
    path, explicit = resolve_config_path(args.config, os.environ)
    return path if explicit or path.exists() else None


def _load(args: argparse.Namespace, *, check_modes: bool = True,
          check_schedule_now: bool = True) -> Config:
    """The config; a bad cron or zone in [schedule] is refused here unless the caller checks
    it later (``_check_schedule``)."""
    env_file = Path(args.env_file) if args.env_file else None
    checks = None
    if check_schedule_now:
        from mt5backupd.daemon.schedule import SCHEDULE_CHECKS

        checks = SCHEDULE_CHECKS
    return load_config(_config_path(args), env_file=env_file, check_modes=check_modes,
                       schedule_checks=checks)


def _check_schedule(config: Config) -> None:
    from mt5backupd.daemon.schedule import SCHEDULE_CHECKS

    check_schedule(config.schedule, SCHEDULE_CHECKS,
                   str(config.source) if config.source else "<defaults>")


def _cmd_daemon(args: argparse.Namespace, config: Config) -> int:
    from mt5backupd.daemon import jobs
    from mt5backupd.daemon.service import Daemon

    setup_logging(config.log, "daemon", verbose=args.verbose)
    daemon = Daemon(config, _config_path(args),
                    Path(args.env_file) if args.env_file else None,
                    dict(jobs.DAEMON_JOBS))
    _arun(daemon.run())
    return EXIT_OK


def _print_result(result: BackupResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.summary())


def _cmd_run_now(args: argparse.Namespace, config: Config) -> int:
    if args.job == "database":
        result = _database_now(args, config)
    else:
        setup_logging(config.log, "backup", verbose=args.verbose)
        from mt5backupd.daemon.jobs import run_base_now, run_repository_now

        result = _arun(run_base_now(config) if args.job == "base"
                       else run_repository_now(config))
    _print_result(result, args.json)
    global _exit_fast
    _exit_fast = True
    return result.exit_code


_exit_fast = False  # set once a --run-now is over: nothing is left to run at interpreter exit


def entry() -> NoReturn:
    """The console script. After ``--run-now`` the process ends without the interpreter's
    teardown of every imported module (~60-90 ms of the run's wall time): by then every file
    is closed, every child reaped and every log line written (the sinks are closed here)."""
    code = main()
    if _exit_fast:
        from loguru import logger

        logger.remove()  # closes and flushes every sink
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _database_now(args: argparse.Namespace, config: Config) -> BackupResult:
    """pg_dump first, then logging and the imports of the run (asyncio, HTTP and database
    clients, ~0.2 s), which overlap its catalog phase; a failure to begin is raised inside the
    recorded run."""
    from mt5backupd.backup.runstart import RunStart

    start = RunStart(config)
    try:
        with contextlib.suppress(Exception):  # kept in start.error, raised by the run below
            start.begin()
        setup_logging(config.log, "backup", verbose=args.verbose)
        _check_schedule(config)  # the scheduler's import pulls in asyncio: after the start
        from mt5backupd.daemon.jobs import run_database

        return _arun(run_database(config, show_progress=sys.stderr.isatty() and not args.json,
                                  start=start))
    finally:
        if not start.closed:  # a run that never got far enough to end what was begun
            _arun(start.close())


def _cmd_list(args: argparse.Namespace, config: Config) -> int:
    from mt5backupd.ops import listing

    entries = (_arun(listing.remote_entries(config)) if args.remote
               else listing.local_entries(config))
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
    else:
        wal = [e for e in entries if e.kind == "wal"]  # one per segment: a count, not rows
        print(listing.format_table([e for e in entries if e.kind != "wal"]))
        if config.wal.enabled or wal or any(e.kind == "base" for e in entries):
            from mt5backupd.ops.pitr import window_line

            print(_arun(window_line(config, remote=args.remote)))
    return EXIT_OK


def _cmd_restore(args: argparse.Namespace, config: Config) -> int:
    from mt5backupd.ops import restore

    setup_logging(config.log, "restore", verbose=args.verbose)
    if args.pitr:
        return _restore_pitr(args, config)
    if args.target_db is None:
        raise UsageError("restore needs --target-db NAME (or --pitr --target-dir DIR)")
    result = _arun(restore.restore(
        config, args.backup, args.target_db, source=args.source, create=args.create,
        jobs=args.jobs, force=args.force, no_owner=args.no_owner,
        identity_files=[Path(p) for p in args.identity]))
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return EXIT_OK


def _restore_pitr(args: argparse.Namespace, config: Config) -> int:
    from mt5backupd.ops.pitr import restore_pitr

    if args.target_dir is None:
        raise UsageError("restore --pitr needs --target-dir DIR")
    result = _arun(restore_pitr(config, args.backup, Path(args.target_dir),
                                      to_time=args.to_time, source=args.source,
                                      identity_files=[Path(p) for p in args.identity]))
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return EXIT_OK


def _cmd_check(args: argparse.Namespace, config: Config) -> int:
    from mt5backupd.ops.checks import refused_files_report, report, run_checks

    setup_logging(config.log, "check", verbose=args.verbose)
    # check reports every file the other commands would refuse (instead of stopping at the
    # first), and then runs nothing that file could have changed
    problems = file_mode_problems(_config_path(args),
                                  Path(args.env_file) if args.env_file else None, config)
    if problems:
        text, code = refused_files_report(problems, args.json)
    else:
        text, code = report(_arun(run_checks(config)), args.json)
    print(text)
    return code


def _cmd_verify(args: argparse.Namespace, config: Config) -> int:
    from mt5backupd.daemon.jobs import run_verify

    setup_logging(config.log, "verify", verbose=args.verbose)
    outcome = _arun(run_verify(config, args.backup, [Path(p) for p in args.identity],
                                     pitr=args.pitr))
    print(json.dumps(outcome.to_json(), indent=2) if args.json else outcome.summary())
    if outcome.skipped:
        return EXIT_CONFIG
    return EXIT_OK if outcome.passed else EXIT_VERIFY


def _cmd_upload_pending(args: argparse.Namespace, config: Config) -> int:
    from mt5backupd.daemon.jobs import upload_pending_now

    setup_logging(config.log, "backup", verbose=args.verbose)
    done, left = _arun(upload_pending_now(config))
    if args.json:
        print(json.dumps({"uploaded": done, "pending": left}))
    else:
        print(f"uploaded {done} pending backup(s); {left} still pending")
    return EXIT_PENDING if left else EXIT_OK


def _cmd_keygen(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from mt5backupd.backup.encryption import generate_identity, write_identity_file

    identity, recipient = generate_identity()
    created = datetime.now(UTC).isoformat(timespec="seconds")
    if args.out is None:  # like age-keygen: the identity to stdout, for a pipe or a vault
        print(f"# created: {created}\n# public key: {recipient}\n{identity}")
        print(f"Public key: {recipient}", file=sys.stderr)
        return EXIT_OK
    out = Path(args.out)
    try:
        write_identity_file(out, identity, recipient, created)
    except FileExistsError:
        raise ConfigError(f"{out}: exists; keygen never overwrites an identity") from None
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the identity: {exc.strerror}") from None
    print(recipient)
    print(f"identity written to {out} (0600); add the line above to [encryption] recipients "
          "on the backup host, keep the file where restores run", file=sys.stderr)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from mt5backupd.testkit.demo import run_demo

    setup_logging(None, "demo", verbose=args.verbose)
    keep = Path(args.keep) if args.keep else None
    return _arun(run_demo(size_bytes=int(args.size_mb * 1e6), keep_dir=keep,
                                as_json=args.json))


def _cmd_receiver(args: argparse.Namespace, config: Config) -> int:
    from mt5backupd.receiver import auth
    from mt5backupd.receiver.server import serve

    tokens_file = config.receiver.tokens_file
    if args.receiver_command == "token":
        if args.token_command == "add":
            token = auth.add_token(tokens_file, args.name, args.admin)
            print(token)
            role = "admin" if args.admin else "client"
            print(f"token {args.name!r} ({role}) stored as a hash in "
                  f"{tokens_file}; it is shown only this once", file=sys.stderr)
            return EXIT_OK
        if args.token_command == "list":
            for entry in auth.list_tokens(tokens_file):
                print(f"{entry.name}\t{'admin' if entry.admin else 'client'}\t{entry.created}")
            return EXIT_OK
        if args.token_command == "remove":
            if not auth.remove_token(tokens_file, args.name):
                raise Mt5BackupError(f"{tokens_file}: no token named {args.name!r}")
            print(f"token {args.name!r} removed", file=sys.stderr)
            return EXIT_OK
    setup_logging(config.log, "receiver", verbose=args.verbose)
    _arun(serve(config))
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "run": _cmd_daemon,
    "receiver": _cmd_receiver,
    "list": _cmd_list,
    "restore": _cmd_restore,
    "check": _cmd_check,
    "verify": _cmd_verify,
    "upload-pending": _cmd_upload_pending,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_process()
    verbose = bool(getattr(args, "verbose", False))
    try:
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "keygen":
            return _cmd_keygen(args)
        # `--run-now` of the database checks [schedule] once pg_dump runs (_database_now)
        early_dump = args.run_now and args.command is None and args.job == "database"
        config = _load(args, check_modes=args.command != "check",
                       check_schedule_now=not early_dump)
        if args.run_now:
            if args.command is not None:
                parser.error("--run-now takes no command")
            return _cmd_run_now(args, config)
        command = _COMMANDS.get(args.command or "run")
        if command is None:
            parser.error(f"unknown command {args.command!r}")
        return command(args, config)
    except Mt5BackupError as exc:
        if verbose:
            from loguru import logger

            logger.opt(exception=exc).debug("traceback")
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

