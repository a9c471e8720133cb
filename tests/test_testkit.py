"""The test kit stays out of the production path and importing it has no side effects."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mt5backupd.receiver import auth
from mt5backupd.testkit.pghost import kill_with_children
from mt5backupd.testkit.receiverproc import ReceiverProcess, ReceiverStartError
from tests.pg_fixtures import live_processes_mentioning


def _python(code: str, timeout_s: float = 120.0) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its stdout."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout_s, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_importing_the_testkit_registers_no_atexit_hook() -> None:
    """Importing every testkit module registers nothing with atexit (third-party imports may)."""
    out = _python(
        "import atexit, json, pkgutil\n"
        "ours = []\n"
        "real_register = atexit.register\n"
        "def spy(fn, *args, **kwargs):\n"
        "    ours.append(f'{getattr(fn, \"__module__\", \"?\")}.{getattr(fn, \"__name__\", fn)}')\n"
        "    return real_register(fn, *args, **kwargs)\n"
        "atexit.register = spy\n"
        "import mt5backupd.testkit as kit\n"
        "names = [m.name for m in pkgutil.iter_modules(kit.__path__)]\n"
        "for name in names:\n"
        "    __import__(f'mt5backupd.testkit.{name}')\n"
        "print(json.dumps({'modules': names, 'registered': ours}))\n"
    )
    result = json.loads(out)
    assert {"pgcluster", "pgserver", "pghost", "sampledata", "demo"} <= set(result["modules"])
    assert [r for r in result["registered"] if r.startswith("mt5backupd")] == []


def test_daemon_cli_and_receiver_do_not_load_the_testkit() -> None:
    """Importing the CLI, the daemon and the receiver app loads no mt5backupd.testkit module."""
    out = _python(
        "import json, sys\n"
        "import mt5backupd.cli, mt5backupd.daemon.service, mt5backupd.receiver.server\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mt5backupd'))))\n"
    )
    loaded = json.loads(out)
    assert "mt5backupd.receiver.server" in loaded
    assert [m for m in loaded if m.startswith("mt5backupd.testkit")] == []


def test_a_forgotten_cluster_is_stopped_at_interpreter_exit(tmp_path: Path) -> None:
    """A cluster started and never stopped is stopped when the interpreter that started it exits."""
    out = _python(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from mt5backupd.testkit.pgcluster import PgCluster\n"
        f"pg = PgCluster.create(Path({str(tmp_path)!r}))\n"
        "pg.start()\n"
        "print(json.dumps({'root': str(pg.root), 'data_dir': str(pg.data_dir), 'pid': pg.pid}))\n"
        "sys.stdout.flush()\n"
        # exits here without stop(): only the reaper's atexit hook can stop the postmaster
    )
    started = json.loads(out)
    try:
        assert started["pid"] is not None
        assert live_processes_mentioning(started["data_dir"]) == []
    finally:
        if live_processes_mentioning(started["data_dir"]):  # the bug under test: don't leak it
            kill_with_children(started["pid"])
        shutil.rmtree(started["root"], ignore_errors=True)


def test_receiver_process_binds_a_free_port_and_restarts_on_it(tmp_path: Path) -> None:
    """The first start learns the port the receiver picked; kill -9 and start reuse it; stop
    closes it."""
    rx = ReceiverProcess(tmp_path)
    token = auth.add_token(rx.tokens_file, "alice", admin=False)
    try:
        rx.start()
        port = rx.port
        assert port > 0
        assert _list_status(rx.url, token) == 200
        rx.kill9()
        rx.start()
        assert rx.port == port
        assert _list_status(rx.url, token) == 200
    finally:
        rx.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_receiver_process_that_cannot_start_fails_fast_with_its_error(tmp_path: Path) -> None:
    """A receiver that exits at start (no tokens) is an error carrying its log, not a timeout."""
    rx = ReceiverProcess(tmp_path)
    started = time.monotonic()
    with pytest.raises(ReceiverStartError, match="no tokens"):
        rx.start(timeout_s=60)
    assert time.monotonic() - started < 30
    assert rx.proc is None


def _list_status(url: str, token: str) -> int:
    req = urllib.request.Request(f"{url}/api/backup/list",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        status: int = resp.status
        return status
