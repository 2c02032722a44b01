"""`floki start` as an operator sees it: stop, crash-restart, kill -9, bad config.

RELIABILITY.md A3: after kill -9 of the supervisor no orphan keeps the port or a queue lock,
and a new supervisor starts a full set.
"""
from __future__ import annotations

import signal
import time

from helpers import FlokiServer, port_is_free, process_alive


def test_a_bad_config_exits_3_with_a_message_naming_the_key(tmp_path):
    server = FlokiServer(tmp_path, fsync="sometimes")
    try:
        proc = server.launch()
        assert proc.wait(15) == 3
        log = server.log_tail()
        assert "'fsync'" in log and "'sometimes'" in log
        assert not server.state_path.exists()   # nothing was started
    finally:
        server.cleanup()


def test_sigterm_exits_0_within_10_s_and_leaves_no_child(floki_server):
    server = floki_server(shards=2)
    children = server.state()["children"]
    assert len(children) == 3 and all(c["pid"] for c in children)
    started = time.monotonic()
    assert server.stop(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert not any(process_alive(c["pid"], c["create_time"]) for c in children)
    assert port_is_free(server.port)


def test_a_killed_shard_is_restarted(floki_server):
    server = floki_server(shards=2)
    before = server.pids()
    old = server.kill_shard(1, signal.SIGKILL)
    new = server.wait_until(lambda: (pid := server.pids()["shards"][1]) not in (None, old)
                            and pid, 10, message="shard 1 restarted")
    assert process_alive(new)
    server.wait_until(server.shards_answer, 10, message="every shard answers again")
    assert server.client().ping()
    after = server.pids()
    assert after["frontend"] == before["frontend"] and after["shards"][0] == before["shards"][0]


def test_a_killed_frontend_is_restarted(floki_server):
    server = floki_server(shards=1)
    shard_pid = server.pids()["shards"][0]
    old = server.kill_frontend(signal.SIGKILL)
    new = server.wait_until(lambda: (pid := server.pids()["frontend"]) not in (None, old)
                            and pid, 10, message="frontend restarted")
    assert process_alive(new)
    server.wait_until(lambda: server.client(socket_connect_timeout=0.5).ping(), 10,
                      message="PING after the frontend restart")
    assert server.pids()["shards"][0] == shard_pid   # the shards were left alone


def test_kill_9_of_the_supervisor_leaves_no_orphan_and_a_new_one_starts_a_full_set(
        floki_server):
    server = floki_server(shards=2)
    children = server.state()["children"]
    server.kill_supervisor(signal.SIGKILL)
    server.proc.wait(5)
    # Each child gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops cleanly.
    server.wait_until(lambda: not any(process_alive(c["pid"], c["create_time"])
                                      for c in children), 10, message="children gone")
    assert port_is_free(server.port)
    server.restart()
    fresh = server.state()["children"]
    assert len(fresh) == 3 and all(c["pid"] and c["state"] == "running" for c in fresh)
    assert not {c["pid"] for c in fresh} & {c["pid"] for c in children}
    assert server.client().ping()
