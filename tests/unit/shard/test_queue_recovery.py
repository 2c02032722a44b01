"""Queue recovery: restart after clean stop or crash, damaged checkpoints, ids never reused.

A crash is simulated in-process by dropping the Queue without close(): no final checkpoint, no
clean flag, the bytes already written stay (as after kill -9). Real kill -9 tests are in
test_queue_crash.py.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from floki.config import QueueSettings
from floki.shard import files
from floki.shard.queue import Queue, UnsupportedQueueFormat

T0_MS = 1_700_000_000_000


def new_queue(tmp_path: Path, **settings) -> Queue:
    settings.setdefault("message_timeout", 10.0)
    return Queue.create(tmp_path, "q", QueueSettings(**settings), "never")


def reopen(tmp_path: Path, defaults: QueueSettings | None = None) -> Queue:
    return Queue.open(tmp_path, "q", defaults or QueueSettings(), "never")


def crash(q: Queue) -> None:
    """Leaves the queue as kill -9 would: no checkpoint, no clean flag, LOCK released."""
    q._close_wal(sync=False)
    q._unlock()


def ids_of(items) -> list[int]:
    return [i for i, _, _ in items]


def drain(q: Queue, channel: str, now: float = 0.0) -> list[int]:
    out = []
    while True:
        items = q.get(channel, 1000, now)
        if not items:
            return out
        out += ids_of(items)
        q.ack(channel, [t for _, t, _ in items], now)


def ack_ids(q: Queue, channel: str, items, wanted, now: float = 0.0) -> None:
    assert q.ack(channel, [t for i, t, _ in items if i in wanted], now) == len(wanted)


def queue_json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "q" / "queue.json").read_text())


def damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "half":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif how == "zeros":
        path.write_bytes(b"\0" * max(1, len(path.read_bytes())))
    elif how == "garbage":
        path.write_bytes(b"{not json at all\xff")
    elif how == "wrong_type":
        path.write_text("[1, 2, 3]")
    elif how == "wrong_shape":
        path.write_text('{"format": 1, "channels": [1]}')
    else:
        raise AssertionError(how)


DAMAGE = ["delete", "empty", "half", "zeros", "garbage", "wrong_type", "wrong_shape"]


# --- clean restart ----------------------------------------------------------------------------

def test_clean_restart_keeps_positions_and_redelivers_only_unacked_first(tmp_path):
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.push([b"m%d" % i for i in range(1, 11)], T0_MS)
    items = q.get("c", 6, 0.0)
    ack_ids(q, "c", items, {1, 2, 4})
    q.close()
    assert queue_json(tmp_path)["clean_next_id"] == 11
    q = reopen(tmp_path)
    assert queue_json(tmp_path)["clean_next_id"] == 11        # an idle open writes nothing
    again = q.get("c", 3, 0.0)
    assert ids_of(again) == [3, 5, 6]                         # due first, new tickets
    assert not {t for _, t, _ in again} & {t for _, t, _ in items}
    assert [b for _, _, b in again] == [b"m3", b"m5", b"m6"]
    assert ids_of(q.get("c", 10, 0.0)) == [7, 8, 9, 10]
    assert q.push([b"n"], T0_MS) == (11, 11)                  # clean stop: no id gap
    assert queue_json(tmp_path)["clean_next_id"] is None      # cleared before the push
    q.close()


def test_stale_tickets_are_invalid_after_restart(tmp_path):
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.push([b"a"], T0_MS)
    [(_, ticket, _)] = q.get("c", 1, 0.0)
    q.close()
    q = reopen(tmp_path)
    assert q.ack("c", [ticket], 0.0) == 0
    q.close()


# --- crash restart ----------------------------------------------------------------------------

def test_crash_redelivers_unacked_at_checkpoint_plus_what_moved_after_it(tmp_path):
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.push([b"m%d" % i for i in range(1, 11)], T0_MS)
    first = q.get("c", 4, 0.0)
    ack_ids(q, "c", first, {1, 2})
    q.maintenance(0.0, T0_MS, False)              # checkpoint: next 5, unacked 3, 4
    second = q.get("c", 2, 0.0)                   # 5, 6 delivered after it
    ack_ids(q, "c", first + second, {3, 5})       # acked after it
    crash(q)
    q = reopen(tmp_path)
    assert drain(q, "c") == [3, 4, 5, 6, 7, 8, 9, 10]
    q.close()


def test_crash_restart_continues_ids_above_the_high_water_mark(tmp_path):
    q = new_queue(tmp_path)
    q.push([b"a", b"b"], T0_MS)
    high_water = queue_json(tmp_path)["id_high_water"]
    assert high_water >= 2
    crash(q)
    q = reopen(tmp_path)
    assert q.push([b"c"], T0_MS) == (high_water + 1, high_water + 1)
    q.close()


def test_high_water_mark_is_durable_before_an_id_above_it_is_handed_out(tmp_path, monkeypatch):
    monkeypatch.setattr("floki.shard.queue.ID_BLOCK", 4)
    q = new_queue(tmp_path)
    marks = []
    for size in (1, 3, 1, 10, 2):
        _, last = q.push([b"x"] * size, T0_MS)
        marks.append(queue_json(tmp_path)["id_high_water"])
        assert marks[-1] >= last
    assert marks == sorted(marks) and len(set(marks)) > 1     # raised in blocks, not per push
    assert marks[3] >= 16 + 2 * 10 - 10                       # a big batch reserves 2x
    q.close()


def test_channel_create_and_delete_are_durable_without_a_checkpoint(tmp_path):
    q = new_queue(tmp_path)
    q.create_channel("gone")
    q.delete_channel("gone")
    q.push([b"before"], T0_MS)
    q.create_channel("kept")
    q.push([b"after"], T0_MS)
    crash(q)
    q = reopen(tmp_path)
    assert q.channel_names() == ["kept"]
    assert drain(q, "kept") == [2]                      # its position was durable too
    q.delete_channel("kept")
    crash(q)
    q = reopen(tmp_path)
    assert q.channel_names() == []
    q.close()


def test_a_rewind_by_seek_survives_a_crash(tmp_path):
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.push([b"a", b"b", b"c"], T0_MS)
    drain(q, "c")
    q.maintenance(0.0, T0_MS, False)
    q.seek_id("c", 2)
    crash(q)
    q = reopen(tmp_path)
    assert drain(q, "c") == [2, 3]
    q.close()


def test_a_channel_purge_survives_a_crash(tmp_path):
    """SREM queue channel answered :1; a kill -9 before the next maintenance checkpoint had
    brought every purged message back (found by a crash hunt with real processes)."""
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.create_channel("d")
    q.push([b"a", b"b", b"c"], T0_MS)
    q.maintenance(0.0, T0_MS, False)
    q.get("c", 1, 0.0)                        # one in flight: dropped by the purge too
    assert q.purge_channel("c") is True
    crash(q)
    q = reopen(tmp_path)
    assert drain(q, "c") == []
    assert drain(q, "d") == [1, 2, 3]          # the other channel keeps everything
    first, _ = q.push([b"e"], T0_MS)          # after a crash, past the reserved id block
    assert drain(q, "c") == [first] and first > 3
    q.close()


# --- damaged checkpoints ----------------------------------------------------------------------

def two_checkpoints(tmp_path: Path) -> None:
    """Checkpoint A: c at next 5, unacked 4. Checkpoint B: next 8, nothing unacked. Crash."""
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.create_channel("d")
    q.push([b"m%d" % i for i in range(1, 11)], T0_MS)
    items = q.get("c", 4, 0.0)
    ack_ids(q, "c", items, {1, 2, 3})
    q.maintenance(0.0, T0_MS, False)
    items += q.get("c", 3, 0.0)
    ack_ids(q, "c", items, {4, 5, 6, 7})
    q.maintenance(0.0, T0_MS, False)
    crash(q)


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_channels_file_falls_back_to_the_previous_generation(tmp_path, how, caplog):
    two_checkpoints(tmp_path)
    damage(tmp_path / "q" / "channels.json", how)
    with caplog.at_level(logging.ERROR):
        q = reopen(tmp_path)
    assert "channels.json" in caplog.text
    assert drain(q, "c") == [4, 5, 6, 7, 8, 9, 10]     # earlier than B: redelivery, no skip
    assert drain(q, "d") == list(range(1, 11))
    q.close()
    q = reopen(tmp_path)                                # the repaired file is good again
    assert drain(q, "c") == []
    q.close()


@pytest.mark.parametrize("how", DAMAGE)
def test_no_usable_channels_file_restarts_channels_at_the_oldest_retained_id(tmp_path, how,
                                                                            caplog):
    two_checkpoints(tmp_path)
    damage(tmp_path / "q" / "channels.json", how)
    prev = files.previous_path(tmp_path / "q" / "channels.json")
    damage(prev, "garbage" if how == "delete" else how)
    with caplog.at_level(logging.ERROR):
        q = reopen(tmp_path)
    assert "oldest retained" in caplog.text
    assert q.channel_names() == ["c", "d"]              # names live in queue.json too
    assert drain(q, "c") == list(range(1, 11))          # full redelivery, never a skip
    q.close()


def test_one_garbled_channel_entry_only_rewinds_that_channel(tmp_path):
    two_checkpoints(tmp_path)
    path = tmp_path / "q" / "channels.json"
    data = json.loads(path.read_text())
    data["channels"]["d"] = {"next_id": "x"}
    path.write_text(json.dumps(data))
    q = reopen(tmp_path)
    assert drain(q, "c") == [8, 9, 10]
    assert drain(q, "d") == list(range(1, 11))
    q.close()


@pytest.mark.parametrize("how", ["delete", "garbage", "zeros", "wrong_type"])
def test_damaged_queue_file_falls_back_to_the_previous_generation(tmp_path, how):
    q = new_queue(tmp_path)
    q.set_setting("message_timeout", "77s")
    q.create_channel("c")
    # Another queue.json write, so the previous generation holds the settings and the channel
    # (a new queue's first push writes none: its create reserved the first block of ids).
    q.set_setting("max_in_flight", "123")
    q.push([b"a"], T0_MS)
    crash(q)
    damage(tmp_path / "q" / "queue.json", how)
    q = reopen(tmp_path)
    assert q.settings.message_timeout == 77.0
    assert q.channel_names() == ["c"]
    assert drain(q, "c") == [1]
    assert q.push([b"b"], T0_MS)[0] >= 2
    q.close()


@pytest.mark.parametrize("how", ["delete", "garbage"])
def test_no_usable_queue_file_uses_defaults_and_ids_from_disk(tmp_path, how, caplog):
    q = new_queue(tmp_path, max_in_flight=5)
    q.create_channel("c")
    q.push([b"m%d" % i for i in range(1, 8)], T0_MS)
    items = q.get("c", 3, 0.0)
    ack_ids(q, "c", items, {1, 2})
    q.maintenance(0.0, T0_MS, False)
    crash(q)
    damage(tmp_path / "q" / "queue.json", how)
    files.previous_path(tmp_path / "q" / "queue.json").unlink()
    defaults = QueueSettings(max_in_flight=1000)
    with caplog.at_level(logging.ERROR):
        q = reopen(tmp_path, defaults)
    assert "queue.json" in caplog.text and "ids continue from the segments" in caplog.text
    assert q.settings == defaults
    assert q.channel_names() == ["c"]                   # names from channels.json
    assert drain(q, "c") == [3, 4, 5, 6, 7]
    assert q.push([b"n"], T0_MS)[0] >= 8                # never below what is on disk
    q.close()
    assert queue_json(tmp_path)["settings"]["max_in_flight"] == 1000


def test_unknown_format_is_refused_not_rewritten(tmp_path):
    q = new_queue(tmp_path)
    q.close()
    path = tmp_path / "q" / "queue.json"
    data = json.loads(path.read_text())
    data["format"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(UnsupportedQueueFormat):
        reopen(tmp_path)
    assert json.loads(path.read_text())["format"] == 99
    path.write_text(json.dumps({**data, "format": 1}))
    reopen(tmp_path).close()                            # the failed open released the LOCK


def test_stale_tmp_files_are_ignored(tmp_path):
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.push([b"a"], T0_MS)
    crash(q)
    (tmp_path / "q" / "channels.json.tmp").write_text('{"format": 1, "channels": {}}')
    (tmp_path / "q" / "queue.json.tmp").write_bytes(b"\0\0")
    q = reopen(tmp_path)
    assert q.channel_names() == ["c"] and drain(q, "c") == [1]
    q.close()


def test_a_restored_redelivery_whose_record_is_corrupt_is_dropped(tmp_path):
    q = new_queue(tmp_path, segment_size=4096)
    q.create_channel("c")
    while len(q._wal.segments()) < 2:
        q.push([b"x" * 100], T0_MS)
    assert ids_of(q.get("c", 3, 0.0)) == [1, 2, 3]
    q.close()
    path = files.segment_path(tmp_path / "q", 1)
    data = bytearray(path.read_bytes())
    data[32 + 124 + 24 + 10] ^= 0x01                    # a body byte of id 2 (sealed segment)
    path.write_bytes(bytes(data))
    q = reopen(tmp_path)
    assert ids_of(q.get("c", 3, 0.0)) == [1, 3, 4]
    q.close()


# --- ids are never reused ---------------------------------------------------------------------

@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_ids_keep_growing_after_purge_and_restart(tmp_path, stop):
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.push([b"a"] * 5, T0_MS)
    q.purge()
    q.close() if stop == "clean" else crash(q)
    q = reopen(tmp_path)
    first, _ = q.push([b"b"], T0_MS)
    assert first == 6 if stop == "clean" else first > 5
    assert drain(q, "c") == [first]
    q.close()


def test_ids_keep_growing_after_purge_crash_and_lost_queue_file(tmp_path):
    q = new_queue(tmp_path)
    q.push([b"a"] * 5, T0_MS)
    q.purge()
    crash(q)
    damage(tmp_path / "q" / "queue.json", "delete")
    # (no previous generation: create wrote the only queue.json, reserving the first ids)
    files.previous_path(tmp_path / "q" / "queue.json").unlink(missing_ok=True)
    q = reopen(tmp_path)
    assert q.push([b"b"], T0_MS)[0] >= 6               # the purge segment is named 6
    q.close()


@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_ids_survive_a_truncated_active_segment_tail(tmp_path, stop):
    q = new_queue(tmp_path)
    q.create_channel("c")
    acked = [q.push([b"m%d" % i], T0_MS)[0] for i in range(1, 11)]
    q.close() if stop == "clean" else crash(q)
    path = files.segment_path(tmp_path / "q", 1)
    size = path.stat().st_size
    with open(path, "r+b") as f:                        # lose the last two and a half records
        f.truncate(size - 2 * 27 - 10)
    q = reopen(tmp_path)
    assert drain(q, "c") == list(range(1, 8))
    # The lost ids are never served: the channel is not left waiting for them.
    assert not q.has_available("c", 0.0)
    assert q.info(0.0)["channels"]["c"]["backlog"] == 0
    first, _ = q.push([b"new"], T0_MS)
    assert first > max(acked)
    assert drain(q, "c") == [first]
    q.close()


def test_lost_queue_file_and_channel_checkpoint_above_disk_ids_never_reuses_delivered_ids(
        tmp_path):
    q = new_queue(tmp_path)
    q.create_channel("c")
    q.push([b"m%d" % i for i in range(1, 6)], T0_MS)
    q.get("c", 5, 0.0)
    q.maintenance(0.0, T0_MS, False)                    # 1..5 unacked in the checkpoint
    crash(q)
    for name in ("queue.json",):
        (tmp_path / "q" / name).unlink()
        files.previous_path(tmp_path / "q" / name).unlink()
    path = files.segment_path(tmp_path / "q", 1)
    with open(path, "r+b") as f:                        # the log lost ids 4 and 5
        f.truncate(path.stat().st_size - 2 * 26)
    q = reopen(tmp_path)
    assert q.push([b"new"], T0_MS)[0] >= 6              # 4 and 5 were delivered: not reused
    q.close()


def test_info_backlog_after_a_crash_counts_messages_not_the_skipped_ids(tmp_path):
    q = Queue.create(tmp_path, "gap", QueueSettings(), "interval")
    q.create_channel("c")
    q.push([b"a", b"b", b"c"], 1_700_000_000_000)
    q.checkpoint()
    crash(q)
    q = Queue.open(tmp_path, "gap", QueueSettings(), "interval")
    first, _ = q.push([b"d", b"e"], 1_700_000_000_001)
    assert first > 4                         # ids jumped past the reserved block: a gap
    info = q.info(0.0)["channels"]["c"]
    assert info["backlog"] == 5               # 3 before the crash + 2 after, not the gap
    assert q.stats()["channels"]["c"]["backlog"] == 5
    q.close()


def test_soft_retention_over_a_crash_gap_warns_of_no_loss(tmp_path, caplog):
    """Found by a crash hunt: removing a consumed segment followed by a crash's id gap moved
    the channel over the gap and logged "hard retention removed unacked messages"."""
    settings = QueueSettings(segment_size=1)            # every push batch seals its segment
    q = Queue.create(tmp_path, "gap", settings, "interval")
    q.create_channel("c")
    q.push([b"a", b"b"], T0_MS)
    got = q.get("c", 10, 0.0)
    assert q.ack("c", [ticket for _, ticket, _ in got], 0.0) == 2
    q.checkpoint()                                       # consumed: the cursor is at 3
    crash(q)
    q = Queue.open(tmp_path, "gap", settings, "interval")
    first, _ = q.push([b"c"], T0_MS + 1)
    assert first > 3                                     # the gap
    q.push([b"d"], T0_MS + 2)                            # c's segment is sealed too
    with caplog.at_level(logging.INFO, logger="floki.shard.queue"):
        q.maintenance(0.0, T0_MS + 3, False)
    assert q.info(0.0)["tail"] >= first                  # a and b's segment was removed
    assert "soft retention removed" in caplog.text
    assert "unacked" not in caplog.text
    assert [body for _, _, body in q.get("c", 10, 0.0)] == [b"c", b"d"]
    q.close()
