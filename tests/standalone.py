"""Test helpers for Floki processes run one by one, without a supervisor: `floki shard` and
`floki frontend` as they run on hosts of their own (tests/e2e/test_standalone.py, test_netns.py).

Owns: FlokiProcess (one such process, its log file, readiness and cleanup) and `raw_client`.
Rules:
  1. stop() always leaves the process reaped: SIGTERM, then SIGKILL after the grace period.
  2. Readiness is read from the process's own log line, never waited for with a bare sleep.
Import as `from standalone import ...` (tests/ is on sys.path).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from helpers import FLOKI_RAW_REPLIES, REPO_ROOT, wait_until

READY_LINES = {"shard": "serving on", "frontend": "listening on"}


class FlokiProcess:
    """`python -m floki <kind> <args>`, optionally behind a command `prefix` (e.g.
    `ip netns exec NS`, which execs, so the pid is Floki's own). Output goes to `log_path`."""

    def __init__(self, kind: str, args: Sequence[str], log_path: Path,
                 prefix: Sequence[str] = ()):
        assert kind in READY_LINES
        self.kind = kind
        self.log_path = log_path
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.argv = [*prefix, sys.executable, "-m", "floki", kind, *args]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=log_path.parent, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 30.0) -> "FlokiProcess":
        """Waits for the line a ready process logs. Returns self. Raises RuntimeError."""
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()}")
            return READY_LINES[self.kind] in self.log()
        try:
            wait_until(ready, timeout, message=f"{self.kind} ready")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.log()}") from None
        return self

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, SIGKILL after `grace_s`; reaps (rule 1). Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def raw_client(host: str, port: int, connection_class: type | None = None, **kwargs: Any):
    """Returns a redis.Redis that leaves Floki's INFO and HMSET replies as they are (RESP3)."""
    import redis
    kwargs.setdefault("protocol", 3)
    kwargs.setdefault("socket_timeout", 15.0)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    if connection_class is not None:
        pool = redis.ConnectionPool(connection_class=connection_class, host=host, port=port,
                                    **kwargs)
        client = redis.Redis(connection_pool=pool)
    else:
        client = redis.Redis(host=host, port=port, **kwargs)
    for name in FLOKI_RAW_REPLIES:
        client.response_callbacks.pop(name, None)
    return client
