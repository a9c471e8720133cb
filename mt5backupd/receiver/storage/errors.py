"""What storage refuses, and why. Each refusal has a stable ``reason`` label; the HTTP layer maps
the type (by its hierarchy) to a status, storage itself knows nothing of HTTP."""

from __future__ import annotations


class StorageError(Exception):
    """Base of refusals; ``reason`` is a stable label (metrics, JSON error bodies)."""

    reason = "error"


class NotFound(StorageError):
    reason = "not_found"


class Conflict(StorageError):
    reason = "conflict"


class BadRequest(StorageError):
    reason = "bad_request"


class InvalidId(BadRequest):
    reason = "invalid_id"


class RequestTimeout(StorageError):
    """The client stopped sending its body (idle past the body timeout)."""

    reason = "request_timeout"


class UploadBusy(StorageError):
    reason = "upload_busy"


class OffsetMismatch(StorageError):
    reason = "offset_mismatch"

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"offset {expected} does not match the upload's current offset {current}")
        self.current = current


class TooLarge(StorageError):
    reason = "too_large"


class InsufficientStorage(StorageError):
    reason = "insufficient_storage"


class ChecksumMismatch(StorageError):
    reason = "checksum_mismatch"

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch: client said {expected}, received data is {actual}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(StorageError):
    reason = "size_mismatch"

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"size mismatch: client said {expected} bytes, received {actual}")
        self.expected = expected
        self.actual = actual


class BadEntry(Exception):
    """A file under the root that is not what the receiver wrote: a symlink, a special file,
    something outside the root, or a record that does not match its place. Never served, and
    never a refusal of the request (the caller logs it and answers as if nothing were there)."""


class StoreUnavailable(StorageError):
    """The object store cannot be reached or answers with a server error: the request may
    succeed later (503 with Retry-After; the client keeps its backup pending and retries)."""

    reason = "store_unavailable"


class ObjectLocked(Conflict):
    """The backup is under Object Lock retention: no one may delete it before its date."""

    reason = "object_locked"
