"""Reading committed backups: records checked against their place, lists that skip what is not
ours, and the data opened safely. Nothing here writes."""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from mt5backupd.names import InvalidName, validate_client_name
from mt5backupd.receiver.storage.errors import BadEntry, InvalidId, NotFound
from mt5backupd.receiver.storage.layout import Layout, open_regular, read_small_json, real_subdirs
from mt5backupd.records import BackupRecord, InvalidRecord


def record_from_json(data: Any, client: str, backup_id: str) -> BackupRecord:
    """Check a meta.json against the wire rules and against its place: a record that names
    another backup or another client (copied or planted) is foreign."""
    try:
        record = BackupRecord.from_json(data)
    except InvalidRecord as exc:
        raise BadEntry(f"record is corrupt: {exc}") from None
    if record.id != backup_id or record.client != client:
        raise BadEntry("record names another backup or client")
    return record


class Records:
    """The committed backups under ``backups/``, read with the layout's confinement rules."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def read(self, client: str, backup_id: str) -> BackupRecord | None:
        """The record of a backup; None when there is none; BadEntry when what is there is not
        one of ours (a symlink, outside the root, foreign or corrupt)."""
        backup_dir = self.layout.backup_path(client, backup_id)
        if not os.path.lexists(backup_dir):
            return None
        if os.path.islink(backup_dir):
            raise BadEntry("backup directory is a symlink")
        meta = self.layout.confined(backup_dir / "meta.json")
        try:
            data = read_small_json(meta)
        except FileNotFoundError:
            return None
        return record_from_json(data, client, backup_id)

    def get(self, client: str, backup_id: str) -> BackupRecord:
        try:
            record = self.read(client, backup_id)
        except BadEntry as exc:
            self.layout.warn_once(f"backups/{client}/{backup_id}", str(exc))
            record = None
        if record is None:
            raise NotFound(f"backup {backup_id!r} not found")
        return record

    def clients(self) -> list[str]:
        return sorted(p.name for p in real_subdirs(self.layout.root / "backups"))

    def list_backups(self, client: str) -> list[BackupRecord]:
        """The client's backups, oldest first. A bad entry is skipped (and logged once), never
        a failure of the whole list."""
        try:
            validate_client_name(client)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None
        base = self.layout.root / "backups" / client
        if not os.path.lexists(base):
            return []
        warn_once = self.layout.warn_once
        if os.path.islink(base) or not base.is_dir():
            warn_once(f"backups/{client}", "client directory is not a real directory")
            return []
        records = []
        for entry in base.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                record = self.read(client, entry.name)
            except InvalidId:
                warn_once(f"backups/{client}/{entry.name[:100]!r}", "not a valid backup id")
                continue
            except BadEntry as exc:
                warn_once(f"backups/{client}/{entry.name}", str(exc))
                continue
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r.created, r.id))

    def open_data(self, client: str, backup_id: str) -> tuple[BackupRecord, BinaryIO]:
        record = self.get(client, backup_id)
        where = f"backups/{client}/{backup_id}/data"
        try:
            path = self.layout.confined(self.layout.backup_path(client, backup_id) / "data")
            fd = open_regular(path)
        except FileNotFoundError:
            self.layout.warn_once(where, "record without data")
            raise NotFound(f"backup {backup_id!r} not found") from None
        except BadEntry as exc:
            self.layout.warn_once(where, str(exc))
            raise NotFound(f"backup {backup_id!r} not found") from None
        return record, os.fdopen(fd, "rb")
