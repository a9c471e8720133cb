"""Row counts read off pg_dump's custom-format stream (backup/customformat): equal to count(*)
on awkward tables with the real pg_dump, any chunking, version fields, cut and fuzzed input."""

from __future__ import annotations

import random
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mt5backupd.backup import spool
from mt5backupd.backup.customformat import ArchiveParser, FramingError
from mt5backupd.backup.rowcounts import exact_counts
from mt5backupd.backup.run import run_backup
from mt5backupd.testkit.pgcluster import PgCluster
from tests.backup_fixtures import BackupSetup

# Every table shape the counter must get right, each compared with count(*).
AWKWARD_SQL = r"""
CREATE TABLE no_columns ();
INSERT INTO no_columns SELECT FROM generate_series(1, 37);
CREATE TABLE empty_strings (t text);
INSERT INTO empty_strings SELECT '' FROM generate_series(1, 25);
INSERT INTO empty_strings VALUES (NULL), ('\.'), (E'\\.'), (E'x\n\\.\n');
CREATE TABLE nulls (a int, b text, c bytea);
INSERT INTO nulls SELECT NULL, NULL, NULL FROM generate_series(1, 40);
CREATE TABLE texts (t text);
INSERT INTO texts VALUES (E'line1\nline2\n'), (E'tab\there'), (E'back\\slash\\'), (E'\r\n\\n'),
  (E'\\.\n'), (E'\n'), ('');
CREATE TABLE bin (b bytea);
INSERT INTO bin SELECT decode(repeat('0a00', i), 'hex') FROM generate_series(0, 300) i;
-- rows whose chunk length has a 0x0A byte (10, 266, 2570..2815, 655370): headers holding
-- a newline byte
CREATE TABLE lengths (t text);
INSERT INTO lengths SELECT repeat('x', n - 1) FROM generate_series(1, 3000) n;
INSERT INTO lengths SELECT repeat('y', 655369);
CREATE TABLE wide (t text);
INSERT INTO wide SELECT repeat(md5(i::text), 20000) FROM generate_series(1, 12) i;
CREATE TABLE empty_table (a int);
CREATE TABLE parted (k int, v text) PARTITION BY RANGE (k);
CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (100) TO (1000);
INSERT INTO parted SELECT i, 'v' || i FROM generate_series(0, 499) i;
CREATE SCHEMA "Other Schema";
CREATE TABLE "Other Schema"."MixedCase Table" ("Id" int);
INSERT INTO "Other Schema"."MixedCase Table" SELECT generate_series(1, 13);
CREATE TABLE "quote""d" (a int);
INSERT INTO "quote""d" VALUES (1), (2);
CREATE TABLE many (a int, b text);
INSERT INTO many SELECT i, md5(i::text) FROM generate_series(1, 20000) i;
SELECT lo_from_bytea(0, decode(repeat('0a', 5000), 'hex'));
"""

COUNT_SQL = r"""
SELECT n.nspname || '.' || c.relname, c.oid::regclass::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1
"""


@pytest.fixture(scope="module")
def awkward(pg_cluster: PgCluster) -> Iterator[tuple[bytes, dict[str, int]]]:
    """A real pg_dump -Fc -Z0 of the awkward tables, and count(*) of each."""
    name = f"awk_{secrets.token_hex(4)}"
    pg_cluster.create_database(name)
    try:
        pg_cluster.psql(AWKWARD_SQL, name)
        counts = {}
        for line in pg_cluster.psql(COUNT_SQL, name).splitlines():
            key, regclass = line.split("|")
            counts[key] = int(pg_cluster.psql(f"SELECT count(*) FROM {regclass}", name))  # noqa: S608
        dump = subprocess.run(
            [str(pg_cluster.bin_dir / "pg_dump"), "--format=custom", "--compress=0",
             f"--dbname={pg_cluster.dsn(name)}"], capture_output=True, check=True).stdout
        yield dump, counts
    finally:
        pg_cluster.drop_database(name)


def feed_in_pieces(data: bytes, rng: random.Random, fast: bool = True,
                   max_piece: int = 300_000) -> ArchiveParser:
    parser = ArchiveParser(fast=fast)
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 7, 4096, 65536, max_piece))
        parser.feed(data[pos:pos + step])
        pos += step
    return parser


def test_real_dump_counts_equal_count_star(awkward: tuple[bytes, dict[str, int]]) -> None:
    """Counts from the real pg_dump stream equal count(*) for every table (empty rows,
    NULLs, newlines/tabs/backslashes, `\\.` values, bytea, wide rows, chunk lengths with a
    0x0A byte, an empty table, partitions, another schema, quoted mixed-case names), fed whole,
    in random pieces, with and without the bulk path."""
    dump, counts = awkward
    whole = ArchiveParser()
    whole.feed(dump)
    assert whole.finish() == counts
    assert counts["public.parted_1"] == 100 and counts["Other Schema.MixedCase Table"] == 13
    for seed in range(3):
        assert feed_in_pieces(dump, random.Random(seed)).finish() == counts
    assert feed_in_pieces(dump, random.Random(9), fast=False).finish() == counts
    assert whole.toc and whole.dump_version.startswith(whole.dump_version.split()[0])


def test_every_cut_of_the_stream_fails(awkward: tuple[bytes, dict[str, int]]) -> None:
    """A stream cut anywhere yields no counts: finish() names the byte where it ended."""
    dump, _counts = awkward
    rng = random.Random(5)
    cuts = sorted({*range(0, 64), *(rng.randrange(len(dump)) for _ in range(150)),
                   len(dump) - 1, len(dump) - 5})
    for cut in cuts:
        parser = ArchiveParser()
        parser.feed(dump[:cut])
        with pytest.raises(FramingError) as info:
            parser.finish()
        assert 0 <= info.value.position <= cut


def test_fuzzed_archives_never_hang_or_crash(awkward: tuple[bytes, dict[str, int]]) -> None:
    """Seeded byte flips, insertions and deletions: the parser either completes or raises
    FramingError with a position inside the input, quickly, never another exception."""
    dump, _counts = awkward
    sample = dump[:200_000] + dump[-20_000:]
    rng = random.Random(1234)
    started = time.monotonic()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(200):
        data = bytearray(sample)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            action = rng.random()
            if action < 0.6:
                data[at] = rng.randrange(256)
            elif action < 0.8:
                del data[at:at + rng.randint(1, 50)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 50))
        parser = ArchiveParser()
        try:
            for i in range(0, len(data), 50_000):
                parser.feed(data[i:i + 50_000])
            parser.finish()
            outcomes["ok"] += 1
        except FramingError as exc:
            assert 0 <= exc.position <= len(data)
            outcomes["error"] += 1
    assert outcomes["error"] > 100
    assert time.monotonic() - started < 20


# --- synthetic archives: versions and chunkings pg_dump 15 does not write ------------------


def _int(value: int) -> bytes:
    return bytes([1 if value < 0 else 0]) + abs(value).to_bytes(4, "little")


def _str(text: str | None) -> bytes:
    if text is None:
        return _int(-1)
    raw = text.encode()
    return _int(len(raw)) + raw


def synthetic(minor: int, tables: dict[str, bytes], chunk: int) -> bytes:
    """A custom-format archive of version 1.<minor> whose TABLE DATA entries hold ``tables``
    (``schema.name`` -> COPY text), cut into chunks of ``chunk`` bytes (rows split anywhere)."""
    out = bytearray(b"PGDMP" + bytes([1, minor, 0, 4, 8, 1]))
    out += bytes([0]) if minor >= 15 else _int(0)
    out += b"".join(_int(v) for v in (0, 0, 3, 1, 0, 125, 0))
    out += _str("db") + _str("17.2") + _str("17.2")
    out += _int(len(tables) + 1)
    entries = [(1, "ENCODING", "", "ENCODING", False)]
    for i, name in enumerate(tables):
        namespace, tag = name.split(".")
        entries.append((i + 2, "TABLE DATA", namespace, tag, True))
    for dump_id, desc, namespace, tag, data in entries:
        out += _int(dump_id) + _int(1 if data else 0) + _str("0") + _str("0") + _str(tag)
        out += _str(desc) + _int(2) + _str("") + _str("") + _str(None) + _str(namespace)
        out += _str("") + (_str("heap") if minor >= 14 else b"")
        out += (_int(114) if minor >= 16 else b"") + _str("postgres") + _str("false")
        out += _str("1") + _str(None) + bytes([1 if data else 3]) + bytes(8)
    for i, text in enumerate(tables.values()):
        out += bytes([1]) + _int(i + 2)
        for at in range(0, len(text), chunk):
            piece = text[at:at + chunk]
            out += _int(len(piece)) + piece
        out += _int(0)
    return bytes(out)


@pytest.mark.parametrize("minor", [12, 14, 15, 16])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 4096, 1 << 20])
def test_synthetic_versions_and_chunkings(minor: int, chunk: int) -> None:
    """Header and TOC fields of archive versions 1.12-1.16, and chunks that split rows and
    the `\\.` line anywhere (as a buffering pg_dump writes them): counts stay exact."""
    tables = {
        "public.a": b"1\tx\n2\ty\n\\\\.\n\n" + b"\\.\n\n\n",  # 4 rows: 2, `\\\\.`, ""
        "s.B c": b"\n\n\n\\.\n\n\n",
        "public.no_marker": b"r1\nr2\nr3\n",
        "public.empty": b"\\.\n",
    }
    parser = ArchiveParser()
    parser.feed(synthetic(minor, tables, chunk))
    assert parser.finish() == {"public.a": 4, "s.B c": 3, "public.no_marker": 3,
                               "public.empty": 0}


@pytest.mark.parametrize(("data", "reason"), [
    (b"PGDMX" + bytes(20), "no PGDMP magic"),
    (b"PGDMP" + bytes([1, 17, 0, 4, 8, 1]) + bytes(20), "unsupported archive version 1.17"),
    (b"PGDMP" + bytes([1, 14, 0, 4, 8, 3]) + bytes(20), "format 3 is not custom"),
    (b"PGDMP" + bytes([1, 14, 0, 4, 8, 1]) + _int(6) + bytes(40), "compressed by pg_dump"),
])
def test_refused_headers(data: bytes, reason: str) -> None:
    """Not our archive, a newer version, another format or pg_dump's own compression: one
    clear FramingError naming why."""
    with pytest.raises(FramingError, match=reason):
        ArchiveParser().feed(data)


def test_exact_counts_records_tables_left_out() -> None:
    """Tables the server has but the stream lacks are kept, with their estimate, inexact."""
    counts, missing = exact_counts({"public.a": 3}, {"public.a": 2, "public.b": 50})
    assert counts == {"public.a": {"rows": 3, "exact": True},
                      "public.b": {"rows": 50, "exact": False}}
    assert missing == ["public.b"]


async def test_run_fails_when_pg_dump_output_is_cut(backup_setup: BackupSetup,
                                                    tmp_path: Path) -> None:
    """A pg_dump whose output is cut short but which exits 0 fails the run (pg_restore --list
    alone would accept an archive whose table of contents is whole); nothing is published."""
    real = backup_setup.cfg.database.pg_dump
    fake = tmp_path / "pg_dump"
    fake.write_text(f'#!/bin/sh\n"{real}" "$@" | head -c 30000\nexit 0\n')
    fake.chmod(0o755)
    result = await run_backup(backup_setup.with_(database={"pg_dump": str(fake)}))
    assert not result.ok
    assert "not a complete custom-format archive" in result.error
    assert spool.load_manifests(backup_setup.cfg.local.dir) == []
