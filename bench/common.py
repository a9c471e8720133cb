"""What the benchmark scripts share: the machine description and a VM quirk detector.

Scripts run as ``python bench/NAME.py``, so this directory is on sys.path and they import it as
``common``. A free port comes from ``mt5backupd.testkit.pghost.free_port`` like everywhere else.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

from mt5backupd import __version__


def free_page_reporting() -> bool:
    """True in a VM whose balloon reports freed pages to the host (VIRTIO_BALLOON_F_REPORTING).

    There, memory left free for a couple of seconds loses its host backing, and the next
    page-cache fill pays a host page fault per page: writes then run at a fraction of their
    warm speed, whoever does them.
    """
    for dev in Path("/sys/bus/virtio/devices").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            if int((dev / "device").read_text(), 16) == 5:  # balloon
                features = (dev / "features").read_text().strip()
                if len(features) > 5 and features[5] == "1":
                    return True
    return False


def _first_field(path: str, prefix: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return None


def filesystem(path: Path) -> tuple[str, str]:
    """(type, device) of the filesystem holding ``path``, as df reports them."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError, ValueError):
        out = subprocess.run(["df", "--output=fstype,source", str(path)], capture_output=True,
                             text=True, check=True, timeout=10).stdout.splitlines()
        fstype, source = out[1].split()[:2]
        return fstype, source
    return "unknown", "unknown"


def machine_info(path: Path) -> dict[str, str]:
    """CPU, memory, kernel, the filesystem of ``path``, versions; scripts add their own keys."""
    mem = "unknown"
    with contextlib.suppress(ValueError, IndexError, AttributeError):
        mem = f"{int(str(_first_field('/proc/meminfo', 'MemTotal:')).split()[0]) / 1024**2:.1f} GiB"
    fstype, source = filesystem(path)
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": _first_field("/proc/cpuinfo", "model name") or "unknown",
        "memory": mem,
        "kernel": platform.release(),
        "filesystem": f"{fstype} on {source}",
        "python": platform.python_version(),
        "mt5backupd": __version__,
        "page reporting": "yes (virtio-balloon)" if free_page_reporting() else "no",
    }
