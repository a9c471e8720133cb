"""Where things live in the bucket, and the ETag S3 gives a completed multipart upload. Pure.

Under ``prefix``::

    backups/<client>/<id>/data          committed bytes (complete only by a conditional write)
    backups/<client>/<id>/meta.json     the record: written after the data; its presence is
                                        what makes a backup visible
    sessions/<client>/<uid>/state.json  a resumable upload: S3 upload id, parts, hash state
    sessions/<client>/<uid>/tail-<rnd>  bytes past the last part (< 5 MiB), between requests
    tmp/<client>/<rnd>                  a one-shot (legacy) upload before it is published
    preflight/<rnd>                     the start-up write test, removed at once
"""

from __future__ import annotations

import hashlib

from mt5backupd.names import (
    InvalidName,
    validate_backup_id,
    validate_client_name,
    validate_upload_id,
)
from mt5backupd.receiver.storage.errors import InvalidId

RECORD_NAME = "meta.json"
DATA_NAME = "data"


def multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 (and MinIO, Ceph, moto) gives the object a multipart upload completed with
    these parts: md5 of the parts' binary md5s, then ``-N``. It tells a replica whether the
    object under a name is the one its own session completed."""
    joined = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags)
    return f'"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(part_etags)}"'


def _checked(client: str, backup_id: str | None = None, uid: str | None = None) -> None:
    try:
        validate_client_name(client)
        if backup_id is not None:
            validate_backup_id(backup_id)
        if uid is not None:
            validate_upload_id(uid)
    except InvalidName as exc:
        raise InvalidId(str(exc)) from None


class Keys:
    def __init__(self, prefix: str) -> None:
        self.root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""

    @property
    def backups(self) -> str:
        return f"{self.root}backups/"

    @property
    def sessions(self) -> str:
        return f"{self.root}sessions/"

    def client_backups(self, client: str) -> str:
        _checked(client)
        return f"{self.backups}{client}/"

    def data(self, client: str, backup_id: str) -> str:
        _checked(client, backup_id)
        return f"{self.backups}{client}/{backup_id}/{DATA_NAME}"

    def record(self, client: str, backup_id: str) -> str:
        _checked(client, backup_id)
        return f"{self.backups}{client}/{backup_id}/{RECORD_NAME}"

    def session_dir(self, client: str, uid: str) -> str:
        _checked(client, uid=uid)
        return f"{self.sessions}{client}/{uid}/"

    def session_state(self, client: str, uid: str) -> str:
        return self.session_dir(client, uid) + "state.json"

    def session_tail(self, client: str, uid: str, token: str) -> str:
        return self.session_dir(client, uid) + f"tail-{token}"

    def temp(self, client: str, token: str) -> str:
        _checked(client)
        return f"{self.root}tmp/{client}/{token}"

    def preflight(self, token: str) -> str:
        return f"{self.root}preflight/{token}"

    def split_backup_key(self, key: str) -> tuple[str, str, str] | None:
        """``(client, id, name)`` of a key under backups/, None for anything else."""
        if not key.startswith(self.backups):
            return None
        parts = key[len(self.backups):].split("/")
        if len(parts) != 3:
            return None
        return parts[0], parts[1], parts[2]
