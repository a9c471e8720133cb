"""Run records on disk, shared by the daemon and `--run-now`.

Every run (success or not) updates ``<local.dir>/.mt5backupd-state.json`` under the run lock. The
daemon derives its metrics and /health from this file and the manifests at each scrape, so a run
made by another process shows up at once and nothing is lost across a daemon restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mt5backupd.fsutil import atomic_write_json

STATE_FILE = ".mt5backupd-state.json"
STATE_LOCK = ".mt5backupd-state.lock"
JOBS = ("database", "repository", "verify", "base")
# skipped: a test restore that could not run here (an encrypted backup, no identity)
RESULTS = ("success", "pending", "failure", "skipped")


@dataclass(frozen=True)
class RunRecord:
    job: str
    id: str
    started: str  # ISO 8601
    finished: str
    result: str  # success | pending (backup good, upload not done) | failure
    duration_s: float
    size: int = 0
    error: str = ""

    @property
    def succeeded(self) -> bool:
        """A complete, verified local backup was produced (the upload may still be pending)."""
        return self.result in ("success", "pending")


def load_state(directory: Path) -> dict[str, Any]:
    with contextlib.suppress(FileNotFoundError, ValueError):
        data = json.loads((directory / STATE_FILE).read_text())
        if isinstance(data, dict) and isinstance(data.get("jobs"), dict):
            return data
    return {"jobs": {}}


def job_state(state: dict[str, Any], job: str) -> dict[str, Any]:
    entry: dict[str, Any] = state["jobs"].setdefault(job, {})
    entry.setdefault("runs", {r: 0 for r in RESULTS})
    entry.setdefault("upload_retries", 0)
    entry.setdefault("uploaded_bytes", 0)
    return entry


def last_run(state: dict[str, Any], job: str, key: str = "last_run") -> RunRecord | None:
    raw = state["jobs"].get(job, {}).get(key)
    if not isinstance(raw, dict):
        return None
    try:
        return RunRecord(**raw)
    except TypeError:
        return None


def record_run(directory: Path, record: RunRecord, *, upload_retries: int = 0,
               uploaded_bytes: int = 0) -> None:
    """Add one run; a lock of its own serialises writers (daemon, `--run-now`, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / STATE_LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _record(directory, record, upload_retries, uploaded_bytes)


def _record(directory: Path, record: RunRecord, upload_retries: int,
            uploaded_bytes: int) -> None:
    state = load_state(directory)
    entry = job_state(state, record.job)
    entry["last_run"] = asdict(record)
    if record.result != "skipped":
        entry["last_checked"] = asdict(record)  # the last run that did its work
    if record.succeeded:
        entry["last_success"] = asdict(record)
    entry["runs"][record.result] = int(entry["runs"].get(record.result, 0)) + 1
    entry["upload_retries"] = int(entry["upload_retries"]) + upload_retries
    entry["uploaded_bytes"] = int(entry["uploaded_bytes"]) + uploaded_bytes
    atomic_write_json(directory / STATE_FILE, state, mode=0o640)


# What the last contact with the receiver found. "not_trusted" (TLS verification failed) is
# kept apart from "down" (unreachable, 5xx): one is an outage that heals, the other needs an
# operator.
RECEIVER_OK, RECEIVER_DOWN, RECEIVER_NOT_TRUSTED = "ok", "down", "not_trusted"


def record_receiver(directory: Path, status: str, error: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / STATE_LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = load_state(directory)
        state["receiver"] = {"status": status, "error": error,
                             "at": datetime.now(UTC).isoformat(timespec="seconds")}
        atomic_write_json(directory / STATE_FILE, state, mode=0o640)


def receiver_status(state: dict[str, Any]) -> tuple[str, str]:
    """(status, error) of the last contact with the receiver; ("", "") when none is known."""
    raw = state.get("receiver")
    if not isinstance(raw, dict):
        return "", ""
    return str(raw.get("status", "")), str(raw.get("error", ""))
