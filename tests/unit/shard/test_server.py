"""ShardServer: every request type over a real ROUTER socket, group commit, parked long polls.

The rig is a real Catalog over real queues in tmp_path and a ShardServer whose ROUTER is bound
to inproc://; the test holds the DEALER end and reads the reply frames the frontend would get.
Requests go in through `handle_frames` and a loop pass ends with `_finish_pass`, exactly as
`serve` does; timers run through `rig.timers(now)` with `now` passed in, so nothing sleeps.
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import hiredis
import pytest
import zmq

from floki import __version__, reply, wire
from floki import requests as rq
from floki.config import QueueSettings, ServerConfig
from floki.overrides import Overrides
from floki.routing import shard_for
from floki.shard.catalog import Catalog
from floki.shard.queue import Queue
from floki.config import RUNTIME_KEYS
from floki.shard import server as server_module
from floki.shard.server import FsyncFailed, ShardServer

IDENTITY = b"frontend-1"
REPLY_WAIT_MS = 1000        # a reply that was sent is in the pipe at once; this is a safety net
SILENCE_MS = 30             # how long "no reply" is watched for


@dataclass
class Rig:
    server: ShardServer
    catalog: Catalog
    dealer: zmq.Socket
    data_dir: Path
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # --- sending ---------------------------------------------------------------------------

    def send(self, *argv: bytes | str, request_id: int | None = None) -> int:
        """Feeds one COMMAND to the server (no pass ends). Returns its request id."""
        rid = next(self.ids) if request_id is None else request_id
        args = [a if isinstance(a, bytes) else a.encode() for a in argv]
        self.server.handle_frames([IDENTITY, *wire.encode_request(rid, wire.COMMAND, args)])
        return rid

    def cancel(self, request_id: int) -> None:
        self.server.handle_frames([IDENTITY, *wire.encode_request(request_id, wire.CANCEL)])

    def finish(self) -> None:
        self.server._finish_pass()

    def timers(self, now: float, heartbeat: bool = True) -> None:
        """Runs the timers at `now`; the frontend's heartbeat was heard just then unless
        `heartbeat` is False (a live frontend pings every 0.25 s). The background jobs they
        start are waited for and applied, as the next pass would (settle_background)."""
        if heartbeat:
            self.server.peer_seen[IDENTITY] = now
        self.server._run_timers(now)
        self.settle_background()

    def settle_background(self) -> None:
        """Waits until the background worker has nothing left and applies what it completed
        (and what that resubmits), as the loop's next passes would."""
        worker = self.server.background
        while True:
            assert worker.wait_idle(5.0), "background jobs still running after 5 s"
            self.server._apply_background()
            if worker.outstanding == 0:
                return

    def call(self, *argv: bytes | str) -> tuple[bytes, bytes]:
        """One request in its own pass. Returns (status, payload) of its reply."""
        rid = self.send(*argv)
        self.finish()
        got = self.replies(1)
        assert list(got) == [rid], got
        return got[rid]

    def resp(self, *argv: bytes | str) -> bytes:
        status, payload = self.call(*argv)
        assert status == wire.RESP, (status, payload)
        return payload

    def json(self, *argv: bytes | str) -> dict:
        status, payload = self.call(*argv)
        assert status == wire.JSON, (status, payload)
        return json.loads(payload)

    # --- receiving -------------------------------------------------------------------------

    def replies(self, count: int) -> dict[int, tuple[bytes, bytes]]:
        """Reads exactly `count` replies, then checks nothing else came. Returns id -> reply."""
        got: dict[int, tuple[bytes, bytes]] = {}
        for rid, status, payload in self.reply_list(count):
            got[rid] = (status, payload)
        return got

    def reply_list(self, count: int) -> list[tuple[int, bytes, bytes]]:
        """Reads exactly `count` replies in arrival order (a message may carry several: one
        per request the pass answered), then checks nothing else came."""
        got: list[tuple[int, bytes, bytes]] = []
        while len(got) < count:
            assert self.dealer.poll(REPLY_WAIT_MS), f"only {len(got)} of {count} replies: {got}"
            got += wire.decode_replies(self.dealer.recv_multipart())
        assert len(got) == count, f"{len(got)} replies, expected {count}: {got}"
        self.assert_silent(0)
        return got

    def assert_silent(self, wait_ms: int = SILENCE_MS) -> None:
        if self.dealer.poll(wait_ms):
            raise AssertionError(f"unexpected reply {self.dealer.recv_multipart()!r}")


def parse(payload: bytes):
    """Returns the RESP value (hiredis): ints for `:`, bytes for `$`, ReplyError for `-`."""
    reader = hiredis.Reader()
    reader.feed(payload)
    value = reader.gets()
    assert value is not False, f"incomplete RESP {payload!r}"
    assert reader.gets() is False, f"trailing bytes after the reply in {payload!r}"
    return value


def error_line(payload: bytes) -> str:
    assert payload.startswith(b"-") and payload.endswith(b"\r\n"), payload
    return payload[1:-2].decode()


@pytest.fixture
def make_rig(tmp_path: Path):
    """Factory: make_rig(fsync="never", shard_count=1, index=0, queue=QueueSettings(), **config)."""
    contexts: list[zmq.Context] = []
    catalogs: list[Catalog] = []
    servers: list[ShardServer] = []
    root_level = logging.getLogger().level     # every CONFIG SET server.* applies log_level

    def make(*, index: int = 0, shard_count: int = 1, fsync: str = "never",
             queue: QueueSettings | None = None, **config_values) -> Rig:
        data_dir = tmp_path / f"data{len(catalogs)}"
        config = ServerConfig(data_dir=str(data_dir), shards=shard_count, fsync=fsync,
                              queue=queue or QueueSettings(), **config_values)
        catalog = Catalog(data_dir, index, shard_count, config.queue, config.fsync)
        catalog.open_all()
        catalogs.append(catalog)
        context = zmq.Context()
        contexts.append(context)
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        endpoint = f"inproc://shard-{len(contexts)}"
        router.bind(endpoint)
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IDENTITY, IDENTITY)
        dealer.connect(endpoint)
        server = ShardServer(config, index, catalog, router)
        servers.append(server)
        rig = Rig(server, catalog, dealer, data_dir)
        # A first PING through the sockets, so the ROUTER knows the DEALER's identity (and the
        # PING path runs over a real socket: recv by the server's own _take_batch).
        dealer.send_multipart(wire.encode_request(0, wire.PING))
        assert router.poll(REPLY_WAIT_MS)
        server._take_batch()
        rig.finish()
        assert rig.replies(1)[0][0] == wire.PONG
        return rig

    yield make
    for server in servers:
        server.stop_background()
    for catalog in catalogs:
        catalog.close()
    for context in contexts:
        context.destroy(linger=0)
    logging.getLogger().setLevel(root_level)


@pytest.fixture
def rig(make_rig) -> Rig:
    return make_rig()


def other_shard_name(shard_count: int, index: int) -> str:
    """Returns a queue name that routing gives to shard `index`."""
    return next(n for n in (f"q{i}" for i in range(1000)) if shard_for(n, shard_count) == index)


# --- the handler table ------------------------------------------------------------------------

def test_every_shard_and_fanout_request_type_has_a_handler(rig):
    served = set(rq.SHARD_REQUESTS) | set(rq.FANOUT_REQUESTS)
    assert set(rig.server.handlers) == served
    assert all(callable(h) for h in rig.server.handlers.values())
    assert not set(rq.FRONTEND_REQUESTS) & set(rig.server.handlers)


def test_a_frontend_command_sent_to_a_shard_is_refused(rig):
    assert error_line(rig.resp("PING")).startswith("IPA ")
    assert error_line(rig.resp("ECHO", "x")).startswith("IPA ")


# --- replies of each request type -----------------------------------------------------------

def test_rpush_replies_the_count_of_this_call(rig):
    assert rig.resp("SET", "q", "c") == b"+OK\r\n"
    assert rig.resp("RPUSH", "q", "a", "b", "c") == b":3\r\n"
    assert rig.resp("RPUSH", "q", "d") == b":1\r\n"
    assert rig.catalog.get("q").info(time.monotonic())["head"] == 5


def test_hmget_replies_id_ticket_body_with_integer_id_and_ticket(rig):
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "hello", b"\x00bin\r\n")
    payload = rig.resp("HMGET", "q", "c", "10")
    value = parse(payload)
    assert [(m[0], m[2]) for m in value] == [(1, b"hello"), (2, b"\x00bin\r\n")]
    for message_id, ticket, _ in value:
        assert isinstance(message_id, int) and isinstance(ticket, int) and ticket > 0
    # byte for byte: integers, not bulk strings
    first_ticket = value[0][1]
    assert payload.startswith(b"*2\r\n*3\r\n:1\r\n:%d\r\n$5\r\nhello\r\n" % first_ticket)
    assert rig.resp("HMGET", "q", "c", "10") == reply.EMPTY_ARRAY     # all in flight
    assert rig.resp("HMGET", "q", "c", "0") == reply.EMPTY_ARRAY


def test_hmget_count_is_capped_by_max_get_count(make_rig):
    rig = make_rig(max_get_count=5)
    rig.resp("SET", "q", "c")
    assert rig.resp("HMGET", "q", "c", "5") == reply.EMPTY_ARRAY
    assert error_line(rig.resp("HMGET", "q", "c", "6")) == "IPA Invalid count value (max 5)"


def test_hdel_counts_the_live_tickets_it_acked(rig):
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "a", "b")
    (_, t1, _), (_, t2, _) = parse(rig.resp("HMGET", "q", "c", "2"))
    assert rig.resp("HDEL", "q", "c", str(t1), "12345", str(t2)) == b":2\r\n"
    assert rig.resp("HDEL", "q", "c", str(t1)) == b":0\r\n"            # used ticket
    assert rig.resp("HDEL", "q", "nochannel", str(t1)) == b":0\r\n"    # unknown channel: 0
    assert error_line(rig.resp("HDEL", "q", "c", "x1")) == "IPA Invalid Ticket"
    assert error_line(rig.resp("HDEL", "nq", "c", "1")) == "QNF Queue Not Found"


def test_hmset_seeks_by_id_and_by_timestamp_and_replies_2(rig):
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "a", "b", "c")
    assert rig.resp("HMSET", "q", "c", "ID", "2") == b":2\r\n"
    assert [m[0] for m in parse(rig.resp("HMGET", "q", "c", "10"))] == [2, 3]
    assert rig.resp("HMSET", "q", "c", "TS", "0") == b":2\r\n"     # before everything
    assert [m[0] for m in parse(rig.resp("HMGET", "q", "c", "10"))] == [1, 2, 3]
    assert rig.resp("HMSET", "q", "c", "id", "3") == b":2\r\n"     # keywords: any case
    assert [m[0] for m in parse(rig.resp("HMGET", "q", "c", "10"))] == [3]
    assert error_line(rig.resp("HMSET", "q", "c", "XX", "1")) == (
        "IPA Invalid Seek Type Expected TS or ID")
    assert error_line(rig.resp("HMSET", "q", "nc", "ID", "1")) == "CNF Channel Not Found"
    assert error_line(rig.resp("HMSET", "nq", "c", "ID", "1")) == "QNF Queue Not Found"


def test_set_and_setnx_follow_floki_rules(rig):
    assert rig.resp("SET", "q", "c") == reply.OK                      # new queue and channel
    assert error_line(rig.resp("SET", "q", "c")) == "CAE Channel Already Exists"
    # an existing queue without NX is QAE even for a new channel (Floki's rule)
    assert error_line(rig.resp("SET", "q", "c2")) == "QAE Queue Already Exists"
    assert not rig.catalog.get("q").has_channel("c2")
    assert rig.resp("SET", "q", "c2", "NX") == reply.OK
    assert rig.resp("SET", "q", "c2", "nx") == reply.OK                # existing: still +OK
    assert rig.resp("SETNX", "q", "c3") == reply.OK
    assert rig.resp("SETNX", "q", "c3") == reply.OK
    assert rig.resp("SETNX", "q2", "c") == reply.OK                    # creates the queue
    assert rig.catalog.get("q").channel_names() == ["c", "c2", "c3"]
    assert sorted(rig.catalog.queues) == ["q", "q2"]
    assert error_line(rig.resp("SET", "q", "c", "XX")) == "IPA Invalid SET option, expected NX"
    assert error_line(rig.resp("SET", "q", "..")) == "IPA Invalid Identifier Name"
    assert error_line(rig.resp("SET", "q")) == "MPA Queue or Channel Missing"


def test_del_deletes_a_channel_or_the_queue(rig):
    rig.resp("SET", "q", "c")
    rig.resp("SET", "q", "d", "NX")
    assert rig.resp("DEL", "q", "c") == b":1\r\n"
    assert rig.resp("DEL", "q", "c") == b":0\r\n"
    assert rig.resp("DEL", "nq", "c") == b":0\r\n"
    assert rig.catalog.get("q").channel_names() == ["d"]
    assert rig.resp("DEL", "q") == b":1\r\n"
    assert rig.resp("DEL", "q") == b":0\r\n"
    assert "q" not in rig.catalog and not (rig.data_dir / "q").exists()
    assert error_line(rig.resp("RPUSH", "q", "m")) == "QNF Queue Not Found"


def test_srem_purges_a_channel_or_the_whole_queue(rig):
    rig.resp("SET", "q", "c")
    rig.resp("SET", "q", "d", "NX")
    rig.resp("RPUSH", "q", "a", "b")
    assert rig.resp("SREM", "q", "c") == b":1\r\n"
    assert rig.resp("HMGET", "q", "c", "10") == reply.EMPTY_ARRAY
    assert len(parse(rig.resp("HMGET", "q", "d", "1"))) == 1            # d untouched
    assert rig.resp("SREM", "q", "nochannel") == b":0\r\n"
    assert rig.resp("SREM", "q", "*") == b":1\r\n"
    assert rig.resp("HMGET", "q", "d", "10") == reply.EMPTY_ARRAY
    assert rig.resp("SREM", "nq", "*") == b":0\r\n"
    assert rig.resp("RPUSH", "q", "z") == b":1\r\n"
    assert [m[0] for m in parse(rig.resp("HMGET", "q", "c", "10"))] == [3]   # ids keep growing


def test_queue_config_set_replies_ok_and_is_persisted(rig):
    rig.resp("SET", "q", "c")
    assert rig.resp("CONFIG", "SET", "queues.q.message_timeout", "5s") == reply.OK
    assert rig.resp("CONFIG", "SET", "queues.q.max_in_flight", "7") == reply.OK
    assert rig.catalog.get("q").settings.message_timeout == 5.0
    stored = json.loads((rig.data_dir / "q" / "queue.json").read_text())["settings"]
    assert stored["message_timeout"] == 5.0 and stored["max_in_flight"] == 7
    rig.catalog.close()
    reopened = Queue.open(rig.data_dir, "q", QueueSettings(), "never")
    try:
        assert reopened.settings.message_timeout == 5.0
        assert reopened.settings.max_in_flight == 7
    finally:
        reopened.close()
    rig.catalog.open_all()
    assert rig.catalog.get("q").settings.max_in_flight == 7


def test_queue_config_set_errors(rig):
    rig.resp("SET", "q", "c")
    assert error_line(rig.resp("CONFIG", "SET", "queues.q.nosuchkey", "1")).startswith(
        "IPA Invalid CONFIG SET parameter")
    assert error_line(rig.resp("CONFIG", "SET", "queues.q.message_timeout", "soon")).startswith(
        "IPA Invalid CONFIG SET parameter")
    assert error_line(rig.resp("CONFIG", "SET", "queues.nq.message_timeout", "1s")) == (
        "QNF Queue Not Found")
    assert rig.catalog.get("q").settings == QueueSettings()


def test_info_server_json(rig):
    rig.resp("SET", "q", "c")
    rig.send("HMGET", "q", "c", "1", "30")          # parks: counts as a blocked client
    rig.finish()
    info = rig.json("INFO", "server")
    assert info["index"] == 0 and info["pid"] == os.getpid()
    assert info["queue_count"] == 1 and info["blocked_client_count"] == 1
    assert info["broken_queues"] == {} and info["version"] == __version__
    assert 0 <= info["uptime_s"] < 60
    assert rig.json("INFO")["queue_count"] == 1          # plain INFO: same JSON part


def test_info_queues_json_with_prefix(rig):
    rig.resp("SET", "orders", "c")
    rig.resp("SET", "other", "c")
    rig.resp("SET", "logs", "c")
    rig.resp("RPUSH", "orders", "a", "b")
    parse(rig.resp("HMGET", "orders", "c", "1"))
    everything = rig.json("INFO", "queues")
    assert sorted(everything) == ["logs", "orders", "other"]
    orders = everything["orders"]
    assert orders["head"] == 3 and orders["tail"] == 1 and orders["segments"] == 1
    assert orders["channels"] == {"c": {"position": 2, "in_flight": 1, "backlog": 1}}
    assert sorted(rig.json("INFO", "queues.o")) == ["orders", "other"]
    assert rig.json("INFO", "queues.zzz") == {}


def test_config_get_server_and_queues_json(rig):
    info = rig.json("CONFIG", "GET", "server")
    assert info == json.loads(json.dumps(rig.server.config.to_dict()))
    assert info["fsync"] == "never" and info["queue"]["message_timeout"] == 30.0
    rig.resp("SET", "q1", "c")
    rig.resp("SET", "q2", "c")
    rig.resp("CONFIG", "SET", "queues.q2.max_in_flight", "3")
    assert rig.json("CONFIG", "GET", "queues.q2") == {
        "q2": {**QueueSettings().to_dict(), "max_in_flight": 3}}
    assert sorted(rig.json("CONFIG", "GET", "queues")) == ["q1", "q2"]
    assert sorted(rig.json("CONFIG", "GET", "queues.q*")) == ["q1", "q2"]
    assert rig.json("CONFIG", "GET", "queues.nq") == {}    # the frontend turns {} into QNF


# --- errors -----------------------------------------------------------------------------------

def test_floki_errors_become_resp_error_replies(rig):
    rig.resp("SET", "q", "c")
    assert error_line(rig.resp("RPUSH", "nq", "m")) == "QNF Queue Not Found"
    assert error_line(rig.resp("HMGET", "nq", "c", "1")) == "QNF Queue Not Found"
    assert error_line(rig.resp("HMGET", "q", "nc", "1")) == "CNF Channel Not Found"
    assert error_line(rig.resp("HMGET", "q", "nc", "0")) == "CNF Channel Not Found"
    assert error_line(rig.resp("HMGET", "q", "c", "-1")) == "IPA Invalid count value"
    assert error_line(rig.resp("HMGET", "q", "c", "1", "x")) == "IPA Invalid timeout value"
    assert error_line(rig.resp("HMGET", "q", "c")) == "MPA Queue or Channel or Count Missing"
    assert error_line(rig.resp("RPUSH", "q")) == "MPA Queue or Value Missing"
    assert error_line(rig.resp("NOSUCH", "a")).startswith("ERR unknown command 'NOSUCH'")


def test_a_queue_another_shard_owns_is_wrong_shard(make_rig):
    rig = make_rig(index=0, shard_count=2)
    mine, theirs = other_shard_name(2, 0), other_shard_name(2, 1)
    assert rig.resp("SET", mine, "c") == reply.OK
    for argv in (("SET", theirs, "c"), ("RPUSH", theirs, "m"), ("HMGET", theirs, "c", "1"),
                 ("DEL", theirs), ("CONFIG", "SET", f"queues.{theirs}.max_in_flight", "1")):
        assert error_line(rig.resp(*argv)).startswith("ERR queue routed to the wrong shard")
    assert theirs not in rig.catalog and not (rig.data_dir / theirs).exists()


def test_a_bug_is_internal_error_and_the_shard_keeps_serving(rig, caplog):
    rig.resp("SET", "q", "c")
    rig.resp("SET", "ok", "c")
    rig.catalog.get("q").close()      # a closed Queue left in the catalog: ValueError, not Floki
    with caplog.at_level(logging.ERROR, logger="floki.shard.server"):
        assert rig.resp("RPUSH", "q", "m") == b"-ERR internal error\r\n"
    assert any("internal error" in r.message and r.exc_info for r in caplog.records)
    assert rig.resp("RPUSH", "ok", "m") == b":1\r\n"
    assert rig.resp("HMGET", "q", "c", "1") == b"-ERR internal error\r\n"
    rig.server.handle_frames([IDENTITY, *wire.encode_request(99, wire.PING)])
    rig.finish()
    assert rig.replies(1)[99][0] == wire.PONG


# --- wire -------------------------------------------------------------------------------------

def test_ping_gets_pong_with_json_status(rig):
    rig.resp("SET", "q", "c")
    rig.server.handle_frames([IDENTITY, *wire.encode_request(7, wire.PING)])
    rig.finish()
    status, payload = rig.replies(1)[7]
    assert status == wire.PONG
    assert json.loads(payload) == {"index": 0, "pid": os.getpid(), "queues": 1}


@pytest.mark.parametrize("frames", [
    [IDENTITY],                                                  # nothing after the identity
    [IDENTITY, b"\x00" * 8],                                     # no kind
    [IDENTITY, b"short", wire.COMMAND, b"PING"],                 # request id not 8 bytes
    [IDENTITY, b"\x00" * 8, b"Z", b"RPUSH"],                     # unknown kind
    [IDENTITY, b"\x00" * 8, wire.COMMAND],                       # command without argv
], ids=["identity-only", "no-kind", "short-id", "bad-kind", "no-argv"])
def test_malformed_frames_are_dropped_and_the_shard_keeps_serving(rig, frames, caplog):
    with caplog.at_level(logging.WARNING, logger="floki.shard.server"):
        rig.server.handle_frames(frames)
        rig.finish()
    rig.assert_silent()
    assert any("malformed" in r.message for r in caplog.records)
    assert rig.resp("SET", "q", "c") == reply.OK


def test_requests_taken_from_the_socket_are_answered_in_one_pass_in_order(rig):
    rig.resp("SET", "q", "c")
    for rid in range(100, 150):
        rig.dealer.send_multipart(wire.encode_request(rid, wire.COMMAND, [b"RPUSH", b"q", b"m"]))
    assert rig.server.socket.poll(REPLY_WAIT_MS)     # inproc: all 50 are in the pipe at once
    assert rig.server._take_batch() == 50
    rig.finish()
    # in one message or several (STREAM_REPLY_*), always in order
    order = [rid for rid, _, _ in rig.reply_list(50)]
    assert order == list(range(100, 150))
    assert rig.catalog.get("q").info(time.monotonic())["head"] == 51


def test_serve_runs_passes_until_told_to_stop(rig):
    rig.resp("SET", "q", "c")
    rig.dealer.send_multipart(wire.encode_request(5, wire.COMMAND, [b"RPUSH", b"q", b"a"]))
    rig.dealer.send_multipart(wire.encode_request(6, wire.PING))
    passes = itertools.count()
    rig.server.serve(lambda: next(passes) >= 3)
    got = rig.replies(2)
    assert got[5] == (wire.RESP, b":1\r\n") and got[6][0] == wire.PONG


# --- group commit (fsync = "always") ------------------------------------------------------------

class FsyncCounter:
    """Counts real os.fsync calls; `fail` makes them raise EIO instead (nothing is synced)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.fail = False
        real = os.fsync

        def fsync(fd):
            if self.fail:
                raise OSError(errno.EIO, "injected fsync failure")
            self.calls += 1
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def watch_syncs(rig: Rig, name: str, log: list) -> None:
    """Wraps Queue.sync of one queue instance: records (queue, replies already sent?)."""
    queue = rig.catalog.get(name)
    real_sync = queue.sync

    def sync(*args):
        log.append((name, rig.dealer.poll(0) != 0, queue.needs_sync))
        real_sync(*args)

    queue.sync = sync


def test_group_commit_syncs_each_queue_once_per_pass_before_any_reply(make_rig, monkeypatch):
    rig = make_rig(fsync="always")
    rig.resp("SET", "a", "c")
    rig.resp("SET", "b", "c")
    rig.resp("RPUSH", "a", "warm")          # the first push raises the id high-water mark
    rig.resp("RPUSH", "b", "warm")
    syncs: list = []
    watch_syncs(rig, "a", syncs)
    watch_syncs(rig, "b", syncs)
    fsyncs = FsyncCounter(monkeypatch)

    def one_pass(pushes_per_queue: int) -> int:
        before = fsyncs.calls
        rids = [rig.send("RPUSH", q, f"m{i}") for i in range(pushes_per_queue) for q in "ab"]
        rig.finish()
        got = rig.replies(len(rids))
        assert all(got[r] == (wire.RESP, b":1\r\n") for r in rids)
        return fsyncs.calls - before

    fsyncs_for_one = one_pass(1)
    assert sorted(s[0] for s in syncs) == ["a", "b"]
    syncs.clear()
    fsyncs_for_fifty = one_pass(50)
    # one Queue.sync per queue, each before any reply left, each with work to do
    assert sorted(s[0] for s in syncs) == ["a", "b"]
    assert all(not replied and needed for _, replied, needed in syncs)
    assert 0 < fsyncs_for_fifty == fsyncs_for_one
    assert rig.catalog.get("a").info(time.monotonic())["head"] == 53


def test_with_fsync_always_replies_taken_from_the_socket_wait_for_the_pass_end(make_rig):
    rig = make_rig(fsync="always")
    rig.resp("SET", "q", "c")
    for rid in range(300, 310):
        rig.dealer.send_multipart(wire.encode_request(rid, wire.COMMAND, [b"RPUSH", b"q", b"m"]))
    assert rig.server.socket.poll(REPLY_WAIT_MS)
    assert rig.server._take_batch() == 10
    rig.assert_silent(0)                  # not synced yet: nothing may be acknowledged
    rig.finish()
    assert [rid for rid, _, _ in rig.reply_list(10)] == list(range(300, 310))


def test_group_commit_delivers_nothing_before_it_is_synced(make_rig):
    rig = make_rig(fsync="always")
    rig.resp("SET", "q", "c")
    push = rig.send("RPUSH", "q", "m")
    get = rig.send("HMGET", "q", "c", "1")        # same pass, before the sync
    rig.finish()
    got = rig.replies(2)
    assert got[push] == (wire.RESP, b":1\r\n") and got[get] == (wire.RESP, reply.EMPTY_ARRAY)
    assert not rig.catalog.get("q").needs_sync
    assert [m[2] for m in parse(rig.resp("HMGET", "q", "c", "1"))] == [b"m"]


def test_failed_group_commit_raises_fsync_failed_and_sends_no_reply(make_rig, monkeypatch):
    rig = make_rig(fsync="always")
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "warm")
    fsyncs = FsyncCounter(monkeypatch)
    rig.send("RPUSH", "q", "m1")
    rig.send("RPUSH", "q", "m2")
    rig.server.handle_frames([IDENTITY, *wire.encode_request(77, wire.PING)])
    fsyncs.fail = True
    with pytest.raises(FsyncFailed, match="'q'"):
        rig.finish()
    fsyncs.fail = False
    rig.assert_silent()


def test_interval_fsync_runs_on_its_timer_and_a_failure_is_logged_not_fatal(make_rig,
                                                                             monkeypatch):
    rig = make_rig(fsync="interval", fsync_interval=5.0)
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "m")
    queue = rig.catalog.get("q")
    assert queue.needs_sync
    rig.timers(time.monotonic())                    # not due yet
    assert queue.needs_sync
    fsyncs = FsyncCounter(monkeypatch)
    fsyncs.fail = True
    rig.timers(time.monotonic() + 6)                # due, and the fsync fails
    assert queue.needs_sync
    fsyncs.fail = False
    assert rig.resp("RPUSH", "q", "n") == b":1\r\n"              # still serving
    rig.timers(time.monotonic() + 12)
    assert not queue.needs_sync and fsyncs.calls > 0


# --- parked long polls --------------------------------------------------------------------------

def test_a_long_poll_with_nothing_available_is_parked_and_a_push_answers_it(rig):
    rig.resp("SET", "q", "c")
    poll = rig.send("HMGET", "q", "c", "5", "30")
    rig.finish()
    rig.assert_silent()
    assert rig.server.parked_count == 1
    push = rig.send("RPUSH", "q", "x", "y")
    rig.finish()
    got = rig.replies(2)
    assert got[push] == (wire.RESP, b":2\r\n")
    assert [m[2] for m in parse(got[poll][1])] == [b"x", b"y"]
    assert rig.server.parked_count == 0 and rig.server.parked == {}


def test_a_long_poll_with_messages_available_answers_at_once(rig):
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "x")
    assert [m[2] for m in parse(rig.resp("HMGET", "q", "c", "5", "30"))] == [b"x"]
    assert rig.server.parked_count == 0


def test_a_push_to_another_queue_or_channel_does_not_answer_a_parked_poll(rig):
    rig.resp("SET", "q", "c")
    rig.resp("SET", "q", "d", "NX")
    rig.resp("SET", "other", "c")
    poll = rig.send("HMGET", "q", "c", "1", "30")
    rig.finish()
    rig.resp("RPUSH", "other", "m")
    rig.resp("HMSET", "q", "d", "ID", "1")
    assert rig.server.parked_count == 1
    rig.send("RPUSH", "q", "m")
    rig.finish()
    assert poll in rig.replies(2)


def test_a_parked_poll_past_its_deadline_gets_an_empty_array(rig):
    rig.resp("SET", "q", "c")
    poll = rig.send("HMGET", "q", "c", "1", "0.5")
    rig.finish()
    now = time.monotonic()
    rig.timers(now)                  # not yet
    rig.finish()
    rig.assert_silent(0)
    rig.timers(now + 1.0)
    rig.finish()
    assert rig.replies(1)[poll] == (wire.RESP, reply.EMPTY_ARRAY)
    assert rig.server.parked_count == 0
    rig.resp("RPUSH", "q", "m")                   # nobody waits any more
    assert len(parse(rig.resp("HMGET", "q", "c", "1"))) == 1


def test_cancel_drops_a_parked_poll_and_the_message_stays_available(rig):
    rig.resp("SET", "q", "c")
    poll = rig.send("HMGET", "q", "c", "1", "30")
    rig.finish()
    rig.cancel(poll)
    rig.finish()
    rig.assert_silent(0)
    assert rig.server.parked_count == 0
    push = rig.send("RPUSH", "q", "m")
    rig.finish()
    assert list(rig.replies(1)) == [push]          # nothing for the cancelled poll
    assert [m[2] for m in parse(rig.resp("HMGET", "q", "c", "1"))] == [b"m"]
    rig.timers(time.monotonic() + 60)  # its deadline passes: still no reply
    rig.finish()
    rig.assert_silent(0)


def test_cancel_of_an_unknown_request_is_harmless(rig):
    rig.cancel(12345)
    rig.finish()
    rig.assert_silent(0)
    assert rig.resp("SET", "q", "c") == reply.OK


def test_deleting_the_channel_answers_its_parked_polls_with_cnf(rig):
    rig.resp("SET", "q", "c")
    rig.resp("SET", "q", "d", "NX")
    on_c = rig.send("HMGET", "q", "c", "1", "30")
    on_d = rig.send("HMGET", "q", "d", "1", "30")
    rig.finish()
    delete = rig.send("DEL", "q", "c")
    rig.finish()
    got = rig.replies(2)
    assert got[delete] == (wire.RESP, b":1\r\n")
    assert error_line(got[on_c][1]) == "CNF Channel Not Found"
    assert rig.server.parked_count == 1
    rig.send("DEL", "q")
    rig.finish()
    assert error_line(rig.replies(2)[on_d][1]) == "QNF Queue Not Found"
    assert rig.server.parked_count == 0 and rig.server.parked == {}


def test_an_expired_delivery_wakes_a_parked_poll_of_its_channel(make_rig):
    rig = make_rig(queue=QueueSettings(message_timeout=1.0))
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "m")
    [(message_id, first_ticket, _)] = parse(rig.resp("HMGET", "q", "c", "1"))
    poll = rig.send("HMGET", "q", "c", "1", "60")
    rig.finish()
    rig.timers(time.monotonic())      # still in flight: stays parked
    rig.finish()
    rig.assert_silent(0)
    rig.timers(time.monotonic() + 5)  # the delivery expired, the poll has not
    rig.finish()
    [(again_id, ticket, body)] = parse(rig.replies(1)[poll][1])
    assert (again_id, body) == (message_id, b"m") and ticket != first_ticket


def test_polls_of_a_frontend_that_stopped_pinging_are_dropped_not_fed(rig):
    rig.resp("SET", "q", "c")
    rig.send("HMGET", "q", "c", "10", "60")
    rig.finish()
    rig.timers(time.monotonic() + 10, heartbeat=False)   # the frontend died: no pings
    rig.finish()
    rig.assert_silent(0)
    assert rig.server.parked_count == 0
    rig.resp("RPUSH", "q", "kept")
    assert [m[2] for m in parse(rig.resp("HMGET", "q", "c", "10"))] == [b"kept"]


def test_two_parked_polls_and_one_message_exactly_one_gets_it(rig):
    rig.resp("SET", "q", "c")
    first = rig.send("HMGET", "q", "c", "10", "30")
    second = rig.send("HMGET", "q", "c", "10", "30")
    rig.finish()
    rig.send("RPUSH", "q", "only")
    rig.finish()
    got = rig.replies(2)
    assert [m[2] for m in parse(got[first][1])] == [b"only"]     # the oldest waiter first
    assert second not in got and rig.server.parked_count == 1
    rig.send("RPUSH", "q", "next")
    rig.finish()
    assert [m[2] for m in parse(rig.replies(2)[second][1])] == [b"next"]


def test_a_seek_answers_a_parked_poll_of_its_channel_at_once(rig):
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "a", "b")
    rig.resp("SET", "q", "late", "NX")             # sees only what is pushed from now on
    poll = rig.send("HMGET", "q", "late", "10", "30")
    rig.finish()
    rig.assert_silent(0)
    seek = rig.send("HMSET", "q", "late", "ID", "1")
    rig.finish()
    got = rig.replies(2)
    assert got[seek] == (wire.RESP, b":2\r\n")
    assert [m[2] for m in parse(got[poll][1])] == [b"a", b"b"]


def test_a_poll_held_by_max_in_flight_is_answered_when_an_ack_makes_room(make_rig):
    rig = make_rig(queue=QueueSettings(max_in_flight=1))
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "a", "b")
    [(_, ticket, _)] = parse(rig.resp("HMGET", "q", "c", "10"))
    poll = rig.send("HMGET", "q", "c", "10", "30")     # b exists, but the cap is reached
    rig.finish()
    rig.assert_silent(0)
    assert rig.resp("HDEL", "q", "c", str(ticket)) == b":1\r\n"
    rig.timers(time.monotonic())          # the loop's next timer pass
    rig.finish()
    assert [m[2] for m in parse(rig.replies(1)[poll][1])] == [b"b"]


def test_a_parked_poll_waits_for_the_group_commit(make_rig):
    rig = make_rig(fsync="always")
    rig.resp("SET", "q", "c")
    poll = rig.send("HMGET", "q", "c", "1", "30")
    rig.finish()
    syncs: list = []
    watch_syncs(rig, "q", syncs)
    rig.send("RPUSH", "q", "m")
    rig.finish()
    assert syncs == [("q", False, True)]
    assert [m[2] for m in parse(rig.replies(2)[poll][1])] == [b"m"]


def test_answered_polls_do_not_pile_up_in_the_deadline_heap(rig):
    rig.resp("SET", "q", "c")
    for _ in range(500):
        poll = rig.send("HMGET", "q", "c", "1", "3600")
        rig.send("RPUSH", "q", "m")
        rig.finish()
        [(_, ticket, _)] = parse(rig.replies(2)[poll][1])
        assert rig.resp("HDEL", "q", "c", str(ticket)) == b":1\r\n"
    assert rig.server.parked_count == 0
    # each answered poll left a stale entry due in an hour; they are compacted, not kept
    assert len(rig.server.deadlines) < 200
    still_parked = rig.send("HMGET", "q", "c", "1", "3600")
    rig.finish()
    rig.send("RPUSH", "q", "last")
    rig.finish()
    assert still_parked in rig.replies(2)


def test_after_a_disconnect_a_poll_waits_for_its_frontend_to_be_heard_from(rig):
    """server.py rule 3: the socket reported a disconnect; a parked poll whose frontend was
    not heard from since may belong to the frontend that went away."""
    rig.resp("SET", "q", "c")
    other = rig.dealer.context.socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    other.setsockopt(zmq.IDENTITY, b"other-frontend")
    other.connect(rig.dealer.getsockopt(zmq.LAST_ENDPOINT).decode())
    other.send(wire.encode_request(41, wire.COMMAND, [b"HMGET", b"q", b"c", b"1", b"30"])[0])
    assert rig.server.socket.poll(REPLY_WAIT_MS)
    rig.server._take_batch()
    rig.finish()                                    # parked
    assert rig.server.parked_count == 1
    rig.server.disconnected_s = time.monotonic()    # as take_disconnects() notes one
    rig.resp("RPUSH", "q", "m1")                    # heard from: this dealer, not `other`
    assert rig.server.parked_count == 1 and not other.poll(SILENCE_MS)
    assert [m[2] for m in parse(rig.resp("HMGET", "q", "c", "1"))] == [b"m1"]
    other.send(wire.encode_request(42, wire.PING)[0])   # its next ping
    assert rig.server.socket.poll(REPLY_WAIT_MS)
    rig.server._take_batch()
    rig.finish()
    rig.resp("RPUSH", "q", "m2")
    assert other.poll(REPLY_WAIT_MS)
    replies = dict((rid, payload) for rid, _, payload in wire.decode_replies(
        other.recv_multipart()) if rid == 41)
    if not replies:                                 # the PONG came in its own message
        replies = dict((rid, payload) for rid, _, payload in wire.decode_replies(
            other.recv_multipart()))
    assert [m[2] for m in parse(replies[41])] == [b"m2"]
    other.close()


# --- CONFIG SET server.KEY ----------------------------------------------------------------------

def test_config_set_server_fsync_switches_every_queue(rig):
    rig.resp("SET", "a", "c")
    rig.resp("SET", "b", "c")
    assert rig.json("CONFIG", "SET", "server.fsync", "always") == {"ok": True}
    assert rig.server.config.fsync == "always" and rig.catalog.fsync == "always"
    assert [q.fsync for q in rig.catalog] == ["always", "always"]
    rig.resp("SET", "n", "c")                     # a queue created later too
    assert rig.catalog.get("n").fsync == "always"
    assert rig.json("CONFIG", "SET", "server.fsync", "interval") == {"ok": True}
    assert {q.fsync for q in rig.catalog} == {"interval"}


def test_switching_to_fsync_always_keeps_unsynced_messages_deliverable(rig):
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "pushed-before-the-switch")
    assert rig.resp("SET", "q", "d", "NX") == reply.OK
    poll = rig.send("HMGET", "q", "d", "1", "30")      # d was created after the push: parks
    rig.finish()
    assert rig.catalog.get("q").needs_sync
    rig.send("CONFIG", "SET", "server.fsync", "always")
    rig.finish()
    rig.replies(1)
    assert not rig.catalog.get("q").needs_sync
    assert [m[2] for m in parse(rig.resp("HMGET", "q", "c", "1"))] == [
        b"pushed-before-the-switch"]
    rig.send("RPUSH", "q", "after")
    rig.finish()
    assert [m[2] for m in parse(rig.replies(2)[poll][1])] == [b"after"]


def test_config_set_server_max_get_count_changes_parse_limits(rig):
    rig.resp("SET", "q", "c")
    assert rig.json("CONFIG", "SET", "server.max_get_count", "10") == {"ok": True}
    assert rig.resp("HMGET", "q", "c", "10") == reply.EMPTY_ARRAY
    assert error_line(rig.resp("HMGET", "q", "c", "11")) == "IPA Invalid count value (max 10)"
    assert rig.json("CONFIG", "SET", "server.max_message_size", "4") == {"ok": True}
    assert rig.resp("RPUSH", "q", "1234") == b":1\r\n"
    assert error_line(rig.resp("RPUSH", "q", "12345")).startswith("ERR message too large")


def test_config_set_server_queue_defaults_apply_to_queues_created_later(rig):
    rig.resp("SET", "old", "c")
    assert rig.json("CONFIG", "SET", "server.queue.message_timeout", "7s") == {"ok": True}
    rig.resp("SET", "new", "c")
    assert rig.catalog.get("new").settings.message_timeout == 7.0
    assert rig.catalog.get("old").settings.message_timeout == 30.0
    assert rig.json("CONFIG", "GET", "server")["queue"]["message_timeout"] == 7.0


@pytest.mark.parametrize("key,value", [("bind", "127.0.0.1:1"), ("data_dir", "/elsewhere"),
                                       ("shards", "4")])
def test_config_set_server_refuses_keys_that_cannot_change_at_runtime(rig, key, value):
    before = rig.server.config
    line = error_line(rig.resp("CONFIG", "SET", f"server.{key}", value))
    assert line.startswith("IPA ") and "runtime" in line
    assert rig.server.config == before


def test_config_set_server_bad_values_and_unknown_keys_are_ipa(rig):
    before = rig.server.config
    assert error_line(rig.resp("CONFIG", "SET", "server.fsync", "sometimes")).startswith(
        "IPA Invalid CONFIG SET parameter")
    assert error_line(rig.resp("CONFIG", "SET", "server.nosuchkey", "1")).startswith("IPA ")
    assert error_line(rig.resp("CONFIG", "SET", "server.queue.nosuch", "1")).startswith("IPA ")
    assert rig.server.config == before


def test_config_set_server_is_recorded_for_a_restart_in_this_run(rig, tmp_path):
    rig.server.overrides = Overrides(tmp_path / "run" / "shard-0.overrides.json", "run-a")
    assert rig.json("CONFIG", "SET", "server.fsync", "always") == {"ok": True}
    rig.resp("CONFIG", "SET", "server.fsync", "sometimes")       # refused: not recorded
    restarted = Overrides(tmp_path / "run" / "shard-0.overrides.json", "run-a")
    assert restarted.load() == {"fsync": "always"}


def test_config_set_server_that_cannot_be_recorded_is_refused_with_nothing_changed(
        rig, tmp_path):
    (tmp_path / "run").write_text("a file where the directory should be")
    rig.server.overrides = Overrides(tmp_path / "run" / "shard-0.overrides.json", "run-a")
    before = rig.server.config
    line = error_line(rig.resp("CONFIG", "SET", "server.fsync", "always"))
    assert line.startswith("ERR cannot record CONFIG SET for a restart")
    assert rig.server.config == before and rig.catalog.fsync == before.fsync


def test_config_set_server_log_level_sets_the_root_logger(rig):
    assert rig.json("CONFIG", "SET", "server.log_level", "error") == {"ok": True}
    assert logging.getLogger().level == logging.ERROR      # the fixture restores it


def test_runtime_keys_are_server_keys():
    from floki.config import SERVER_KEYS
    assert RUNTIME_KEYS <= set(SERVER_KEYS)
    assert not {"bind", "data_dir", "shards"} & RUNTIME_KEYS


def test_a_message_of_many_requests_is_answered_as_one_message_and_a_bad_frame_alone_dropped(
        rig, caplog):
    rig.resp("SET", "q", "c")
    frames = [wire.encode_request(rid, wire.COMMAND, [b"RPUSH", b"q", b"m"])[0]
              for rid in (201, 202)]
    frames.insert(1, b"\x00" * 3)                      # malformed, between two good ones
    with caplog.at_level(logging.WARNING, logger="floki.shard.server"):
        rig.server.handle_frames([IDENTITY, *frames])
        rig.finish()
    assert any("malformed" in r.message for r in caplog.records)
    message = rig.dealer.recv_multipart()
    assert wire.decode_replies(message) == [(201, wire.RESP, b":1\r\n"),
                                            (202, wire.RESP, b":1\r\n")]
    rig.assert_silent(0)


def test_a_push_taken_mid_pass_answers_parked_polls_when_replies_are_sent(rig, monkeypatch):
    monkeypatch.setattr(server_module, "STREAM_REPLY_S", 0.0)    # send after every message
    rig.resp("SET", "q", "c")
    poll = rig.send("HMGET", "q", "c", "10", "5")
    rig.finish()
    rig.assert_silent(0)                               # parked: nothing to give
    rig.dealer.send_multipart(wire.encode_request(900, wire.COMMAND, [b"RPUSH", b"q", b"m"]))
    assert rig.server.socket.poll(REPLY_WAIT_MS)
    assert rig.server._take_batch() == 1               # no _finish_pass: still mid pass
    got = {rid: payload for rid, _, payload in rig.reply_list(2)}
    assert got[900] == b":1\r\n"
    assert parse(got[poll])[0][2] == b"m"


def _send_pushes(rig, rids) -> None:
    for rid in rids:
        rig.dealer.send_multipart(wire.encode_request(rid, wire.COMMAND, [b"RPUSH", b"q", b"m"]))
    assert rig.server.socket.poll(REPLY_WAIT_MS)


def test_small_replies_of_a_short_pass_leave_as_one_message_at_its_end(rig, monkeypatch):
    monkeypatch.setattr(server_module, "STREAM_REPLY_S", 60.0)
    rig.resp("SET", "q", "c")
    _send_pushes(rig, range(400, 420))
    assert rig.server._take_batch() == 20
    rig.assert_silent(0)                               # held: 20 small replies
    rig.finish()
    message = rig.dealer.recv_multipart()
    assert [rid for rid, _, _ in wire.decode_replies(message)] == list(range(400, 420))
    rig.assert_silent(0)


def test_replies_leave_mid_pass_once_they_add_up_to_the_threshold(rig, monkeypatch):
    monkeypatch.setattr(server_module, "STREAM_REPLY_S", 60.0)
    monkeypatch.setattr(server_module, "STREAM_REPLY_BYTES", 8)    # two ":1\r\n" replies
    rig.resp("SET", "q", "c")
    _send_pushes(rig, range(500, 506))
    assert rig.server._take_batch() == 6
    # nothing left for the pass's end: every two replies went out as they added up
    got = [wire.decode_replies(rig.dealer.recv_multipart()) for _ in range(3)]
    assert [[rid for rid, _, _ in m] for m in got] == [[500, 501], [502, 503], [504, 505]]
    rig.finish()
    rig.assert_silent(0)


def test_a_large_reply_sent_without_a_copy_arrives_whole(rig):
    body = bytes(range(256)) * (server_module.ZERO_COPY_BYTES // 256 + 1)   # above the line
    rig.resp("SET", "q", "c")
    assert rig.resp("RPUSH", "q", body) == b":1\r\n"
    got = parse(rig.resp("HMGET", "q", "c", "1"))
    assert got[0][2] == body
