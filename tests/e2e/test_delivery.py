"""Delivery semantics end to end: fanout, shared channels, redelivery, long polls, pipelining."""
from __future__ import annotations

import socket
import threading
import time

import pytest


def cmd(client, *args):
    return client.execute_command(*args)


@pytest.fixture
def server(floki_server):
    return floki_server(shards=2, queue_message_timeout="1s")


def test_fanout_every_channel_sees_every_message(server):
    r = server.client()
    cmd(r, "SET", "fan", "a")
    cmd(r, "SET", "fan", "b", "NX")
    bodies = [f"m{i}".encode() for i in range(500)]
    for start in range(0, 500, 100):
        cmd(r, "RPUSH", "fan", *bodies[start:start + 100])
    for channel in ("a", "b"):
        seen = []
        while True:
            got = cmd(r, "HMGET", "fan", channel, 64)
            if not got:
                break
            seen += got
            assert cmd(r, "HDEL", "fan", channel, *[m[1] for m in got]) == len(got)
        assert [m[2] for m in seen] == bodies
        assert [m[0] for m in seen] == list(range(1, 501))


def test_consumers_sharing_a_channel_never_get_the_same_message_at_once(server):
    setup = server.client()
    cmd(setup, "SET", "shared", "workers")
    cmd(setup, "RPUSH", "shared", *[str(i) for i in range(2000)])
    results: list[list[int]] = [[] for _ in range(4)]

    def consume(slot: int):
        r = server.client()
        while True:
            got = cmd(r, "HMGET", "shared", "workers", 7)
            if not got:
                return
            results[slot] += [m[0] for m in got]
            cmd(r, "HDEL", "shared", "workers", *[m[1] for m in got])

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    every = [i for ids in results for i in ids]
    assert sorted(every) == list(range(1, 2001))      # each exactly once: no overlap, no loss
    assert sum(1 for ids in results if ids) >= 2


def test_unacked_message_is_redelivered_with_a_new_ticket(server):
    r = server.client()
    cmd(r, "SET", "redo", "c")
    cmd(r, "RPUSH", "redo", "x", "y")
    (first_id, first_ticket, body), second = cmd(r, "HMGET", "redo", "c", 2)
    cmd(r, "HDEL", "redo", "c", second[1])
    assert cmd(r, "HMGET", "redo", "c", 10) == []        # still in flight
    again = cmd(r, "HMGET", "redo", "c", 10, 3)          # long poll until it expires (1 s)
    assert [(m[0], m[2]) for m in again] == [(first_id, body)]
    assert again[0][1] != first_ticket
    assert cmd(r, "HDEL", "redo", "c", first_ticket) == 0   # the old ticket died
    assert cmd(r, "HDEL", "redo", "c", again[0][1]) == 1


def test_long_poll_returns_promptly_when_a_message_arrives(server):
    consumer, producer = server.client(), server.client()
    cmd(consumer, "SET", "lp", "c")
    result = {}

    def wait():
        start = time.monotonic()
        result["got"] = cmd(consumer, "HMGET", "lp", "c", 10, 20)
        result["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.5)
    assert cmd(producer, "PING")                             # other clients are unaffected
    pushed_at = time.monotonic()
    cmd(producer, "RPUSH", "lp", "hello")
    thread.join(10)
    assert [m[2] for m in result["got"]] == [b"hello"]
    assert time.monotonic() - pushed_at < 1.0
    assert 0.4 < result["elapsed"] < 3.0


def test_long_poll_times_out_with_an_empty_array(server):
    r = server.client()
    cmd(r, "SET", "lp2", "c")
    start = time.monotonic()
    assert cmd(r, "HMGET", "lp2", "c", 5, 0.5) == []
    assert 0.4 < time.monotonic() - start < 2.0


def test_disconnected_long_poller_does_not_swallow_messages(server):
    r = server.client()
    cmd(r, "SET", "gone", "c")
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(b"*5\r\n$5\r\nHMGET\r\n$4\r\ngone\r\n$1\r\nc\r\n$2\r\n10\r\n$2\r\n30\r\n")
    time.sleep(0.3)
    sock.close()                       # the client goes away while parked on the shard
    time.sleep(0.3)
    cmd(r, "RPUSH", "gone", "precious")
    got = cmd(r, "HMGET", "gone", "c", 10)
    assert [m[2] for m in got] == [b"precious"]


def test_pipelined_mixed_commands_across_queues_keep_order(server):
    r = server.client()
    queues = [f"pipe{i}" for i in range(20)]
    for name in queues:
        cmd(r, "SET", name, "c")
    pipe = r.pipeline(transaction=False)
    expected = []
    for round_ in range(50):
        for name in queues:
            pipe.execute_command("RPUSH", name, f"{name}:{round_}")
            expected.append(1)
            pipe.execute_command("PING")
            expected.append(True)
    for name in queues:
        pipe.execute_command("HMGET", name, "c", 100)
    replies = pipe.execute()
    assert replies[:len(expected)] == expected
    for name, got in zip(queues, replies[len(expected):]):
        assert [m[2].decode() for m in got] == [f"{name}:{i}" for i in range(50)]


def test_raw_pipeline_of_ten_thousand_commands(server):
    r = server.client()
    for i in range(8):
        cmd(r, "SET", f"raw{i}", "c")
    request = b"".join(
        b"*3\r\n$5\r\nRPUSH\r\n$4\r\nraw%d\r\n$%d\r\n%s\r\n" % (i % 8, len(str(i)), str(i).encode())
        for i in range(10_000))
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(request)
        data = b""
        while data.count(b"\r\n") < 10_000:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    assert data == b":1\r\n" * 10_000
    total = sum(len(cmd(r, "HMGET", f"raw{i}", "c", 10_000)) for i in range(8))
    assert total == 10_000
