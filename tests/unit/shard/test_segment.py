import errno
import os
import random
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from faultfs import FaultyFileIO, OsLayer
from floki.shard import fileio, files
from floki.shard.segment import (FORMAT_VERSION, IOV_MAX, LARGE_BODY_BYTES, NO_RECORD,
                                 RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, SEGMENT_MAGIC,
                                 BadRecord, CorruptSegment, Segment, UnfinishedSegment,
                                 UnsupportedFormat, decode_record, decode_segment_header,
                                 encode_batch, encode_record, encode_segment_header,
                                 index_from_bytes, index_to_bytes, parse_record, writev_all)

U64 = st.integers(min_value=0, max_value=2**64 - 1)


# --- record codec ---------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"", b"x", b"\x00" * 7, bytes(range(256)), b"\xff" * 70000])
def test_record_round_trip(body):
    data = encode_record(42, 1_700_000_000_123, body)
    assert len(data) == RECORD_HEADER_SIZE + len(body)
    assert decode_record(data) == (42, 1_700_000_000_123, body)


@settings(max_examples=200, deadline=None)
@given(id_=U64, timestamp_ms=U64, body=st.binary(max_size=300))
def test_record_round_trip_property(id_, timestamp_ms, body):
    assert decode_record(encode_record(id_, timestamp_ms, body)) == (id_, timestamp_ms, body)


@settings(max_examples=200, deadline=None)
@given(id_=U64, timestamp_ms=U64, body=st.binary(max_size=200), data=st.data())
def test_any_single_byte_change_is_detected(id_, timestamp_ms, body, data):
    record = bytearray(encode_record(id_, timestamp_ms, body))
    position = data.draw(st.integers(min_value=0, max_value=len(record) - 1), label="position")
    delta = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    record[position] ^= delta
    with pytest.raises(BadRecord):
        decode_record(bytes(record))


def test_batch_encoding_matches_single_records_and_offsets():
    bodies = [b"a", b"", b"ccc"]
    data, offsets = encode_batch(10, 5, bodies, start_offset=SEGMENT_HEADER_SIZE)
    assert data == b"".join(encode_record(10 + i, 5, b) for i, b in enumerate(bodies))
    assert list(offsets) == [32, 32 + 25, 32 + 25 + 24]


@pytest.mark.parametrize("length", [0, 1, 2**31 - 1, 2**32 - 1])
def test_hostile_length_is_rejected_before_use(length):
    record = bytearray(encode_record(1, 2, b"abcdef"))
    struct.pack_into("<I", record, 4, length)
    assert parse_record(bytes(record), 0, len(record)) is None


def test_short_header_and_short_body_do_not_parse():
    record = encode_record(1, 2, b"abcdef")
    for cut in range(len(record)):
        assert parse_record(record[:cut], 0, cut) is None


def test_worked_example_in_log_format_matches_the_code():
    text = (Path(files.__file__).parent / "log_format.md").read_text()
    section = text.split("## Worked example", 1)[1]
    block = section.split("```", 2)[1]
    documented = bytes.fromhex("".join(
        " ".join(m.group(1).split()[:16]) for m in
        re.finditer(r"^[0-9a-f]{8}  ((?:[0-9a-f]{2} ?)+)", block, re.M)))
    expected = (encode_segment_header(1, 1_700_000_000_000)
                + encode_record(1, 1_700_000_000_123, b"hello")
                + encode_record(2, 1_700_000_000_123, b""))
    assert documented == expected
    assert "`20 00 00 00 3d 00 00 00`" in section


# --- segment header ---------------------------------------------------------------------------

def test_segment_header_round_trip():
    header = encode_segment_header(77, 123)
    assert len(header) == SEGMENT_HEADER_SIZE == 32
    assert header[:8] == SEGMENT_MAGIC
    assert decode_segment_header(header, Path("x.seg")) == (77, 123)


def test_bad_magic_is_corrupt_segment_naming_the_file():
    header = b"NOTFLOKI" + encode_segment_header(1, 1)[8:]
    with pytest.raises(CorruptSegment, match="bad magic") as err:
        decode_segment_header(header, Path("/d/00000000000000000001.seg"))
    assert "00000000000000000001.seg" in str(err.value)
    assert not isinstance(err.value, (UnsupportedFormat, UnfinishedSegment))


def test_unknown_version_is_unsupported_format():
    header = struct.pack("<8sIIQQ", SEGMENT_MAGIC, FORMAT_VERSION + 1, 0, 1, 1)
    with pytest.raises(UnsupportedFormat, match="version 2"):
        decode_segment_header(header, Path("s.seg"))


@pytest.mark.parametrize("data", [b"", b"FLK", bytes(32)])
def test_short_or_zero_header_is_unfinished(data):
    with pytest.raises(UnfinishedSegment):
        decode_segment_header(data, Path("s.seg"))


# --- one segment file -----------------------------------------------------------------------

def _segment_with(tmp_path, count, first_id=1):
    segment = Segment.create(tmp_path, first_id, 1000)
    for i in range(count):
        data, offsets = encode_batch(first_id + i, 2000 + i, [b"body-%d" % i],
                                     segment.size_bytes)
        segment.append(data, offsets, 2000 + i)
    segment.sync()
    segment.close()
    return files.segment_path(tmp_path, first_id), files.index_path(tmp_path, first_id)


def _read_all(segment):
    out = []
    segment.read(segment.first_id, len(segment.offsets), out)
    return out


def test_index_file_is_the_raw_offset_array(tmp_path):
    seg_path, idx_path = _segment_with(tmp_path, 3)
    entries = index_from_bytes(idx_path.read_bytes())
    assert list(entries) == [32, 32 + 30, 32 + 60]
    assert idx_path.read_bytes() == struct.pack("<3I", 32, 62, 92)
    assert index_to_bytes(entries) == idx_path.read_bytes()


@pytest.mark.parametrize("damage", ["missing", "empty", "half_entry", "past_eof", "garbage",
                                    "decreasing"])
def test_damaged_index_is_rebuilt(tmp_path, damage):
    seg_path, idx_path = _segment_with(tmp_path, 20)
    good = idx_path.read_bytes()
    damaged = {
        "missing": None,
        "empty": b"",
        "half_entry": good[:-2],
        "past_eof": good + struct.pack("<I", seg_path.stat().st_size + 100),
        "garbage": good[:40] + os.urandom(40),
        "decreasing": good[:20] + struct.pack("<I", 40) + good[24:],
    }[damage]
    for active in (False, True):
        if damaged is None:
            idx_path.unlink()
        else:
            idx_path.write_bytes(damaged)
        segment = Segment.open(tmp_path, 1, active=active)
        try:
            assert [b for _, b in _read_all(segment)] == [b"body-%d" % i for i in range(20)]
            assert segment.lost_records == 0
        finally:
            segment.close()
        assert idx_path.read_bytes() == good


def test_corrupt_record_in_sealed_segment_gets_no_record_when_index_is_rebuilt(tmp_path):
    seg_path, idx_path = _segment_with(tmp_path, 10)
    entries = index_from_bytes(idx_path.read_bytes())
    raw = bytearray(seg_path.read_bytes())
    raw[entries[4] + RECORD_HEADER_SIZE] ^= 0x01        # body of id 5
    seg_path.write_bytes(bytes(raw))
    idx_path.unlink()
    segment = Segment.open(tmp_path, 1, active=False)
    try:
        assert segment.offsets[4] == NO_RECORD
        assert segment.lost_records == 1
        assert [i for i, _ in _read_all(segment)] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    finally:
        segment.close()
    assert seg_path.read_bytes() == bytes(raw)          # a sealed file is never modified


def test_appending_to_a_reopened_active_segment_continues_the_index(tmp_path):
    _segment_with(tmp_path, 2)
    segment = Segment.open(tmp_path, 1, active=True)
    data, offsets = encode_batch(3, 9, [b"three"], segment.size_bytes)
    segment.append(data, offsets, 9)
    segment.sync()
    segment.close()
    segment = Segment.open(tmp_path, 1, active=False)
    try:
        assert [b for _, b in _read_all(segment)] == [b"body-0", b"body-1", b"three"]
        assert segment.first_timestamp_ms == 2000 and segment.newest_timestamp_ms == 9
    finally:
        segment.close()


# --- large bodies: written uncopied with writev, read back as memoryview slices ---------------

LARGE = LARGE_BODY_BYTES
MIXED_SIZES = [0, 5, LARGE - 1, LARGE, LARGE + 1, 100, 65536, 70000, 3]


def _bodies(sizes, seed=0):
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in sizes]


def _append(segment, bodies, timestamp_ms=5):
    data, offsets = encode_batch(segment.end_id, timestamp_ms, bodies, segment.size_bytes)
    segment.append(data, offsets, timestamp_ms)


def _records_in(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Every record of a segment file's bytes, checked with parse_record/decode_record."""
    out, pos = [], SEGMENT_HEADER_SIZE
    while pos < len(raw):
        parsed = parse_record(raw, pos, len(raw))
        assert parsed is not None, f"no valid record at {pos}"
        out.append(decode_record(raw[pos:parsed[2]]))
        pos = parsed[2]
    return out


def test_a_batch_with_large_bodies_is_a_buffer_list_of_the_same_bytes():
    bodies = _bodies(MIXED_SIZES)
    data, offsets = encode_batch(10, 5, bodies, start_offset=SEGMENT_HEADER_SIZE)
    assert isinstance(data, list)
    joined = b"".join(data)
    assert joined == b"".join(encode_record(10 + i, 5, b) for i, b in enumerate(bodies))
    for body in bodies:              # the large bodies are the caller's objects, not copies
        assert any(part is body for part in data) == (len(body) >= LARGE)
    for i, (offset, body) in enumerate(zip(offsets, bodies)):
        rel = offset - SEGMENT_HEADER_SIZE
        end = rel + RECORD_HEADER_SIZE + len(body)
        assert parse_record(joined, rel, len(joined)) == (10 + i, 5, end)
        assert decode_record(joined[rel:end]) == (10 + i, 5, body)


def test_a_batch_of_small_bodies_stays_one_bytes_object():
    data, _ = encode_batch(1, 2, [b"x" * (LARGE - 1), b"", b"y"], SEGMENT_HEADER_SIZE)
    assert type(data) is bytes


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.one_of(st.sampled_from([0, 1, LARGE - 1, LARGE, LARGE + 1]),
                                st.integers(min_value=0, max_value=3 * LARGE)), max_size=12),
       kind=st.sampled_from([bytes, bytearray, memoryview]), first_id=st.integers(1, 2**40),
       start=st.integers(SEGMENT_HEADER_SIZE, 2**31))
def test_batch_encoding_equals_record_by_record_encoding(sizes, kind, first_id, start):
    bodies = _bodies(sizes, seed=len(sizes))
    data, offsets = encode_batch(first_id, 77, [kind(b) for b in bodies], start)
    joined = data if isinstance(data, bytes) else b"".join(map(bytes, data))
    assert joined == b"".join(encode_record(first_id + i, 77, b) for i, b in enumerate(bodies))
    assert isinstance(data, list) == any(len(b) >= LARGE for b in bodies)
    expected_offsets, pos = [], start
    for body in bodies:
        expected_offsets.append(pos)
        pos += RECORD_HEADER_SIZE + len(body)
    assert list(offsets) == expected_offsets


def test_large_records_round_trip_through_a_segment(tmp_path):
    batches = [_bodies(MIXED_SIZES, seed=s) for s in range(3)] + [_bodies([10] * 5, seed=9)]
    expected = [body for batch in batches for body in batch]
    segment = Segment.create(tmp_path, 1, 1000)
    try:
        for n, bodies in enumerate(batches):
            _append(segment, bodies, 2000 + n)
        got = _read_all(segment)
        assert [i for i, _ in got] == list(range(1, len(expected) + 1))
        assert [bytes(body) for _, body in got] == expected
        assert all(type(body) is (memoryview if len(body) >= LARGE else bytes)
                   for _, body in got)
        views = [body for _, body in got if isinstance(body, memoryview)]
        assert len({id(view.obj) for view in views}) < len(views)    # slices of one pread
        assert all(view.readonly and view == bytes(view) and hash(view) == hash(bytes(view))
                   for view in views)
        for start in range(1, len(expected) + 1, 4):                 # runs that start anywhere
            out = []
            assert segment.read(start, 4, out) == []
            assert [bytes(b) for _, b in out] == expected[start - 1:start + 3]
        segment.sync()
    finally:
        segment.close()
    seg_path = files.segment_path(tmp_path, 1)
    assert [(i, ts, body) for i, ts, body in _records_in(seg_path.read_bytes())] == [
        (k + 1, 2000 + n, body) for k, (n, body) in
        enumerate((n, body) for n, batch in enumerate(batches) for body in batch)]
    files.index_path(tmp_path, 1).unlink()          # rebuilt by scanning, then trusted
    for active in (False, True, False):
        segment = Segment.open(tmp_path, 1, active=active, check_every_record=active)
        try:
            assert [bytes(b) for _, b in _read_all(segment)] == expected
            assert segment.lost_records == 0
        finally:
            segment.close()


def test_a_damaged_large_body_is_skipped_and_reported(tmp_path):
    segment = Segment.create(tmp_path, 1, 1000)
    bodies = _bodies([70000, 65536, 2000], seed=4)
    _append(segment, bodies)
    segment.sync()
    victim = segment.offsets[1] + RECORD_HEADER_SIZE + 40000
    segment.close()
    seg_path = files.segment_path(tmp_path, 1)
    raw = bytearray(seg_path.read_bytes())
    raw[victim] ^= 0x10
    seg_path.write_bytes(bytes(raw))
    segment = Segment.open(tmp_path, 1, active=False)
    try:
        out = []
        assert segment.read(1, 3, out) == [2]
        assert [(i, bytes(b)) for i, b in out] == [(1, bodies[0]), (3, bodies[2])]
    finally:
        segment.close()


class _ShortWritev(OsLayer):
    """The os functions, but a writev writes at most `limit` bytes (as the kernel may), and
    more than IOV_MAX buffers in one call fail the test."""

    def __init__(self, limit: int):
        self.limit = limit
        self.buffer_counts: list[int] = []

    def writev(self, fd, buffers):
        assert 0 < len(buffers) <= IOV_MAX
        self.buffer_counts.append(len(buffers))
        return os.write(fd, b"".join(map(bytes, buffers))[:self.limit])


@pytest.mark.parametrize("limit,count", [(1, 40), (7, 300), (1000, 2 * IOV_MAX + 5),
                                         (1 << 30, 2 * IOV_MAX + 5)])
def test_writev_all_loops_on_partial_writes_and_caps_buffers_per_call(tmp_path, limit, count):
    rng = random.Random(limit)
    buffers = [rng.randbytes(rng.choice([0, 1, 3, 50])) for _ in range(count)]
    buffers += [memoryview(rng.randbytes(5000)), bytearray(b"tail")]
    before = list(buffers)
    path = tmp_path / "f"
    layer = _ShortWritev(limit)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        with fileio.installed(layer):
            total = writev_all(fd, buffers)
    finally:
        os.close(fd)
    expected = b"".join(map(bytes, buffers))
    assert total == len(expected) and path.read_bytes() == expected
    assert buffers == before and all(a is b for a, b in zip(buffers, before))  # caller's list
    assert len(layer.buffer_counts) >= (count + 2 + IOV_MAX - 1) // IOV_MAX
    if limit < len(expected):
        assert len(layer.buffer_counts) >= len(expected) // limit


def test_append_survives_short_writevs(tmp_path):
    bodies = _bodies(MIXED_SIZES, seed=5)
    segment = Segment.create(tmp_path, 1, 1000)
    try:
        with fileio.installed(_ShortWritev(4099)):
            _append(segment, bodies)
        assert [bytes(b) for _, b in _read_all(segment)] == bodies
        assert segment.size_bytes == os.path.getsize(segment.path)
    finally:
        segment.close()


def _check_only_acknowledged(tmp_path, acknowledged):
    """The file holds exactly the acknowledged records, also after recovery (rule 7)."""
    assert [body for _, _, body in _records_in(files.segment_path(tmp_path, 1).read_bytes())
            ] == acknowledged
    segment = Segment.open(tmp_path, 1, active=True, check_every_record=True)
    try:
        assert [bytes(b) for _, b in _read_all(segment)] == acknowledged
    finally:
        segment.close()


@pytest.mark.parametrize("partial_bytes", [0, 10, RECORD_HEADER_SIZE + 30000,
                                           2 * RECORD_HEADER_SIZE + 65536 + 3])
def test_a_writev_failing_midway_leaves_no_partial_batch(tmp_path, partial_bytes):
    segment = Segment.create(tmp_path, 1, 1000)
    first, lost, kept = (_bodies([70000, 10, 2000], seed=1), _bodies([65536, 5, 65536], seed=2),
                         _bodies([3000, 1], seed=3))
    faults = FaultyFileIO(tmp_path)
    try:
        _append(segment, first)
        size = segment.size_bytes
        with fileio.installed(faults):
            rule = faults.fail("write", errno.ENOSPC, partial_bytes=partial_bytes,
                               path_contains=".seg")
            with pytest.raises(OSError) as err:
                _append(segment, lost)
            assert err.value.errno == errno.ENOSPC and rule.fired == 1
            assert faults.calls.get("writev") == 1         # a "write" rule strikes writev
            assert os.path.getsize(segment.path) == size == segment.size_bytes
            assert segment.end_id == 4 and len(segment.offsets) == 3
            _append(segment, kept)
        assert segment.end_id == 6
        segment.sync()
    finally:
        segment.close()
    _check_only_acknowledged(tmp_path, first + kept)


class _ShortThenFailingWritev(OsLayer):
    """The first writev writes `first_bytes` and returns (short); the next one fails."""

    def __init__(self, first_bytes: int):
        self.first_bytes = first_bytes
        self.calls = 0

    def writev(self, fd, buffers):
        self.calls += 1
        if self.calls == 1:
            return os.write(fd, b"".join(map(bytes, buffers))[:self.first_bytes])
        raise OSError(errno.EIO, "injected")


def test_a_short_writev_then_an_error_cuts_the_batch_back(tmp_path):
    segment = Segment.create(tmp_path, 1, 1000)
    try:
        _append(segment, _bodies([1500], seed=6))
        size = segment.size_bytes
        layer = _ShortThenFailingWritev(RECORD_HEADER_SIZE + 20000)
        with fileio.installed(layer):
            with pytest.raises(OSError) as err:
                _append(segment, _bodies([65536, 65536], seed=7))
        assert err.value.errno == errno.EIO and layer.calls == 2
        assert os.path.getsize(segment.path) == size == segment.size_bytes
        _append(segment, [b"after"])
        segment.sync()
    finally:
        segment.close()
    _check_only_acknowledged(tmp_path, _bodies([1500], seed=6) + [b"after"])


def test_a_failed_writev_that_cannot_be_cut_back_is_cut_before_the_next_append(tmp_path):
    segment = Segment.create(tmp_path, 1, 1000)
    faults = FaultyFileIO(tmp_path)
    try:
        _append(segment, [b"one"])
        size = segment.size_bytes
        with fileio.installed(faults):
            faults.fail("writev", errno.EIO, partial_bytes=5000)
            faults.fail("ftruncate", errno.EIO)
            with pytest.raises(OSError):
                _append(segment, _bodies([65536], seed=8))
            assert os.path.getsize(segment.path) == size + 5000     # left behind for now
            assert segment.size_bytes == size and segment.end_id == 2
            _append(segment, _bodies([LARGE], seed=9))
        segment.sync()
    finally:
        segment.close()
    _check_only_acknowledged(tmp_path, [b"one"] + _bodies([LARGE], seed=9))
