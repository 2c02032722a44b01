"""Shards reached over tcp:// ([[shard]] endpoints) serve exactly like ipc:// ones."""
from __future__ import annotations

import json

from helpers import free_port

from floki.routing import shard_for


def test_tcp_shards_serve_route_and_survive_a_restart(floki_server):
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    server = floki_server(shards=2, shard_endpoints=endpoints)
    r = server.client()
    names = [next(f"t{i}" for i in range(100) if shard_for(f"t{i}", 2) == s) for s in (0, 1)]
    for name in names:
        r.execute_command("SET", name, "c")
        assert r.execute_command("RPUSH", name, f"{name}-a", f"{name}-b") == 2
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.execute_command("HMGET", name, "c", 10)
    for name, got in zip(names, pipe.execute()):
        assert [m[2].decode() for m in got] == [f"{name}-a", f"{name}-b"]
    info = json.loads(r.execute_command("INFO", "server")[0])
    assert info["shards"] == 2 and info["queue_count"] == 2
    old = server.kill_shard(1)
    server.wait_until(lambda: server.pids()["shards"][1] not in (None, old), 10)
    server.wait_until(lambda: r.execute_command("RPUSH", names[1], "again") == 1, 10,
                      message="tcp shard back")
    # unacked before the kill, so handed out again after the restart (at-least-once)
    assert [m[2].decode() for m in r.execute_command("HMGET", names[1], "c", 10, 1)] == [
        f"{names[1]}-a", f"{names[1]}-b", "again"]
