"""The durable log position (wal.py rule 8, segment.py rules 7-8, queue.py rules 1 and 7).

After an unclean stop only the records after the last checkpointed durable position are checked
one by one; these tests prove that the position is never ahead of what an fsync made durable
(even across power losses), that it is really used, that anything wrong with it falls back to
the full check, and the related open-time savings (no fsync, no queue.json write, one fd per
segment) and id rules.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from faultfs import FaultyFileIO, PowerLost
from floki.config import QueueSettings
from floki.shard import channel as channel_module
from floki.shard import fileio, files
from floki.shard.queue import POSITION_CHECKPOINT_BYTES, Queue
from floki.shard.segment import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, encode_batch, parse_record
from floki.shard.wal import DurablePosition, Wal

T0_MS = 1_700_000_000_000


def body(id_: int) -> bytes:
    return b"body-%d-" % id_ + bytes([id_ % 251]) * (id_ % 37)


def push(wal: Wal, count: int) -> None:
    first = wal.next_id
    wal.append([body(i) for i in range(first, first + count)], T0_MS)


def crash(wal: Wal) -> None:
    """kill -9: the files are closed, nothing is fsynced or checkpointed."""
    for segment in wal._segments:
        segment.close()


def zero_record(directory: Path, first_id: int, index: int) -> tuple[int, int]:
    """Zeroes the record at entry `index` of segment `first_id` (a hole left by out-of-order
    writeback). Returns its (start, end) offsets."""
    path = files.segment_path(directory, first_id)
    data = bytearray(path.read_bytes())
    offsets = _offsets(bytes(data), first_id)
    start, end = offsets[index], offsets[index + 1] if index + 1 < len(offsets) else len(data)
    data[start:end] = bytes(end - start)
    path.write_bytes(bytes(data))
    return start, end


def _offsets(data: bytes, first_id: int) -> list[int]:
    pos, out = SEGMENT_HEADER_SIZE, []
    while True:
        parsed = parse_record(data, pos, len(data))
        if parsed is None or parsed[0] != first_id + len(out):
            return out
        out.append(pos)
        pos = parsed[2]


def position_is_true(data: bytes, position: DurablePosition) -> bool:
    """True when `data` (a segment's bytes) holds every id below position.end_id as valid
    records that end exactly at position.offset."""
    offsets = _offsets(data[:position.offset], position.segment)
    if position.end_id == position.segment:
        return position.offset == SEGMENT_HEADER_SIZE and len(data) >= SEGMENT_HEADER_SIZE
    if len(offsets) != position.end_id - position.segment:
        return False
    last = parse_record(data, offsets[-1], position.offset)
    return last is not None and last[2] == position.offset


# --- the position is never ahead of the disk ----------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_wal_position_never_runs_ahead_of_the_fsynced_bytes(tmp_path, seed):
    """After every operation the position the Wal offers for a checkpoint is covered by the
    bytes the file had at its last fsync: what a power loss keeps at the very least."""
    rng = random.Random(seed)
    directory = tmp_path / "q"
    layer = FaultyFileIO(tmp_path, seed=seed)
    with fileio.installed(layer):
        wal = Wal.open(directory, segment_size=4096)
        for _ in range(120):
            op = rng.random()
            if op < 0.6:
                push(wal, rng.randint(1, 6))
            elif op < 0.9:
                wal.sync()
            elif op < 0.95:
                wal.purge()
            elif len(wal.segments()) > 1:
                wal.remove_oldest_segment()
            position = wal.durable
            assert position is not None
            synced = layer.synced_bytes(files.segment_path(directory, position.segment))
            assert position_is_true(synced, position), (seed, position)
        wal.close()


def test_queue_checkpoints_only_positions_that_survive_a_power_loss(tmp_path):
    """Power losses at random points of a queue's life (pushes, interval fsyncs, position
    checkpoints, rolls, purges): the position in the image's channels.json is never ahead of
    the image's data, and recovery from it loses nothing that was fsynced."""
    for seed in range(25):
        rng = random.Random(seed)
        data = tmp_path / f"run{seed}" / "data"
        data.mkdir(parents=True)
        image = data.parent / "image"
        layer = FaultyFileIO(data, seed=seed)
        layer.crash_at(rng.randint(5, 260), image)
        synced_ids: set[int] = set()
        purged_below = 0
        with fileio.installed(layer), pytest.MonkeyPatch.context() as mp:
            mp.setattr("floki.shard.queue.POSITION_CHECKPOINT_BYTES", 300)
            queue = None
            try:
                queue = Queue.create(data, "q", QueueSettings(segment_size=4096), "interval")
                queue.create_channel("c")
                pushed: list[int] = []
                for _ in range(200):
                    op = rng.random()
                    if op < 0.6:
                        first, last = queue.push([body(i) for i in range(rng.randint(1, 5))],
                                                 T0_MS)
                        pushed.extend(range(first, last + 1))
                    elif op < 0.85:
                        queue.sync()
                        synced_ids.update(pushed)
                    elif op < 0.97:
                        queue.maintenance(0.0, T0_MS, fsync_due=False)
                    else:
                        purged_below = queue._live_wal().next_id
                        queue.purge()
            except PowerLost:
                pass
            if not layer.lost:
                layer.power_loss(image)
            layer.close_all()
            if queue is not None:
                queue._unlock()
        directory = image / "q"
        if not (directory / "channels.json").exists():
            continue
        stored = DurablePosition.from_dict(
            json.loads((directory / "channels.json").read_text()).get("log"))
        newest = files.list_segment_ids(directory)[-1]
        if stored is not None and stored.segment == newest:
            segment_bytes = files.segment_path(directory, newest).read_bytes()
            assert position_is_true(segment_bytes, stored), (seed, stored)
        with fileio.installed(FaultyFileIO(image)):
            recovered = Queue.open(image, "q", QueueSettings(), "interval")
            try:
                wal = recovered._live_wal()
                found = {i for i, _ in wal.read(1, 10_000)}
                lost = sorted(i for i in synced_ids if i >= purged_below and i not in found)
                assert not lost, (seed, lost[:10])
            finally:
                recovered.close()


# --- the position is used, and anything wrong with it falls back --------------------------------

def _log_with_position(directory: Path) -> DurablePosition:
    """Ids 1..10 fsynced (the position), 11..14 written after it, then kill -9."""
    wal = Wal.open(directory, segment_size=1 << 20)
    push(wal, 10)
    wal.sync()
    position = wal.durable
    push(wal, 4)
    crash(wal)
    assert position == DurablePosition(1, position.offset, 11)
    return position


def test_only_records_after_the_position_are_checked_one_by_one(tmp_path):
    directory = tmp_path / "q"
    position = _log_with_position(directory)
    zero_record(directory, 1, 4)        # id 5, before the position: bit rot, not a torn write
    wal = Wal.open(directory, segment_size=1 << 20, min_next_id=15, durable=position)
    # Nothing was cut at id 5: it is found corrupt when read (read-time CRC), the rest served.
    assert [i for i, _ in wal.read(1, 100)] == [1, 2, 3, 4] + list(range(6, 15))
    assert wal.corrupt_records == 1
    crash(wal)


def test_a_hole_after_the_position_ends_the_log_there(tmp_path):
    directory = tmp_path / "q"
    position = _log_with_position(directory)
    start, _end = zero_record(directory, 1, 11)        # id 12, written after the position
    wal = Wal.open(directory, segment_size=1 << 20, min_next_id=15, durable=position)
    assert [i for i, _ in wal.read(1, 100)] == list(range(1, 12))
    assert wal.corrupt_records == 0
    assert files.segment_path(directory, 1).stat().st_size == start
    assert wal.append([b"next"], T0_MS) == (15, 15)       # ids never go back
    wal.close()


@pytest.mark.parametrize("how", ["none", "offset_not_a_record_end", "offset_past_the_file",
                                 "end_id_off_by_one", "other_segment", "index_lost",
                                 "index_short"])
def test_a_position_that_does_not_match_falls_back_to_checking_every_record(tmp_path, how):
    directory = tmp_path / "q"
    position = _log_with_position(directory)
    zero_record(directory, 1, 4)      # a hole at id 5 that only the full check cuts the log at
    size = files.segment_path(directory, 1).stat().st_size
    bad = {
        "none": None,
        "offset_not_a_record_end": DurablePosition(1, position.offset + 3, 11),
        "offset_past_the_file": DurablePosition(1, size + 100, 11),
        "end_id_off_by_one": DurablePosition(1, position.offset, 12),
        "other_segment": DurablePosition(7, position.offset, 11),
        "index_lost": position,
        "index_short": position,
    }[how]
    index = files.index_path(directory, 1)
    if how == "index_lost":
        index.unlink()
    elif how == "index_short":
        index.write_bytes(index.read_bytes()[:4 * 9])
    wal = Wal.open(directory, segment_size=1 << 20, min_next_id=15, durable=bad)
    assert [i for i, _ in wal.read(1, 100)] == [1, 2, 3, 4]
    assert wal.corrupt_records == 0
    assert wal.durable.end_id == 5
    crash(wal)


@pytest.mark.parametrize("stored", ["garbage", "wrong_types", "negative", "missing"])
def test_a_corrupt_position_in_channels_json_falls_back_to_the_full_check(tmp_path, stored):
    queue = Queue.create(tmp_path, "q", QueueSettings(), "interval")
    queue.create_channel("c")
    queue.push([body(i) for i in range(1, 11)], T0_MS)
    queue.sync()
    queue.checkpoint()
    queue.push([body(i) for i in range(11, 15)], T0_MS)
    queue._close_wal(sync=False)
    queue._unlock()
    path = tmp_path / "q" / "channels.json"
    data = json.loads(path.read_text())
    assert DurablePosition.from_dict(data["log"]) is not None
    data["log"] = {"garbage": "x", "wrong_types": {"segment": "1", "offset": 32, "end_id": 1},
                   "negative": {"segment": 1, "offset": -5, "end_id": 1},
                   "missing": None}[stored]
    if stored == "missing":
        del data["log"]
    path.write_text(json.dumps(data))
    zero_record(tmp_path / "q", 1, 4)
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    assert [i for i, _, _ in queue.get("c", 100, 0.0)] == [1, 2, 3, 4]
    queue.close()


def test_queue_open_after_a_crash_uses_the_checkpointed_position(tmp_path, monkeypatch):
    monkeypatch.setattr("floki.shard.queue.POSITION_CHECKPOINT_BYTES", 1)
    queue = Queue.create(tmp_path, "q", QueueSettings(), "interval")
    queue.create_channel("c")
    queue.push([body(i) for i in range(1, 11)], T0_MS)
    queue.sync()                       # lag >= 1 byte: the position is checkpointed here
    stored = json.loads((tmp_path / "q" / "channels.json").read_text())["log"]
    assert stored == queue._live_wal().durable.to_dict() == {
        "segment": 1, "offset": stored["offset"], "end_id": 11}
    queue.push([body(i) for i in range(11, 15)], T0_MS)
    queue._close_wal(sync=False)
    queue._unlock()
    zero_record(tmp_path / "q", 1, 4)           # before the position: not checked at open
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    assert [i for i, _, _ in queue.get("c", 100, 0.0)] == [1, 2, 3, 4] + list(range(6, 15))
    assert queue.info(0.0)["corrupt_records"] == 1
    queue.close()


def test_position_is_checkpointed_when_it_lags_by_the_threshold(tmp_path):
    queue = Queue.create(tmp_path, "q", QueueSettings(), "interval")
    path = tmp_path / "q" / "channels.json"
    before = path.read_bytes()
    queue.push([b"x" * 100], T0_MS)
    queue.sync()
    queue.maintenance(0.0, T0_MS, False)
    assert path.read_bytes() == before          # a small lag costs no checkpoint
    batch = [b"x" * 1000] * 1000
    while queue._position_lag_bytes() < POSITION_CHECKPOINT_BYTES:
        queue.push(batch, T0_MS)
        assert path.read_bytes() == before      # nothing fsynced yet: nothing to store
        queue._live_wal().sync()
    queue.sync()
    stored = json.loads(path.read_text())["log"]
    assert stored == queue._live_wal().durable.to_dict()
    queue.close()


def test_a_stored_position_ahead_of_the_recovered_log_is_replaced_at_open(tmp_path):
    queue = Queue.create(tmp_path, "q", QueueSettings(), "interval")
    queue.create_channel("c")
    queue.push([body(i) for i in range(1, 11)], T0_MS)
    queue.sync()
    queue.checkpoint()
    queue._close_wal(sync=False)
    queue._unlock()
    path = files.segment_path(tmp_path / "q", 1)
    with open(path, "r+b") as f:                  # an operator cut the log (floki check)
        f.truncate(path.stat().st_size - 40)
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    stored = DurablePosition.from_dict(
        json.loads((tmp_path / "q" / "channels.json").read_text())["log"])
    assert stored == queue._live_wal().durable and stored.offset <= path.stat().st_size
    queue.close()


# --- open-time costs -------------------------------------------------------------------------

def _count_fsyncs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    return calls


def test_opening_a_cleanly_stopped_queue_writes_and_fsyncs_nothing(tmp_path, monkeypatch):
    queue = Queue.create(tmp_path, "q", QueueSettings(), "interval")
    queue.create_channel("c")
    queue.push([b"a", b"b"], T0_MS)
    queue.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir() if p.is_file()}
    fsyncs = _count_fsyncs(monkeypatch)
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    assert fsyncs == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir() if p.is_file()} == before
    # One descriptor per segment plus LOCK until something is appended (the .idx is opened
    # for appending at the first push).
    assert queue._live_wal()._segments[-1]._index_fd is None
    assert [i for i, _, _ in queue.get("c", 10, 0.0)] == [1, 2]
    assert queue.push([b"c"], T0_MS) == (3, 3)
    assert queue._live_wal()._segments[-1]._index_fd is not None
    queue.close()
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    assert queue._live_wal().read(1, 10) == [(1, b"a"), (2, b"b"), (3, b"c")]
    queue.close()


def test_unclean_open_with_a_matching_position_needs_no_fsync(tmp_path, monkeypatch):
    queue = Queue.create(tmp_path, "q", QueueSettings(), "interval")
    queue.push([b"a", b"b"], T0_MS)
    queue.sync()
    queue.checkpoint()
    queue._close_wal(sync=False)
    queue._unlock()
    fsyncs = _count_fsyncs(monkeypatch)
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    assert fsyncs == []
    queue._close_wal(sync=False)
    queue._unlock()
    # Records past the position may exist only in the page cache: they are fsynced at open.
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    queue.push([b"c"], T0_MS)
    queue._close_wal(sync=False)
    queue._unlock()
    fsyncs.clear()
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    assert fsyncs
    assert queue._live_wal().synced_next_id == queue._live_wal().next_id
    queue.close()


# --- the clean flag and ids --------------------------------------------------------------------

def _queue_json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "q" / "queue.json").read_text())


def test_an_idle_open_keeps_the_clean_flag_and_a_crash_then_reuses_nothing(tmp_path):
    queue = Queue.create(tmp_path, "q", QueueSettings(), "interval")
    queue.push([b"a", b"b"], T0_MS)
    queue.close()
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    queue._close_wal(sync=False)                # kill -9 before any push: still clean
    queue._unlock()
    assert _queue_json(tmp_path)["clean_next_id"] == 3
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    assert queue.push([b"c"], T0_MS) == (3, 3)
    queue.close()


@pytest.mark.parametrize("change", ["push", "purge"])
def test_the_clean_flag_is_cleared_before_the_log_changes(tmp_path, change):
    queue = Queue.create(tmp_path, "q", QueueSettings(), "interval")
    queue.push([b"a", b"b"], T0_MS)
    queue.close()
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    if change == "push":
        queue.push([b"c"], T0_MS)
    else:
        queue.purge()
    assert _queue_json(tmp_path)["clean_next_id"] is None
    queue._close_wal(sync=False)
    queue._unlock()
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    first, _ = queue.push([b"d"], T0_MS)
    assert first > 3 if change == "push" else first >= 3
    queue.close()


def test_a_clean_flag_in_the_previous_generation_never_reuses_ids(tmp_path):
    """queue.json.prev may say "clean, next id 11" while the lost primary had raised the mark
    and ids 11.. were handed out, then lost with a torn tail: they must not come back."""
    queue = Queue.create(tmp_path, "q", QueueSettings(), "interval")
    queue.create_channel("c")
    queue.push([body(i) for i in range(1, 11)], T0_MS)
    queue.close()
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    handed_out = list(range(*queue.push([body(i) for i in range(11, 21)], T0_MS)))
    queue._close_wal(sync=False)
    queue._unlock()
    directory = tmp_path / "q"
    assert json.loads(files.previous_path(files.queue_file(directory)).read_text()
                      )["clean_next_id"] == 11
    path = files.segment_path(directory, 1)
    data = path.read_bytes()
    path.write_bytes(data[:_offsets(data, 1)[10]])       # ids 11.. lost (never fsynced)
    files.queue_file(directory).write_bytes(b"{torn")   # and the primary is unusable
    queue = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    first, _ = queue.push([b"new"], T0_MS)
    assert first > max(handed_out)
    assert [i for i, _, _ in queue.get("c", 100, 0.0)][-1] == first
    queue.close()


# --- tickets, reads, encoding ----------------------------------------------------------------

def test_tickets_differ_in_a_forked_child():
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # the child: its own ticket sequence
        os.close(read_fd)
        os.write(write_fd, json.dumps([channel_module._ticket_source.getrandbits(63)
                                       for _ in range(4)]).encode())
        os._exit(0)
    os.close(write_fd)
    mine = [channel_module._ticket_source.getrandbits(63) for _ in range(4)]
    with os.fdopen(read_fd) as f:
        theirs = json.loads(f.read())
    os.waitpid(pid, 0)
    assert mine != theirs


@pytest.mark.parametrize("active", [False, True])
@pytest.mark.parametrize("entry", [0, 3, 1 << 20, 0xFFFFFF00])
def test_a_wrong_index_entry_in_the_middle_is_found_when_read_and_repaired(tmp_path, active,
                                                                          entry):
    directory = tmp_path / "q"
    wal = Wal.open(directory, segment_size=1 << 20)
    push(wal, 50)
    wal.close()
    index = files.index_path(directory, 1)
    good = index.read_bytes()
    index.write_bytes(good[:4 * 20] + entry.to_bytes(4, "little") + good[4 * 21:])
    if not active:                    # a newer segment makes segment 1 a sealed one
        wal = Wal.open(directory, segment_size=1 << 20, min_next_id=100)
        wal.append([b"x"], T0_MS)
        wal.close()
    wal = Wal.open(directory, segment_size=1 << 20)
    got = wal.read(1, 50)
    assert got == [(i, body(i)) for i in range(1, 51)]
    assert wal.corrupt_records == 0
    wal.close()
    assert index.read_bytes() == good


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_encode_batch_takes_any_bytes_like_body(kind):
    bodies = [b"", b"a", b"hello" * 50]
    data, offsets = encode_batch(7, T0_MS, [kind(b) for b in bodies], 100)
    assert (data, offsets) == encode_batch(7, T0_MS, bodies, 100)
    assert list(offsets) == [100, 100 + RECORD_HEADER_SIZE, 100 + 2 * RECORD_HEADER_SIZE + 1]
