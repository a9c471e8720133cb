"""`mt5backupd list`, and which backup a reference a user typed names (``resolve``, pure).

A backup's id is its file name (``mt5_trading-20261125-030000.dump.zst``), locally and on the
receiver alike. Where a user types a reference, the id without its suffix (what earlier
versions printed, ``mt5_trading-20261125-030000``) and ``latest`` are accepted too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mt5backupd.backup import spool
from mt5backupd.backup.encryption import AGE_SUFFIX
from mt5backupd.backup.remote import receiver_client
from mt5backupd.config import Config
from mt5backupd.errors import ConfigError, Mt5BackupError

LATEST = "latest"
REMOTE = "remote"  # the upload column of a receiver's entry


@dataclass(frozen=True)
class BackupEntry:
    """One backup as `list` shows it, from a local manifest or the receiver's record."""

    id: str
    file: str  # == id; kept in the JSON for the scripts that read it
    kind: str
    size: int
    sha256: str
    created: str
    upload: str  # uploaded | pending | disabled | remote
    verify: str  # last test-restore result, "" when never verified
    recipients: tuple[str, ...] = ()  # the age recipients it was encrypted to, when known

    @property
    def encrypted(self) -> bool:
        return self.id.endswith(AGE_SUFFIX) or bool(self.recipients)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "file": self.file, "kind": self.kind, "size": self.size,
                "sha256": self.sha256, "created": self.created, "upload": self.upload,
                "verify": self.verify or None, "encrypted": self.encrypted,
                "recipients": list(self.recipients)}


def local_entries(cfg: Config) -> list[BackupEntry]:
    return [BackupEntry(m.id, m.file, m.kind, m.size, m.sha256, m.started, m.upload.state,
                        str(m.extra.get("verify", {}).get("result", "")), tuple(m.recipients))
            for m in spool.load_manifests(cfg.local.dir)]


async def remote_entries(cfg: Config) -> list[BackupEntry]:
    client = receiver_client(cfg)
    if client is None:
        raise ConfigError("[remote] url is not set: there is no receiver to list")
    async with client:
        records = await client.list_backups()  # validated: an id is safe as a file name
    entries = [BackupEntry(r.id, r.id, r.kind, r.size, r.sha256, r.created, REMOTE, "",
                           _recipients(r.metadata)) for r in records]
    return sorted(entries, key=lambda e: (e.created, e.file))


def _recipients(metadata: dict[str, Any]) -> tuple[str, ...]:
    """The recipients a receiver's record names (its client's manifest, sent at upload)."""
    encryption = metadata.get("encryption")
    if not isinstance(encryption, dict) or not isinstance(encryption.get("recipients"), list):
        return ()
    return tuple(str(r) for r in encryption["recipients"])


def format_table(entries: list[BackupEntry]) -> str:
    width = max([36, *(len(e.id) for e in entries)])
    lines = [f"{'ID':<{width}} {'KIND':<10} {'SIZE':>10} {'SHA256':<12} {'CREATED':<25} "
             f"{'UPLOAD':<9} {'VERIFY':<7} ENCRYPTED"]
    for e in entries:
        encrypted = (f"age ({len(e.recipients)} recipients)" if e.recipients
                     else "age" if e.encrypted else "no")
        lines.append(f"{e.id:<{width}} {e.kind:<10} {e.size / 1e6:>8.1f}MB "
                     f"{e.sha256[:12]:<12} {e.created[:25]:<25} {e.upload:<9} "
                     f"{e.verify or '-':<7} {encrypted}")
    return "\n".join(lines)


def resolve(entries: Sequence[BackupEntry], ref: str, where: str,
            kind: str = spool.KIND_DATABASE) -> BackupEntry:
    """The one backup of ``kind`` that ``ref`` names among ``entries`` (oldest first):
    ``latest``, an id, or an id without its suffix. Anything else (no match, a match of
    another kind, several matches) is an error that says what there is instead."""
    candidates = [e for e in entries if e.kind == kind]
    if not candidates:
        raise Mt5BackupError(f"no {kind} backups {where}")
    if ref == LATEST:
        return candidates[-1]
    named = [e for e in entries if e.id == ref] or \
        [e for e in entries if spool.stem_of(e.id) == ref]
    matches = [e for e in named if e.kind == kind]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise Mt5BackupError(f"{ref!r} names {len(matches)} backups {where}: "
                             f"{', '.join(e.id for e in matches)}; give one of them in full")
    if named:
        raise Mt5BackupError(f"{ref!r} is a {named[0].kind} backup, not a {kind} backup")
    raise Mt5BackupError(f"no {kind} backup {ref!r} {where}; newest is {candidates[-1].id!r}")
