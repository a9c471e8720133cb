"""pg_dump's first bytes kept in a scratch file until the pump takes over.

pg_dump starts before the run's preflight (backup/runstart) and finishes its catalog phase in
well under the ~0.2 s the preflight and ``--run-now``'s imports take; after that it would block
on its full pipe. A thread moves what it writes into an unlinked file in the backup directory
(page cache, not our heap) until the pump is ready; the pump then reads that file first, then the
pipe. Bounded by ``max_bytes`` (a slow preflight makes pg_dump wait again, as without the
drain); a byte read from the pipe is never lost: one the file could not take (disk full) is
kept and handed over after the file, and the spool write fails on that disk anyway.
"""

from __future__ import annotations

import contextlib
import os
import select
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from mt5backupd.errors import Mt5BackupError

DRAIN_MAX_BYTES = 256 * 1024 * 1024
READ_BYTES = 1024 * 1024
POLL_S = 0.05  # how soon the thread sees the pump's "stop"
JOIN_TIMEOUT_S = 30.0  # a drain thread that does not end by then is stuck in a write


class EarlyDrain:
    """Started on the read end of pg_dump's pipe; ``stop`` (blocking) ends the thread and
    returns the read function for the pump: the drained bytes, then the pipe."""

    def __init__(self, read_fd: int, directory: Path, max_bytes: int = DRAIN_MAX_BYTES) -> None:
        self.read_fd = read_fd
        self.directory = directory
        self.max_bytes = max_bytes
        self.drained_bytes = 0
        self.eof = False
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed by stop/close
        self._unwritten = b""  # read from the pipe, refused by the file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self._file.fileno()
        poller = select.poll()  # not select(): any fd number
        poller.register(self.read_fd, select.POLLIN)
        while not self._stop.is_set() and self.drained_bytes < self.max_bytes:
            if not poller.poll(POLL_S * 1000):
                continue
            chunk = os.read(self.read_fd, min(READ_BYTES, self.max_bytes - self.drained_bytes))
            if not chunk:
                self.eof = True
                return
            view = memoryview(chunk)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                self._unwritten = bytes(view)
                self.drained_bytes += len(chunk) - len(view)
                return
            self.drained_bytes += len(chunk)

    def stop(self) -> Callable[[int], bytes]:
        """End the drain (waits up to one poll) and return ``read(n)``: the drained bytes in
        order, then whatever else pg_dump writes to the pipe."""
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT_S)
        if self._thread.is_alive():  # a write stuck on a hung disk: no safe hand-over
            raise Mt5BackupError(f"pg_dump's early output could not be taken over from its "
                               f"scratch file in {self.directory} within {JOIN_TIMEOUT_S:.0f} s "
                               "(a hung disk?)")
        fd = self._file.fileno()
        os.lseek(fd, 0, os.SEEK_SET)
        pending = [self._unwritten] if self._unwritten else []
        in_file = True

        def read(n: int) -> bytes:
            nonlocal in_file
            if in_file:
                data = os.read(fd, n)
                if data:
                    return data
                in_file = False
                self.close()
            if pending:
                return pending.pop(0)
            return b"" if self.eof else os.read(self.read_fd, n)

        return read

    def close(self) -> None:
        """Stop the thread if it runs and drop the scratch file (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(JOIN_TIMEOUT_S)
        if not self._thread.is_alive():  # else the stuck thread still owns it; it is unlinked
            with contextlib.suppress(OSError):
                self._file.close()
