"""Receiver tokens: random, shown once, stored only as SHA-256, compared in constant time.

Tokens carry 256 bits of randomness, so a plain SHA-256 is enough (no password stretching needed).
The file is re-read when it changes, so ``receiver token add`` takes effect without a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mt5backupd.config import Secret
from mt5backupd.errors import ConfigError
from mt5backupd.fsutil import atomic_write_json
from mt5backupd.names import InvalidName, validate_client_name

TOKEN_PREFIX = "mt5b_"
LEGACY_TOKEN_NAME = "default"
_EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


class Forbidden(Exception):
    """The token is valid but may not do this: another client's backups, an admin action.
    An authorization refusal (403), not a storage one."""

    reason = "forbidden"


@dataclass(frozen=True)
class Principal:
    name: str  # also the client's storage namespace
    admin: bool


@dataclass(frozen=True)
class TokenEntry:
    name: str
    digest: str  # sha256 hex of the token
    admin: bool
    created: str


def digest_token(token: str) -> str:
    """SHA-256 of the token's bytes. Header values arrive decoded with surrogateescape, so a
    token that is not UTF-8 (bytes ``ff fe fd``) holds lone surrogates: they are hashed back to
    their bytes instead of raising (a 500 anyone could trigger before authentication)."""
    try:
        raw = token.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates outside the escape range: still just a wrong token
        raw = token.encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).hexdigest()


def _read_entries(path: Path) -> list[TokenEntry]:
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return []
    except PermissionError:
        raise ConfigError(f"{path}: tokens file not readable (permission denied)") from None
    try:
        data = json.loads(raw)
        entries = [
            TokenEntry(str(e["name"]), str(e["sha256"]), bool(e.get("admin", False)),
                       str(e.get("created", "")))
            for e in data["tokens"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: tokens file is not valid ({exc.__class__.__name__})") from None
    return entries


def _check_file_mode(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o022:
        # Whoever can write this file can mint an admin token.
        raise ConfigError(f"{path}: tokens file is writable by group/others (mode {mode:04o}); "
                          f"run: chmod 600 {path}")


class TokenStore:
    """Authenticates bearer tokens against the tokens file plus the legacy env token."""

    def __init__(self, path: Path, legacy_token: Secret | None = None) -> None:
        self.path = path
        self._legacy = (
            TokenEntry(LEGACY_TOKEN_NAME, digest_token(legacy_token.reveal()), False, "env")
            if legacy_token
            else None
        )
        self._mtime_ns: int | None = None
        self._entries: list[TokenEntry] = []
        self.reload()

    def reload(self) -> None:
        _check_file_mode(self.path)
        try:
            self._mtime_ns = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._mtime_ns = None
        self._entries = _read_entries(self.path)

    def _maybe_reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime_ns:
            try:
                self.reload()
            except ConfigError:
                # Keep serving with the last good set; the operator sees it at the next start/check.
                self._mtime_ns = mtime

    @property
    def entries(self) -> list[TokenEntry]:
        all_entries = list(self._entries)
        if self._legacy and not any(e.name == LEGACY_TOKEN_NAME for e in all_entries):
            all_entries.append(self._legacy)
        return all_entries

    def authenticate(self, authorization: str | None) -> Principal | None:
        """Same work and the same answer for missing, malformed and wrong tokens."""
        self._maybe_reload()
        scheme, _, token = (authorization or "").partition(" ")
        well_formed = scheme.lower() == "bearer" and bool(token.strip())
        presented = digest_token(token.strip()) if well_formed else _EMPTY_DIGEST
        found: Principal | None = None
        for entry in self.entries:  # no early exit: timing does not tell which entry matched
            if hmac.compare_digest(presented, entry.digest) and well_formed:
                found = Principal(entry.name, entry.admin)
        return found


def add_token(path: Path, name: str, admin: bool) -> str:
    """Create a token named ``name``, store its hash, return the token (shown once)."""
    try:
        validate_client_name(name)
    except InvalidName as exc:
        raise ConfigError(f"token name {name!r}: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _check_file_mode(path)
        entries = _read_entries(path)
        if any(e.name == name for e in entries):
            raise ConfigError(f"{path}: a token named {name!r} exists; remove it first")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entries.append(TokenEntry(name, digest_token(token), admin,
                                  datetime.now(UTC).isoformat(timespec="seconds")))
        _write_entries(path, entries)
    return token


def remove_token(path: Path, name: str) -> bool:
    lock_path = path.with_name(f".{path.name}.lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read_entries(path)
        kept = [e for e in entries if e.name != name]
        if len(kept) == len(entries):
            return False
        _write_entries(path, kept)
    return True


def list_tokens(path: Path) -> list[TokenEntry]:
    return _read_entries(path)


def _write_entries(path: Path, entries: list[TokenEntry]) -> None:
    """Replace the file, keeping its owner: `token add` runs as root, the receiver as its own
    user, which must still be able to read the file afterwards."""
    try:
        st = path.stat()
        owner: tuple[int, int] | None = (st.st_uid, st.st_gid)
    except FileNotFoundError:
        owner = None
    atomic_write_json(
        path,
        {"tokens": [{"name": e.name, "sha256": e.digest, "admin": e.admin, "created": e.created}
                    for e in entries]},
        mode=0o600,
    )
    os.chmod(path, 0o600)
    if owner is not None and os.geteuid() == 0:
        os.chown(path, *owner)
