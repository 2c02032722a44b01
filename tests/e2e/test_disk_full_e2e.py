"""A real `floki start` whose data directory is a small tmpfs that fills up (RELIABILITY 14).

Pass: RPUSH answers `-ERR disk full ...` and stores nothing of that push; HMGET / HDEL keep
working; deleting another queue frees space and pushes work again without a restart; after a
restart every acknowledged body is there, intact, and `floki check` finds the data directory
clean. Skipped (with the reason) where mounting a tmpfs is not permitted.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from helpers import REPO_ROOT

TMPFS_SIZE = "8m"
BODY_BYTES = 64 * 1024


def cmd(client, *args):
    return client.execute_command(*args)


@pytest.fixture
def full_disk_server(floki_server):
    """A started server (fsync = always) whose data_dir is a fresh tmpfs of TMPFS_SIZE."""
    server = floki_server(start=False, fsync="always")
    server.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                                  str(server.data_dir)], capture_output=True, text=True,
                                 timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield server.start()
    finally:
        server.cleanup()
        subprocess.run(["umount", "-l", str(server.data_dir)], capture_output=True, timeout=10)


def drain(client, queue: str, channel: str) -> list[bytes]:
    bodies = []
    while True:
        got = cmd(client, "HMGET", queue, channel, 50)
        if not got:
            return bodies
        bodies += [m[2] for m in got]
        cmd(client, "HDEL", queue, channel, *[m[1] for m in got])


def test_a_full_data_dir_refuses_pushes_keeps_serving_and_recovers(full_disk_server):
    server = full_disk_server
    r = server.client()
    for queue in ("ballast", "big"):
        cmd(r, "SET", queue, "c")
    for n in range(24):                                 # 1.5 MiB we can free later
        cmd(r, "RPUSH", "ballast", b"b" * BODY_BYTES)

    acked: list[bytes] = []
    error = None
    for n in range(1000):
        body = f"{n}:".encode() + bytes([n % 251]) * BODY_BYTES
        try:
            assert cmd(r, "RPUSH", "big", body) == 1
        except redis.ResponseError as exc:
            error = str(exc)
            break
        acked.append(body)
    assert error is not None and error.startswith("disk full"), error
    assert len(acked) > 10
    for _ in range(3):                                  # still full: refused, still alive
        with pytest.raises(redis.ResponseError, match="^disk full"):
            cmd(r, "RPUSH", "big", b"x" * BODY_BYTES)

    got = cmd(r, "HMGET", "big", "c", 5)                # reads and acks keep working
    assert [m[2] for m in got] == acked[:5]
    assert cmd(r, "HDEL", "big", "c", *[m[1] for m in got]) == 5

    assert cmd(r, "DEL", "ballast") == 1                # frees space, no restart
    server.wait_until(lambda: cmd(r, "RPUSH", "big", b"after") == 1, 10,
                      message="RPUSH works again")
    acked.append(b"after")

    server.restart()
    r = server.client()
    stats = json.loads(cmd(r, "INFO", "queues")[0])["big"]
    assert stats["corrupt_records"] == 0
    cmd(r, "HMSET", "big", "c", "ID", 1)                 # replay everything retained
    assert drain(r, "big", "c") == acked
    assert server.stop() == 0

    checked = subprocess.run([sys.executable, "-m", "floki", "check", str(server.data_dir)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
