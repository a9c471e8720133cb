"""The typed wire contract: the JSON the client and the receiver exchange about a backup.

The receiver writes a ``BackupRecord`` as ``meta.json`` and answers list, commit and upload with
it; the client reads the same type back (``from_json`` refuses what does not fit, so a broken or
hostile answer fails as one clear error instead of a ``KeyError`` somewhere later). The answer to
"create an upload" is an ``UploadSession``. The ``sha256sum -c`` sidecar line both sides write
lives here too. Pure data, no I/O.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mt5backupd.names import (
    InvalidName,
    is_sha256_hex,
    validate_backup_id,
    validate_kind,
    validate_upload_id,
)


class InvalidRecord(ValueError):
    """JSON from the other side that is not a valid record; the message says which field."""


_TYPE_NAMES = {str: "a string", int: "an integer"}


def _field(data: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is no integer
        raise InvalidRecord(f"{what}: field {key!r} is missing or not {_TYPE_NAMES[kind]}")
    return value


@dataclass(frozen=True)
class BackupRecord:
    id: str  # the stored file name, e.g. mt5_trading-20261125-030000.dump.zst
    client: str
    name: str
    kind: str
    size: int
    sha256: str
    created: str  # ISO 8601 UTC
    metadata: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "client": self.client,
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.sha256,
            "created": self.created,
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: Any) -> BackupRecord:
        """A record as the receiver sent it; InvalidRecord names the first field that is wrong."""
        if not isinstance(data, dict):
            raise InvalidRecord("backup record is not a JSON object")
        what = "backup record"
        backup_id = _field(data, "id", str, what)
        try:
            validate_backup_id(backup_id)
        except InvalidName as exc:
            raise InvalidRecord(f"{what}: invalid id: {exc}") from None
        what = f"backup record {backup_id}"
        size = _field(data, "size", int, what)
        if size < 0:
            raise InvalidRecord(f"{what}: negative size")
        sha256 = _field(data, "sha256", str, what)
        if not is_sha256_hex(sha256):
            raise InvalidRecord(f"{what}: sha256 is not 64 lowercase hex digits")
        created = _field(data, "created", str, what)
        try:
            created_at = datetime.fromisoformat(created)
        except ValueError:
            raise InvalidRecord(f"{what}: created is not an ISO 8601 time") from None
        if created_at.tzinfo is None:
            raise InvalidRecord(f"{what}: created has no time zone")
        kind = _field(data, "kind", str, what)
        try:
            validate_kind(kind)
        except InvalidName as exc:
            raise InvalidRecord(f"{what}: invalid kind: {exc}") from None
        metadata = data.get("metadata")
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise InvalidRecord(f"{what}: metadata is not a JSON object")
        return cls(id=backup_id, client=_field(data, "client", str, what),
                   name=_field(data, "name", str, what), kind=kind,
                   size=size, sha256=sha256, created=created, metadata=metadata)

    def is_same(self, backup_id: str, sha256: str, size: int) -> bool:
        """The one rule for "this backup is already on the receiver": same id, bytes and size."""
        return self.id == backup_id and self.sha256 == sha256 and self.size == size

    @property
    def created_dt(self) -> datetime:
        return datetime.fromisoformat(self.created)

    @property
    def taken_dt(self) -> datetime:
        """When the backup was taken (the client's ``metadata.started``), else committed:
        backups uploaded late, after an outage, still belong to their own day."""
        started = self.metadata.get("started")
        if isinstance(started, str):
            with contextlib.suppress(ValueError):
                taken = datetime.fromisoformat(started)
                if taken.tzinfo is not None:
                    return taken
        return self.created_dt


def find_same(records: Iterable[BackupRecord], backup_id: str, sha256: str,
              size: int) -> BackupRecord | None:
    """The receiver's record of exactly this backup (``BackupRecord.is_same``), if any."""
    return next((r for r in records if r.is_same(backup_id, sha256, size)), None)


@dataclass(frozen=True)
class UploadSession:
    """The receiver's answer to "create an upload": where to send the bytes."""

    upload_id: str
    offset: int
    url: str

    def to_json(self) -> dict[str, Any]:
        return {"upload_id": self.upload_id, "offset": self.offset, "url": self.url}

    @classmethod
    def from_json(cls, data: Any) -> UploadSession:
        if not isinstance(data, dict):
            raise InvalidRecord("upload session is not a JSON object")
        what = "upload session"
        upload_id = _field(data, "upload_id", str, what)
        try:
            validate_upload_id(upload_id)
        except InvalidName as exc:
            raise InvalidRecord(f"{what}: {exc}") from None
        offset = _field(data, "offset", int, what)
        if offset < 0:
            raise InvalidRecord(f"{what}: negative offset")
        return cls(upload_id, offset, _field(data, "url", str, what))


def sidecar_line(sha256: str, file_name: str) -> str:
    """``<sha256>  <file>\\n``: the checksum file ``sha256sum -c`` accepts as is."""
    return f"{sha256}  {file_name}\n"


def parse_sidecar(text: str) -> tuple[str, str]:
    """(sha256, file name) of a sidecar written by ``sidecar_line`` (or by ``sha256sum``)."""
    sha256, sep, name = text.rstrip("\n").partition("  ")
    if not sep or not is_sha256_hex(sha256) or not name or "\n" in name:
        raise InvalidRecord("not a sha256sum line: '<64 hex digits>  <file name>'")
    return sha256, name
