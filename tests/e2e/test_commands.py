"""Every command and every error of the Floki protocol, against a real `floki start`."""
from __future__ import annotations

import json
import time

import pytest
import redis


@pytest.fixture
def server(floki_server):
    return floki_server(shards=2)


@pytest.fixture
def r(server):
    client = server.client()
    yield client
    client.close()


def cmd(client, *args):
    return client.execute_command(*args)


def error_of(client, *args) -> str:
    with pytest.raises(redis.ResponseError) as exc:
        cmd(client, *args)
    return str(exc.value)


def info_queues(client, prefix: str = "") -> dict:
    section = "queues." + prefix if prefix else "queues"
    return json.loads(cmd(client, "INFO", section)[0])


def test_create_push_get_ack_round_trip(r):
    assert cmd(r, "SET", "orders", "billing") in (b"OK", "OK", True)
    assert cmd(r, "RPUSH", "orders", "a", "b", "c") == 3
    got = cmd(r, "HMGET", "orders", "billing", 2)
    assert [(m[0], m[2]) for m in got] == [(1, b"a"), (2, b"b")]
    assert all(isinstance(m[1], int) and 0 < m[1] < 2**63 for m in got)
    assert cmd(r, "HDEL", "orders", "billing", got[0][1], got[1][1]) == 2
    assert cmd(r, "HDEL", "orders", "billing", got[0][1]) == 0   # already used
    assert [m[0] for m in cmd(r, "HMGET", "orders", "billing", 10)] == [3]
    assert cmd(r, "HMGET", "orders", "billing", 10) == []


def test_command_names_are_case_insensitive(r):
    assert cmd(r, "set", "q1", "c")
    assert cmd(r, "rPuSh", "q1", "x") == 1
    assert len(cmd(r, "hmget", "q1", "c", 1)) == 1


def test_set_errors_follow_floki(r):
    cmd(r, "SET", "q", "c")
    assert error_of(r, "SET", "q", "c").startswith("CAE")
    assert error_of(r, "SET", "q", "c2").startswith("QAE")
    assert cmd(r, "SET", "q", "c2", "NX")
    assert cmd(r, "SETNX", "q", "c2")        # nothing new, still OK
    assert cmd(r, "SETNX", "q", "c3")
    assert set(info_queues(r, "q")["q"]["channels"]) == {"c", "c2", "c3"}


def test_missing_queue_and_channel_errors(r):
    assert error_of(r, "RPUSH", "nope", "x").startswith("QNF Queue Not Found")
    assert error_of(r, "HMGET", "nope", "c", 1).startswith("QNF")
    assert error_of(r, "HDEL", "nope", "c", 1).startswith("QNF")
    assert error_of(r, "HMSET", "nope", "c", "ID", 1).startswith("QNF")
    cmd(r, "SET", "q", "c")
    assert error_of(r, "HMGET", "q", "nochan", 1).startswith("CNF Channel Not Found")
    assert error_of(r, "HMSET", "q", "nochan", "ID", 1).startswith("CNF")
    assert cmd(r, "HDEL", "q", "nochan", 1) == 0


def test_parameter_errors_and_the_connection_stays_usable(r):
    cmd(r, "SET", "q", "c")
    assert error_of(r, "HMGET", "q", "c", "many").startswith("IPA Invalid count value")
    assert error_of(r, "HMGET", "q", "c", 10001).startswith("IPA Invalid count value")
    assert error_of(r, "HMGET", "q", "c", 1, "soon").startswith("IPA Invalid timeout value")
    assert error_of(r, "HDEL", "q", "c", 1, "x").startswith("IPA Invalid Ticket")
    assert error_of(r, "HMSET", "q", "c", "XX", 1).startswith("IPA Invalid Seek Type")
    assert error_of(r, "HMSET", "q", "c", "ID", "x").startswith("IPA Invalid ID")
    assert error_of(r, "HMSET", "q", "c", "TS", "x").startswith("IPA Invalid Timestamp")
    assert error_of(r, "SET", "../etc", "c").startswith("IPA Invalid Identifier Name")
    assert error_of(r, "SET", "", "c").startswith("IPA Invalid Identifier Name")
    assert error_of(r, "RPUSH", "q").startswith("MPA")
    assert error_of(r, "HMGET", "q", "c").startswith("MPA")
    assert error_of(r, "INFO", "bogus").startswith("IPA Invalid INFO parameter")
    assert error_of(r, "CONFIG").startswith("MPA")
    assert error_of(r, "FLUSHALL").startswith("unknown command 'FLUSHALL'")
    assert error_of(r, "PING", "a", "b").startswith("wrong number of arguments for 'ping'")
    assert r.ping()
    assert cmd(r, "RPUSH", "q", "still-works") == 1


def test_huge_count_is_refused_not_hung(r):
    cmd(r, "SET", "q", "c")
    assert error_of(r, "HMGET", "q", "c", 2**62).startswith("IPA Invalid count value")
    assert cmd(r, "HMGET", "q", "c", 0) == []


def test_one_rpush_or_hdel_carries_up_to_100000_and_no_more(r):
    cmd(r, "SET", "q", "c")
    bodies = [f"m{i}" for i in range(2000)]
    assert cmd(r, "RPUSH", "q", *bodies) == 2000
    got = cmd(r, "HMGET", "q", "c", 2000)
    assert [m[2].decode() for m in got] == bodies
    assert cmd(r, "HDEL", "q", "c", *[m[1] for m in got]) == 2000
    # commands.py rule 4: refused whole, before the shard spends time on it
    assert error_of(r, "RPUSH", "q", *[b"x"] * 100_001).startswith("IPA Too many messages")
    assert error_of(r, "HDEL", "q", "c", *[b"1"] * 100_001).startswith("IPA Too many tickets")
    assert cmd(r, "RPUSH", "q", *[b"x"] * 100_000) == 100_000
    assert info_queues(r, "q")["q"]["head"] == 102_001          # the next id


def test_a_get_reply_stops_at_64_mib_of_bodies(r):
    # queue.py rule 5: one reply's memory is bounded whatever the count and the sizes
    cmd(r, "SET", "big", "c")
    mib = 1024**2
    bodies = [bytes([65 + i % 26]) * mib for i in range(66)]
    for i in range(0, 66, 6):
        assert cmd(r, "RPUSH", "big", *bodies[i:i + 6]) == 6
    first = cmd(r, "HMGET", "big", "c", 100)
    assert 1 <= len(first) < 66 and sum(len(m[2]) for m in first) <= 64 * mib
    rest = cmd(r, "HMGET", "big", "c", 100)
    assert [m[2] for m in first + rest] == bodies
    assert cmd(r, "HDEL", "big", "c", *[m[1] for m in first + rest]) == 66


def test_binary_bodies_round_trip(r):
    cmd(r, "SET", "q", "c")
    bodies = [bytes(range(256)), b"", b"\r\n*1\r\n$3\r\nfoo\r\n", b"\x00" * 1000]
    cmd(r, "RPUSH", "q", *bodies)
    assert [m[2] for m in cmd(r, "HMGET", "q", "c", 10)] == bodies


def test_seek_by_id_and_timestamp(r):
    cmd(r, "SET", "q", "c")
    cmd(r, "RPUSH", "q", "a", "b")
    time.sleep(1.1)
    middle = time.time()
    cmd(r, "RPUSH", "q", "c", "d")
    assert [m[0] for m in cmd(r, "HMGET", "q", "c", 10)] == [1, 2, 3, 4]
    assert cmd(r, "HMSET", "q", "c", "ID", 2) == 2
    assert [m[0] for m in cmd(r, "HMGET", "q", "c", 10)] == [2, 3, 4]
    assert cmd(r, "HMSET", "q", "c", "TS", f"{middle:.3f}") == 2
    assert [m[0] for m in cmd(r, "HMGET", "q", "c", 10)] == [3, 4]
    assert cmd(r, "HMSET", "q", "c", "ID", 0) == 2                # before the oldest: oldest
    assert [m[0] for m in cmd(r, "HMGET", "q", "c", 10)] == [1, 2, 3, 4]
    assert cmd(r, "HMSET", "q", "c", "ID", 6) == 2                # past the head: waits
    cmd(r, "RPUSH", "q", "e", "f")
    assert [m[0] for m in cmd(r, "HMGET", "q", "c", 10)] == [6]


def test_delete_and_purge(r):
    cmd(r, "SET", "q", "c")
    cmd(r, "SET", "q", "d", "NX")
    cmd(r, "RPUSH", "q", "a", "b")
    assert cmd(r, "SREM", "q", "c") == 1
    assert cmd(r, "HMGET", "q", "c", 10) == []
    assert len(cmd(r, "HMGET", "q", "d", 10)) == 2
    assert cmd(r, "SREM", "q", "nochan") == 0
    assert cmd(r, "DEL", "q", "d") == 1
    assert cmd(r, "DEL", "q", "d") == 0
    assert error_of(r, "HMGET", "q", "d", 1).startswith("CNF")
    cmd(r, "RPUSH", "q", "x")
    assert cmd(r, "SREM", "q", "*") == 1
    assert cmd(r, "HMGET", "q", "c", 10) == []
    assert cmd(r, "RPUSH", "q", "y") == 1
    assert [m[0] for m in cmd(r, "HMGET", "q", "c", 10)] == [4]   # ids keep growing
    assert cmd(r, "DEL", "q") == 1
    assert cmd(r, "DEL", "q") == 0
    assert error_of(r, "RPUSH", "q", "x").startswith("QNF")
    assert cmd(r, "SET", "q", "c")                                # can be made again


def test_info_and_config(r):
    cmd(r, "SET", "alpha", "c")
    cmd(r, "SET", "beta", "c")
    cmd(r, "RPUSH", "alpha", "1", "2", "3")
    cmd(r, "HMGET", "alpha", "c", 1)
    queues = info_queues(r)
    assert set(queues) >= {"alpha", "beta"}
    alpha = queues["alpha"]
    assert alpha["head"] == 4 and alpha["tail"] == 1
    assert alpha["segments"] >= 1 and alpha["disk_usage"] > 0
    channel = alpha["channels"]["c"]
    assert channel["in_flight"] == 1 and channel["backlog"] == 2 and channel["position"] == 2
    assert set(info_queues(r, "al")) == {"alpha"}
    server = json.loads(cmd(r, "INFO", "server")[0])
    assert server["queue_count"] >= 2 and server["shards"] == 2 and server["client_count"] >= 1
    text = cmd(r, "INFO")
    assert isinstance(text, (bytes, str)) and b"queue_count" in (
        text if isinstance(text, bytes) else text.encode())

    config = json.loads(cmd(r, "CONFIG", "GET", "server")[0])
    assert config["fsync"] == "interval"
    assert cmd(r, "CONFIG", "SET", "queues.alpha.message_timeout", "5s")
    alpha_config = json.loads(cmd(r, "CONFIG", "GET", "queues.alpha")[0])
    assert alpha_config["alpha"]["message_timeout"] == 5.0
    assert set(json.loads(cmd(r, "CONFIG", "GET", "queues")[0])) >= {"alpha", "beta"}
    assert error_of(r, "CONFIG", "GET", "queues.nope").startswith("QNF")
    assert error_of(r, "CONFIG", "SET", "queues.nope.message_timeout", "1s").startswith("QNF")
    assert error_of(r, "CONFIG", "SET", "queues.alpha.message_timeout", "soon").startswith("IPA")
    assert error_of(r, "CONFIG", "SET", "queues.alpha.bogus", "1").startswith("IPA")
    assert cmd(r, "CONFIG", "SET", "server.max_get_count", "5")
    assert error_of(r, "HMGET", "alpha", "c", 6).startswith("IPA Invalid count value")
    assert error_of(r, "CONFIG", "SET", "server.bind", "1.2.3.4:1").startswith("IPA")
    assert json.loads(cmd(r, "CONFIG", "GET", "server")[0])["max_get_count"] == 5
    assert cmd(r, "CONFIG", "SET", "server.max_connections", "500")   # a frontend-only key
    assert json.loads(cmd(r, "CONFIG", "GET", "server")[0])["max_connections"] == 500
    # Values that once got "internal error" (a ValueError past the config parser) or +OK with
    # an infinite value that then broke queue creation and CONFIG GET's JSON: all refused.
    huge = "9" * 400
    for key, value in [("server.max_get_count", "\u00b2"), ("server.max_connections", "--1"),
                       ("server.queue.max_in_flight", "9" * 5000),
                       ("queues.alpha.max_in_flight", "\u00b2"),
                       ("server.max_message_size", huge), ("queues.alpha.segment_size", huge),
                       ("server.fsync_interval", huge), ("server.queue.message_timeout", huge),
                       ("queues.alpha.message_timeout", huge)]:
        assert error_of(r, "CONFIG", "SET", key, value).startswith("IPA"), key
    json.loads(cmd(r, "CONFIG", "GET", "server")[0], parse_constant=pytest.fail)
    assert cmd(r, "SET", "created-after", "c")


def test_housekeeping_commands(server):
    for protocol in (2, 3):
        r = server.client(protocol=protocol, client_name="tester")
        assert r.ping() is True
        assert cmd(r, "ECHO", "x") == b"x"
        assert cmd(r, "SELECT", 0)
        assert error_of(r, "SELECT", 1).startswith("DB index is out of range")
        assert cmd(r, "CLIENT", "GETNAME") == b"tester"
        assert isinstance(cmd(r, "CLIENT", "ID"), int)
        assert cmd(r, "CLIENT", "SETINFO", "LIB-NAME", "x")
        assert r.command_count() >= 10
        assert isinstance(r.command(), dict)
        assert cmd(r, "COMMAND", "DOCS") in ({}, [])
        r.close()


def raw_exchange(server, request: bytes, until: bytes) -> bytes:
    import socket
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(request)
        data = b""
        while until not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    return data


def test_hello_answers_resp2_array_and_resp3_map(server):
    resp3 = raw_exchange(server, b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n*1\r\n$4\r\nPING\r\n",
                         b"PONG")
    assert resp3.startswith(b"%") and b"proto\r\n:3\r\n" in resp3
    resp2 = raw_exchange(server, b"*2\r\n$5\r\nHELLO\r\n$1\r\n2\r\n*1\r\n$4\r\nPING\r\n",
                         b"PONG")
    assert resp2.startswith(b"*") and b"proto\r\n:2\r\n" in resp2


def test_ping_with_a_message_echoes_it(server):
    assert raw_exchange(server, b"*2\r\n$4\r\nPING\r\n$2\r\nhi\r\n", b"hi\r\n") == (
        b"$2\r\nhi\r\n")


def test_hello_4_is_noproto(server):
    data = raw_exchange(server, b"*2\r\n$5\r\nHELLO\r\n$1\r\n4\r\n*1\r\n$4\r\nPING\r\n",
                        b"PONG")
    assert data.startswith(b"-NOPROTO")


def test_quit_closes_after_ok(server):
    import socket
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(b"*1\r\n$4\r\nQUIT\r\n")
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data == b"+OK\r\n"
    sock.close()
