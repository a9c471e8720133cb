"""Validation of names that arrive from URLs, tokens and config (pure, no I/O).

A backup id becomes a directory name on the receiver, so it is held to a strict alphabet rather than
"cleaned": anything outside it is refused, which makes traversal (``..``, separators, NUL,
absolute paths, encoded forms after decoding) impossible by construction.
"""

from __future__ import annotations

import re

MAX_ID_LEN = 200
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_CLIENT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")
SIDECAR_SUFFIX = ".sha256"


class InvalidName(ValueError):
    """The value is not acceptable for its role; the message says why without echoing junk."""


def validate_backup_id(value: str) -> str:
    if not value or len(value) > MAX_ID_LEN:
        raise InvalidName(f"backup id must be 1..{MAX_ID_LEN} characters")
    if not _ID_RE.fullmatch(value):
        raise InvalidName("backup id may contain only letters, digits and . _ + - (no leading dot)")
    if ".." in value:
        raise InvalidName("backup id must not contain '..'")
    if value.endswith(SIDECAR_SUFFIX):
        raise InvalidName(f"backup id must not end in {SIDECAR_SUFFIX} (reserved for checksums)")
    return value


def validate_client_name(value: str) -> str:
    if not _CLIENT_RE.fullmatch(value):
        raise InvalidName("client name must be 1..64 of a-z 0-9 _ - (first: a letter or digit)")
    return value


def validate_kind(value: str) -> str:
    if not _KIND_RE.fullmatch(value):
        raise InvalidName("kind must be 1..32 of a-z 0-9 _ - starting with a letter")
    return value


def validate_upload_id(value: str) -> str:
    if not _UPLOAD_ID_RE.fullmatch(value):
        raise InvalidName("upload id must be 32 lowercase hex digits")
    return value


def is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
