import os
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from floki.shard import files
from floki.shard.segment import (FORMAT_VERSION, NO_RECORD, RECORD_HEADER_SIZE,
                                 SEGMENT_HEADER_SIZE, SEGMENT_MAGIC, BadRecord, CorruptSegment,
                                 Segment, UnfinishedSegment, UnsupportedFormat,
                                 decode_record, decode_segment_header, encode_batch,
                                 encode_record, encode_segment_header, index_from_bytes,
                                 index_to_bytes, parse_record)

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
