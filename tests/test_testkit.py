"""The test kit stays out of the production path and importing it has no side effects."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from mt5backupd.testkit.pghost import kill_with_children
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
        "import mt5backupd.cli, mt5backupd.daemon, mt5backupd.receiver.app\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mt5backupd'))))\n"
    )
    loaded = json.loads(out)
    assert "mt5backupd.receiver.app" in loaded
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
