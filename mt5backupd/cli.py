"""Command line: parse, load config, one call per command; errors become one line + exit code."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from loguru import logger

from mt5backupd import __version__
from mt5backupd.config import Config, load_config, resolve_config_path
from mt5backupd.errors import EXIT_FAILURE, EXIT_OK, Mt5BackupError
from mt5backupd.logs import setup_logging


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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


def _load(args: argparse.Namespace) -> Config:
    path, explicit = resolve_config_path(args.config, os.environ)
    if not explicit and not path.exists():
        return load_config(None)
    return load_config(path)


def _cmd_receiver(args: argparse.Namespace, config: Config) -> int:
    from mt5backupd.receiver import auth
    from mt5backupd.receiver.app import serve

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
    asyncio.run(serve(config))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    try:
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_FAILURE
        config = _load(args)
        if args.command == "receiver":
            return _cmd_receiver(args, config)
        parser.error(f"unknown command {args.command!r}")
    except Mt5BackupError as exc:
        if verbose:
            logger.opt(exception=exc).debug("traceback")
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
