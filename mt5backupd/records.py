"""The typed wire contract: the JSON the client and the receiver exchange about a backup.

The receiver writes a ``BackupRecord`` as ``meta.json`` and answers list, commit and upload with
it; the client reads the same type back. Pure data, no I/O.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class BackupRecord:
    id: str
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
