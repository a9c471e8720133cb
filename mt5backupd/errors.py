"""One exception base for everything the CLI reports as a one-line error with an exit code.

Exit codes are part of the contract (documented in docs/cli.md); never renumber them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # the run failed; nothing new is presented as a backup
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_PENDING = 3  # local backup good, upload still pending
EXIT_CONFIG = 4  # config, secret file or permission problem; nothing was attempted
EXIT_LOCKED = 5  # another run holds the lock
EXIT_VERIFY = 6  # a verification/check failed (checksum, test restore, self-check)


class Mt5BackupError(Exception):
    """Base of all expected failures; ``str(err)`` is the one line shown to the operator."""

    exit_code = EXIT_FAILURE


class ConfigError(Mt5BackupError):
    """Bad config value, unknown key, unreadable or unprotected secret file."""

    exit_code = EXIT_CONFIG


class UsageError(Mt5BackupError):
    """A command line that argparse accepts but that does not make sense (exit 2)."""

    exit_code = EXIT_USAGE


class LockHeldError(Mt5BackupError):
    exit_code = EXIT_LOCKED


class CheckFailedError(Mt5BackupError):
    """A check of a backup failed: its bytes, its readability, or a test restore."""

    exit_code = EXIT_VERIFY


class ChecksumMismatchError(CheckFailedError):
    """A backup file's sha256 is not the one recorded when it was written."""


class ArchiveUnreadableError(CheckFailedError):
    """pg_restore or tar cannot read a backup archive back."""


class VerifyError(CheckFailedError):
    """A test restore failed: the restored database is not the one that was dumped."""


class UploadPendingError(Mt5BackupError):
    """The local backup is complete and verified but could not be uploaded yet."""

    exit_code = EXIT_PENDING
