"""The ``[encryption]`` keys as text: recipients (public, in the config or a recipients file in
the format ``age -R`` reads) and identity files (private, mode 0600, read only where restores
run). Parsing is pure; pyrage only checks that a key is a well-formed X25519 key."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pyrage import IdentityError, RecipientError, x25519

from mt5backupd.config.filemodes import file_mode_problem
from mt5backupd.errors import ConfigError
from mt5backupd.redact import register_secret

RECIPIENT_PREFIX = "age1"
IDENTITY_PREFIX = "AGE-SECRET-KEY-1"


def key_lines(text: str) -> list[str]:
    """The keys of a recipients or identity file: one per line, ``#`` comments and blank lines
    skipped (the format ``age -R`` and ``age -i`` read)."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def recipient_problem(value: str) -> str | None:
    """Why ``value`` is not an X25519 age recipient, or None (pure)."""
    if not value.startswith(RECIPIENT_PREFIX):
        return ("not an X25519 age recipient (age1...); ssh and plugin recipients are not "
                "supported")
    try:
        x25519.Recipient.from_str(value)
    except RecipientError as exc:
        return f"not a valid age recipient ({exc})"
    return None


def check_recipients(values: Iterable[str], where: str) -> tuple[str, ...]:
    """The recipients, each checked; ConfigError naming the first malformed one."""
    checked: list[str] = []
    for value in values:
        problem = recipient_problem(value)
        if problem:
            raise ConfigError(f"{where}: recipient {value!r}: {problem}")
        if value not in checked:
            checked.append(value)
    return tuple(checked)


def read_recipients_file(path: Path, where: str) -> tuple[str, ...]:
    """The recipients of ``path`` (``age -R`` format). Whoever can write it decides who can read
    every new backup, so a group/world-writable file is refused like a config file."""
    text = _read_key_file(path, where, secret=False)
    return check_recipients(key_lines(text), f"{where} {path}")


def _read_key_file(path: Path, where: str, *, secret: bool) -> str:
    """The text of a recipients or identity file, after its mode check; errors name the file
    and the key at fault, never the content."""
    problem = file_mode_problem(path, where, secret=secret)
    if problem:
        raise ConfigError(problem.message)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where} {path}: file not found") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} {path}: not readable ({exc.__class__.__name__})") from None


def read_identity_file(path: Path, what: str) -> list[x25519.Identity]:
    """The X25519 identities in ``path`` (an ``age-keygen`` file), which must be 0600 (no group
    or world bits). Errors name the file, never a key."""
    text = _read_key_file(path, what, secret=True)
    identities = []
    for number, line in enumerate(key_lines(text), 1):
        register_secret(line)  # never in a log line, whatever happens next
        if not line.startswith(IDENTITY_PREFIX):
            raise ConfigError(f"{what} {path}: key {number} is not an X25519 age identity "
                              f"({IDENTITY_PREFIX}...)")
        try:
            identities.append(x25519.Identity.from_str(line))
        except IdentityError:
            raise ConfigError(f"{what} {path}: key {number} is not a valid age "
                              "identity") from None
    if not identities:
        raise ConfigError(f"{what} {path}: no identity (AGE-SECRET-KEY-1...) in the file")
    return identities


def load_identities(identity_file: Path | None,
                    extra: Iterable[Path] = ()) -> list[x25519.Identity]:
    """Every identity a restore may try: ``[encryption] identity_file``, then each
    ``--identity`` (several: old backups keep opening with old keys)."""
    identities: list[x25519.Identity] = []
    if identity_file is not None:
        identities += read_identity_file(identity_file, "[encryption] identity_file")
    for path in extra:
        identities += read_identity_file(path, "--identity")
    return identities
