"""What a backup run reports: the live hooks (RunObserver) and the outcome (BackupResult)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mt5backupd.backup.upload_state import UPLOAD_PENDING


@dataclass
class RunObserver:
    """Hooks for live progress (TTY line, daemon metrics); all optional."""

    on_uploaded_bytes: Callable[[int], None] = field(default=lambda _n: None)
    on_upload_retry: Callable[[], None] = field(default=lambda: None)


@dataclass
class BackupResult:
    ok: bool
    exit_code: int
    id: str = ""  # the backup's id: its file name, as in the manifest and on the receiver
    file: Path | None = None
    size: int = 0
    raw_bytes: int = 0
    sha256: str = ""
    compression: str = ""
    duration_s: float = 0.0
    dump_duration_s: float = 0.0
    upload_state: str = ""
    upload_retries: int = 0
    uploaded_bytes: int = 0
    resumed_at: list[int] = field(default_factory=list)
    size_anomaly: bool = False
    pending_uploaded: int = 0
    rotated: list[str] = field(default_factory=list)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "exit_code": self.exit_code, "id": self.id,
            "file": str(self.file) if self.file else None, "size": self.size,
            "raw_bytes": self.raw_bytes, "sha256": self.sha256, "compression": self.compression,
            "duration_s": round(self.duration_s, 3),
            "dump_duration_s": round(self.dump_duration_s, 3),
            "upload_state": self.upload_state, "upload_retries": self.upload_retries,
            "uploaded_bytes": self.uploaded_bytes, "resumed_at": self.resumed_at,
            "size_anomaly": self.size_anomaly,
            "pending_uploaded": self.pending_uploaded, "rotated": self.rotated,
            "error": self.error or None,
        }

    def summary(self) -> str:
        if not self.ok:
            return f"backup FAILED: {self.error}"
        mb = 1e6
        rate = self.raw_bytes / mb / self.dump_duration_s if self.dump_duration_s else 0.0
        lines = [
            f"backup {self.id}  OK" + ("  (upload PENDING)" if self.upload_state == UPLOAD_PENDING
                                       else ""),
            f"  file      {self.file}",
            f"  size      {self.size / mb:.1f} MB ({self.compression}; pg_dump output "
            f"{self.raw_bytes / mb:.1f} MB)",
            f"  sha256    {self.sha256}",
            f"  duration  {self.duration_s:.1f} s (pg_dump {self.dump_duration_s:.1f} s, "
            f"{rate:.1f} MB/s)",
            f"  upload    {self.upload_state}"
            + (f" ({self.upload_retries} retries)" if self.upload_retries else ""),
        ]
        if self.error:  # a good local backup, but e.g. the receiver is not trusted
            lines.append(f"  ERROR     {self.error}")
        if self.size_anomaly:
            lines.append("  WARNING   size anomaly: less than half of the previous backup")
        if self.pending_uploaded:
            lines.append(f"  pending   {self.pending_uploaded} earlier backup(s) uploaded first")
        if self.rotated:
            lines.append(f"  rotated   {', '.join(self.rotated)}")
        return "\n".join(lines)
