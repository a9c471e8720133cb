"""Removing committed backups: one by an admin, or many by a retention policy. Blocking
filesystem work (rename, rmtree): the HTTP layer calls it from a worker thread."""

from __future__ import annotations

import os
import secrets
import shutil
import threading

from mt5backupd.fsutil import fsync_dir
from mt5backupd.receiver.storage.errors import NotFound
from mt5backupd.receiver.storage.reading import Records
from mt5backupd.records import BackupRecord
from mt5backupd.retention import Item, Policy, select_remove_by_kind


class Pruner:
    def __init__(self, records: Records) -> None:
        self.records = records
        self.layout = records.layout
        # auto-retention after a commit and the admin routes run in worker threads: one removal
        # at a time, so two of them never pick the same backup and collide on its rename
        self._lock = threading.Lock()

    def delete(self, client: str, backup_id: str) -> BackupRecord:
        with self._lock:
            return self._delete(client, backup_id)

    def _delete(self, client: str, backup_id: str) -> BackupRecord:
        record = self.records.get(client, backup_id)
        dest = self.layout.backup_dir(client, backup_id)
        trash = self.layout.root / "trash" / secrets.token_hex(16)
        try:
            os.rename(dest, trash)  # disappears atomically, then is removed at leisure
        except FileNotFoundError:
            raise NotFound(f"backup {backup_id!r} not found") from None
        fsync_dir(dest.parent)
        shutil.rmtree(trash, ignore_errors=True)
        return record

    def prune(self, client: str, policy: Policy, *, dry_run: bool = False) -> list[BackupRecord]:
        """Apply ``policy`` to each kind of ``client``'s backups; return what was (or would be)
        removed. The newest backup of each kind always stays."""
        policy.validate()
        with self._lock:
            return self._prune(client, policy, dry_run)

    def _prune(self, client: str, policy: Policy, dry_run: bool) -> list[BackupRecord]:
        by_kind: dict[str, list[BackupRecord]] = {}
        for record in self.records.list_backups(client):
            by_kind.setdefault(record.kind, []).append(record)
        removed: list[BackupRecord] = []
        by_id = {r.id: r for records in by_kind.values() for r in records}
        items = {kind: [Item(r.id, r.taken_dt) for r in records]
                 for kind, records in by_kind.items()}
        for backup_id in select_remove_by_kind(items, policy):  # WAL goes with base backups
            if not dry_run:
                self._delete(client, backup_id)
            removed.append(by_id[backup_id])
        return removed
