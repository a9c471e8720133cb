"""What became of a local backup's upload: the ``upload`` object of its manifest (pure).

The JSON is the one manifests have always carried (``{"state": "pending", "session": ...}``,
``{"state": "uploaded", "remote_id": ..., "uploaded_at": ..., "retries": n}``,
``{"state": "disabled"}``), so manifests written by earlier versions load unchanged. Fields that
do not apply are left out rather than written as null; readers treat the two alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

UPLOAD_UPLOADED = "uploaded"
UPLOAD_PENDING = "pending"
UPLOAD_DISABLED = "disabled"  # no [remote] configured


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class UploadState:
    state: str
    session: str | None = None  # receiver upload session to resume (pending only)
    remote_id: str | None = None  # the receiver's id of the backup (uploaded only)
    uploaded_at: str | None = None  # ISO 8601 UTC (uploaded only)
    retries: int | None = None  # retries the upload needed (uploaded only)
    error: str | None = None  # why it is still pending

    @classmethod
    def pending(cls, session: str | None = None, error: str | None = None) -> UploadState:
        return cls(UPLOAD_PENDING, session=session, error=error)

    @classmethod
    def uploaded(cls, remote_id: str, retries: int, uploaded_at: str | None = None
                 ) -> UploadState:
        return cls(UPLOAD_UPLOADED, remote_id=remote_id, retries=retries,
                   uploaded_at=uploaded_at or _now_iso())

    @classmethod
    def disabled(cls) -> UploadState:
        return cls(UPLOAD_DISABLED)

    @classmethod
    def initial(cls, remote_configured: bool) -> UploadState:
        """A new backup's state before any upload outcome is known."""
        return cls.pending() if remote_configured else cls.disabled()

    @property
    def is_pending(self) -> bool:
        return self.state == UPLOAD_PENDING

    def with_session(self, session: str | None) -> UploadState:
        return UploadState(self.state, session, self.remote_id, self.uploaded_at, self.retries,
                           self.error)

    def to_json(self) -> dict[str, Any]:
        fields = {"state": self.state, "session": self.session, "remote_id": self.remote_id,
                  "uploaded_at": self.uploaded_at, "retries": self.retries, "error": self.error}
        return {k: v for k, v in fields.items() if v is not None}

    @classmethod
    def from_json(cls, data: Any) -> UploadState:
        """Lenient on purpose: a manifest is ours, and a field of the wrong type is dropped
        rather than making the whole backup invisible."""
        if not isinstance(data, dict):
            return cls.pending()

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) else None

        retries = data.get("retries")
        return cls(state=text("state") or UPLOAD_PENDING, session=text("session"),
                   remote_id=text("remote_id"), uploaded_at=text("uploaded_at"),
                   retries=retries if isinstance(retries, int) and not isinstance(retries, bool)
                   else None,
                   error=text("error"))
