"""GET /metrics on a real `floki start`: every number after push/get/ack/redelivery, and a
shard killed with SIGKILL: down, back up, its restart visible, its counters a new life."""
from __future__ import annotations

import time
import urllib.request

import pytest

from floki.routing import shard_for
from helpers import free_port
from unit.frontend.test_metrics import parse, value

MESSAGE_TIMEOUT_S = 0.3


def scrape(server) -> dict[str, dict]:
    """Returns {sample name: {frozenset(labels): value}} from the server's /metrics."""
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return parse(text)


def queue_on(shard: int, shards: int) -> str:
    return next(f"q{i}" for i in range(1000) if shard_for(f"q{i}", shards) == shard)


@pytest.fixture
def server(floki_server):
    port = free_port()
    server = floki_server(shards=2, fsync="always", maintenance_interval="50ms",
                          metrics_bind=f"127.0.0.1:{port}",
                          queue_message_timeout=f"{int(MESSAGE_TIMEOUT_S * 1000)}ms")
    server.metrics_address = f"127.0.0.1:{port}"
    return server


def channel_numbers(samples, queue: str) -> dict[str, float | None]:
    labels = {"shard": "0", "queue": queue, "channel": "c"}
    return {
        "pushed": value(samples, "floki_messages_pushed_total", shard="0", queue=queue),
        "delivered": value(samples, "floki_messages_delivered_total", **labels),
        "redelivered": value(samples, "floki_messages_redelivered_total", **labels),
        "acked": value(samples, "floki_messages_acked_total", **labels),
        "backlog": value(samples, "floki_channel_backlog_messages", **labels),
        "in_flight": value(samples, "floki_channel_in_flight_messages", **labels),
    }


def test_metrics_count_push_get_ack_and_redelivery_and_survive_a_shard_kill(server):
    client = server.client()
    queue = queue_on(0, 2)
    client.execute_command("SET", queue, "c")
    assert client.execute_command("RPUSH", queue, *[f"m{i}" for i in range(5)]) == 5
    first = client.execute_command("HMGET", queue, "c", 3)
    assert client.execute_command("HDEL", queue, "c", first[0][1], first[1][1]) == 2
    time.sleep(MESSAGE_TIMEOUT_S + 0.1)                    # the third delivery expires
    again = client.execute_command("HMGET", queue, "c", 1)
    assert [m[0] for m in again] == [first[2][0]]

    before = scrape(server)
    assert channel_numbers(before, queue) == {"pushed": 5, "delivered": 4, "redelivered": 1,
                                              "acked": 2, "backlog": 2, "in_flight": 1}
    assert value(before, "floki_queue_segments", shard="0", queue=queue) == 1
    disk_bytes = value(before, "floki_queue_disk_bytes", shard="0", queue=queue)
    assert disk_bytes > 5 * 2
    assert value(before, "floki_fsync_duration_seconds_count", shard="0") >= 1
    assert value(before, "floki_fsync_duration_seconds_bucket", shard="0", le="+Inf") == \
        value(before, "floki_fsync_duration_seconds_count", shard="0")
    for command, count in (("RPUSH", 1), ("HMGET", 2), ("HDEL", 1), ("SET", 1)):
        assert value(before, "floki_command_duration_seconds_count", command=command) == count
    assert value(before, "floki_connected_clients") >= 1
    for shard in ("0", "1"):
        assert value(before, "floki_shard_up", shard=shard) == 1
        assert value(before, "floki_shard_restarts_total", shard=shard) == 0
    started_s = value(before, "floki_shard_start_time_seconds", shard="0")
    other_started_s = value(before, "floki_shard_start_time_seconds", shard="1")
    assert time.time() - 120 < started_s <= time.time()

    time.sleep(0.3)            # a few maintenance ticks: the acks and positions are checkpointed
    server.kill_shard(0)

    def down():
        samples = scrape(server)
        return samples if value(samples, "floki_shard_up", shard="0") == 0 else None

    scraped_at = time.monotonic()
    while_down = server.wait_until(down, interval=0.01, message="shard 0 reported down")
    assert channel_numbers(while_down, queue) == dict.fromkeys(channel_numbers(before, queue))
    assert value(while_down, "floki_shard_start_time_seconds", shard="0") is None
    assert value(while_down, "floki_shard_up", shard="1") == 1
    assert time.monotonic() - scraped_at < 5

    def up_again():
        samples = scrape(server)
        return samples if value(samples, "floki_shard_up", shard="0") == 1 else None

    after = server.wait_until(up_again, timeout=15, message="shard 0 back up")
    assert value(after, "floki_shard_restarts_total", shard="0") == 1
    assert value(after, "floki_shard_restarts_total", shard="1") == 0
    assert value(after, "floki_shard_start_time_seconds", shard="0") > started_s
    assert value(after, "floki_shard_start_time_seconds", shard="1") == other_started_s
    # A new life: counters from 0; what is on disk comes back as it was (the unacked delivery
    # is due again, no longer in flight).
    assert channel_numbers(after, queue) == {"pushed": 0, "delivered": 0, "redelivered": 0,
                                             "acked": 0, "backlog": 2, "in_flight": 0}
    assert value(after, "floki_queue_disk_bytes", shard="0", queue=queue) == disk_bytes

    # Within the new life the counters only grow.
    last = channel_numbers(after, queue)
    for step in range(4):
        client.execute_command("RPUSH", queue, f"n{step}")
        got = client.execute_command("HMGET", queue, "c", 2)
        client.execute_command("HDEL", queue, "c", *[m[1] for m in got])
        now = channel_numbers(scrape(server), queue)
        for key in ("pushed", "delivered", "redelivered", "acked"):
            assert now[key] >= last[key], (key, last, now)
        last = now
    # The restored delivery first, then the two left unread before the kill, then the new.
    assert last == {"pushed": 4, "delivered": 1 + 2 + 4, "redelivered": 1, "acked": 7,
                    "backlog": 0, "in_flight": 0}
    assert value(scrape(server), "floki_shard_restarts_total", shard="0") == 1
