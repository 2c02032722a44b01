"""floki/frontend/metrics.py: the text format, the scrape over the router (STATS), restarts,
command timing in the connection, and the HTTP endpoint."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from floki import wire
from floki.config import ConfigError, ServerConfig, config_from_dict, shard_endpoint
from floki.frontend import main, metrics
from floki.frontend.metrics import (CommandTimes, Exposition, Metrics, MetricsServer,
                                    shard_samples)
from floki.frontend.router import UNAVAILABLE, Router, ShardState
from floki.histogram import Histogram
from floki.supervisor import ExitCode
from unit.frontend.frontend_fakes import FakeShard, run_async, wait_for
from unit.frontend.test_connection import Client, queue_on, resp


def parse(text: str) -> dict[str, dict]:
    """Returns {sample name: {frozenset(labels.items()): value}} of a text exposition."""
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get(name, {}).get(frozenset(labels.items()))


def shard_stats(start_time_s: float = 1000.0, pushed: int = 5, **channel) -> dict:
    """A STATS reply as a shard sends it (one queue "q" with one channel "c")."""
    histogram = Histogram((0.001, 0.01))
    histogram.observe(0.002)
    values = {"messages_delivered": 4, "messages_redelivered": 1, "messages_acked": 3,
              "backlog": 1, "in_flight": 1}
    values.update(channel)
    return {"index": 0, "pid": 123, "start_time_s": start_time_s, "version": "x",
            "blocked_clients": 2, "broken_queues": 0, "fsync_seconds": histogram.to_dict(),
            "queues": {"q": {"messages_pushed": pushed, "disk_bytes": 4096, "segments": 1,
                             "channels": {"c": values}}}}


class StubRouter:
    """What Metrics needs of a Router: shard states and `call`, answered from a table."""

    def __init__(self, count: int = 2):
        self.shard_count = count
        self.states = [ShardState.UP] * count
        self.answers: dict[int, tuple[bytes, bytes] | None] = {}   # None: never answers
        self.calls: list[tuple[int, bytes]] = []

    def state(self, index: int) -> ShardState:
        return self.states[index]

    async def call(self, index: int, argv, kind=wire.COMMAND):
        self.calls.append((index, kind))
        answer = self.answers.get(index)
        if answer is None:
            await asyncio.Event().wait()        # a stuck shard
        return answer


def make_metrics(tmp_path, router=None, shard_timeout=2.0, connections=()) -> Metrics:
    config = ServerConfig(data_dir=str(tmp_path), shard_timeout=shard_timeout)
    return Metrics(config, router or StubRouter(), set(connections), CommandTimes())


def write_supervisor_state(tmp_path, restarts: dict[int, int]) -> None:
    run = tmp_path / ".run"
    run.mkdir(exist_ok=True)
    children = [{"role": "shard", "index": i, "pid": 1, "restarts": n}
                for i, n in restarts.items()]
    children.append({"role": "frontend", "index": None, "pid": 2, "restarts": 9})
    (run / "supervisor.json").write_text(json.dumps({"pid": 1, "children": children}))


# --- configuration ---------------------------------------------------------------------------

def test_metrics_bind_defaults_to_loopback_and_empty_turns_it_off():
    assert ServerConfig().metrics_bind == "127.0.0.1:9798"
    assert config_from_dict({"server": {"metrics_bind": ""}}).metrics_bind == ""
    assert config_from_dict({"server": {"metrics_bind": "0.0.0.0:9100"}}).metrics_bind == \
        "0.0.0.0:9100"
    for bad in ("9100", "host:", "host:99999", 9100):
        with pytest.raises(ConfigError, match="metrics_bind"):
            config_from_dict({"server": {"metrics_bind": bad}})


# --- the text format -------------------------------------------------------------------------

def test_exposition_escapes_labels_and_groups_each_family():
    out = Exposition()
    out.add("floki_queue_segments", (("shard", "0"), ("queue", 'a"b\\c\nd')), 3)
    out.add("floki_shard_up", (("shard", "0"),), 1)
    out.add("floki_queue_segments", (("shard", "1"), ("queue", "x")), 2)
    out.add("floki_frontend_start_time_seconds", (), 1.5)
    text = out.text()
    assert text.index("floki_shard_up{") < text.index("floki_queue_segments{")  # table order
    assert text.count("# TYPE floki_queue_segments gauge") == 1
    samples = parse(text)
    assert value(samples, "floki_queue_segments", shard="0", queue='a"b\\c\nd') == 3
    assert value(samples, "floki_queue_segments", shard="1", queue="x") == 2
    assert value(samples, "floki_frontend_start_time_seconds") == 1.5


def test_shard_samples_cover_every_number_and_reject_a_malformed_reply():
    samples, histograms = shard_samples(3, shard_stats())
    by_family = {(family, labels): v for family, labels, v in samples}
    channel = (("shard", "3"), ("queue", "q"), ("channel", "c"))
    assert by_family[("floki_messages_pushed_total", channel[:2])] == 5
    assert by_family[("floki_messages_redelivered_total", channel)] == 1
    assert by_family[("floki_channel_backlog_messages", channel)] == 1
    assert by_family[("floki_queue_disk_bytes", channel[:2])] == 4096
    assert histograms[0][2].count == 1
    for broken in (shard_stats(pushed=-1), shard_stats(pushed=True), shard_stats(backlog=None),
                   shard_stats(in_flight=float("nan")), {**shard_stats(), "queues": []},
                   {**shard_stats(), "fsync_seconds": {}}, {}):
        with pytest.raises((ValueError, KeyError, TypeError, AttributeError)):
            shard_samples(0, broken)


# --- the scrape ------------------------------------------------------------------------------

def test_a_down_shard_has_up_0_and_no_other_series(tmp_path):
    m = make_metrics(tmp_path, connections=["c1", "c2"])
    samples = parse(m.render_replies([shard_stats(), None]))
    assert value(samples, "floki_shard_up", shard="0") == 1
    assert value(samples, "floki_shard_up", shard="1") == 0
    assert value(samples, "floki_shard_restarts_total", shard="1") == 0
    for name, series in samples.items():
        if name not in ("floki_shard_up", "floki_shard_restarts_total"):
            assert all(dict(labels).get("shard") != "1" for labels in series), name
    assert value(samples, "floki_messages_acked_total", shard="0", queue="q", channel="c") == 3
    assert value(samples, "floki_fsync_duration_seconds_bucket", shard="0", le="0.01") == 1
    assert value(samples, "floki_fsync_duration_seconds_count", shard="0") == 1
    assert value(samples, "floki_shard_blocked_clients", shard="0") == 2
    assert value(samples, "floki_connected_clients") == 2
    assert value(samples, "floki_frontend_start_time_seconds") == pytest.approx(time.time(),
                                                                                abs=60)


def test_a_malformed_reply_is_a_down_shard_not_half_a_shard(tmp_path, caplog):
    m = make_metrics(tmp_path)
    samples = parse(m.render_replies([shard_stats(backlog="lots"), shard_stats()]))
    assert value(samples, "floki_shard_up", shard="0") == 0
    assert value(samples, "floki_messages_pushed_total", shard="0", queue="q") is None
    assert value(samples, "floki_shard_up", shard="1") == 1
    assert "malformed STATS" in caplog.text


def test_restarts_count_start_time_changes_without_a_supervisor(tmp_path):
    m = make_metrics(tmp_path)

    def restarts(replies):
        samples = parse(m.render_replies(replies))
        return [value(samples, "floki_shard_restarts_total", shard=str(i)) for i in (0, 1)]

    assert restarts([shard_stats(1000.0), shard_stats(1000.0)]) == [0, 0]
    assert restarts([None, shard_stats(1000.0)]) == [0, 0]             # down: not yet known
    assert restarts([shard_stats(2000.0), shard_stats(1000.0)]) == [1, 0]
    assert restarts([shard_stats(2000.0), shard_stats(1000.0)]) == [1, 0]
    assert restarts([shard_stats(3000.0), shard_stats(1000.5)]) == [2, 1]


def test_restarts_come_from_supervisor_json_and_survive_it_being_unreadable(tmp_path):
    m = make_metrics(tmp_path)
    write_supervisor_state(tmp_path, {0: 4, 1: 0})
    samples = parse(m.render_replies([shard_stats(1000.0), None]))
    assert value(samples, "floki_shard_restarts_total", shard="0") == 4
    assert value(samples, "floki_shard_restarts_total", shard="1") == 0
    (tmp_path / ".run" / "supervisor.json").write_text("{half a fi")
    samples = parse(m.render_replies([shard_stats(2000.0), None]))
    assert value(samples, "floki_shard_restarts_total", shard="0") == 4    # never backwards
    write_supervisor_state(tmp_path, {0: 5, 1: 1})
    samples = parse(m.render_replies([shard_stats(2000.0), None]))
    assert value(samples, "floki_shard_restarts_total", shard="0") == 5
    assert value(samples, "floki_shard_restarts_total", shard="1") == 1


def test_the_scrape_asks_up_shards_only_and_is_bounded_by_the_shard_timeout(tmp_path):
    router = StubRouter(4)
    router.states[1] = ShardState.DOWN
    router.answers = {0: (wire.JSON, json.dumps(shard_stats()).encode()),
                      2: None,                                      # stuck
                      3: (UNAVAILABLE, b"-ERR shard unavailable\r\n")}
    m = make_metrics(tmp_path, router, shard_timeout=0.2)

    async def scrape():
        started = time.monotonic()
        body = await m.render()
        return body, time.monotonic() - started

    body, took_s = run_async(scrape())
    assert 0.15 < took_s < 2.0
    assert sorted(router.calls) == [(0, wire.STATS), (2, wire.STATS), (3, wire.STATS)]
    samples = parse(body.decode())
    assert [value(samples, "floki_shard_up", shard=str(i)) for i in range(4)] == [1, 0, 0, 0]


def test_a_shard_answering_json_that_is_not_an_object_is_down(tmp_path):
    router = StubRouter(1)
    router.answers = {0: (wire.JSON, b"[1, 2]")}
    assert run_async(make_metrics(tmp_path, router).shard_stats(0)) is None
    router.answers = {0: (wire.JSON, b"{nope")}
    assert run_async(make_metrics(tmp_path, router).shard_stats(0)) is None


class StatsShard(FakeShard):
    """A FakeShard that answers wire STATS requests (and records the request kinds)."""

    def __init__(self, endpoint: str, stats: dict):
        self.stats = stats
        self.kinds: list[bytes] = []
        super().__init__(endpoint)

    async def _serve(self) -> None:
        while True:
            while self.socket.poll(0):
                identity, *frames = self.socket.recv_multipart()
                for frame in frames:                 # wire.py: one frame per request
                    request_id, kind, args = wire.decode_request_frame(frame)
                    self.kinds.append(kind)
                    if kind == wire.PING:
                        self.send(identity, request_id, wire.PONG, b'{"index":0}')
                    elif kind == wire.STATS:
                        self.send(identity, request_id, wire.JSON,
                                  json.dumps(self.stats).encode())
            await asyncio.sleep(0.002)


def test_the_scrape_sends_wire_stats_through_the_real_router(ipc_dir):
    async def scenario():
        endpoint = f"ipc://{ipc_dir}/shard-0.ipc"
        shard = StatsShard(endpoint, shard_stats())
        router = Router([endpoint], 1.0, heartbeat_interval_s=0.05)
        router.start(asyncio.get_running_loop())
        try:
            assert await router.wait_up(5.0)
            m = Metrics(ServerConfig(data_dir=str(ipc_dir)), router, set(), CommandTimes())
            samples = parse((await m.render()).decode())
            assert wire.STATS in shard.kinds
            assert value(samples, "floki_shard_up", shard="0") == 1
            assert value(samples, "floki_messages_pushed_total", shard="0", queue="q") == 5
        finally:
            router.close()
            shard.close()
    run_async(scenario())


# --- command timing in the connection ----------------------------------------------------------

def command_count(client: Client, name: str) -> int:
    return client.frontend.command_times.histograms[name].count


def test_local_commands_are_timed_at_once_whatever_the_case_and_unknown_ones_not():
    client = Client()
    client.send(resp(b"PING") + resp(b"pInG") + resp(b"ping") + resp(b"NOSUCH") +
                resp(b"ECHO"))                     # ECHO without its argument: an error
    assert command_count(client, "PING") == 3
    assert command_count(client, "ECHO") == 0
    assert all(h.count == 0 for n, h in client.frontend.command_times.histograms.items()
               if n != "PING")
    assert CommandTimes().of(b"rPuSh") is not None and CommandTimes().of(b"NOSUCH") is None


def test_shard_commands_are_timed_when_the_reply_arrives_and_long_polls_not():
    client = Client()
    queue = queue_on(0)
    client.send(resp(b"RPUSH", queue, b"m") + resp(b"HMGET", queue, b"c", b"1", b"5") +
                resp(b"hmget", queue, b"c", b"1"))
    assert command_count(client, "RPUSH") == 0                  # no reply yet
    for request_id in list(client.router.sent):
        client.router.answer(request_id, b"*0\r\n")
    assert command_count(client, "RPUSH") == 1
    assert command_count(client, "HMGET") == 1                  # the one without a timeout
    histogram = client.frontend.command_times.histograms["RPUSH"]
    assert 0 < histogram.sum < 5


def test_a_fanned_out_command_is_timed_when_merged():
    client = Client()
    client.send(resp(b"INFO", b"QUEUES"))
    assert command_count(client, "INFO") == 0
    for request_id in list(client.router.sent):
        client.router.answer(request_id, b"{}", status=wire.JSON)
    assert command_count(client, "INFO") == 1


# --- HTTP ------------------------------------------------------------------------------------

async def http(address, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    return data


def test_get_metrics_and_every_other_request(tmp_path):
    async def scenario():
        router = StubRouter(1)
        router.answers = {0: (wire.JSON, json.dumps(shard_stats()).encode())}
        server = MetricsServer(make_metrics(tmp_path, router), "127.0.0.1:0")
        await server.start()
        address = server.address
        try:
            ok = await http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = ok.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
            assert f"Content-Length: {len(body)}".encode() in head
            assert value(parse(body.decode()), "floki_shard_up", shard="0") == 1
            head_only = await http(address, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n")
            assert head_only.startswith(b"HTTP/1.1 200 OK") and head_only.endswith(b"\r\n\r\n")
            assert (await http(address, b"GET / HTTP/1.1\r\n\r\n")).startswith(
                b"HTTP/1.1 404 ")
            not_allowed = await http(address, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert not_allowed.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in not_allowed
            assert (await http(address, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            assert await http(address, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000) == b""
        finally:
            server.close()
    run_async(scenario())


def test_a_port_in_use_is_retried_and_an_unusable_address_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "BIND_RETRY_S", 0.05)

    async def scenario():
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = MetricsServer(make_metrics(tmp_path), f"127.0.0.1:{port}")
        await server.start()                       # no exception: clients are served anyway
        assert server.address is None
        await asyncio.sleep(0.15)
        assert server.address is None
        blocker.close()
        await wait_for(lambda: server.address is not None, timeout_s=5.0)
        assert server.address[1] == port
        server.close()
        with pytest.raises(OSError) as raised:
            await MetricsServer(make_metrics(tmp_path), "192.0.2.1:9798").start()
        assert raised.value.errno == errno.EADDRNOTAVAIL
    run_async(scenario())


def test_the_frontend_serves_metrics_from_its_shards(ipc_dir):
    async def scenario():
        (ipc_dir / ".run").mkdir(exist_ok=True)
        config = ServerConfig(bind="127.0.0.1:0", data_dir=str(ipc_dir), shards=1,
                              shard_timeout=0.5, metrics_bind="127.0.0.1:0")
        shard = StatsShard(shard_endpoint(config, 0), shard_stats())
        ready = asyncio.get_running_loop().create_future()
        metrics_ready = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(main.serve(config, ready, metrics_ready))
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        server = metrics_ready.result()
        reply = await http(server.address, b"GET /metrics HTTP/1.1\r\n\r\n")
        samples = parse(reply.split(b"\r\n\r\n", 1)[1].decode())
        assert value(samples, "floki_shard_up", shard="0") == 1
        assert value(samples, "floki_connected_clients") == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert await task == ExitCode.OK
        shard.close()
        off = ServerConfig(bind="127.0.0.1:0", data_dir=str(ipc_dir), shards=1,
                           shard_timeout=0.5, metrics_bind="192.0.2.1:9798")
        shard = StatsShard(shard_endpoint(off, 0), shard_stats())
        assert await main.serve(off) == ExitCode.BOOT_ERROR     # not an address of ours
        shard.close()
    run_async(scenario())
