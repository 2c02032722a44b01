"""The shard's numbers for /metrics: Queue/Channel counters, Queue.stats(), ShardServer.stats()
answering a wire STATS request, and the fsync histogram."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from floki import wire
from floki.config import QueueSettings
from floki.histogram import Histogram
from floki.shard.queue import Queue
from floki.shard.server import FSYNC_BUCKETS_S
from unit.shard.test_server import IDENTITY, make_rig  # noqa: F401 - make_rig is a fixture

T0_MS = 1_700_000_000_000
TIMEOUT_S = 10.0


def channel_stats(queue: Queue, channel: str = "c") -> dict:
    return queue.stats()["channels"][channel]


def counters(queue: Queue, channel: str = "c") -> tuple[int, int, int, int]:
    """(pushed, delivered, redelivered, acked)."""
    ch = channel_stats(queue, channel)
    return (queue.stats()["messages_pushed"], ch["messages_delivered"],
            ch["messages_redelivered"], ch["messages_acked"])


@pytest.fixture
def queue(tmp_path: Path):
    q = Queue.create(tmp_path, "q", QueueSettings(message_timeout=TIMEOUT_S), "never")
    q.create_channel("c")
    yield q
    q.close()


def test_counters_follow_push_get_ack_and_redelivery(queue):
    assert counters(queue) == (0, 0, 0, 0)
    queue.push([b"a", b"b", b"c"], T0_MS)
    queue.push([b"d"], T0_MS)
    assert counters(queue) == (4, 0, 0, 0)
    got = queue.get("c", 2, now=0.0)
    assert counters(queue) == (4, 2, 0, 0)
    assert queue.ack("c", [got[0][1]], now=1.0) == 1
    assert queue.ack("c", [got[0][1], 12345], now=1.0) == 0      # used and unknown: no ack
    assert counters(queue) == (4, 2, 0, 1)
    # The second delivery expires: the next get hands it out again, before the new ones.
    again = queue.get("c", 10, now=TIMEOUT_S + 1)
    assert [i for i, _, _ in again] == [2, 3, 4]
    assert counters(queue) == (4, 5, 1, 1)
    assert queue.ack("c", [got[1][1]], now=TIMEOUT_S + 1) == 0   # its old ticket died
    assert queue.ack("c", [t for _, t, _ in again], now=TIMEOUT_S + 2) == 3
    assert counters(queue) == (4, 5, 1, 4)
    assert queue.get("c", 10, now=TIMEOUT_S + 3) == []
    assert counters(queue) == (4, 5, 1, 4)


def test_stats_gauges_match_info_and_cost_no_scan(queue):
    queue.create_channel("idle")
    queue.push([b"x" * 100] * 5, T0_MS)
    queue.get("c", 3, now=0.0)
    stats, info = queue.stats(), queue.info(0.0)
    assert stats["disk_bytes"] == info["disk_usage"] > 0
    assert stats["segments"] == info["segments"] == 1
    for name in ("c", "idle"):
        assert stats["channels"][name]["backlog"] == info["channels"][name]["backlog"]
    assert stats["channels"]["c"]["backlog"] == 2 and stats["channels"]["idle"]["backlog"] == 5
    assert stats["channels"]["c"]["in_flight"] == 3
    # Expired but not taken back yet: still in flight for stats (no scan), not for INFO (a scan).
    assert queue.stats()["channels"]["c"]["in_flight"] == 3
    assert queue.info(TIMEOUT_S + 1)["channels"]["c"]["in_flight"] == 0
    json.dumps(stats)                     # travels as JSON


def test_a_reopened_queue_counts_from_zero_and_restored_deliveries_are_redeliveries(tmp_path):
    queue = Queue.create(tmp_path, "q", QueueSettings(message_timeout=TIMEOUT_S), "never")
    queue.create_channel("c")
    queue.push([b"a", b"b", b"c"], T0_MS)
    queue.get("c", 2, now=0.0)
    before = queue.stats()
    queue.close()
    queue = Queue.open(tmp_path, "q", QueueSettings(), "never")
    try:
        after = queue.stats()
        assert counters(queue) == (0, 0, 0, 0)
        assert (after["disk_bytes"], after["segments"]) == (before["disk_bytes"],
                                                            before["segments"])
        assert after["channels"]["c"]["backlog"] == before["channels"]["c"]["backlog"] == 1
        got = queue.get("c", 10, now=0.0)
        assert [i for i, _, _ in got] == [1, 2, 3]
        assert counters(queue) == (0, 3, 2, 0)
    finally:
        queue.close()


# --- the shard server ----------------------------------------------------------------------

def stats_request(rig, request_id: int = 900) -> dict:
    rig.server.handle_frames([IDENTITY, *wire.encode_request(request_id, wire.STATS)])
    rig.finish()
    status, payload = rig.replies(1)[request_id]
    assert status == wire.JSON
    return json.loads(payload)


def test_wire_stats_is_one_frame_without_arguments():
    frames = wire.encode_request(7, wire.STATS, [b"ignored"])
    assert frames == [wire.encode_request(7, wire.STATS)[0]] and len(frames) == 1
    assert wire.decode_request(frames) == (7, wire.STATS, [])


def test_stats_reply_names_the_process_and_counts_per_queue_and_channel(make_rig):
    rig = make_rig()
    before = time.time()
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "a", "b", "c")
    rig.resp("HMGET", "q", "c", "2")
    stats = stats_request(rig)
    assert stats["index"] == 0 and stats["pid"] == os.getpid()
    assert stats["start_time_s"] == rig.server.started <= before
    assert stats["blocked_clients"] == 0 and stats["broken_queues"] == 0
    queue = stats["queues"]["q"]
    assert queue["messages_pushed"] == 3
    assert queue["channels"]["c"] == {"messages_delivered": 2, "messages_redelivered": 0,
                                      "messages_acked": 0, "backlog": 1, "in_flight": 2}
    histogram = Histogram.from_dict(stats["fsync_seconds"])
    assert histogram.bounds == FSYNC_BUCKETS_S and histogram.count == 0   # fsync = never


def test_group_commit_fsyncs_are_timed_once_per_pass(make_rig):
    rig = make_rig(fsync="always")
    rig.resp("SET", "q", "c")
    for _ in range(3):                     # three pushes in one pass: one fsync
        rig.send("RPUSH", "q", "m")
    rig.finish()
    rig.replies(3)
    rig.resp("RPUSH", "q", "m")            # one more pass, one more fsync
    histogram = Histogram.from_dict(stats_request(rig)["fsync_seconds"])
    assert histogram.count == 2 and histogram.sum > 0


def test_interval_fsyncs_are_timed(make_rig):
    rig = make_rig(fsync="interval", fsync_interval=1.0)
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "m")
    rig.timers(rig.server.timers.next_fsync + 0.001)
    rig.finish()
    rig.timers(rig.server.timers.next_fsync + 0.001)   # nothing new to sync: not timed
    rig.finish()
    assert Histogram.from_dict(stats_request(rig)["fsync_seconds"]).count == 1
