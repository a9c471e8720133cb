"""Client hardening (issue 9): files others can write are refused before anything runs, plain
http to another host needs allow_http, children get a clean environment, an untrusted receiver
is not an outage, and a run killed mid-upload leaves no orphaned session on the receiver."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest

from mt5backupd.backup import spool, upload_journal
from mt5backupd.backup.upload_state import UploadState
from mt5backupd.config import Config, LocalConfig, load_config
from mt5backupd.daemon.metrics import LiveState, make_registry
from mt5backupd.daemon.service import Daemon
from mt5backupd.errors import ConfigError
from mt5backupd.receiver.auth import TokenStore
from mt5backupd.receiver.metrics import ReceiverMetrics
from mt5backupd.receiver.server import start_receiver
from tests.backup_fixtures import BackupSetup, config_toml, write_token
from tests.receiver_harness import make_tokens, receiver_config
from tests.waits import wait_until

CLI = [sys.executable, "-m", "mt5backupd"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PG", "MT5BACKUPD", "BACKUP_", "POSTGRES_"))}
    env.update(extra)
    return env


async def cli(*args: str, env: dict[str, str] | None = None,
              timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The real CLI as a subprocess, without blocking the loop that serves the receiver."""
    return await asyncio.to_thread(subprocess.run, [*CLI, *args], capture_output=True,
                                   text=True, env=env or clean_env(), timeout=timeout_s)


def marker_script(path: Path, marker: Path) -> Path:
    path.write_text(f"#!/bin/sh\ntouch {marker}\nexit 0\n")
    path.chmod(0o755)
    return path


def metric_values(registry_text: bytes) -> dict[str, float]:
    out = {}
    for line in registry_text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# ------------------------------------------------------------------ files others can write


def test_world_writable_config_never_runs_its_pg_dump(tmp_path: Path) -> None:
    """A 0666 config whose pg_dump writes a marker: --run-now and check exit 4 naming the file
    and `chmod go-w`, and the marker never appears."""
    marker = tmp_path / "ran"
    evil = marker_script(tmp_path / "x", marker)
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\npg_dump = "{evil}"\npg_restore = "{evil}"\n'
                      f'[local]\ndir = "{tmp_path / "backups"}"\n')
    config.chmod(0o666)
    for args in (["--run-now"], ["check"], ["upload-pending"], ["verify"]):
        run = subprocess.run([*CLI, *args, "--config", str(config)], capture_output=True,
                             text=True, env=clean_env(), timeout=60)
        assert run.returncode == 4, (args, run.stdout, run.stderr)
        assert f"chmod go-w {config}" in run.stdout + run.stderr, args
        assert not marker.exists(), f"{args}: the config's pg_dump ran"
    assert not (tmp_path / "backups").exists()


def test_check_reports_every_refused_file_and_runs_nothing(tmp_path: Path) -> None:
    """check lists each refused file (writable config, readable env file with a password,
    readable password/token files, writable tokens file, readable tls_key) as a FAIL line."""
    marker = tmp_path / "ran"
    evil = marker_script(tmp_path / "x", marker)
    files = {name: tmp_path / name for name in ("pw", "token", "tokens.json", "key.pem",
                                                 "cert.pem")}
    for path in files.values():
        path.write_text("value\n")
    modes = {"pw": 0o640, "token": 0o604, "tokens.json": 0o620, "key.pem": 0o644,
             "cert.pem": 0o644}
    for name, mode in modes.items():
        files[name].chmod(mode)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[database]\npg_dump = "{evil}"\npg_restore = "{evil}"\n'
        f'password_file = "{files["pw"]}"\n[local]\ndir = "{tmp_path / "b"}"\n'
        f'[remote]\nurl = "https://127.0.0.1:1"\ntoken_file = "{files["token"]}"\n'
        f'[receiver]\ntokens_file = "{files["tokens.json"]}"\n'
        f'tls_cert = "{files["cert.pem"]}"\ntls_key = "{files["key.pem"]}"\n')
    config.chmod(0o662)
    env_file = tmp_path / "mt5-backup"
    env_file.write_text("POSTGRES_PASSWORD=hunter2\n")
    env_file.chmod(0o644)
    run = subprocess.run([*CLI, "--env-file", str(env_file), "check", "--json", "--config",
                          str(config)], capture_output=True, text=True, env=clean_env(),
                         timeout=60)
    assert run.returncode == 4, run.stderr
    checks = json.loads(run.stdout)["checks"]
    failed = {c["check"]: c for c in checks if not c["ok"]}
    expected = {f"config file {config}": f"chmod go-w {config}",
                f"env file {env_file}": f"chmod 600 {env_file}",
                f"[database] password_file {files['pw']}": f"chmod 600 {files['pw']}",
                f"[remote] token_file {files['token']}": f"chmod 600 {files['token']}",
                f"[receiver] tokens_file {files['tokens.json']}":
                    f"chmod go-w {files['tokens.json']}",
                f"[receiver] tls_key {files['key.pem']}": f"chmod 600 {files['key.pem']}"}
    for name, fix in expected.items():
        assert name in failed, (name, list(failed))
        assert failed[name]["fix"] == fix
    assert "hunter2" not in run.stdout + run.stderr
    assert not any(c["ok"] for c in checks)  # nothing else ran: no tool, no connection
    assert not marker.exists()


def test_readable_env_file_with_secret_refused_and_fixed_by_chmod(tmp_path: Path) -> None:
    """An env file holding BACKUP_API_TOKEN that others can read is refused (exit 4, chmod 600);
    the same file without secrets, or at 0600, loads."""
    env_file = tmp_path / "mt5-backup"
    env_file.write_text("BACKUP_API_TOKEN=tok-secret\nBACKUP_DIR=/tmp/x\n")
    env_file.chmod(0o644)
    with pytest.raises(ConfigError, match=rf"chmod 600 {env_file}") as err:
        load_config(None, env={}, env_file=env_file)
    assert "tok-secret" not in str(err.value)
    env_file.chmod(0o600)
    assert load_config(None, env={}, env_file=env_file).remote.token is not None
    env_file.write_text("BACKUP_DIR=/tmp/x\n")
    env_file.chmod(0o644)
    assert load_config(None, env={}, env_file=env_file).local.dir == Path("/tmp/x")
    env_file.chmod(0o646)
    with pytest.raises(ConfigError, match=rf"chmod go-w {env_file}"):
        load_config(None, env={}, env_file=env_file)


# ------------------------------------------------------------------ plain http


def test_plain_http_to_another_host_needs_allow_http(tmp_path: Path) -> None:
    """http:// to a non-loopback host is refused naming [remote] allow_http; loopback and
    https are fine; allow_http = true accepts it."""
    config = tmp_path / "c.toml"
    for url, ok in [("http://backup.example:9101", False), ("http://10.0.0.5:9101", False),
                    ("http://[2001:db8::1]:9101", False), ("http://127.0.0.1:9101", True),
                    ("http://127.8.9.10:9101", True), ("http://[::1]:9101", True),
                    ("http://localhost:9101", True), ("https://backup.example:9101", True)]:
        config.write_text(f'[remote]\nurl = "{url}"\n')
        if ok:
            assert load_config(config, env={}).remote.url == url
        else:
            with pytest.raises(ConfigError, match=r"\[remote\] allow_http"):
                load_config(config, env={})
    config.write_text('[remote]\nurl = "http://backup.example:9101"\nallow_http = true\n')
    assert load_config(config, env={}).remote.allow_http


def test_http_refusal_comes_before_any_connection(tmp_path: Path) -> None:
    """--run-now with a refused http:// url exits 4 without connecting to the database."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\nhost = "127.0.0.1"\nport = {port}\n'
                      f'[local]\ndir = "{tmp_path / "b"}"\n'
                      '[remote]\nurl = "http://backup.example:9101"\n')
    run = subprocess.run([*CLI, "--run-now", "--config", str(config)], capture_output=True,
                         text=True, env=clean_env(), timeout=60)
    try:
        assert run.returncode == 4, run.stderr
        assert "[remote] allow_http" in run.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked
    finally:
        listener.close()


async def test_legacy_http_url_warns_and_upload_pending_down_exits_3(tmp_path: Path) -> None:
    """A legacy http:// BACKUP_API_URL to another host loads, warns on every run; with that
    receiver down, upload-pending exits 3 and the state says "down", not "not trusted"."""
    backups = tmp_path / "backups"
    env_file = tmp_path / "mt5-backup"
    env_file.write_text(f"BACKUP_API_URL=http://192.0.2.1:9/api/backup/upload\n"
                        f"BACKUP_API_TOKEN=tok-legacy-secret\nBACKUP_DIR={backups}\n")
    env_file.chmod(0o600)
    config = tmp_path / "c.toml"
    config.write_text("[remote]\ntimeout_s = 0.5\nmax_retries = 0\n")
    for _ in range(2):
        run = await cli("--env-file", str(env_file), "upload-pending", "--config", str(config))
        assert run.returncode == 3, run.stderr
        assert "plain http://" in run.stderr and "WARNING" in run.stderr
        assert "tok-legacy-secret" not in run.stdout + run.stderr
    metrics = metric_values(generate_latest(make_registry(lambda: backups, LiveState())))
    assert metrics["mt5backup_receiver_down"] == 1.0
    assert metrics["mt5backup_receiver_not_trusted"] == 0.0


def test_legacy_import_writes_allow_http_with_reason(tmp_path: Path) -> None:
    """The legacy import keeps an http:// receiver on another host working: allow_http = true,
    preceded by a comment on why and how to move to TLS; the result loads."""
    from mt5backupd.config.legacy_import import import_legacy

    legacy = tmp_path / "mt5-backup"
    legacy.write_text("BACKUP_API_URL=http://backup.lan:9101/api/backup/upload\n"
                      "BACKUP_API_TOKEN=tok\n")
    out = tmp_path / "config.toml"
    import_legacy(Path(__file__).parents[1] / "config.example.toml", legacy, out,
                  tmp_path / "credentials")
    text = out.read_text()
    comment = text.partition("\nallow_http = true")[0].rsplit("\n\n", 1)[-1].split("[remote]")[-1]
    assert "BACKUP_API_URL" in comment and "To move to TLS" in comment
    assert "https://" in comment and "ca_file" in comment
    cfg = load_config(out, env={})
    assert cfg.remote.allow_http and cfg.remote.url == "http://backup.lan:9101"


# ------------------------------------------------------------------ child environments


def recording_wrapper(path: Path, real: str, log: Path) -> Path:
    """A pg_dump/pg_restore that records its environment (and a copy of its passfile), then
    execs the real tool."""
    path.write_text(
        "#!/bin/sh\n"
        f"{{ env; echo '----'; }} >> {log}\n"
        f'if [ -n "$PGPASSFILE" ]; then cat "$PGPASSFILE" >> {log}.passfile; '
        f'echo "$PGPASSFILE" >> {log}.passfile-path; fi\n'
        f'exec {real} "$@"\n')
    path.chmod(0o755)
    return path


async def test_children_get_clean_environment_and_a_private_passfile(
        backup_setup: BackupSetup, tmp_path: Path) -> None:
    """pg_dump and pg_restore see no token, webhook URL or unrelated variable, and the password
    only in a 0600 passfile that is gone after the run."""
    log = tmp_path / "child-env.log"
    db = backup_setup.cfg.database
    dump = recording_wrapper(tmp_path / "pg_dump", db.pg_dump, log)
    restore = recording_wrapper(tmp_path / "pg_restore", db.pg_restore, log)
    password = "pw:with\\specials-Zq81"
    pw_file = write_token(tmp_path / "db-password", password)
    hook = "https://hooks.example/secret-hook-7f3a"
    config = tmp_path / "c.toml"
    config.write_text(
        config_toml(backup_setup).replace(f'pg_dump = "{db.pg_dump}"', f'pg_dump = "{dump}"')
        .replace(f'pg_restore = "{db.pg_restore}"', f'pg_restore = "{restore}"')
        .replace("[local]", f'password_file = "{pw_file}"\n[local]')
        + f'[notify]\nwebhook_urls = ["{hook}"]\n')
    token = backup_setup.receiver.tokens.alice
    run = await cli("--run-now", "--config", str(config), env=clean_env(
        BACKUP_API_TOKEN=token, UNRELATED_SECRET="leak-me-not", PGPASSWORD="inherited-pw",
        PGCONNECT_TIMEOUT="7", LC_TIME="C"))
    assert run.returncode == 0, run.stderr
    seen = log.read_text()
    assert seen.count("----") >= 3  # pg_dump --version, pg_restore --version, the dump, --list
    for leak in (token, hook, "leak-me-not", "UNRELATED_SECRET", "PGPASSWORD", password,
                 "inherited-pw", "BACKUP_API_TOKEN"):
        assert leak not in seen, leak
    assert "PGCONNECT_TIMEOUT=7" in seen and "LC_TIME=C" in seen and "PATH=" in seen
    assert "PGPASSFILE=" in seen
    assert (tmp_path / "child-env.log.passfile").read_text() == \
        "*:*:*:*:pw\\:with\\\\specials-Zq81\n"
    for passfile in (tmp_path / "child-env.log.passfile-path").read_text().split():
        assert not Path(passfile).exists()  # removed with its private directory


# ------------------------------------------------------------------ TLS not trusted


def make_cert(directory: Path, san: str) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mt5-receiver.test", "-addext", f"subjectAltName={san}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key


async def test_untrusted_receiver_keeps_backup_pending_exits_4(
        backup_setup: BackupSetup, tmp_path: Path) -> None:
    """A self-signed receiver the client does not trust: backup kept locally and pending, exit
    4, "receiver not trusted", shown apart from "down" in metrics and /health; a wrong host name
    with the right CA is refused the same way by upload-pending."""
    cert, key = make_cert(tmp_path, "DNS:mt5-receiver.test")
    cfg = receiver_config(tmp_path / "tls", tls_cert=cert, tls_key=key)
    (tmp_path / "tls").mkdir()
    tokens = make_tokens(cfg.tokens_file)
    running = await start_receiver(cfg, TokenStore(cfg.tokens_file), metrics=ReceiverMetrics())
    try:
        assert running.url.startswith("https://127.0.0.1:")
        write_token(backup_setup.token_file, tokens.alice)
        config = tmp_path / "c.toml"
        base = config_toml(backup_setup).replace(backup_setup.receiver.url, running.url)
        config.write_text(base + "max_retries = 0\n")
        run = await cli("--run-now", "--json", "--config", str(config))
        assert run.returncode == 4, run.stderr
        assert "receiver not trusted" in run.stderr
        result = json.loads(run.stdout)
        assert result["ok"] and result["upload_state"] == "pending"
        backups = backup_setup.cfg.local.dir
        manifests = spool.load_manifests(backups)
        assert len(manifests) == 1 and manifests[0].pending
        assert (backups / manifests[0].file).exists()

        metrics = metric_values(generate_latest(make_registry(lambda: backups, LiveState())))
        assert metrics["mt5backup_receiver_not_trusted"] == 1.0
        assert metrics["mt5backup_receiver_down"] == 0.0
        assert metrics['mt5backup_runs_total{job="database",result="pending"}'] == 1.0
        daemon = Daemon(Config(local=LocalConfig(dir=backups)), None, None, {})
        ok, body = daemon.health()
        assert not ok and body["receiver"] == "not_trusted"
        assert any("receiver not trusted" in r for r in body["reasons"])

        # the right CA but a name the certificate does not carry (127.0.0.1)
        config.write_text(base + f'ca_file = "{cert}"\nmax_retries = 0\n')
        run = await cli("upload-pending", "--config", str(config))
        assert run.returncode == 4, run.stderr
        assert "receiver not trusted" in run.stderr
        assert spool.load_manifests(backups)[0].pending
    finally:
        await running.close()


# ------------------------------------------------------------------ orphaned upload sessions


def slow_pg_dump(path: Path, real: str) -> Path:
    """pg_dump that keeps its stdout open after the dump, so the upload stays in flight."""
    path.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --version) exec {real} "$@";; esac\n'
        f'{real} "$@"\nexec sleep 60\n')
    path.chmod(0o755)
    return path


async def test_kill_9_mid_upload_next_run_aborts_orphaned_session(
        backup_setup: BackupSetup, tmp_path: Path) -> None:
    """kill -9 of the client during its upload leaves a partial on the receiver; the next run
    aborts that session, so the partial count goes back to 0."""
    db = backup_setup.cfg.database
    slow = slow_pg_dump(tmp_path / "pg_dump", db.pg_dump)
    normal = tmp_path / "normal.toml"
    normal.write_text(config_toml(backup_setup))
    killed = tmp_path / "slow.toml"
    # no compression: bytes reach the spool (and the receiver) while "pg_dump" still runs
    killed.write_text(config_toml(backup_setup).replace(
        f'pg_dump = "{db.pg_dump}"', f'pg_dump = "{slow}"\ncompression = "none"'))
    partial_root = backup_setup.receiver.cfg.data_dir / "partial"
    backups = backup_setup.cfg.local.dir

    def partials() -> list[Path]:
        return sorted(partial_root.glob("*/*.json"))  # one per open session

    def spooled() -> bool:  # the dump is under way (the receiver writes in batches)
        return any(p.stat().st_size > 0 for p in (backups / spool.PARTIAL_DIR).glob("*"))

    proc = await asyncio.create_subprocess_exec(
        *CLI, "--run-now", "--config", str(killed), env=clean_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_until(lambda: bool(upload_journal.load(backups))
                         and bool(partials()) and spooled(), 60.0, "the upload in flight")
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        await proc.wait()
        for child in subprocess.run(["pgrep", "-f", str(slow)], capture_output=True,
                                    text=True).stdout.split():
            os.kill(int(child), signal.SIGKILL)  # the wrapper's sleep, in its own group
    assert len(partials()) == 1

    run = await cli("--run-now", "--config", str(normal))
    assert run.returncode == 0, run.stderr
    assert "aborted upload session" in run.stderr
    assert partials() == []
    assert upload_journal.load(backups) == {}
    async with aiohttp.ClientSession() as http, \
            http.get(f"{backup_setup.receiver.url}/metrics") as resp:
        text = await resp.text()
    assert "mt5backup_receiver_partial_uploads 0.0" in text


def test_journal_plan_resumes_complete_backup_and_aborts_the_rest() -> None:
    """A complete pending backup without a session resumes its newest journalled session; an
    older one of it, one of an uploaded backup and one whose backup is gone are aborted."""
    def manifest(file: str, upload: dict[str, object]) -> spool.Manifest:
        return spool.Manifest(id=file, file=file, kind="database", size=1, sha256="0" * 64,
                              compression="none", started="2024-01-01T00:00:00+00:00",
                              finished="2024-01-01T00:00:01+00:00", duration_s=1.0,
                              dump_duration_s=1.0, raw_bytes=1, size_anomaly=False,
                              upload=UploadState.from_json(upload), database="db")

    manifests = [manifest("a", {"state": "pending"}),
                 manifest("b", {"state": "uploaded"}),
                 manifest("c", {"state": "pending", "session": "s-c"})]
    plan = upload_journal.plan({"s-a1": "a", "s-a2": "a", "s-b": "b", "s-gone": "gone",
                                "s-c": "c"}, manifests)
    assert plan.resume == {"a": "s-a2"}
    assert sorted(plan.abort) == ["s-a1", "s-b", "s-gone"]
    assert plan.settled == ["s-c"]
