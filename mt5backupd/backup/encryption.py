"""age (age-encryption.org/v1, X25519) in the byte path, through pyrage: no crypto of our own.

Encrypting: ``EncryptingSink`` sits between the compressor and the spool file. pyrage's
streaming API pulls (``encrypt_io(reader, writer)``) while our producers push (the pump thread,
the tar writer), so pyrage runs in a thread of its own that reads what the producer writes
through a small bounded queue: memory stays a few MiB whatever the backup's size, and nothing
but ciphertext reaches the sink (the spool file's ``.partial`` included).

Decrypting: ``decode_file_to_fd`` streams a stored file (age, zstd, or plain) to a pipe as the
plain pg_dump archive, for pg_restore; ``check_opens`` proves, before any database is touched,
that one of the identities opens a file (age's header check).
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

import pyrage
import zstandard
from pyrage import x25519

from mt5backupd.backup.compress import BATCH_BYTES, READ_BYTES, ZSTD_MAGIC, Writable
from mt5backupd.errors import CheckFailedError, ConfigError

AGE_MAGIC = b"age-encryption.org/v1\n"
AGE_SUFFIX = ".age"
AGE_FORMAT = "age-encryption.org/v1"
QUEUE_ITEMS = 4  # producer writes of up to 1 MiB each: the stage holds a few MiB at most
_PUT_POLL_S = 0.5
_EOF = b""


class NoIdentityError(ConfigError):
    """An encrypted backup and no identity to open it: nothing was attempted."""


class WrongIdentityError(ConfigError):
    """None of the identities given opens the backup (age's header check)."""


class DecryptionFailedError(CheckFailedError):
    """age's authentication failed inside the stream: the ciphertext was changed."""


class _Aborted(Exception):
    """The producer failed: the encryption thread stops without finishing the stream."""


def is_age_file(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(len(AGE_MAGIC)) == AGE_MAGIC


def parse_recipients(recipients: Sequence[str]) -> list[x25519.Recipient]:
    """pyrage recipients of already checked ``age1...`` strings (config/encryption)."""
    return [x25519.Recipient.from_str(r) for r in recipients]


class _QueueReader:
    """The read side pyrage pulls from: the producer's writes, in order, then EOF."""

    def __init__(self, items: queue.Queue[bytes | None]) -> None:
        self._items = items
        self._current = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:
        while not self._current and not self._eof:
            item = self._items.get()
            if item is None:
                raise _Aborted
            if item == _EOF:
                self._eof = True
            self._current = memoryview(item)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(size if size > 0 else READ_BYTES)
        n = self.readinto(buffer)
        return bytes(buffer[:n])


class _Batching:
    """pyrage writes 64 KiB pieces; the spool file (hash, write(2), uploader wake-up) gets them
    gathered into ``BATCH_BYTES`` writes."""

    def __init__(self, sink: Writable) -> None:
        self._sink = sink
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        if len(self._buffer) >= BATCH_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            self._sink.write(self._buffer)
            self._buffer = bytearray()


class EncryptingSink:
    """A ``Writable`` whose bytes reach ``sink`` only as age ciphertext to ``recipients``.

    ``finish()`` ends the stream (age's last chunk) and raises what the encryption thread met
    (a full disk in the sink, say); ``abort()`` stops it without a last chunk. The producer's
    ``write`` raises the thread's error as soon as it is known, so a failed sink stops the dump.
    """

    def __init__(self, sink: Writable, recipients: Sequence[x25519.Recipient]) -> None:
        if not recipients:
            raise ValueError("no recipients")
        self._items: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_ITEMS)
        self._out = _Batching(sink)
        self._recipients = list(recipients)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="age-encrypt", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            pyrage.encrypt_io(cast("io.BufferedIOBase", _QueueReader(self._items)),
                              cast("io.BufferedIOBase", self._out), self._recipients)
            self._out.flush()
        except _Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the producer, which raises it
            self._error = exc
            self._drain()  # a producer blocked on a full queue must not wait forever

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._items.get_nowait()

    def _raise_error(self) -> None:
        error = self._error
        if error is not None:
            if isinstance(error, pyrage.EncryptError):
                raise OSError(f"age encryption failed: {error}") from None
            raise error

    def _put(self, item: bytes | None) -> None:
        while True:
            self._raise_error()
            if not self._thread.is_alive():
                return
            try:
                self._items.put(item, timeout=_PUT_POLL_S)
                return
            except queue.Full:
                continue

    def write(self, data: bytes | bytearray, /) -> int:
        if data:
            self._put(bytes(data))  # the producer may reuse its buffer
        return len(data)

    def finish(self) -> None:
        """Blocking: the last chunk is written and the thread is done."""
        self._put(_EOF)
        self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Blocking: stop the thread without ending the stream (the file is discarded)."""
        if self._thread.is_alive():
            self._drain()
            with contextlib.suppress(queue.Full):
                self._items.put(None, timeout=_PUT_POLL_S)
            self._thread.join(timeout=10.0)


class _FdWriter:
    """write(2) to a pipe, all of it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.written = 0
        # our own write failure (a full disk behind --jobs' file), kept because pyrage hands
        # it back as a bare OSError that would otherwise read as failed authentication
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.error = exc
            raise
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class _Decoding:
    """What age decrypts: zstd decoded when it is a zstd stream (sniffed from its first bytes),
    passed through otherwise (pg_dump's own gzip, no compression)."""

    def __init__(self, out: _FdWriter) -> None:
        self._out = out
        self._head = bytearray()
        self._target: Writable | None = None
        self._zstd: Any = None  # zstandard's stream writer (untyped)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._target is None:
            self._head += data
            if len(self._head) < len(ZSTD_MAGIC):
                return len(data)
            self._choose()
            assert self._target is not None
            head, self._head = bytes(self._head), bytearray()
            self._target.write(head)
            return len(data)
        self._target.write(bytes(data))
        return len(data)

    def _choose(self) -> None:
        if bytes(self._head[:len(ZSTD_MAGIC)]) == ZSTD_MAGIC:
            self._zstd = zstandard.ZstdDecompressor().stream_writer(
                cast("IO[bytes]", self._out), write_size=READ_BYTES, closefd=False)
            self._target = cast("Writable", self._zstd)
        else:
            self._target = self._out

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._target is None:
            self._choose()
            assert self._target is not None
            self._target.write(bytes(self._head))
        if self._zstd is not None:
            self._zstd.flush()


def decrypt_to_fd(path: Path, write_fd: int,
                  identities: Sequence[x25519.Identity]) -> int:
    """Blocking: the plain archive inside the age file ``path`` (zstd decoded) to ``write_fd``.
    DecryptionFailedError when age's authentication fails on the way (what was written before
    that point was authenticated, but the stream is incomplete)."""
    out = _FdWriter(write_fd)
    decoding = _Decoding(out)
    with path.open("rb") as src:
        try:
            pyrage.decrypt_io(cast("io.BufferedIOBase", src), cast("io.BufferedIOBase", decoding),
                              list(identities))
        except pyrage.DecryptError as exc:
            raise WrongIdentityError(f"{path.name}: no identity given opens it ({exc})") \
                from None
        except (BrokenPipeError, zstandard.ZstdError):
            raise
        except OSError as exc:
            if out.error is not None:  # the output failed (disk full, a closed pipe): say that
                raise out.error from None
            # pyrage reports a failed chunk authentication as OSError("decryption error")
            raise DecryptionFailedError(
                f"{path.name}: age authentication failed after {out.written} plain bytes "
                f"({exc.strerror or exc}): the file was changed after it was written; "
                "stopped") from None
    decoding.close()
    return out.written


class _HeaderOpened(Exception):
    """The first plaintext arrived: the header opened."""


class _StopAtFirstWrite:
    def writable(self) -> bool:
        return True

    def write(self, _data: bytes) -> int:
        raise _HeaderOpened

    def flush(self) -> None:
        pass


def check_opens(path: Path, identities: Sequence[x25519.Identity], *,
                name: str | None = None, recipients: Sequence[str] = ()) -> None:
    """Blocking: prove one of ``identities`` opens the age file ``path`` (the header, and the
    first chunk's authentication), reading no more than that. NoIdentityError without
    identities, WrongIdentityError when none opens it."""
    label = name or path.name
    if not identities:
        raise NoIdentityError(
            f"{label} is encrypted (age); give --identity PATH or set [encryption] "
            "identity_file; nothing was restored or touched")
    try:
        with path.open("rb") as src:
            pyrage.decrypt_io(cast("io.BufferedIOBase", src),
                              cast("io.BufferedIOBase", _StopAtFirstWrite()),
                              list(identities))
    except _HeaderOpened:
        return
    except pyrage.DecryptError:
        to = f"; it was encrypted to {', '.join(recipients)}" if recipients else ""
        raise WrongIdentityError(
            f"{label}: none of the {len(identities)} identities given opens it (age header "
            f"check){to}; nothing was restored or touched") from None
    except OSError as exc:
        raise DecryptionFailedError(f"{label}: age authentication failed in its first chunk "
                                    f"({exc.strerror or exc}); the file was changed") from None


def generate_identity() -> tuple[str, str]:
    """(identity text, recipient) of a new X25519 key."""
    identity = x25519.Identity.generate()
    return str(identity), str(identity.to_public())


def write_identity_file(path: Path, identity: str, recipient: str, created: str) -> None:
    """An ``age-keygen`` style file, 0600, never replacing an existing file."""
    text = f"# created: {created}\n# public key: {recipient}\n{identity}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(text.encode())
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        # a half-written key (disk full) would block the retry ("never overwrites") for nothing
        path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def plain_reader(path: Path,
                 identities: Sequence[x25519.Identity]) -> Iterator[IO[bytes]]:
    """The plain content of the age file ``path`` (zstd decoded) as a readable pipe, fed by a
    thread; the thread's failure (a changed file) is raised when the block ends."""
    read_fd, write_fd = os.pipe()
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            # a reader that stops early closes the pipe (BrokenPipeError): it says why itself
            with contextlib.suppress(BrokenPipeError):
                decrypt_to_fd(path, write_fd, identities)
        except BaseException as exc:  # noqa: BLE001 - raised in the reader's thread
            errors.append(exc)
        finally:
            os.close(write_fd)

    feeder = threading.Thread(target=feed, name="age-decrypt", daemon=True)
    feeder.start()
    reader = os.fdopen(read_fd, "rb")
    try:
        yield reader
    finally:
        reader.close()
        feeder.join()
    if errors:
        raise errors[0]
