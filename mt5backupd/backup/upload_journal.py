"""The receiver upload sessions this host opened and has not settled, so that a run killed
mid-upload (kill -9, power loss) never leaves an orphaned partial on the receiver: the next run
resumes the session when the local backup is complete, and aborts it otherwise.

The journal lives next to the backups (``<local.dir>/.mt5backupd-uploads.json``) and is only
written under the run lock.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mt5backupd.backup.spool import Manifest
from mt5backupd.fsutil import atomic_write_json

JOURNAL_FILE = ".mt5backupd-uploads.json"


def load(directory: Path) -> dict[str, str]:
    """Session id -> backup file name, oldest session first."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        data = json.loads((directory / JOURNAL_FILE).read_text())
        if isinstance(data, dict) and isinstance(data.get("sessions"), list):
            return {str(e["uid"]): str(e["file"]) for e in data["sessions"]
                    if isinstance(e, dict) and "uid" in e and "file" in e}
    return {}


def save(directory: Path, sessions: Mapping[str, str]) -> None:
    path = directory / JOURNAL_FILE
    if not sessions:
        path.unlink(missing_ok=True)
        return
    atomic_write_json(path, {"sessions": [{"uid": u, "file": f} for u, f in sessions.items()]})


def add(directory: Path, uid: str, file: str) -> None:
    sessions = load(directory)
    sessions[uid] = file
    save(directory, sessions)


def discard(directory: Path, uids: Iterable[str]) -> None:
    sessions = load(directory)
    gone = [u for u in uids if u in sessions]
    if gone:
        save(directory, {u: f for u, f in sessions.items() if u not in gone})


@dataclass
class Plan:
    resume: dict[str, str] = field(default_factory=dict)  # backup file -> session to resume
    abort: list[str] = field(default_factory=list)  # sessions to abort on the receiver
    settled: list[str] = field(default_factory=list)  # entries the manifests already carry


def plan(sessions: Mapping[str, str], manifests: Iterable[Manifest]) -> Plan:
    """What to do with each journalled session (pure). A complete local backup still pending
    and without a recorded session takes its newest journalled session (resumed, not sent
    again); every other session is an orphan: its backup is gone, uploaded or has another."""
    by_file = {m.file: m for m in manifests}
    result = Plan()
    for uid, file in sessions.items():  # oldest first: a later session of a file wins
        manifest = by_file.get(file)
        recorded = manifest.upload.session if manifest is not None else None
        if manifest is not None and manifest.pending and recorded == uid:
            result.settled.append(uid)
        elif manifest is not None and manifest.pending and recorded is None:
            if file in result.resume:
                result.abort.append(result.resume[file])
            result.resume[file] = uid
        else:
            result.abort.append(uid)
    return result
