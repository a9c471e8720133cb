"""WAL names, LSNs, shipped object names and the tar watcher (pure logic, table-tested)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from mt5backupd.backup.basebackup import wal_range
from mt5backupd.backup.tarwatch import TarWatcher
from mt5backupd.errors import Mt5BackupError
from mt5backupd.wal.receivewal import repair_partials
from mt5backupd.wal.shipper import ShippedIndex, chain_complete
from mt5backupd.walnames import (
    WalObject,
    data_end,
    format_lsn,
    next_segment,
    object_name,
    parse_lsn,
    parse_object,
    segment_name,
    segment_number,
)

MB16 = 16 * 1024 * 1024


@pytest.mark.parametrize(("lsn", "value"), [("0/0", 0), ("0/2000028", 0x2000028),
                                            ("1/FF000000", (1 << 32) | 0xFF000000)])
def test_lsn_round_trip(lsn: str, value: int) -> None:
    """LSN text parses to its 64-bit position and formats back."""
    assert parse_lsn(lsn) == value
    assert format_lsn(value) == lsn


@pytest.mark.parametrize("bad", ["", "2000028", "x/1"])
def test_bad_lsn_refused(bad: str) -> None:
    """Text that is not an LSN is a ValueError."""
    with pytest.raises(ValueError):
        parse_lsn(bad)


@pytest.mark.parametrize(("timeline", "lsn", "name"), [
    (1, 0x2000028, "000000010000000000000002"),
    (1, (1 << 32) | 0xFF000000, "0000000100000001000000FF"),
    (2, 0x0FFFFFFF, "00000002000000000000000F"),
])
def test_segment_names(timeline: int, lsn: int, name: str) -> None:
    """The segment holding an LSN, and back to its number."""
    assert segment_name(timeline, lsn) == name
    assert segment_number(name) == (timeline, lsn // MB16)


def test_next_segment_crosses_the_log_boundary() -> None:
    """After ...000000FF comes the next "log" (2^32 bytes of WAL)."""
    assert next_segment("0000000100000000000000FF") == "000000010000000100000000"
    assert next_segment("000000010000000000000002") == "000000010000000000000003"


@pytest.mark.parametrize(("name", "parsed"), [
    ("000000010000000000000002.wal.zst", WalObject("000000010000000000000002", None, False)),
    ("000000010000000000000002-p81920.wal.zst.age",
     WalObject("000000010000000000000002", 81920, True)),
    ("base-20261129-121552.tar.zst", None),
    ("00000001000000000000002.wal.zst", None),
])
def test_wal_object_names(name: str, parsed: WalObject | None) -> None:
    """Shipped WAL ids parse back; anything else is not a WAL object."""
    assert parse_object(name) == parsed
    if parsed is not None and not parsed.encrypted:
        assert object_name(parsed.segment, parsed.upto) == name


@pytest.mark.parametrize(("data", "end"), [
    (bytes(32768), 0),
    (b"x" + bytes(32767), 1),
    (bytes(8192) + b"xy" + bytes(8190) + bytes(16384), 8194),
    (bytes(24575) + b"x", 24576),
])
def test_data_end_of_a_zero_padded_partial(data: bytes, end: int) -> None:
    """The end of the WAL in a zero-padded segment: just after its last non-zero byte."""
    assert data_end(data) == end


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("piece", [1, 511, 512, 513, 4096, 10**6])
def test_tar_watcher_keeps_wanted_members_whatever_the_pieces(piece: int) -> None:
    """Members asked for are captured exactly, however the stream is cut."""
    manifest = json.dumps({"WAL-Ranges": []}).encode() * 50
    stream = _tar({"base/1/123": b"a" * 5000, "empty": b"", "backup_manifest": manifest})
    watcher = TarWatcher(("backup_manifest", "empty"))
    for i in range(0, len(stream), piece):
        watcher.feed(stream[i:i + piece])
    assert watcher.files == {"backup_manifest": manifest, "empty": b""}


def test_wal_range_from_a_backup_manifest() -> None:
    """The range recorded for a base backup: LSNs and the segments that hold them."""
    manifest = json.dumps({"WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/2000028",
                                           "End-LSN": "0/3000100"}]}).encode()
    assert wal_range(manifest, MB16) == {
        "timeline": 1, "start_lsn": "0/2000028", "end_lsn": "0/3000100",
        "start_segment": "000000010000000000000002", "end_segment": "000000010000000000000003",
        "segment_bytes": MB16}
    with pytest.raises(Mt5BackupError, match="WAL-Ranges"):
        wal_range(b"{}", MB16)


def test_repair_partials_after_a_kill_during_preallocation(tmp_path: Path) -> None:
    """A cut-short all-zero .partial is removed, one with data is moved aside, whole-segment
    and empty ones are left alone."""
    (tmp_path / "000000010000000000000001.partial").write_bytes(bytes(9805824))
    (tmp_path / "000000010000000000000002.partial").write_bytes(b"wal" + bytes(1000))
    (tmp_path / "000000010000000000000003.partial").write_bytes(bytes(MB16))
    (tmp_path / "000000010000000000000004.partial").write_bytes(b"")
    assert repair_partials(tmp_path) == ["000000010000000000000001.partial",
                                         "000000010000000000000002.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000000010000000000000002.partial.broken", "000000010000000000000003.partial",
        "000000010000000000000004.partial"]


@pytest.mark.parametrize(("full", "upto", "complete"), [
    ({"000000010000000000000003", "000000010000000000000004"}, {}, True),
    ({"000000010000000000000003"}, {"000000010000000000000004": 4096}, True),
    ({"000000010000000000000003"}, {"000000010000000000000004": 200}, False),
    ({"000000010000000000000004"}, {}, False),
])
def test_chain_complete(full: set[str], upto: dict[str, int], complete: bool) -> None:
    """A base's WAL is complete when every segment to its end is stored, the last maybe as a
    snapshot that reaches its end LSN."""
    wal = {"start_segment": "000000010000000000000003", "end_segment": "000000010000000000000004",
           "end_lsn": "0/4000100", "segment_bytes": MB16}
    assert chain_complete(wal, ShippedIndex(full, upto, "", "", 0)) is complete
