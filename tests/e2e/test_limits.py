"""Client limits of issue 4 against a real `floki start` (RELIABILITY.md tests 20, 23, 24, 29).

Each limit in floki.toml has a test here: max_connections, max_bulk_len, max_args,
max_message_size (an oversized body is dropped as it arrives, its command refused, the connection
kept), max_output_buffer (a client that never reads is disconnected; its messages are redelivered,
none lost) and timeout (idle and slowloris clients are closed). Limits are checked from headers:
the frontend's memory does not grow with what clients declare. Names that try to leave the data
directory are refused.
"""
from __future__ import annotations

import json
import os
import socket
import time
import zlib

import hiredis
import psutil
import pytest

from helpers import FlokiServer

MAX_CONNECTIONS = 60
MAX_BULK = 8 * 1024**2
MAX_MESSAGE = 64 * 1024
MAX_ARGS = 2_000_000
MAX_OUTPUT = 1024**2
MB = 1024**2


def resp(*argv: bytes | str) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in argv]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)


class RawClient:
    """A bare TCP client: exact bytes out, replies parsed with hiredis, EOF seen as such."""

    def __init__(self, server: FlokiServer, timeout_s: float = 10.0, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout_s)
        self.sock.connect((server.host, server.port))
        self.reader = hiredis.Reader()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self):
        """Returns the next reply (a hiredis.ReplyError for an error). Raises EOFError."""
        while (value := self.reader.gets()) is False:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.reader.feed(data)
        return value

    def call(self, *argv):
        self.send(resp(*argv))
        return self.reply()

    def rest_until_closed(self, timeout_s: float = 10.0) -> bytes:
        """Returns every byte still to come; fails unless the server closes within timeout_s."""
        self.sock.settimeout(timeout_s)
        chunks = []
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with small limits for the whole module (a start costs seconds)."""
    srv = FlokiServer(tmp_path_factory.mktemp("limits") / "floki", shards=2,
                      max_connections=MAX_CONNECTIONS, max_bulk_len=MAX_BULK,
                      max_message_size=MAX_MESSAGE, max_args=MAX_ARGS,
                      max_output_buffer=MAX_OUTPUT, queue_message_timeout="1s")
    try:
        yield srv.start()
    finally:
        srv.cleanup()


def frontend(server: FlokiServer) -> psutil.Process:
    return psutil.Process(server.pids()["frontend"])


def info_queue(server: FlokiServer, name: str) -> dict:
    client = RawClient(server)
    try:
        return json.loads(client.call("INFO", f"queues.{name}")[0])[name]
    finally:
        client.close()


def test_one_client_more_than_max_connections_is_refused_and_fds_come_back(server):
    """RELIABILITY 23: the excess get the error and are closed; the others keep working."""
    proc = frontend(server)
    baseline_fds = proc.num_fds()
    held = [RawClient(server) for _ in range(MAX_CONNECTIONS)]
    for client in held:
        assert client.call("PING") == b"PONG"
    extra = [RawClient(server) for _ in range(30)]
    for client in extra:
        assert client.rest_until_closed() == b"-ERR max number of clients reached\r\n"
        client.close()
    for client in held:
        assert client.call("ECHO", "still here") == b"still here"
    for client in held:
        client.close()
    server.wait_until(lambda: proc.num_fds() <= baseline_fds, message="fds back to baseline")
    late = RawClient(server)
    assert late.call("PING") == b"PONG"
    late.close()


def test_a_bulk_above_max_bulk_len_is_a_protocol_error_from_its_header(server):
    client, other = RawClient(server), RawClient(server)
    client.send(b"*2\r\n$4\r\nECHO\r\n$%d\r\n" % (MAX_BULK + 1))      # no body byte sent
    assert client.rest_until_closed() == b"-ERR Protocol error: invalid bulk length\r\n"
    assert other.call("PING") == b"PONG"
    for raw in (b"$-5", b"$abc", b"$99999999999999999999"):
        bad = RawClient(server)
        bad.send(b"*1\r\n" + raw + b"\r\n")
        assert bad.rest_until_closed() == b"-ERR Protocol error: invalid bulk length\r\n"
        bad.close()
    client.close()
    other.close()


def test_bodies_above_max_message_size_are_dropped_not_buffered(server):
    """RELIABILITY 29: -ERR, nothing of that RPUSH stored, the connection stays usable, and the
    frontend never holds the bodies (20 clients x 4 MB in flight at once)."""
    setup = RawClient(server)
    assert setup.call("SET", "big", "c") == b"OK"
    proc = frontend(server)
    rss_before = proc.memory_info().rss
    body_bytes, clients = 4 * MB, [RawClient(server) for _ in range(20)]
    for client in clients:
        client.send(b"*5\r\n$5\r\nRPUSH\r\n$3\r\nbig\r\n$4\r\nok-1\r\n$%d\r\n" % body_bytes)
    chunk = b"z" * (256 * 1024)
    for _ in range(body_bytes // len(chunk)):
        for client in clients:
            client.send(chunk)
    rss_peak = proc.memory_info().rss
    for client in clients:
        client.send(b"\r\n$4\r\nok-2\r\n")
        assert str(client.reply()) == (f"ERR message too large ({body_bytes} bytes, "
                                       f"max_message_size is {MAX_MESSAGE})")
    assert rss_peak - rss_before < 30 * MB, (rss_before, rss_peak)   # buffered would be 80 MB
    for client in clients:
        assert client.call("PING") == b"PONG"
        client.close()
    assert setup.call("RPUSH", "big", "x" * MAX_MESSAGE) == 1         # at the limit: stored
    assert str(setup.call("RPUSH", "big", "a", "x" * (MAX_MESSAGE + 1))).startswith(
        "ERR message too large")                                           # held, then refused
    setup.close()
    queue = info_queue(server, "big")
    assert queue["head"] == 2 and queue["channels"]["c"]["backlog"] == 1   # only the one


def test_max_args_and_million_element_headers_commit_no_memory(server):
    """A `*1000000` header within max_args waits for its elements without allocating for them
    (hiredis would reserve 8 MB of list per header: 320 MB here)."""
    proc = frontend(server)
    before = proc.memory_info()
    clients = [RawClient(server) for _ in range(40)]
    for client in clients:
        client.send(b"*1000000\r\n$5\r\nRPUSH\r\n$1\r\nq\r\n")
    probe = RawClient(server)
    assert probe.call("PING") == b"PONG"          # every header above has been read by now
    after = proc.memory_info()
    assert after.vms - before.vms < 100 * MB, (before, after)
    assert after.rss - before.rss < 30 * MB, (before, after)
    for client in clients:
        client.close()
    over = RawClient(server)
    over.send(b"*%d\r\n" % (MAX_ARGS + 1))
    assert over.rest_until_closed() == b"-ERR Protocol error: invalid multibulk length\r\n"
    assert probe.call("PING") == b"PONG"
    probe.close()


def make_body(seq: int) -> bytes:
    payload = os.urandom(16).hex().encode() * 1000          # 32 000 bytes
    return b"%06d:%08x:" % (seq, zlib.crc32(payload)) + payload


def body_is_intact(body: bytes) -> bool:
    seq, crc, payload = body.split(b":", 2)
    return zlib.crc32(payload) == int(crc, 16)


def test_a_client_that_never_reads_is_disconnected_and_its_messages_redelivered(server):
    """RELIABILITY 20: the output buffer cap closes the client; frontend memory stays bounded,
    other clients are served; the messages handed to it come back after message_timeout."""
    count = 600                                            # 19 MB of replies
    producer = RawClient(server)
    assert producer.call("SET", "slow", "c") == b"OK"
    bodies = {}
    for seq in range(count):
        bodies[seq] = make_body(seq)
        assert producer.call("RPUSH", "slow", bodies[seq]) == 1
    proc = frontend(server)
    rss_before = proc.memory_info().rss
    clients_before = json.loads(producer.call("INFO", "server")[0])["client_count"]
    hog = RawClient(server, rcvbuf=4096)
    hog.send(resp("HMGET", "slow", "c", "1") * count)     # and never reads a byte
    worst_ping_s = 0.0

    def hog_gone() -> bool:
        nonlocal worst_ping_s
        started = time.monotonic()
        assert producer.call("PING") == b"PONG"
        worst_ping_s = max(worst_ping_s, time.monotonic() - started)
        info = json.loads(producer.call("INFO", "server")[0])
        return info["client_count"] < clients_before + 1 and "does not read its replies" in \
            server.log_path.read_text(errors="replace")

    server.wait_until(hog_gone, timeout=20, message="the hog disconnected")
    assert proc.memory_info().rss - rss_before < 64 * MB
    assert worst_ping_s < 1.0
    hog.close()

    # Messages lost: 0, corrupt bodies served: 0 (the hog's tickets expire and are redelivered).
    consumer = RawClient(server)
    seen, corrupt = {}, 0
    deadline = time.monotonic() + 20
    while len(seen) < count and time.monotonic() < deadline:
        got = consumer.call("HMGET", "slow", "c", "100", "0.5")
        tickets = []
        for msg_id, ticket, body in got:
            corrupt += not body_is_intact(body)
            seen[int(body.split(b":", 1)[0])] = body
            tickets.append(ticket)
        if tickets:
            assert consumer.call("HDEL", "slow", "c", *[str(t) for t in tickets]) == len(tickets)
    assert corrupt == 0
    assert sorted(seen) == list(range(count))               # none lost
    assert all(seen[seq] == bodies[seq] for seq in seen)
    consumer.close()
    producer.close()


@pytest.mark.parametrize("name", [b"../x", b"..", b".", b"/abs", b"a/b", b"a\x00b", b"x" * 10240,
                                  b".hidden", b"", b"*", b"\xff\xfe", b"a b", b"q\r\nPING"])
def test_names_that_could_leave_the_data_dir_are_refused(server, name):
    client = RawClient(server)
    before = sorted(os.listdir(server.data_dir))
    parent_before = sorted(os.listdir(server.data_dir.parent))
    for argv in (("SET", name, "c"), ("SET", "ok", name), ("RPUSH", name, "m"),
                 ("HMGET", name, "c", "1"), ("DEL", name), ("CONFIG", "SET",
                                                            b"queues." + name + b".x", "1")):
        reply = client.call(*argv)
        assert isinstance(reply, hiredis.ReplyError), (argv, reply)
        assert str(reply).startswith(("IPA", "QNF")), (argv, reply)
    assert client.call("PING") == b"PONG"
    assert sorted(os.listdir(server.data_dir)) == before
    assert sorted(os.listdir(server.data_dir.parent)) == parent_before
    client.close()


def test_idle_and_slowloris_clients_are_closed_after_timeout(floki_server):
    """RELIABILITY 24: silent clients and clients that never finish a command are closed after
    `timeout`; an active client and a parked long poll are not."""
    server = floki_server(shards=1, timeout="400ms")
    setup = RawClient(server)
    assert setup.call("SET", "lp", "c") == b"OK"
    idle, slowloris, active, poller = (RawClient(server) for _ in range(4))
    assert idle.call("PING") == b"PONG"
    poller.send(resp("HMGET", "lp", "c", "1", "1.5"))
    started = time.monotonic()
    slowloris.send(b"*2\r\n$4\r\nECHO\r\n$100\r\n")
    while time.monotonic() - started < 1.2:
        assert active.call("PING") == b"PONG"
        try:
            slowloris.send(b"x")                   # a byte every 100 ms, never a command
        except OSError:
            pass                                   # closed already
        time.sleep(0.1)
    assert idle.rest_until_closed(timeout_s=2.0) == b""               # closed without a reply
    assert slowloris.rest_until_closed(timeout_s=2.0) == b""
    assert active.call("PING") == b"PONG"
    assert poller.reply() == []                                        # answered at its deadline
    assert 1.4 < time.monotonic() - started < 3.0
    assert poller.call("PING") == b"PONG"
    for client in (setup, idle, slowloris, active, poller):
        client.close()
