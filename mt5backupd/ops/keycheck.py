"""`check`'s encryption lines: recipients parse, the identity (when configured) opens the
newest encrypted backup's header, and a warning when that identity sits beside the backups."""

from __future__ import annotations

import asyncio

from mt5backupd.backup import spool
from mt5backupd.backup.encryption import check_opens
from mt5backupd.config import Config
from mt5backupd.config.encryption import load_identities
from mt5backupd.errors import Mt5BackupError
from mt5backupd.ops.checks_model import Check


def _short(recipient: str) -> str:
    return f"{recipient[:12]}…{recipient[-6:]}"


async def encryption_checks(cfg: Config) -> list[Check]:
    enc = cfg.encryption
    results: list[Check] = []
    if enc.enabled:  # parsed and checked at load; a malformed one never gets here
        results.append(Check("encryption", True, f"age to {len(enc.recipients)} recipient(s): "
                             + ", ".join(_short(r) for r in enc.recipients)))
    else:
        results.append(Check("encryption", True, "off: backups are stored and uploaded in "
                             "clear (set [encryption] recipients)", warning=True))
    if enc.identity_file is None:
        return results
    encrypted = [m for m in spool.load_manifests(cfg.local.dir) if m.encrypted]
    try:
        identities = load_identities(enc.identity_file)
        if encrypted:
            newest = encrypted[-1]
            await asyncio.to_thread(check_opens, cfg.local.dir / newest.file, identities,
                                    name=newest.id, recipients=newest.recipients)
            results.append(Check("identity", True, f"{enc.identity_file} opens {newest.id}"))
        else:
            results.append(Check("identity", True, f"{enc.identity_file}: "
                                 f"{len(identities)} identity(ies); no encrypted backup here "
                                 "to open"))
    except (Mt5BackupError, OSError) as exc:
        results.append(Check("identity", False, str(exc), "give the identity whose recipient "
                             "is in the backup's manifest (mt5backupd list --json)"))
    if encrypted or enc.enabled:
        results.append(Check(
            "identity location", True, f"{enc.identity_file} is on the host that holds the "
            "backups it opens: whoever gets this disk reads them; right on a restore-drill "
            "host, otherwise keep the identity only where restores run", warning=True))
    return results
