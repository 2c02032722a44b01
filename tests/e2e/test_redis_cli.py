"""redis-cli, the reference client, works one-shot and interactively (on a tty it asks for
COMMAND DOCS first and aborts on replies it does not expect)."""
from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time

import pytest

REDIS_CLI = shutil.which("redis-cli")
pytestmark = pytest.mark.skipif(REDIS_CLI is None,
                                reason="redis-cli not installed (.ci/run installs redis-tools)")


def run_cli(server, *args: str) -> str:
    out = subprocess.run([REDIS_CLI, "-p", str(server.port), *args], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_one_shot_commands(floki_server):
    server = floki_server()
    assert run_cli(server, "PING").strip() == "PONG"
    assert run_cli(server, "SET", "cliq", "c").strip() == "OK"
    assert run_cli(server, "RPUSH", "cliq", "hello", "world").strip() == "2"
    lines = run_cli(server, "HMGET", "cliq", "c", "10").split()
    assert lines[0] == "1" and lines[2] == "hello" and lines[3] == "2" and lines[5] == "world"
    assert run_cli(server, "HDEL", "cliq", "c", lines[1], lines[4]).strip() == "2"
    assert "QNF" in run_cli(server, "RPUSH", "nope", "x")
    assert run_cli(server, "-3", "PING").strip() == "PONG"          # RESP3 via HELLO 3
    assert "queue_count" in run_cli(server, "INFO")


def test_interactive_session_on_a_tty(floki_server):
    server = floki_server()
    pid, fd = pty.fork()
    if pid == 0:   # child: redis-cli on a real terminal
        # TERM=dumb: linenoise reads plain lines instead of querying the cursor position
        os.execve(REDIS_CLI, [REDIS_CLI, "-p", str(server.port)], {**os.environ, "TERM": "dumb"})
    try:
        def read_until(token: bytes, timeout: float = 10.0) -> bytes:
            data, deadline = b"", time.monotonic() + timeout
            while token not in data:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, f"redis-cli did not print {token!r}; got {data!r}"
                chunk = os.read(fd, 4096)
                assert chunk, f"redis-cli exited; output {data!r}"
                data += chunk
            return data

        read_until(b"> ")                          # the prompt: it started cleanly
        os.write(fd, b"SET ttyq c\r")
        assert b"OK" in read_until(b"> ")
        os.write(fd, b"RPUSH ttyq a b c\r")
        assert b"(integer) 3" in read_until(b"> ")
        os.write(fd, b"PING\r")
        assert b"PONG" in read_until(b"> ")
        os.write(fd, b"quit\r")
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)
