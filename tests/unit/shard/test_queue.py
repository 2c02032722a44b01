"""Queue: push, get, ack, redelivery, cap, seek, purge, delete, settings, retention, lock, INFO.

Time is passed in (`now` monotonic seconds, `now_ms` message timestamps); nothing sleeps.
Recovery and crash behaviour are in test_queue_recovery.py and test_queue_crash.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from floki.config import ConfigError, QueueSettings
from floki.errors import (ChannelNotFound, InvalidParameter, QueueAlreadyExists,
                          QueueNotFound)
from floki.shard import files
from floki.shard.queue import ID_BLOCK, Queue, QueueLocked

T0_MS = 1_700_000_000_000          # a fixed wall-clock time for message timestamps


def new_queue(tmp_path: Path, fsync: str = "never", **settings) -> Queue:
    return Queue.create(tmp_path, "q", QueueSettings(**settings), fsync)


def bodies(first: int, count: int, size: int = 0) -> list[bytes]:
    return [f"m{i}".encode().ljust(size, b".") for i in range(first, first + count)]


def ids_of(items) -> list[int]:
    return [i for i, _, _ in items]


@pytest.fixture
def queue(tmp_path):
    q = new_queue(tmp_path, message_timeout=10.0)
    yield q
    q.close()


# --- create / open / lock / delete ------------------------------------------------------------

def test_create_makes_the_directory_with_its_checkpoints(tmp_path):
    q = new_queue(tmp_path)
    d = tmp_path / "q"
    assert (d / "queue.json").is_file() and (d / "channels.json").is_file()
    assert (d / "LOCK").is_file()
    meta = json.loads((d / "queue.json").read_text())
    assert meta["format"] == 1 and meta["clean_next_id"] is None
    assert meta["settings"] == QueueSettings().to_dict()
    q.close()


def test_create_twice_raises_queue_already_exists(tmp_path):
    q = new_queue(tmp_path)
    q.close()
    with pytest.raises(QueueAlreadyExists):
        new_queue(tmp_path)


def test_create_reuses_an_empty_directory_left_by_a_crashed_create(tmp_path):
    (tmp_path / "q").mkdir()
    q = new_queue(tmp_path)
    assert q.push([b"a"], T0_MS) == (1, 1)
    q.close()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", ".hidden", "é"])
def test_invalid_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidParameter):
        Queue.create(tmp_path, name, QueueSettings(), "never")


def test_invalid_channel_name_is_refused(queue):
    with pytest.raises(InvalidParameter):
        queue.create_channel("../c")


def test_open_of_a_missing_queue_raises_queue_not_found(tmp_path):
    with pytest.raises(QueueNotFound):
        Queue.open(tmp_path, "nope", QueueSettings(), "never")


def test_a_second_opener_fails_on_the_lock_until_the_first_closes(tmp_path):
    q = new_queue(tmp_path)
    with pytest.raises(QueueLocked, match="in use"):
        Queue.open(tmp_path, "q", QueueSettings(), "never")
    q.close()
    q2 = Queue.open(tmp_path, "q", QueueSettings(), "never")
    q2.close()


def test_delete_removes_every_file_and_the_directory(tmp_path):
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.push(bodies(1, 10), T0_MS)
    q.delete()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        q.push([b"x"], T0_MS)
    again = new_queue(tmp_path)                 # the name and the lock are free again
    assert again.push([b"x"], T0_MS) == (1, 1)
    again.close()


# --- push / get / ack -------------------------------------------------------------------------

def test_ids_start_at_1_and_grow_by_batch(queue):
    assert queue.push([b"a"], T0_MS) == (1, 1)
    assert queue.push([b"b", b"c", b"d"], T0_MS) == (2, 4)


def test_new_channel_sees_only_messages_pushed_after_it(queue):
    queue.push(bodies(1, 3), T0_MS)
    assert queue.create_channel("c") is True
    assert queue.create_channel("c") is False
    assert queue.get("c", 10, 0.0) == []
    queue.push([b"new"], T0_MS)
    [(id_, ticket, body)] = queue.get("c", 10, 0.0)
    assert (id_, body) == (4, b"new") and ticket > 0


def test_get_returns_new_messages_in_id_order_up_to_count(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 5), T0_MS)
    first = queue.get("c", 3, 0.0)
    assert ids_of(first) == [1, 2, 3]
    assert [b for _, _, b in first] == [b"m1", b"m2", b"m3"]
    assert ids_of(queue.get("c", 10, 0.0)) == [4, 5]
    assert queue.get("c", 10, 0.0) == []
    assert queue.get("c", 0, 0.0) == []


def test_channels_are_independent_cursors_over_one_log(queue):
    queue.create_channel("a")
    queue.create_channel("b")
    queue.push(bodies(1, 3), T0_MS)
    assert ids_of(queue.get("a", 10, 0.0)) == [1, 2, 3]
    assert ids_of(queue.get("b", 2, 0.0)) == [1, 2]
    assert queue.channel_names() == ["a", "b"]


def test_unknown_channel(queue):
    with pytest.raises(ChannelNotFound):
        queue.get("nope", 1, 0.0)
    with pytest.raises(ChannelNotFound):
        queue.seek_id("nope", 1)
    with pytest.raises(ChannelNotFound):
        queue.seek_timestamp("nope", 1.0)
    assert queue.ack("nope", [1, 2], 0.0) == 0
    assert queue.purge_channel("nope") is False
    assert queue.delete_channel("nope") is False
    assert queue.has_available("nope", 0.0) is False
    assert queue.next_wakeup("nope") is None


def test_ack_counts_valid_unexpired_tickets_only(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 3), T0_MS)
    (_, t1, _), (_, t2, _), (_, t3, _) = queue.get("c", 3, 0.0)
    assert queue.ack("c", [t1, t1, 42], 1.0) == 1
    assert queue.ack("c", [t2], 10.0) == 0          # timeout 10 s: expired at 10.0
    assert queue.ack("c", [t3], 9.5) == 1


def test_expired_messages_come_back_first_oldest_first_with_new_tickets(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 2), T0_MS)
    [(id1, t1, _)] = queue.get("c", 1, 0.0)
    [(id2, t2, _)] = queue.get("c", 1, 1.0)
    assert (id1, id2) == (1, 2)
    queue.push(bodies(3, 2), T0_MS)
    assert queue.next_wakeup("c") == 10.0
    assert ids_of(queue.get("c", 1, 9.0)) == [3]                # nothing expired yet
    items = queue.get("c", 10, 11.0)
    assert ids_of(items) == [1, 2, 4]
    new_t1, new_t2 = items[0][1], items[1][1]
    assert {new_t1, new_t2}.isdisjoint({t1, t2})
    assert queue.ack("c", [t1, t2], 11.5) == 0                  # the old tickets died
    assert queue.ack("c", [new_t1, new_t2], 11.5) == 2


def test_acked_messages_never_come_back(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 3), T0_MS)
    items = queue.get("c", 3, 0.0)
    assert queue.ack("c", [t for _, t, _ in items], 1.0) == 3
    assert queue.get("c", 10, 1000.0) == []


def test_max_in_flight_caps_new_deliveries_but_not_redeliveries(tmp_path):
    q = new_queue(tmp_path, message_timeout=10.0, max_in_flight=3)
    q.create_channel("c")
    q.push(bodies(1, 10), T0_MS)
    first = q.get("c", 10, 0.0)
    assert ids_of(first) == [1, 2, 3]
    assert q.get("c", 10, 1.0) == []
    assert not q.has_available("c", 1.0)
    again = q.get("c", 10, 10.0)
    assert ids_of(again) == [1, 2, 3]                          # redeliveries only, at the cap
    assert not q.has_available("c", 12.0)
    assert q.ack("c", [again[0][1]], 12.0) == 1
    assert q.has_available("c", 12.0)
    assert ids_of(q.get("c", 10, 12.0)) == [4]                 # one slot freed
    q.close()


def test_lowering_max_in_flight_applies_to_the_next_get(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 10), T0_MS)
    assert len(queue.get("c", 4, 0.0)) == 4
    queue.set_setting("max_in_flight", "2")
    assert queue.get("c", 10, 1.0) == []


def test_message_timeout_setting_applies_to_later_gets(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 2), T0_MS)
    queue.set_setting("message_timeout", "2s")
    queue.get("c", 1, 0.0)
    assert ids_of(queue.get("c", 5, 2.0)) == [1, 2]


def test_has_available_and_next_wakeup(queue):
    queue.create_channel("c")
    assert not queue.has_available("c", 0.0)
    queue.push([b"a"], T0_MS)
    assert queue.has_available("c", 0.0)
    queue.get("c", 1, 0.0)
    assert not queue.has_available("c", 5.0)
    assert queue.next_wakeup("c") == 10.0
    assert queue.has_available("c", 10.0)


def test_fsync_always_never_delivers_before_the_message_is_durable(tmp_path):
    q = new_queue(tmp_path, fsync="always")
    q.create_channel("c")
    q.push([b"a", b"b"], T0_MS)
    assert q.needs_sync
    assert not q.has_available("c", 0.0)
    assert q.get("c", 10, 0.0) == []
    q.sync()
    assert not q.needs_sync
    assert q.has_available("c", 0.0)
    assert ids_of(q.get("c", 10, 0.0)) == [1, 2]
    q.fsync = "never"                              # the mode can change at runtime
    q.push([b"c"], T0_MS)
    assert ids_of(q.get("c", 10, 0.0)) == [3]
    q.close()


def test_an_io_error_while_reading_redeliveries_loses_none_of_them(queue, monkeypatch):
    from floki.errors import StorageIOError
    queue.create_channel("c")
    queue.push(bodies(1, 3), T0_MS)
    queue.get("c", 3, 0.0)

    def failing_read(*args, **kwargs):
        raise StorageIOError("I/O error (read: test)")
    with monkeypatch.context() as m:
        m.setattr(queue._wal, "read_within", failing_read)
        with pytest.raises(StorageIOError):
            queue.get("c", 10, 50.0)
    assert ids_of(queue.get("c", 10, 50.0)) == [1, 2, 3]


# --- seek -------------------------------------------------------------------------------------

def test_seek_id_rewinds_and_drops_in_flight(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 5), T0_MS)
    tickets = [t for _, t, _ in queue.get("c", 5, 0.0)]
    queue.seek_id("c", 2)
    assert queue.ack("c", tickets, 1.0) == 0
    assert ids_of(queue.get("c", 10, 1.0)) == [2, 3, 4, 5]
    assert queue.get("c", 10, 5.0) == []
    assert ids_of(queue.get("c", 10, 100.0)) == [2, 3, 4, 5]   # 1 was dropped by the seek


def test_seek_id_before_the_oldest_reads_from_the_oldest_and_past_head_waits(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 3), T0_MS)
    queue.seek_id("c", 0)
    assert ids_of(queue.get("c", 1, 0.0)) == [1]
    queue.seek_id("c", 6)
    assert queue.get("c", 10, 0.0) == []
    queue.push(bodies(4, 4), T0_MS)             # ids 4..7
    assert ids_of(queue.get("c", 10, 0.0)) == [6, 7]


def test_seek_timestamp_finds_the_first_message_at_or_after_it(queue):
    queue.create_channel("c")
    for k in range(5):                          # ids 1..5 stamped T0 + 1000 k ms
        queue.push([b"x%d" % k], T0_MS + 1000 * k)
    t0 = T0_MS / 1000
    queue.seek_timestamp("c", t0 + 2)
    assert ids_of(queue.get("c", 10, 0.0)) == [3, 4, 5]
    queue.seek_timestamp("c", t0 + 1.0005)      # between two stamps: the later one
    assert ids_of(queue.get("c", 1, 0.0)) == [3]
    queue.seek_timestamp("c", 0)                # before everything: the oldest
    assert ids_of(queue.get("c", 1, 0.0)) == [1]
    queue.seek_timestamp("c", t0 + 100)         # after everything: only new messages
    assert queue.get("c", 10, 0.0) == []
    queue.push([b"late"], T0_MS + 200_000)
    assert ids_of(queue.get("c", 10, 0.0)) == [6]


def test_seek_timestamp_with_fractional_milliseconds_does_not_skip(tmp_path):
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.push([b"a"], 290)
    q.push([b"b"], 291)
    q.seek_timestamp("c", 0.29)                 # 0.29 * 1000 == 290.00000000000006
    assert ids_of(q.get("c", 1, 0.0)) == [1]
    q.close()


# --- purge / delete channel -------------------------------------------------------------------

def test_purge_channel_moves_to_head_and_drops_in_flight(queue):
    queue.create_channel("c")
    queue.create_channel("other")
    queue.push(bodies(1, 4), T0_MS)
    tickets = [t for _, t, _ in queue.get("c", 2, 0.0)]
    assert queue.purge_channel("c") is True
    assert queue.ack("c", tickets, 1.0) == 0
    assert queue.get("c", 10, 100.0) == []
    assert ids_of(queue.get("other", 10, 0.0)) == [1, 2, 3, 4]    # others untouched
    queue.push([b"n"], T0_MS)
    assert ids_of(queue.get("c", 10, 100.0)) == [5]


def test_purge_queue_drops_data_and_ids_keep_growing(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 4), T0_MS)
    tickets = [t for _, t, _ in queue.get("c", 2, 0.0)]
    queue.purge()
    assert queue.ack("c", tickets, 1.0) == 0
    assert queue.get("c", 10, 100.0) == []
    queue.seek_id("c", 0)
    assert queue.get("c", 10, 100.0) == []
    info = queue.info(0.0)
    assert info["head"] == 5 and info["tail"] == 5
    assert queue.push([b"n"], T0_MS) == (5, 5)
    assert ids_of(queue.get("c", 10, 100.0)) == [5]


def test_delete_channel(queue):
    queue.create_channel("c")
    assert queue.delete_channel("c") is True
    assert not queue.has_channel("c")
    with pytest.raises(ChannelNotFound):
        queue.get("c", 1, 0.0)
    assert queue.create_channel("c") is True


# --- settings ---------------------------------------------------------------------------------

def test_set_setting_is_persisted_and_bad_values_change_nothing(tmp_path):
    q = new_queue(tmp_path)
    q.set_setting("message_timeout", "45s")
    q.set_setting("segment_size", "8kb")
    with pytest.raises(ConfigError):
        q.set_setting("message_timeout", "soon")
    with pytest.raises(ConfigError):
        q.set_setting("no_such_key", "1")
    assert q.settings.message_timeout == 45.0
    meta = json.loads((tmp_path / "q" / "queue.json").read_text())
    assert meta["settings"]["message_timeout"] == 45.0
    assert meta["settings"]["segment_size"] == 8192
    q.close()
    other_defaults = QueueSettings(message_timeout=5.0, max_in_flight=7)
    q = Queue.open(tmp_path, "q", other_defaults, "never")
    assert q.settings.message_timeout == 45.0          # defaults apply only at create
    assert q.settings.max_in_flight == QueueSettings().max_in_flight
    assert q.settings.segment_size == 8192
    q.close()


# --- retention --------------------------------------------------------------------------------

SEG = 4096          # small segments: 32 records of 100-byte bodies each


def fill_segments(q: Queue, n_segments: int, t_ms: int = T0_MS, step_ms: int = 0) -> list:
    """Pushes 100-byte messages until the log has n_segments sealed segments plus the active
    one; segment k's messages are stamped t_ms + k * step_ms. Returns wal.segments()."""
    while len(q._wal.segments()) <= n_segments:
        q.push([b"x" * 100], t_ms + step_ms * (len(q._wal.segments()) - 1))
    return q._wal.segments()


def consume_all(q: Queue, channel: str, now: float = 0.0) -> None:
    while True:
        items = q.get(channel, 1000, now)
        if not items:
            return
        q.ack(channel, [t for _, t, _ in items], now)


def retention_queue(tmp_path, **settings) -> Queue:
    base = dict(segment_size=SEG, hard_retention_period=0.0)
    base.update(settings)
    return new_queue(tmp_path, **base)


def test_consumed_segments_go_at_the_next_tick_when_soft_retention_is_off(tmp_path):
    q = retention_queue(tmp_path)
    q.create_channel("c")
    segs = fill_segments(q, 3)
    assert len(segs) == 4 and segs[-1].active
    q.maintenance(0.0, T0_MS, False)
    assert len(q._wal.segments()) == 4                  # nothing consumed yet
    consume_all(q, "c")
    q.maintenance(0.0, T0_MS, False)
    remaining = q._wal.segments()
    assert len(remaining) == 1 and remaining[0].active  # never the active one
    assert q.info(0.0)["tail"] == remaining[0].first_id
    q.close()


def test_soft_retention_stops_at_the_first_segment_a_channel_still_needs(tmp_path):
    q = retention_queue(tmp_path)
    q.create_channel("fast")
    q.create_channel("slow")
    segs = fill_segments(q, 3)
    consume_all(q, "fast")
    slow = q.get("slow", segs[1].end_id - 1, 0.0)      # slow holds segments 0 and 1 in flight
    q.ack("slow", [t for id_, t, _ in slow if id_ != segs[1].first_id], 0.0)
    q.maintenance(0.0, T0_MS, False)
    assert [s.first_id for s in q._wal.segments()] == [s.first_id for s in segs[1:]]
    q.close()


def test_queue_without_channels_keeps_its_data(tmp_path):
    q = retention_queue(tmp_path)
    fill_segments(q, 3)
    q.maintenance(0.0, T0_MS + 10**9, False)
    assert len(q._wal.segments()) == 4
    q.close()


def test_soft_retention_period_keeps_consumed_data_for_replay(tmp_path):
    q = retention_queue(tmp_path, retention_period=60.0)
    q.create_channel("c")
    segs = fill_segments(q, 2, step_ms=30_000)          # newest stamps: T0, T0+30s, ...
    consume_all(q, "c")
    q.maintenance(0.0, T0_MS + 60_000, False)           # age 60 s: kept (age <= period)
    assert len(q._wal.segments()) == 3
    q.maintenance(0.0, T0_MS + 60_001, False)           # first one older than 60 s
    assert [s.first_id for s in q._wal.segments()] == [s.first_id for s in segs[1:]]
    q.maintenance(0.0, T0_MS + 90_001, False)
    assert len(q._wal.segments()) == 1
    q.close()


def test_soft_retention_size_keeps_consumed_data_while_total_fits(tmp_path):
    q = retention_queue(tmp_path)
    q.create_channel("c")
    fill_segments(q, 3)
    consume_all(q, "c")
    total = q._wal.disk_bytes()
    q.set_setting("retention_size", str(total))
    q.maintenance(0.0, T0_MS, False)
    assert len(q._wal.segments()) == 4                  # total <= size: keep all
    q.set_setting("retention_size", str(total - 1))
    q.maintenance(0.0, T0_MS, False)
    assert len(q._wal.segments()) == 3                  # one removal brings it under
    assert q._wal.disk_bytes() <= total - 1
    q.close()


def test_hard_retention_period_removes_unread_data_and_channels_skip(tmp_path, caplog):
    q = retention_queue(tmp_path, hard_retention_period=3600.0, message_timeout=10.0)
    q.create_channel("c")
    segs = fill_segments(q, 2, step_ms=1_000_000)
    [(first, ticket, _)] = q.get("c", 1, 0.0)
    assert first == 1
    q.maintenance(0.0, segs[0].newest_timestamp_ms + 3_600_000, False)
    assert len(q._wal.segments()) == 3                  # age == period: kept
    q.maintenance(0.0, segs[0].newest_timestamp_ms + 3_600_001, False)
    assert q._wal.segments()[0].first_id == segs[1].first_id
    assert f"hard retention removed unacked messages below id {segs[1].first_id}" in caplog.text
    assert q.ack("c", [ticket], 1.0) == 0               # the removed delivery is gone
    items = q.get("c", 1, 100.0)                        # continues at the oldest remaining
    assert ids_of(items) == [segs[1].first_id]
    q.close()


def test_hard_retention_size_removes_oldest_until_under(tmp_path):
    q = retention_queue(tmp_path)
    q.create_channel("c")                               # nothing consumed
    fill_segments(q, 3)
    per_segment = q._wal.disk_bytes() // 4
    q.set_setting("hard_retention_size", str(2 * per_segment + per_segment // 2))
    q.maintenance(0.0, T0_MS, False)
    assert len(q._wal.segments()) == 2
    assert q.info(0.0)["channels"]["c"]["position"] == q._wal.first_id
    q.close()


def test_hard_retention_never_removes_the_active_segment(tmp_path):
    q = retention_queue(tmp_path, hard_retention_size=1, hard_retention_period=1.0)
    q.create_channel("c")
    q.push(bodies(1, 3), T0_MS)
    q.maintenance(0.0, T0_MS + 10**9, False)
    assert len(q._wal.segments()) == 1
    assert ids_of(q.get("c", 10, 0.0)) == [1, 2, 3]
    q.close()


def test_in_flight_messages_removed_by_hard_retention_are_not_redelivered(tmp_path):
    q = retention_queue(tmp_path, hard_retention_period=1.0, message_timeout=10.0)
    q.create_channel("c")
    segs = fill_segments(q, 1)
    items = q.get("c", 2, 0.0)
    q.push([b"x" * 100], T0_MS + 5000)                  # keeps the active segment young
    q._apply_retention(T0_MS + 2000)
    assert q._wal.first_id == segs[1].first_id
    later = q.get("c", 10, 50.0)                        # 1 and 2 expired but are gone
    assert ids_of(later) == list(range(segs[1].first_id, q.info(0.0)["head"]))
    assert not set(ids_of(items)) & set(ids_of(later))
    q.close()


# --- INFO -------------------------------------------------------------------------------------

def test_info(queue):
    queue.create_channel("c")
    queue.push(bodies(1, 5), T0_MS)
    queue.get("c", 2, 0.0)
    info = queue.info(1.0)
    assert info["head"] == 6 and info["tail"] == 1 and info["segments"] == 1
    assert info["disk_usage"] > 0 and info["corrupt_records"] == 0
    assert info["channels"] == {"c": {"position": 3, "in_flight": 2, "backlog": 3}}
    assert queue.info(10.0)["channels"]["c"]["in_flight"] == 0     # expired


def test_get_skips_corrupt_records_one_by_one_and_is_never_stuck(tmp_path):
    q = retention_queue(tmp_path)
    q.create_channel("c")
    segs = fill_segments(q, 1)
    q.close()
    path = files.segment_path(tmp_path / "q", 1)
    data = bytearray(path.read_bytes())
    record = 24 + 100
    for id_ in (2, 3):                                  # flip one body byte of ids 2 and 3
        data[32 + (id_ - 1) * record + 24 + 50] ^= 0xFF
    path.write_bytes(bytes(data))
    q = Queue.open(tmp_path, "q", QueueSettings(), "never")
    got = [ids_of(q.get("c", 1, 0.0)) for _ in range(3)]
    assert got == [[1], [4], [5]]
    assert q.info(0.0)["corrupt_records"] >= 2
    rest = ids_of(q.get("c", 10_000, 0.0))
    assert rest == list(range(6, segs[-1].end_id))
    q.close()


# --- ids of a new queue (rule 1: its create reserves the first block) ------------------------

def test_a_new_queue_reserves_its_first_ids_at_create_so_the_first_push_writes_nothing(
        tmp_path):
    queue = new_queue(tmp_path, "interval")
    queue.create_channel("c")
    path = files.queue_file(queue.directory)
    stored = json.loads(path.read_text())
    assert stored["id_high_water"] == ID_BLOCK and stored["clean_next_id"] is None
    before = os.stat(path)
    assert queue.push([b"first"], T0_MS) == (1, 1)
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not files.tmp_path(path).exists()
    queue.close()


@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_ids_of_a_new_queue_after_a_restart(tmp_path, stop):
    queue = new_queue(tmp_path, "interval")
    if stop == "clean":
        queue.close()                                # records the exact next id: 1
    else:
        queue._close_wal(sync=False)                 # kill -9: nothing more written
        queue._unlock()
    reopened = Queue.open(tmp_path, "q", QueueSettings(), "interval")
    first, _ = reopened.push([b"m"], T0_MS)
    # a crash may leave a gap (never a reuse): ids go on above the reserved block
    assert first == (1 if stop == "clean" else ID_BLOCK + 1)
    reopened.close()


# --- a get's byte budget (rule 5) ---------------------------------------------------------------

def test_a_get_stops_at_the_byte_budget_and_always_returns_one(queue, monkeypatch):
    from floki.shard import queue as queue_module
    monkeypatch.setattr(queue_module, "MAX_GET_BYTES", 1000)
    queue.create_channel("c")
    bodies = [bytes([65 + i]) * 300 for i in range(7)]
    queue.push(bodies, 0)
    queue.push([b"z" * 5000], 0)                      # alone over the budget
    got = []
    sizes = []
    while True:
        batch = queue.get("c", 100, 1.0)
        if not batch:
            break
        sizes.append(len(batch))
        got += batch
    assert [body for _, _, body in got] == bodies + [b"z" * 5000]
    assert sizes == [3, 3, 1, 1]                      # 3 x (300 B + header) fit in 1,000 B
    assert queue.ack("c", [t for _, t, _ in got], 2.0) == 8


def test_redeliveries_past_the_budget_stay_due_before_new_messages(queue, monkeypatch):
    from floki.shard import queue as queue_module
    queue.create_channel("c")
    queue.push([bytes([65 + i]) * 300 for i in range(6)], 0)
    first = queue.get("c", 100, 0.0)                  # all six in flight
    assert len(first) == 6
    queue.push([b"new"], 0)
    monkeypatch.setattr(queue_module, "MAX_GET_BYTES", 1000)
    later = 11.0                                      # past message_timeout (10 s)
    a = queue.get("c", 100, later)
    b = queue.get("c", 100, later)
    c = queue.get("c", 100, later)
    assert [i for i, _, _ in a] == [1, 2, 3]          # 3 x (300 B + header) fit in 1,000 B
    assert [i for i, _, _ in b] == [4, 5, 6, 7]       # the rest of the due ones, then new
    assert c == []
    assert queue.ack("c", [t for _, t, _ in a + b], later) == 7
    assert queue.ack("c", [t for _, t, _ in first], later) == 0   # their tickets died


def test_read_within_reports_how_far_it_scanned(tmp_path):
    q = new_queue(tmp_path)
    q.push([b"x" * 100] * 10, 0)
    wal = q._wal
    pairs, scanned_to = wal.read_within(1, 10, None, 300)
    assert [i for i, _ in pairs] == [1, 2] and scanned_to == 3
    pairs, scanned_to = wal.read_within(1, 4)
    assert [i for i, _ in pairs] == [1, 2, 3, 4] and scanned_to == 5
    pairs, scanned_to = wal.read_within(9, 100)
    assert [i for i, _ in pairs] == [9, 10] and scanned_to == 11
    pairs, scanned_to = wal.read_within(5, 10, None, 1)      # one, whatever the budget
    assert [i for i, _ in pairs] == [5] and scanned_to == 6
    q.close()
