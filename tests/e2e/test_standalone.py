"""`floki shard` and `floki frontend` run alone, as on hosts of their own: two shards over
tcp:// (each with its own data dir, binding an address other than the endpoint the frontends
dial) and two frontends serving them at once. Frontends are stateless: a message pushed through
one is consumed and acked through the other, and a long poll parked on one is woken by a push
through the other."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from helpers import free_port, write_toml
from standalone import FlokiProcess, raw_client

from floki.config import SERVER_KEYS
from floki.routing import shard_for


def one_host_frontends(server: dict) -> dict:
    """`server` with what lets two frontends share one host: no metrics listener (they would
    both want its one port), where this version of Floki has one."""
    if "metrics_bind" in SERVER_KEYS:
        server = dict(server, metrics_bind="")
    return server


@pytest.fixture
def cluster(tmp_path):
    ports = [free_port() for _ in range(2)]
    toml = tmp_path / "floki.toml"
    # The frontends dial "localhost"; each shard binds 127.0.0.1 (its --bind): advertised
    # endpoint and bound address are different strings, as behind a Kubernetes Service.
    write_toml(toml, one_host_frontends({"shard_timeout": "1s", "log_level": "info"}), {},
               [f"tcp://localhost:{port}" for port in ports])
    started: list[FlokiProcess] = []

    def run(kind: str, *args: str) -> FlokiProcess:
        proc = FlokiProcess(kind, ["-c", str(toml), *args],
                            tmp_path / f"{kind}-{len(started)}.log")
        started.append(proc)
        return proc

    try:
        shards = [run("shard", "--index", str(i), "--bind", f"tcp://127.0.0.1:{port}",
                      "--data-dir", str(tmp_path / f"shard{i}"))
                  for i, port in enumerate(ports)]
        frontend_ports = [free_port(), free_port()]
        frontends = [run("frontend", "--bind", f"127.0.0.1:{port}",
                         "--data-dir", str(tmp_path / "frontend"))
                     for port in frontend_ports]
        for proc in started:
            proc.wait_ready()
        yield {"shards": shards, "frontends": frontends, "tmp": tmp_path,
               "frontend_ports": frontend_ports,
               "clients": [raw_client("127.0.0.1", port) for port in frontend_ports]}
    finally:
        for proc in reversed(started):
            proc.stop()


def names_per_shard(count: int = 2) -> list[str]:
    return [next(f"q{i}" for i in range(100) if shard_for(f"q{i}", count) == s)
            for s in range(count)]


def bodies(reply) -> list[bytes]:
    return [m[2] for m in reply]


def test_two_frontends_serve_the_same_shards(cluster):
    a, b = cluster["clients"]
    for name in names_per_shard():
        assert a.execute_command("SET", name, "c")
        assert a.rpush(name, b"m1", b"m2") == 2
        # pushed through A, consumed and acked through B
        got = b.execute_command("HMGET", name, "c", 10)
        assert bodies(got) == [b"m1", b"m2"]
        assert b.execute_command("HDEL", name, "c", *[m[1] for m in got]) == 2
        # a ticket handed out by A is acked through B
        assert a.rpush(name, b"m3") == 1
        (_, ticket, body), = a.execute_command("HMGET", name, "c", 10)
        assert body == b"m3"
        assert b.execute_command("HDEL", name, "c", ticket) == 1
        assert a.execute_command("HMGET", name, "c", 10) == []
        # each shard's data dir holds exactly its queues
        index = shard_for(name, 2)
        assert (cluster["tmp"] / f"shard{index}" / name / "queue.json").is_file()
        assert not (cluster["tmp"] / f"shard{1 - index}" / name).exists()
    info_a = json.loads(a.execute_command("INFO", "server")[0])
    info_b = json.loads(b.execute_command("INFO", "server")[0])
    assert info_a["shards"] == info_b["shards"] == 2
    assert info_a["queue_count"] == info_b["queue_count"] == 2


def test_a_long_poll_on_one_frontend_is_woken_by_a_push_through_the_other(cluster):
    a, b = cluster["clients"]
    name = names_per_shard()[1]
    a.execute_command("SET", name, "c")
    result: list = []
    poller = threading.Thread(
        target=lambda: result.append(b.execute_command("HMGET", name, "c", 10, 20)))
    started = time.monotonic()
    poller.start()
    # the poll is parked at the shard once INFO QUEUES counts it as a blocked client
    deadline = time.monotonic() + 10
    while json.loads(a.execute_command("INFO", "server")[0]).get("blocked_client_count") != 1:
        assert time.monotonic() < deadline, "long poll never parked"
        time.sleep(0.02)
    assert a.rpush(name, b"wake") == 1
    poller.join(15)
    assert not poller.is_alive()
    assert bodies(result[0]) == [b"wake"]
    assert time.monotonic() - started < 10     # woken, not timed out after 20 s


def test_one_frontend_stopping_leaves_the_other_serving(cluster):
    a, b = cluster["clients"]
    name = names_per_shard()[0]
    a.execute_command("SET", name, "c")
    a.rpush(name, b"before")
    assert cluster["frontends"][0].stop() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", cluster["frontend_ports"][0]), timeout=5)
    assert b.rpush(name, b"after") == 1
    assert bodies(b.execute_command("HMGET", name, "c", 10)) == [b"before", b"after"]
