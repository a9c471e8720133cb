"""Last line of defence: servers a process started and forgot are stopped when it exits.

A test that fails or is interrupted must not leave a postmaster or a receiver behind (it would
hold its port and directory forever). Servers call :func:`track` when they start and
:func:`untrack` once stopped; the ``atexit`` hook is registered by the first :func:`track`, not at
import, so importing the test kit has no side effects.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Callable

_live: dict[object, Callable[[], None]] = {}
_hook_registered = False


def track(server: object, stop: Callable[[], None]) -> None:
    """Remember ``server`` as running; ``stop()`` is called at interpreter exit unless untracked.

    ``stop`` must be quick and must not raise on an already-stopped server.
    """
    global _hook_registered
    if not _hook_registered:
        atexit.register(_stop_forgotten)
        _hook_registered = True
    _live[server] = stop


def untrack(server: object) -> None:
    _live.pop(server, None)


def _stop_forgotten() -> None:
    for server, stop in list(_live.items()):
        with contextlib.suppress(Exception):
            stop()
        _live.pop(server, None)
