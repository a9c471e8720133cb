"""Process-level tuning for the byte paths (receiver ingest, backup pump).

Measured on the 2-core VM (docs/benchmarks.md): glibc returned every freed 1 MiB buffer to the
kernel, so each new one was page-faulted in again (~200k faults per GiB received), and worker
threads waited up to Python's 5 ms switch interval for the GIL between their C calls. Keeping
freed memory in the heap and switching more often made receiver ingest ~2x faster.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

SWITCH_INTERVAL_S = 0.001


def tune_process() -> None:
    """Best effort: a libc without mallopt (musl) simply keeps its defaults. Called first thing,
    before any thread of ours exists (the environment is not safe to change once they run)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # numpy's bundled OpenBLAS starts a thread per core when the row counter first imports it
    # (~50 ms of CPU taken from pg_dump on a small machine); the counter never multiplies a
    # matrix. Children never see this variable (childenv.child_env passes an allow-list).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    with contextlib.suppress(OSError, AttributeError):
        # the symbols already loaded into this process, libc's among them: find_library
        # would run `ldconfig -p`, a subprocess on every start (~15 ms of --run-now)
        libc = ctypes.CDLL(None)
        # Buffers up to 32 MiB come from the heap and freed heap memory is kept (up to
        # 256 MiB) for reuse instead of being returned and faulted in again.
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)
        libc.mallopt(_M_TOP_PAD, 16 * 1024 * 1024)
