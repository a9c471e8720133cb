"""pg_restore over any of our archive formats (age and zstd are decoded in a thread into its
stdin)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyrage import x25519

from mt5backupd.backup.childenv import child_env
from mt5backupd.backup.compress import decompress_file_to_fd, is_zstd_file
from mt5backupd.backup.encryption import decrypt_to_fd, is_age_file
from mt5backupd.errors import ArchiveUnreadableError, ConfigError, Mt5BackupError


def decode_file_to_fd(path: Path, write_fd: int,
                      identities: Sequence[x25519.Identity] = ()) -> int:
    """Blocking: the plain pg_dump archive in ``path`` (age decrypted, zstd decoded) to
    ``write_fd``."""
    if is_age_file(path):
        return decrypt_to_fd(path, write_fd, identities)
    return decompress_file_to_fd(path, write_fd)


async def run_pg_restore(
    pg_restore: str,
    archive: Path,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    identities: Sequence[x25519.Identity] = (),
) -> tuple[int, str, str]:
    """Run ``pg_restore ARGS`` on ``archive``; return (returncode, stdout, stderr).

    Plain custom-format files are passed by name (pg_restore can seek); zstd and age archives
    are streamed through a pipe, so nothing decoded ever touches the disk. A decoding failure
    (age authentication: the file was changed) is raised once pg_restore has ended, whatever
    pg_restore made of the cut stream.
    """
    streamed = is_zstd_file(archive) or is_age_file(archive)
    argv = [pg_restore, *args] + ([] if streamed else [str(archive)])
    read_fd = write_fd = -1
    if streamed:
        read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=read_fd if streamed else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else child_env(),
        )
    except OSError as exc:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        why = "not found" if isinstance(exc, FileNotFoundError) else \
            f"cannot be run ({exc.strerror or exc})"
        raise ConfigError(f"[database] pg_restore: {pg_restore!r} {why}") from None
    feeder: asyncio.Future[int] | None = None
    if streamed:
        os.close(read_fd)

        def feed() -> int:
            try:
                return decode_file_to_fd(archive, write_fd, identities)
            except BrokenPipeError:
                return -1  # pg_restore stopped reading; its exit status tells why
            finally:
                os.close(write_fd)

        feeder = asyncio.get_running_loop().run_in_executor(None, feed)
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled: do not leave pg_restore behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if feeder is not None:
            with contextlib.suppress(Exception):
                await feeder
    if feeder is not None and feeder.done() and not feeder.cancelled():
        error = feeder.exception()
        if isinstance(error, Mt5BackupError):
            raise error
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def failure_reason(returncode: int, stderr: str) -> str:
    """Why pg_restore failed, in one line: its last stderr line (where it says why), else the
    exit status."""
    text = stderr.strip()
    return text.splitlines()[-1] if text else f"exit status {returncode}"


async def list_archive(pg_restore: str, archive: Path,
                       identities: Sequence[x25519.Identity] = ()) -> list[str]:
    """The archive's table of contents; ArchiveUnreadableError when pg_restore cannot
    read it.

    This reads the header and the table of contents only, not the table data: it proves the
    file is a custom-format archive pg_restore accepts. That the data blocks are the bytes
    pg_dump wrote is what the sha256 (computed while writing) proves; that they restore is the
    job of a test restore."""
    rc, out, err = await run_pg_restore(pg_restore, archive, ["--list"],
                                        identities=identities)
    if rc != 0:
        raise ArchiveUnreadableError(f"pg_restore --list cannot read {archive.name}: "
                                     f"{failure_reason(rc, err)}")
    entries = [line for line in out.splitlines() if line and not line.startswith(";")]
    if not entries:
        raise ArchiveUnreadableError(f"pg_restore --list found no entries in {archive.name}")
    return entries
