"""floki.shard.main.run as the supervisor starts it: `python -m floki shard --index I ...`.

Each test runs a real shard process on a data directory in tmp_path and talks to it over a
DEALER on its ipc:// endpoint. Not tested here: the exit when the parent dies (it needs a
parent that can be killed under the shard; the supervisor tests cover orphans).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from floki import wire
from floki.config import QueueSettings, ServerConfig, shard_endpoint
from floki.shard.main import EXIT_BOOT, EXIT_OK
from floki.shard.queue import Queue
from helpers import REPO_ROOT

T0_MS = 1_700_000_000_000
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class ShardProcess:
    """One `python -m floki shard` child; stop() or kill() it, cleanup() always works."""

    def __init__(self, tmp_path: Path, index: int = 0, shards: int = 1):
        self.data_dir = tmp_path / "data"
        self.log_path = tmp_path / f"shard-{index}.log"
        self.endpoint = shard_endpoint(ServerConfig(data_dir=str(self.data_dir)), index)
        argv = [sys.executable, "-m", "floki", "shard", "--index", str(index),
                "--shards", str(shards), "--data-dir", str(self.data_dir), "--log-level", "info"]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with open(self.log_path, "wb") as log:
            # cwd = tmp_path: no ./floki.toml there, so only the options above configure it
            self.proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=log, env=env)
        self.context = zmq.Context()
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(self.endpoint)
        self._ids = iter(range(1, 1 << 62))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> dict:
        """PINGs until the shard answers. Returns its PONG status."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"shard exited {self.proc.returncode}:\n{self.log()}"
            try:
                self.dealer.send_multipart(wire.encode_request(next(self._ids), wire.PING),
                                           zmq.NOBLOCK)
            except zmq.Again:
                pass                       # not connected yet
            if self.dealer.poll(100):
                for _, status, payload in wire.decode_replies(self.dealer.recv_multipart()):
                    if status == wire.PONG:
                        return json.loads(payload)
        raise AssertionError(f"shard did not answer PING:\n{self.log()}")

    def send(self, *argv: str) -> int:
        rid = next(self._ids)
        self.dealer.send_multipart(wire.encode_request(rid, wire.COMMAND,
                                                       [a.encode() for a in argv]))
        return rid

    def reply(self, rid: int, timeout_ms: int = 5000) -> bytes:
        """Returns the RESP payload of reply `rid` (skipping late PONGs)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            if self.dealer.poll(50):
                for got_id, status, payload in wire.decode_replies(
                        self.dealer.recv_multipart()):
                    if got_id == rid:
                        assert status == wire.RESP
                        return payload
        raise AssertionError(f"no reply to request {rid}:\n{self.log()}")

    def call(self, *argv: str) -> bytes:
        return self.reply(self.send(*argv))

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(STOP_TIMEOUT_S)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
        self.context.destroy(linger=0)


@pytest.fixture
def shards(tmp_path):
    started: list[ShardProcess] = []

    def start(**kwargs) -> ShardProcess:
        shard = ShardProcess(tmp_path, **kwargs)
        started.append(shard)
        return shard

    yield start
    for shard in started:
        shard.cleanup()


def leave_queue(data_dir: Path, name: str, messages: int) -> None:
    queue = Queue.create(data_dir, name, QueueSettings(), "never")
    queue.create_channel("c")
    queue.push([b"old%d" % i for i in range(messages)], T0_MS)
    queue.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_shard_serves_then_stops_cleanly_on_a_signal(shards, tmp_path, signum):
    leave_queue(tmp_path / "data", "q", messages=3)
    shard = shards()
    status = shard.wait_ready()
    assert status == {"index": 0, "pid": shard.proc.pid, "queues": 1}
    assert shard.call("RPUSH", "q", "new1", "new2") == b":2\r\n"
    assert shard.call("HMGET", "q", "c", "10").count(b"*3\r\n") == 5
    # a poll parked for 60 s does not hold the stop (stop() waits STOP_TIMEOUT_S at most)
    shard.send("HMGET", "q", "c", "1", "60")
    assert not shard.dealer.poll(50)
    assert shard.stop(signum) == EXIT_OK, shard.log()
    # final checkpoints were written: the clean stop recorded the exact next id (no gap)
    meta = json.loads((tmp_path / "data" / "q" / "queue.json").read_text())
    assert meta["clean_next_id"] == 6
    queue = Queue.open(tmp_path / "data", "q", QueueSettings(), "never")
    try:
        assert queue.push([b"after"], T0_MS) == (6, 6)
    finally:
        queue.close()
    assert "stopped" in shard.log()


def test_a_killed_shard_leaves_an_id_gap_a_clean_stop_does_not(shards, tmp_path):
    """The contrast that makes the clean-stop test meaningful: without the final checkpoint
    ids continue above the reserved high-water mark."""
    leave_queue(tmp_path / "data", "q", messages=1)
    shard = shards()
    shard.wait_ready()
    assert shard.call("RPUSH", "q", "x") == b":1\r\n"
    shard.proc.kill()
    shard.proc.wait(STOP_TIMEOUT_S)
    queue = Queue.open(tmp_path / "data", "q", QueueSettings(), "never")
    try:
        first_id, _ = queue.push([b"after"], T0_MS)
        assert first_id > 3
    finally:
        queue.close()


def test_shard_creates_queues_it_owns_and_they_survive_a_restart(shards, tmp_path):
    shard = shards()
    shard.wait_ready()
    assert shard.call("SET", "fresh", "c") == b"+OK\r\n"
    assert shard.call("RPUSH", "fresh", "a") == b":1\r\n"
    assert shard.stop() == EXIT_OK, shard.log()
    again = shards()
    assert again.wait_ready()["queues"] == 1
    assert b"$1\r\na\r\n" in again.call("HMGET", "fresh", "c", "1")
    assert again.stop() == EXIT_OK


def test_an_out_of_range_index_is_a_boot_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "floki", "shard", "--index", "1", "--shards", "1",
         "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert result.returncode == EXIT_BOOT == 3
    assert b"out of range" in result.stderr
    assert not (tmp_path / "data").exists()           # nothing was opened or created


def test_an_endpoint_path_too_long_for_a_unix_socket_is_a_boot_error(tmp_path):
    data_dir = tmp_path / ("d" * 120)        # <data_dir>/.run/shard-0.ipc exceeds 107 bytes
    leave_queue(data_dir, "q", messages=1)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "floki", "shard", "--index", "0", "--shards", "1",
         "--data-dir", str(data_dir)],
        cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert result.returncode == EXIT_BOOT, result.stderr.decode(errors="replace")
    assert b"cannot bind" in result.stderr
    # the queues it had opened were closed cleanly before the exit
    assert json.loads((data_dir / "q" / "queue.json").read_text())["clean_next_id"] == 2
