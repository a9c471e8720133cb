"""What a `--run-now` costs the trading server besides pg_dump, and how soon pg_dump's data starts.

Run it (from the repository root)::

    .venv/bin/python bench/firstbyte.py --size-mb 300
    .venv/bin/python bench/firstbyte.py --size-mb 300 --python /path/to/other/.venv/bin/python

On a throwaway cluster filled by ``mt5backupd.testkit.sampledata`` and logging every statement
(``log_statement = all``, with each session's id and millisecond times), it runs
``mt5backupd --run-now`` (local only, no receiver) ``--repeat`` times with the given Python
(``--python``: another checkout's venv measures the code before a change on the same data) and
reports:

1. **Queries besides pg_dump's**: every statement the run sent on its own connections (the
   sessions that are not pg_dump's), with a count of table scans (``count(*)``).
2. **Process start to pg_dump's first byte**: from launching the process to the server's log
   of pg_dump's first ``COPY ... TO stdout`` (pg_dump writes the header and table of contents
   just before it, then the data). Median of the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from mt5backupd.testkit.pgcluster import PgCluster
from mt5backupd.testkit.sampledata import generate

DB = "mt5_trading"
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \S+) \[([^\]]*)\] (?:LOG:\s+)?"
                   r"(?:statement|execute [^:]*): (.*)$")  # simple and extended protocol
# pg_dump's sessions are told apart by what only pg_dump sends (its application name is the
# run's, PGAPPNAME=mt5backupd)
_PG_DUMP_MARKS = ("set_config('search_path', '', false)", "TO stdout;")


def _when(stamp: str) -> float:
    day, clock, _zone = stamp.split(" ")
    return datetime.strptime(f"{day} {clock} +0000", "%Y-%m-%d %H:%M:%S.%f %z").timestamp()


def one_run(pg: PgCluster, python: str, config: Path) -> tuple[float, float, list[str]]:
    """(seconds to pg_dump's first COPY, wall seconds, our statements)."""
    offset = pg.log_path.stat().st_size
    launched = time.time()
    # run from the config's directory: `-m` puts the working directory first on sys.path,
    # and another checkout's Python must import its own package, not this one
    run = subprocess.run([python, "-m", "mt5backupd", "--run-now", "--config", str(config)],
                         capture_output=True, text=True, cwd=config.parent)
    wall = time.time() - launched
    if run.returncode not in (0, 3):
        raise SystemExit(f"--run-now failed ({run.returncode}): {run.stderr[-2000:]}")
    with pg.log_path.open("rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").splitlines()
    sessions: dict[str, list[tuple[str, str]]] = {}
    for line in lines:
        match = _LINE.match(line)
        if match:
            stamp, session, statement = match.groups()
            sessions.setdefault(session, []).append((stamp, statement))
    first_copy = None
    ours = []
    for statements in sessions.values():
        if any(mark in s for _t, s in statements for mark in _PG_DUMP_MARKS):
            for stamp, statement in statements:
                if statement.startswith("COPY ") and first_copy is None:
                    first_copy = _when(stamp)
        else:
            ours += [" ".join(s.split())[:120] for _t, s in statements]
    if first_copy is None:
        raise SystemExit("no COPY by pg_dump in the server log")
    return first_copy - launched, wall, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=300.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--python", default=sys.executable,
                        help="the Python whose mt5backupd runs (default: this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mt5b-firstbyte-", dir="/var/tmp") as tmp, \
            PgCluster.create(Path(tmp)) as pg:
        pg.create_database(DB)
        asyncio.run(generate(pg.dsn(DB), target_bytes=int(args.size_mb * 1024 * 1024)))
        pg.psql("ALTER SYSTEM SET log_statement = 'all';"
                "ALTER SYSTEM SET log_line_prefix = '%m [%c] ';"
                "ALTER SYSTEM SET log_timezone = 'UTC';")
        pg.psql("SELECT pg_reload_conf()")
        time.sleep(1)
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[database]\nhost = "{pg.host}"\nport = {pg.port}\nuser = "{pg.user}"\n'
            f'dbname = "{DB}"\npg_dump = "{pg.bin_dir / "pg_dump"}"\n'
            f'pg_restore = "{pg.bin_dir / "pg_restore"}"\n'
            f'[local]\ndir = "{Path(tmp) / "backups"}"\nkeep = 2\n')
        runs = [one_run(pg, args.python, config) for _ in range(args.repeat)]
    print(f"python: {args.python}; {args.size_mb:g} MiB of sample data; {args.repeat} runs")
    for first, wall, _ours in runs:
        print(f"  process start -> pg_dump's first COPY {first:.3f} s; whole run {wall:.2f} s")
    print(f"median process start -> first COPY: "
          f"{statistics.median(r[0] for r in runs):.3f} s")
    ours = runs[-1][2]
    scans = [s for s in ours if "count(*)" in s.lower()]
    print(f"statements of the run besides pg_dump's (last run): {len(ours)}, "
          f"table scans (count(*)): {len(scans)}")
    for statement in ours:
        print(f"  {statement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
