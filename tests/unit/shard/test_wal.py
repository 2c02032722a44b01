import errno
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from floki.errors import DiskFull, StorageIOError
from floki.shard import files, segment as segment_module
from floki.shard.segment import (NO_RECORD, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE,
                                 index_from_bytes)
from floki.shard.wal import CorruptSegment, SegmentInfo, UnsupportedFormat, Wal, WalHealth

REPO = Path(__file__).resolve().parents[3]


def body_for(id_: int) -> bytes:
    """A body derived from the id, of varying length (some empty), so any mix-up shows."""
    return (b"%d:" % id_) * (id_ % 5)


def fill(wal: Wal, count: int, *, batch: int = 1, timestamp_ms: int = 1000) -> None:
    while count > 0:
        n = min(batch, count)
        first = wal.next_id
        assert wal.append([body_for(first + i) for i in range(n)], timestamp_ms) == (
            first, first + n - 1)
        count -= n


def assert_bodies(pairs):
    for id_, body in pairs:
        assert body == body_for(id_), id_


def seg_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".seg")


def record_offsets(directory: Path, first_id: int) -> list[int]:
    return list(index_from_bytes(files.index_path(directory, first_id).read_bytes()))


def pick_victim(offsets: list[int]) -> int:
    """Returns the entry of a record with a non-empty body that is neither first nor last."""
    return next(j for j in range(1, len(offsets) - 1)
                if offsets[j + 1] - offsets[j] > RECORD_HEADER_SIZE)


@pytest.fixture
def qdir(tmp_path):
    return tmp_path / "q"


# --- basics, rolling, reading -----------------------------------------------------------------

def test_new_log_starts_at_min_next_id_with_one_empty_segment(qdir):
    wal = Wal.open(qdir, segment_size=4096, min_next_id=7)
    assert (wal.first_id, wal.next_id, wal.synced_next_id) == (7, 7, 7)
    assert wal.segments() == [SegmentInfo(7, 7, SEGMENT_HEADER_SIZE, None, True)]
    assert seg_files(qdir) == ["00000000000000000007.seg"]
    assert wal.read(0, 10) == [] and wal.read_one(7) is None
    wal.close()


def test_append_returns_consecutive_ids_and_reads_them_back(qdir):
    wal = Wal.open(qdir, segment_size=1 << 20)
    assert wal.append([b"a", b"", b"\x00\xff"], 5) == (1, 3)
    assert wal.append([b"d"], 6) == (4, 4)
    assert wal.read(1, 10) == [(1, b"a"), (2, b""), (3, b"\x00\xff"), (4, b"d")]
    assert wal.read(2, 2) == [(2, b""), (3, b"\x00\xff")]
    assert wal.read(2, 10, end_id=3) == [(2, b"")]
    assert wal.read_one(3) == b"\x00\xff" and wal.read_one(5) is None
    assert wal.timestamp_of(4) == 6 and wal.timestamp_of(9) is None
    wal.close()


def test_roll_at_segment_size_and_segments_are_named_by_first_id(qdir):
    wal = Wal.open(qdir, segment_size=SEGMENT_HEADER_SIZE + 3 * (RECORD_HEADER_SIZE + 10))
    for _ in range(7):
        wal.append([b"0123456789"], 1)
    infos = wal.segments()
    assert [(s.first_id, s.end_id, s.active) for s in infos] == [
        (1, 4, False), (4, 7, False), (7, 8, True)]
    assert all(s.size_bytes <= wal.segment_size for s in infos)
    assert seg_files(qdir) == [files.segment_name(i) for i in (1, 4, 7)]
    assert wal.disk_bytes() == sum(p.stat().st_size for p in qdir.iterdir())
    wal.close()


def test_batch_never_splits_and_a_large_batch_gets_its_own_segment(qdir):
    wal = Wal.open(qdir, segment_size=200)
    wal.append([b"x" * 50], 1)                          # 1
    wal.append([b"y" * 100] * 5, 1)                     # 2..6: bigger than segment_size
    wal.append([b"z"], 1)                               # 7
    assert [(s.first_id, s.end_id) for s in wal.segments()] == [(1, 2), (2, 7), (7, 8)]
    assert [b for _, b in wal.read(1, 10)] == [b"x" * 50] + [b"y" * 100] * 5 + [b"z"]
    wal.close()


def test_segment_size_change_applies_to_the_next_roll(qdir):
    wal = Wal.open(qdir, segment_size=1 << 20)
    fill(wal, 10)
    wal.segment_size = 1
    fill(wal, 2)
    assert [(s.first_id, s.end_id) for s in wal.segments()] == [(1, 11), (11, 12), (12, 13)]
    wal.close()


def test_read_across_segment_boundaries_in_one_call(qdir):
    wal = Wal.open(qdir, segment_size=300)
    fill(wal, 100, batch=3)
    assert len(wal.segments()) > 5
    got = wal.read(1, 1000)
    assert [i for i, _ in got] == list(range(1, 101))
    assert_bodies(got)
    assert [i for i, _ in wal.read(10, 25)] == list(range(10, 35))
    assert [i for i, _ in wal.read(50, 1000, end_id=60)] == list(range(50, 60))
    wal.close()
    wal = Wal.open(qdir, segment_size=300)
    assert [i for i, _ in wal.read(0, 1000)] == list(range(1, 101))
    wal.close()


def test_sync_makes_synced_next_id_catch_up_and_is_then_a_no_op(qdir, monkeypatch):
    wal = Wal.open(qdir, segment_size=1 << 20)
    fill(wal, 3)
    assert wal.needs_sync and wal.synced_next_id == 1
    wal.sync()
    assert not wal.needs_sync and wal.synced_next_id == wal.next_id == 4
    calls = []
    monkeypatch.setattr(segment_module.os, "fsync", lambda fd: calls.append(fd))
    wal.sync()
    assert calls == []
    monkeypatch.undo()
    wal.close()


def test_memory_per_message_is_about_one_index_entry(qdir):
    wal = Wal.open(qdir, segment_size=1 << 30)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        body = [b"m"] * 1000
        for _ in range(20):
            wal.append(body, 1)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000 * 6           # 4 bytes per message plus array slack, no bodies
    wal.close()


# --- ids never go backwards -------------------------------------------------------------------

def test_min_next_id_above_the_disk_starts_a_new_segment_named_by_it(qdir):
    wal = Wal.open(qdir, segment_size=1 << 20)
    fill(wal, 5)
    wal.close()
    wal = Wal.open(qdir, segment_size=1 << 20, min_next_id=100)
    assert wal.next_id == 100 and wal.first_id == 1
    assert wal.append([b"x"], 1) == (100, 100)
    assert [(s.first_id, s.end_id) for s in wal.segments()] == [(1, 6), (100, 101)]
    assert [i for i, _ in wal.read(1, 10)] == [1, 2, 3, 4, 5, 100]
    wal.close()
    wal = Wal.open(qdir, segment_size=1 << 20)
    assert wal.next_id == 101
    wal.close()


def test_empty_newest_segment_name_counts_and_a_jump_replaces_it(qdir):
    wal = Wal.open(qdir, segment_size=1 << 20, min_next_id=50)
    wal.close()
    wal = Wal.open(qdir, segment_size=1 << 20)       # name 50 keeps next_id at 50
    assert wal.next_id == 50
    wal.close()
    wal = Wal.open(qdir, segment_size=1 << 20, min_next_id=80)
    assert wal.append([b"x"], 1) == (80, 80)
    assert seg_files(qdir) == [files.segment_name(80)]  # the empty one was not kept
    wal.close()


def test_purge_then_reopen_keeps_ids_growing(qdir):
    wal = Wal.open(qdir, segment_size=200)
    fill(wal, 30, batch=4)
    wal.purge()
    assert wal.first_id == wal.next_id == 31
    assert wal.read(0, 100) == [] and wal.read_one(5) is None
    assert wal.segments() == [SegmentInfo(31, 31, SEGMENT_HEADER_SIZE, None, True)]
    assert seg_files(qdir) == [files.segment_name(31)]
    assert not wal.needs_sync
    wal.close()
    wal = Wal.open(qdir, segment_size=200)
    assert wal.next_id == 31
    assert wal.append([b"after"], 1) == (31, 31)
    wal.purge()
    wal.purge()                                        # idempotent on an empty log
    wal.close()
    wal = Wal.open(qdir, segment_size=200)
    assert wal.next_id == 32 and wal.first_id == 32
    wal.close()


def test_remove_oldest_segment_never_removes_the_active_one(qdir):
    wal = Wal.open(qdir, segment_size=100)
    fill(wal, 6, timestamp_ms=5)
    count = len(wal.segments())
    assert count >= 3
    removed = []
    while len(wal.segments()) > 1:
        removed.append(wal.remove_oldest_segment())
    assert len(removed) == count - 1 and not any(r.active for r in removed)
    with pytest.raises(ValueError):
        wal.remove_oldest_segment()
    active = wal.segments()[0]
    assert active.active and wal.first_id == active.first_id
    assert [i for i, _ in wal.read(0, 100)] == list(range(active.first_id, 7))
    assert wal.read_one(1) is None
    assert seg_files(qdir) == [files.segment_name(active.first_id)]
    assert not any(p.suffix == ".idx" and p.stem != f"{active.first_id:020d}"
                   for p in qdir.iterdir())
    wal.close()


def test_find_id_by_timestamp_across_segments(qdir):
    wal = Wal.open(qdir, segment_size=150)
    assert wal.find_id_by_timestamp(5) == 1                # empty log: next_id
    for ts in (100, 100, 200, 300, 300, 300, 400, 500, 600, 700):
        wal.append([b"0123456789" * 3], ts)                # ids 1..10, ~3 per segment
    assert len(wal.segments()) >= 3
    expect = {0: 1, 100: 1, 101: 3, 200: 3, 250: 4, 300: 4, 301: 7, 400: 7, 450: 8,
              600: 9, 650: 10, 700: 10, 701: 11}
    for ts, id_ in expect.items():
        assert wal.find_id_by_timestamp(ts) == id_, ts
    wal.remove_oldest_segment()
    assert wal.find_id_by_timestamp(0) == wal.first_id
    wal.close()


def test_find_id_by_timestamp_reads_only_log_n_headers(qdir, monkeypatch):
    wal = Wal.open(qdir, segment_size=1 << 30)
    for i in range(1024):
        wal.append([b"payload" * 4], 1000 + i)
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(segment_module.os, "pread",
                        lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    assert wal.find_id_by_timestamp(1500) == 501
    monkeypatch.undo()
    assert len(reads) <= 12 and set(reads) == {RECORD_HEADER_SIZE}
    wal.close()


# --- torn tails -------------------------------------------------------------------------------

def test_truncated_tail_is_ignored(tmp_path):
    """Cut the active segment at every byte inside its last record; reopen must keep exactly
    the complete records, cut the file, and continue ids from the last complete one."""
    origin = tmp_path / "origin"
    wal = Wal.open(origin, segment_size=300)
    fill(wal, 20, batch=2)
    wal.append([b"the-last-record-body"], 1000)              # id 21
    wal.close()
    active_id = max(files.parse_segment_name(n) for n in seg_files(origin))
    last_start = record_offsets(origin, active_id)[-1]
    full_size = files.segment_path(origin, active_id).stat().st_size
    for cut in range(last_start, full_size):
        for min_next_id in ((1, 25) if cut % 8 == 0 else (1,)):
            work = tmp_path / f"cut{cut}-{min_next_id}"
            shutil.copytree(origin, work)
            with open(files.segment_path(work, active_id), "r+b") as f:
                f.truncate(cut)
            wal = Wal.open(work, segment_size=300, min_next_id=min_next_id)
            got = wal.read(0, 100)
            assert [i for i, _ in got] == list(range(1, 21))
            assert_bodies(got)
            assert files.segment_path(work, active_id).stat().st_size == last_start
            assert len(record_offsets(work, active_id)) == 21 - active_id
            assert wal.next_id == max(21, min_next_id)
            assert wal.append([b"new"], 2000)[0] == max(21, min_next_id)
            wal.close()
            shutil.rmtree(work)


def test_garbage_after_the_last_record_is_cut(qdir):
    wal = Wal.open(qdir, segment_size=1 << 20)
    fill(wal, 5)
    wal.close()
    path = files.segment_path(qdir, 1)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(os.urandom(100))
    wal = Wal.open(qdir, segment_size=1 << 20)
    assert path.stat().st_size == size and wal.next_id == 6
    assert_bodies(wal.read(0, 10))
    wal.close()


@pytest.mark.parametrize("length", [0, 2**31 - 1, 2**32 - 1, "past_eof"])
def test_hostile_length_in_the_active_tail_is_a_torn_write(qdir, length):
    wal = Wal.open(qdir, segment_size=1 << 20)
    fill(wal, 6)
    wal.close()
    path = files.segment_path(qdir, 1)
    last = record_offsets(qdir, 1)[-1]
    size = path.stat().st_size
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, last + 4, size if length == "past_eof" else length)
    path.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        wal = Wal.open(qdir, segment_size=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    assert [i for i, _ in wal.read(0, 10)] == [1, 2, 3, 4, 5] and wal.next_id == 6
    assert path.stat().st_size == last
    wal.close()


def test_unfinished_newest_segment_is_recreated(qdir):
    wal = Wal.open(qdir, segment_size=1 << 20)
    fill(wal, 4)
    wal.close()
    files.segment_path(qdir, 9).write_bytes(b"FLKS")    # crash while creating segment 9
    wal = Wal.open(qdir, segment_size=1 << 20)
    assert wal.next_id == 9
    assert files.segment_path(qdir, 9).stat().st_size == SEGMENT_HEADER_SIZE
    assert wal.append([b"x"], 1) == (9, 9)
    assert [i for i, _ in wal.read(0, 10)] == [1, 2, 3, 4, 9]
    wal.close()


# --- corruption in sealed segments ------------------------------------------------------------

def _sealed_log(qdir, count=30):
    wal = Wal.open(qdir, segment_size=250)
    fill(wal, count, batch=3)
    wal.close()
    ids = [files.parse_segment_name(n) for n in seg_files(qdir)]
    assert len(ids) >= 3
    return ids


@pytest.mark.parametrize("where", ["crc", "length", "id", "timestamp", "body"])
def test_flipped_byte_in_sealed_segment_is_skipped_and_counted(qdir, where):
    ids = _sealed_log(qdir)
    sealed = ids[1]
    offsets = record_offsets(qdir, sealed)
    j = pick_victim(offsets)
    victim = sealed + j
    field = {"crc": 0, "length": 4, "id": 8, "timestamp": 16, "body": RECORD_HEADER_SIZE}[where]
    path = files.segment_path(qdir, sealed)
    raw = bytearray(path.read_bytes())
    raw[offsets[j] + field] ^= 0x40
    path.write_bytes(bytes(raw))
    wal = Wal.open(qdir, segment_size=250)
    got = wal.read(0, 100)
    assert [i for i, _ in got] == [i for i in range(1, 31) if i != victim]
    assert_bodies(got)
    assert wal.corrupt_records == 1
    assert wal.read_one(victim) is None and wal.corrupt_records == 1     # logged/counted once
    assert path.read_bytes() == bytes(raw)
    wal.close()


@pytest.mark.parametrize("length", [0, 2**31 - 1, 2**32 - 1, "past_eof"])
@pytest.mark.parametrize("index", ["kept", "missing"])
def test_hostile_length_in_sealed_segment_is_skipped(qdir, length, index):
    ids = _sealed_log(qdir, count=45)
    sealed = ids[1]
    offsets = record_offsets(qdir, sealed)
    j = pick_victim(offsets)
    path = files.segment_path(qdir, sealed)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, offsets[j] + 4, len(raw) if length == "past_eof" else length)
    path.write_bytes(bytes(raw))
    if index == "missing":
        files.index_path(qdir, sealed).unlink()
    tracemalloc.start()
    try:
        wal = Wal.open(qdir, segment_size=250)
        got = wal.read(0, 100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert [i for i, _ in got] == [i for i in range(1, 46) if i != sealed + j]
    assert_bodies(got)
    assert wal.corrupt_records == 1
    wal.close()
    if index == "missing":            # the rebuilt index marks the id and is reused
        assert record_offsets(qdir, sealed)[j] == NO_RECORD


@pytest.fixture(scope="module")
def sealed_origin(tmp_path_factory):
    origin = tmp_path_factory.mktemp("sealed") / "q"
    return origin, _sealed_log(origin, count=40)


@settings(max_examples=60, deadline=None)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                      min_size=1, max_size=8),
       drop_index=st.booleans())
def test_bit_flips_in_sealed_segment_never_serve_a_wrong_body(sealed_origin, flips,
                                                              drop_index):
    origin, ids = sealed_origin
    with tempfile.TemporaryDirectory() as tmp:
        qdir = Path(tmp) / "q"
        shutil.copytree(origin, qdir)
        path = files.segment_path(qdir, ids[1])
        raw = bytearray(path.read_bytes())
        for where, bit in flips:
            raw[SEGMENT_HEADER_SIZE + int(where * (len(raw) - SEGMENT_HEADER_SIZE))] ^= 1 << bit
        path.write_bytes(bytes(raw))
        if drop_index:
            files.index_path(qdir, ids[1]).unlink()
        wal = Wal.open(qdir, segment_size=250)
        got = wal.read(0, 100)
        assert_bodies(got)
        served = {i for i, _ in got}
        damaged = set(range(ids[1], ids[2]))
        assert set(range(1, 41)) - damaged <= served <= set(range(1, 41))
        missing = len(damaged - served)
        if drop_index:          # a lost tail counts at least one record
            assert (wal.corrupt_records > 0) == (missing > 0)
            assert wal.corrupt_records <= missing
        else:                   # every id is either served or counted
            assert wal.corrupt_records == missing
        wal.close()


@settings(max_examples=60, deadline=None)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                      min_size=1, max_size=4),
       which=st.sampled_from(["sealed", "active"]))
def test_bit_flips_in_an_index_file_never_lose_a_record(sealed_origin, flips, which):
    origin, ids = sealed_origin
    with tempfile.TemporaryDirectory() as tmp:
        qdir = Path(tmp) / "q"
        shutil.copytree(origin, qdir)
        path = files.index_path(qdir, ids[1] if which == "sealed" else ids[-1])
        raw = bytearray(path.read_bytes())
        for where, bit in flips:
            raw[int(where * len(raw))] ^= 1 << bit
        path.write_bytes(bytes(raw))
        wal = Wal.open(qdir, segment_size=250)
        got = wal.read(0, 100)
        assert [i for i, _ in got] == list(range(1, 41))
        assert_bodies(got)
        assert wal.corrupt_records == 0
        wal.close()


def test_damaged_index_of_sealed_segment_is_rebuilt(qdir):
    ids = _sealed_log(qdir)
    idx = files.index_path(qdir, ids[0])
    good = idx.read_bytes()
    idx.write_bytes(good[:-6])
    files.index_path(qdir, ids[1]).unlink()
    wal = Wal.open(qdir, segment_size=250)
    got = wal.read(0, 100)
    assert [i for i, _ in got] == list(range(1, 31))
    assert_bodies(got)
    assert wal.corrupt_records == 0
    wal.close()
    assert idx.read_bytes() == good and files.index_path(qdir, ids[1]).exists()


@pytest.mark.parametrize("position", ["sealed", "active"])
def test_bad_magic_is_refused_naming_the_file_and_left_untouched(qdir, position):
    ids = _sealed_log(qdir)
    victim = files.segment_path(qdir, ids[0] if position == "sealed" else ids[-1])
    raw = bytearray(victim.read_bytes())
    raw[0:8] = b"XXXXXXXX"
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptSegment, match=victim.name):
        Wal.open(qdir, segment_size=250)
    assert victim.read_bytes() == bytes(raw)


def test_unknown_version_is_refused(qdir):
    ids = _sealed_log(qdir)
    victim = files.segment_path(qdir, ids[-1])
    raw = bytearray(victim.read_bytes())
    struct.pack_into("<I", raw, 8, 99)
    victim.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedFormat, match="version 99"):
        Wal.open(qdir, segment_size=250)
    assert victim.read_bytes() == bytes(raw)


def test_stray_files_are_ignored_and_orphan_index_removed(qdir):
    _sealed_log(qdir, count=20)
    (qdir / "notes.txt").write_text("hi")
    (qdir / "12.seg").write_bytes(b"junk")
    files.index_path(qdir, 999).write_bytes(b"\x20\x00\x00\x00")
    wal = Wal.open(qdir, segment_size=250)
    assert [i for i, _ in wal.read(0, 100)] == list(range(1, 21))
    wal.close()
    assert (qdir / "notes.txt").exists() and (qdir / "12.seg").exists()
    assert not files.index_path(qdir, 999).exists()


# --- disk errors ------------------------------------------------------------------------------

def _fail_next_segment_write(monkeypatch, err):
    """Makes the next os.write write half its data, then raise OSError(err)."""
    real_write = os.write
    state = {"armed": True}

    def flaky_write(fd, data):
        if state["armed"]:
            state["armed"] = False
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(err, os.strerror(err))
        return real_write(fd, data)

    monkeypatch.setattr(segment_module.os, "write", flaky_write)
    return state


@pytest.mark.parametrize("err,error_type", [(errno.ENOSPC, DiskFull), (errno.EDQUOT, DiskFull),
                                            (errno.EIO, StorageIOError)])
def test_failed_write_leaves_no_partial_record_and_later_appends_work(qdir, monkeypatch, err,
                                                                      error_type):
    wal = Wal.open(qdir, segment_size=1 << 20)
    fill(wal, 3)
    size = files.segment_path(qdir, 1).stat().st_size
    state = _fail_next_segment_write(monkeypatch, err)
    with pytest.raises(error_type):
        wal.append([b"lost-1", b"lost-2"], 1)
    assert not state["armed"]
    assert files.segment_path(qdir, 1).stat().st_size == size
    assert wal.next_id == 4
    monkeypatch.undo()
    assert wal.append([b"kept"], 1) == (4, 4)
    assert wal.read(3, 10) == [(3, body_for(3)), (4, b"kept")]
    wal.close()
    wal = Wal.open(qdir, segment_size=1 << 20)
    assert wal.read(3, 10) == [(3, body_for(3)), (4, b"kept")] and wal.corrupt_records == 0
    wal.close()


def test_failed_index_write_does_not_fail_the_append_and_is_repaired(qdir, monkeypatch):
    wal = Wal.open(qdir, segment_size=1 << 20)
    fill(wal, 3)
    real_write = os.write
    index_fd = wal._segments[-1]._index_fd

    def index_write_fails(fd, data):
        if fd == index_fd:
            real_write(fd, bytes(data[:3]))
            raise OSError(errno.ENOSPC, "full")
        return real_write(fd, data)

    monkeypatch.setattr(segment_module.os, "write", index_write_fails)
    assert wal.append([b"a", b"b"], 1) == (4, 5)
    assert wal.append([b"c"], 1) == (6, 6)
    monkeypatch.undo()
    assert len(files.index_path(qdir, 1).read_bytes()) == 3 * 4     # cut back, not torn
    wal.sync()
    assert record_offsets(qdir, 1) == list(wal._segments[-1].offsets)
    wal.close()
    wal = Wal.open(qdir, segment_size=1 << 20)
    assert [b for _, b in wal.read(4, 10)] == [b"a", b"b", b"c"]
    wal.close()


def test_close_releases_every_file_descriptor(qdir):
    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    wal = Wal.open(qdir, segment_size=200)
    fill(wal, 30, batch=3)
    wal.close()
    wal.close()                                          # idempotent
    assert open_fds() == before
    wal = Wal.open(qdir, segment_size=200)
    wal.read(0, 100)
    wal.purge()
    wal.close()
    assert open_fds() == before
    wal = Wal.open(qdir, segment_size=200)
    wal.append([b"x"], 1)
    wal.segment_size = 1
    wal.append([b"y"], 1)
    assert [s.first_id for s in wal.segments()] == [31, 32]
    wal.close()
    files.segment_path(qdir, 31).write_bytes(b"BADMAGIC" + bytes(40))   # after 32 is open
    with pytest.raises(CorruptSegment):
        Wal.open(qdir, segment_size=200)
    assert open_fds() == before


def test_failed_roll_keeps_the_old_segment_active(qdir, monkeypatch):
    wal = Wal.open(qdir, segment_size=100)
    wal.append([b"x" * 60], 1)
    real_open = os.open

    def no_new_files(path, flags, *args):
        if flags & os.O_EXCL:
            raise OSError(errno.ENOSPC, "full")
        return real_open(path, flags, *args)

    monkeypatch.setattr(segment_module.os, "open", no_new_files)
    with pytest.raises(DiskFull):
        wal.append([b"y" * 60], 1)
    monkeypatch.undo()
    assert len(wal.segments()) == 1 and wal.next_id == 2
    assert wal.append([b"y" * 60], 1) == (2, 2)
    assert [b for _, b in wal.read(0, 10)] == [b"x" * 60, b"y" * 60]
    wal.close()


# --- kill -9 ----------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from floki.shard.wal import Wal

    def body_for(id_):
        return (b"%d:" % id_) * (id_ % 5)

    wal = Wal.open(Path(sys.argv[1]), segment_size=4096)
    size = 1
    while True:
        first = wal.next_id
        acked = wal.append([body_for(first + i) for i in range(size)], 1)
        print(acked[0], acked[1], flush=True)
        size = size % 7 + 1
""")


def test_kill_9_loses_no_acknowledged_append(qdir):
    acked = []
    for _round in range(2):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(qdir)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out = b""
            deadline = None
            while True:
                ready, _, _ = select.select([proc.stdout], [], [], 5)
                assert ready, "child printed nothing"
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, proc.stderr.read().decode()
                out += chunk
                if deadline is None:
                    deadline = time.monotonic() + 0.5
                if time.monotonic() >= deadline:
                    break
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            out += proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        lines = out.split(b"\n")[:-1]        # a line without its newline was not acknowledged
        assert lines
        acked += [tuple(map(int, line.split())) for line in lines]
    wal = Wal.open(qdir, segment_size=4096)
    expected_ids = [i for first, last in acked for i in range(first, last + 1)]
    assert expected_ids == sorted(set(expected_ids))
    got = dict(wal.read(0, len(expected_ids) + 100))
    for id_ in expected_ids:
        assert got.get(id_) == body_for(id_), id_
    assert wal.next_id >= expected_ids[-1] + 1
    assert wal.corrupt_records == 0
    wal.close()


# --- a background fsync (wal.py rule 9; background.py rules b, g) ---------------------------

def test_a_pending_sync_works_on_a_dup_and_closes_it(tmp_path):
    wal = Wal.open(tmp_path / "q", segment_size=1 << 20)
    wal.append([b"a"], 1)
    pending = wal.start_sync()
    active_fd = wal._segments[-1].fd
    assert pending.segment_fd != active_fd
    assert os.fstat(pending.segment_fd).st_ino == os.fstat(active_fd).st_ino
    with pytest.raises(ValueError):
        wal.start_sync()                             # one at a time
    with pytest.raises(RuntimeError):
        wal.sync()                                   # nobody settles it: refused, not raced
    thread = threading.Thread(target=pending.run)
    thread.start()
    thread.join(10.0)
    with pytest.raises(OSError):
        os.fstat(pending.segment_fd)                 # closed by run()
    assert wal.finish_sync(pending, None) is None
    assert wal.synced_next_id == 2 and not wal.needs_sync
    assert wal.start_sync() is None                  # nothing left to sync
    wal.close()


def test_a_pending_sync_that_never_runs_releases_its_fd(tmp_path):
    wal = Wal.open(tmp_path / "q", segment_size=1 << 20)
    wal.append([b"a"], 1)
    pending = wal.start_sync()
    error = wal.finish_sync(pending, OSError(errno.EIO, "never ran"))
    assert isinstance(error, StorageIOError) and wal.health is WalHealth.FAILED
    with pytest.raises(OSError):
        os.fstat(pending.segment_fd)
    wal.sync()                                       # the probe
    assert wal.health is WalHealth.OK
    wal.close()
