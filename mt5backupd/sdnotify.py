"""systemd notify protocol, in-house: one datagram to $NOTIFY_SOCKET (a leading @ means the
abstract namespace). Without systemd every call is a no-op."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class SystemdNotifier:
    """READY/STATUS/WATCHDOG/STOPPING to systemd (no-op when not run by systemd)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval_s: float | None = None
        if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and (
            not watchdog_pid or watchdog_pid == str(os.getpid())
        ):
            self.watchdog_interval_s = int(watchdog_usec) / 1e6 / 2  # ping at half the timeout

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``READY=1``, ``STATUS=...`` etc. Failures are swallowed: systemd going away must
        not take the backup daemon with it."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError:
            return False
        return True
