"""The systemd notify protocol: sockets and the watchdog interval."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mt5backupd.sdnotify import SystemdNotifier


def test_sd_notify_path_and_abstract_socket(tmp_path: Path) -> None:
    """Datagrams reach a filesystem socket and an abstract (@) one; no socket is a no-op."""
    fs = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fs.bind(str(tmp_path / "n.sock"))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"mt5backupd-test-{os.getpid()}"
    abstract.bind(b"\0" + name.encode())
    try:
        assert SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock")}).send("READY=1")
        assert fs.recv(100) == b"READY=1"
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1", "STATUS=x")
        assert abstract.recv(100) == b"READY=1\nSTATUS=x"
        assert not SystemdNotifier({}).send("READY=1")
        assert SystemdNotifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval_s == 1.5
        assert SystemdNotifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
                        ).watchdog_interval_s is None
    finally:
        fs.close()
        abstract.close()
