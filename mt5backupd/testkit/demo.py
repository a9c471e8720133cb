"""`mt5backupd demo`: the whole product on a throwaway PostgreSQL, end to end, then cleaned up.

A generated MT5-like database, a real receiver on loopback, a new age key, one real encrypted
backup through the normal run path, the receiver's copy (ciphertext) downloaded, hash-checked,
refused without the identity, then decrypted and restored into a scratch database, and the row
counts compared with the source.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from mt5backupd.backup.encryption import (
    AGE_MAGIC,
    NoIdentityError,
    generate_identity,
    write_identity_file,
)
from mt5backupd.backup.run import run_backup
from mt5backupd.config import (
    Config,
    DatabaseConfig,
    EncryptionConfig,
    LocalConfig,
    ReceiverConfig,
    RemoteConfig,
)
from mt5backupd.errors import EXIT_FAILURE, EXIT_OK, CheckFailedError, VerifyError
from mt5backupd.fsutil import atomic_write_bytes
from mt5backupd.ops.restore import restore
from mt5backupd.receiver.auth import TokenStore, add_token
from mt5backupd.receiver.server import start_receiver
from mt5backupd.testkit.dbcontent import table_row_counts
from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.sampledata import generate

SOURCE_DB = "mt5_trading"
CHECK_DB = "mt5_restore_check"


async def run_demo(*, size_bytes: int, keep_dir: Path | None, as_json: bool) -> int:
    base = keep_dir or Path(tempfile.mkdtemp(prefix="mt5backupd-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    say = (lambda _m: None) if as_json else print
    report: dict[str, object] = {"dir": str(base)}
    try:
        say(f"demo: working in {base}")
        pg = await asyncio.to_thread(PgCluster.create, base / "pg")
        with pg:
            await asyncio.to_thread(pg.create_database, SOURCE_DB)
            t0 = time.monotonic()
            source_counts = await generate(pg.dsn(SOURCE_DB), target_bytes=size_bytes)
            say(f"demo: PostgreSQL {pg.server_version()} on port {pg.port}, generated "
                f"{sum(source_counts.values())} rows in {len(source_counts)} tables "
                f"({time.monotonic() - t0:.1f} s)")

            receiver_cfg = ReceiverConfig(listen_host="127.0.0.1", listen_port=0,
                                          data_dir=base / "receiver",
                                          tokens_file=base / "receiver-tokens.json",
                                          min_free_bytes=0)
            token = add_token(receiver_cfg.tokens_file, "demo", admin=False)
            token_file = base / "remote-token"
            atomic_write_bytes(token_file, token.encode(), mode=0o600)
            identity, recipient = generate_identity()
            key_file = base / "restore-host-identity.txt"  # in real life: not on this host
            write_identity_file(key_file, identity, recipient, "demo")
            say(f"demo: new age identity {key_file} (0600); backups are encrypted to "
                f"{recipient}")
            receiver = await start_receiver(receiver_cfg, TokenStore(receiver_cfg.tokens_file))
            try:
                say(f"demo: receiver listening on {receiver.url}")
                cfg = Config(
                    database=DatabaseConfig(host=pg.host, port=pg.port, user=pg.user,
                                            dbname=SOURCE_DB, pg_dump=str(pg.bin_dir / "pg_dump"),
                                            pg_restore=str(pg.bin_dir / "pg_restore")),
                    local=LocalConfig(dir=base / "backups", keep=3),
                    remote=RemoteConfig(url=receiver.url, token_file=token_file,
                                        retry_delay_s=0.5),
                    encryption=EncryptionConfig(recipients=(recipient,)),
                )
                result = await run_backup(cfg)
                say(result.summary())
                report["backup"] = result.to_json()
                if not result.ok:
                    return result.exit_code

                stored = sorted((base / "receiver").rglob("data"))
                if not stored or not stored[-1].read_bytes().startswith(AGE_MAGIC):
                    raise VerifyError("the receiver's copy is not age ciphertext")
                say("demo: the receiver holds ciphertext only (age-encryption.org/v1)")
                try:
                    await restore(cfg, "latest", CHECK_DB, source="remote", create=True)
                    raise VerifyError("an encrypted backup restored without an identity")
                except NoIdentityError as exc:
                    say(f"demo: without the identity, restore refuses: {exc}")
                # the product's own restore: download, sha256 check, age header check, restore
                restored = await restore(cfg, "latest", CHECK_DB, source="remote", create=True,
                                         identity_files=[key_file])
                say(f"demo: receiver's copy downloaded, sha256 matches ({restored.sha256[:16]}"
                    "...), decrypted with the identity")
            finally:
                await receiver.close()
            restored_counts = await table_row_counts(pg.dsn(CHECK_DB))
            restore_s = restored.restore_s
            report["source_rows"] = source_counts
            report["restored_rows"] = restored_counts
            if restored_counts != source_counts:
                raise VerifyError(f"row counts differ after restore: source {source_counts}, "
                                  f"restored {restored_counts}")
            say(f"demo: restored into {CHECK_DB} in {restore_s:.1f} s; row counts equal in all "
                f"{len(source_counts)} tables:")
            for table, rows in sorted(source_counts.items()):
                say(f"        {table:<10} {rows:>10}")
        report["ok"] = True
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            print("demo: OK — backup taken, encrypted, uploaded, verified on both ends, "
                  "decrypted and restored")
        return EXIT_OK
    except CheckFailedError as exc:  # a sha256 mismatch in the restore, or the row counts
        report["ok"] = False
        report["error"] = str(exc)
        if as_json:
            print(json.dumps(report, indent=2))
        print(f"error: {exc}")
        return EXIT_FAILURE
    finally:
        if keep_dir is None:
            shutil.rmtree(base, ignore_errors=True)
