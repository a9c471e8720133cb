"""backup/drain: a writer's early bytes kept in a scratch file until the reader takes over; every
byte once and in order, whatever the bound, the timing or a full disk."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mt5backupd.backup.drain import EarlyDrain
from tests.diskfaults import small_tmpfs
from tests.waits import wait_until_sync

MiB = 1024 * 1024


def pattern(size_bytes: int) -> bytes:
    """Bytes where a lost, repeated or swapped piece changes the digest."""
    out = bytearray()
    counter = 0
    while len(out) < size_bytes:
        out += hashlib.sha256(counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size_bytes])


def writer(size_bytes: int, *,
           hold_after_bytes: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """A real process writing ``pattern(size_bytes)`` into a pipe; (process, read fd). With
    ``hold_after_bytes`` it writes that much, then waits for a line on stdin before the rest."""
    read_fd, write_fd = os.pipe()
    script = (
        "import sys, hashlib\n"
        f"sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "from tests.test_drain import pattern\n"
        f"data = pattern({size_bytes})\n"
        f"hold = {hold_after_bytes!r}\n"
        "out = sys.stdout.buffer\n"
        "if hold is not None:\n"
        "    out.write(data[:hold]); out.flush(); sys.stdin.readline(); data = data[hold:]\n"
        "out.write(data); out.flush()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=write_fd,
                            stdin=subprocess.PIPE)
    os.close(write_fd)
    return proc, read_fd


def read_all(read: Callable[[int], bytes]) -> bytes:
    out = bytearray()
    while chunk := read(256 * 1024):
        out += chunk
    return bytes(out)


def test_every_byte_once_in_order(tmp_path: Path) -> None:
    """The reader gets the drained bytes, then the pipe's, exactly the writer's stream."""
    proc, read_fd = writer(6 * MiB, hold_after_bytes=2 * MiB)
    drain = EarlyDrain(read_fd, tmp_path)
    wait_until_sync(lambda: drain.drained_bytes == 2 * MiB, 10, "2 MiB drained")
    read = drain.stop()
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    assert read_all(read) == pattern(6 * MiB)
    assert proc.wait(timeout=10) == 0
    os.close(read_fd)
    assert list(tmp_path.iterdir()) == []  # the scratch file never had a name


def test_bounded_drain_leaves_the_rest_in_the_pipe(tmp_path: Path) -> None:
    """At max_bytes the drain stops reading: the writer waits on its pipe, nothing is lost."""
    proc, read_fd = writer(4 * MiB)
    drain = EarlyDrain(read_fd, tmp_path, max_bytes=1 * MiB)
    wait_until_sync(lambda: drain.drained_bytes == 1 * MiB, 10, "1 MiB drained")
    assert proc.poll() is None  # blocked on the full pipe
    assert read_all(drain.stop()) == pattern(4 * MiB)
    assert proc.wait(timeout=10) == 0
    os.close(read_fd)


def test_writer_done_before_the_reader_came(tmp_path: Path) -> None:
    """A writer that finished into the drain: its bytes, then end of stream."""
    proc, read_fd = writer(3 * MiB)
    drain = EarlyDrain(read_fd, tmp_path)
    assert proc.wait(timeout=10) == 0
    wait_until_sync(lambda: drain.eof, 10, "end of stream drained")
    read = drain.stop()
    assert read_all(read) == pattern(3 * MiB)
    assert read(1024) == b""
    os.close(read_fd)


def test_full_disk_loses_no_byte(tmp_path: Path) -> None:
    """The scratch disk fills up mid-drain: what the file refused is handed over after it, the
    rest comes from the pipe; the stream is intact."""
    with small_tmpfs(tmp_path / "small", 1 * MiB) as small:
        proc, read_fd = writer(5 * MiB, hold_after_bytes=3 * MiB)
        drain = EarlyDrain(read_fd, small)
        wait_until_sync(lambda: not drain._thread.is_alive(), 10, "drain stopped by ENOSPC")
        assert drain.drained_bytes <= 1 * MiB
        read = drain.stop()
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert read_all(read) == pattern(5 * MiB)
        assert proc.wait(timeout=10) == 0
        os.close(read_fd)


@pytest.mark.parametrize("stop_first", [True, False])
def test_close_ends_the_thread_and_the_file(tmp_path: Path, stop_first: bool) -> None:
    """close() (a run that never pumps) ends the thread and drops the file, after stop or not."""
    proc, read_fd = writer(1 * MiB, hold_after_bytes=512 * 1024)
    drain = EarlyDrain(read_fd, tmp_path)
    if stop_first:
        drain.stop()
    drain.close()
    drain.close()  # idempotent
    assert not drain._thread.is_alive()
    proc.kill()
    proc.wait(timeout=10)
    os.close(read_fd)
