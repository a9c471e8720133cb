"""Waits on conditions, not clocks: poll a predicate (a file, a log line, a metric, a status) until
it holds or a deadline passes, and fail naming what was awaited.

A fixed sleep is either too short on a loaded machine (a flaky test) or too long everywhere (a
slow suite); a deadline is generous because it is only reached when the test fails anyway.
Sleeps that remain in the tests are the behaviour under test (a throttled link, a slow client, a
server kept down, time that must pass for something to age) and say so where they stand.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

POLL_S = 0.05  # how often a condition is looked at: cheap checks, and short enough not to lag


class WaitTimeout(AssertionError):
    """The awaited condition did not hold before the deadline (a test failure)."""


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float,
                     what: str, *, poll_s: float = POLL_S) -> None:
    """Return once ``predicate()`` (plain or async) is true; raise :class:`WaitTimeout` naming
    ``what`` after ``timeout_s``. The predicate is tried at least once, also after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(poll_s)


def wait_until_sync(predicate: Callable[[], bool], timeout_s: float, what: str, *,
                    poll_s: float = POLL_S) -> None:
    """:func:`wait_until` for code without an event loop (threads, plain tests)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def log_offset(path: Path) -> int:
    """The current end of a log file (0 if it does not exist yet): pass it as ``after`` to
    :func:`wait_for_log` to wait for a line written from now on."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def wait_for_log(path: Path, pattern: str, timeout_s: float, *,
                       after: int = 0) -> re.Match[str]:
    """The first match of the regex ``pattern`` in ``path``'s text past byte ``after``, once a
    line matching it has been written."""
    regex = re.compile(pattern)
    found: list[re.Match[str]] = []

    def written() -> bool:
        try:
            with path.open("rb") as log:
                log.seek(after)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return False
        match = regex.search(text)
        if match:
            found.append(match)
        return match is not None

    await wait_until(written, timeout_s, f"{pattern!r} in {path}")
    return found[0]
