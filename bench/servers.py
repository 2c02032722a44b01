"""The two servers under test, started and always stopped by the runner.

Owns: `FlokiServer` (a real `floki start`: temp data dir, its own port, fsync mode) and
`RedisServer` (Debian's redis-server: AOF on, appendfsync everysec|always, temp dir, loopback,
its own port), with one interface: start, wait_ready, stop, kill9, the pids to measure.
Rules:
  1. Every server runs in its own session (start_new_session=True): Ctrl-C in the terminal never
     reaches it, and stop() can always SIGTERM it, then SIGKILL the whole process group and every
     child Floki's supervisor.json lists. stop() is safe to call twice and after a crash.
  2. Nothing listens beyond 127.0.0.1.
  3. redis-server comes from Debian; `ensure_redis_server` installs it with apt-get if missing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.loadgen import Connection, encode_command

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.005


def free_port(host: str = HOST) -> int:
    """Returns a TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ensure_redis_server() -> str:
    """Returns the path of redis-server, installing Debian's package first if it is missing.
    Raises RuntimeError if it cannot be had."""
    path = shutil.which("redis-server")
    if path:
        return path
    if not shutil.which("apt-get"):
        raise RuntimeError("redis-server is missing and there is no apt-get to install it")
    print("redis-server missing: apt-get update && apt-get install -y redis-server",
          file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.decode()[-500:]}")
    path = shutil.which("redis-server")
    if not path:
        raise RuntimeError("redis-server still missing after apt-get install")
    return path


def redis_version(path: str) -> str:
    """Returns redis-server's version string (e.g. "7.0.15")."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip()


class _Server:
    """What both servers share: a process in its own session, a port, a log file."""

    kind = ""
    label = ""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = free_port()
        self.log_path = self.dir / f"{self.kind}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def launch(self) -> None:
        """Starts the server without waiting for it."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.dir, env=self.env(),
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> "_Server":
        """Launches and waits until ready. Returns self. Raises RuntimeError."""
        self.launch()
        self.wait_ready()
        return self

    def ready_probe(self, conn: Connection) -> bool:
        return conn.call(encode_command("PING")) == b"PONG"

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Waits until the server answers. Raises RuntimeError with the log tail."""
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited before it was ready\n{self.log_tail()}")
            try:
                conn = Connection(self.host, self.port, connect_timeout_s=1.0)
                try:
                    if self.ready_probe(conn):
                        return
                finally:
                    conn.close()
            except Exception as exc:   # noqa: BLE001 - refused, loading, shard not up yet...
                last = exc
            time.sleep(POLL_S)
        raise RuntimeError(f"{self.label} not ready within {timeout_s} s ({last!r})\n"
                           f"{self.log_tail()}")

    def connect(self) -> Connection:
        return Connection(self.host, self.port)

    def _extra_pids(self) -> list[int]:
        return []

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL the process group and any listed child (rule 1)."""
        if self.proc is None:
            return
        extra = self._extra_pids()
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(STOP_TIMEOUT_S)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self._kill_all(extra)

    def kill9(self) -> None:
        """kill -9 of the server and everything it started, like a crash of the machine's
        processes (files written to the OS stay). Waits until they are gone."""
        if self.proc is None:
            return
        self._kill_all(self._extra_pids())

    def _kill_all(self, extra: list[int]) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in extra:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        psutil.wait_procs([p for p in map(_process, extra) if p is not None], timeout=5)

    def rss_bytes(self) -> dict[str, int]:
        """Returns {process role: resident set size in bytes}."""
        raise NotImplementedError

    def profile_targets(self) -> dict[str, int]:
        """Returns {role: pid} of the server's processes (worth profiling and measuring)."""
        raise NotImplementedError

    def cpu_seconds(self) -> dict[str, float]:
        """Returns {role: CPU seconds (user + system) used so far} of the server's processes;
        unlike wall-clock profiles, this does not count time spent waiting for a core."""
        out = {}
        for role, pid in self.profile_targets().items():
            proc = _process(pid)
            try:
                times = proc.cpu_times() if proc else None
            except psutil.Error:
                times = None
            if times is not None:
                out[role] = times.user + times.system
        return out

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _rss(pid: int | None) -> int:
    proc = _process(pid) if pid else None
    try:
        return proc.memory_info().rss if proc else 0
    except psutil.Error:
        return 0


class FlokiServer(_Server):
    """`python -m floki start` with its own floki.toml, data dir and port."""

    kind = "floki"

    def __init__(self, directory: Path, fsync: str = "interval", shards: int = 0,
                 log_level: str = "warning"):
        super().__init__(directory)
        self.fsync = fsync
        self.label = f"Floki (fsync={fsync})"
        self.data_dir = self.dir / "data"
        self.toml_path = self.dir / "floki.toml"
        self.toml_path.write_text(
            "[server]\n"
            f'bind = "{self.host}:{self.port}"\n'
            f"data_dir = {json.dumps(str(self.data_dir))}\n"
            f"shards = {int(shards)}\n"
            f'fsync = "{fsync}"\n'
            f'log_level = "{log_level}"\n')

    def command(self) -> list[str]:
        return [sys.executable, "-m", "floki", "start", "-c", str(self.toml_path)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        return env

    def ready_probe(self, conn: Connection) -> bool:
        # INFO QUEUES needs every shard, so it also says the shards are up.
        return (conn.call(encode_command("PING")) == b"PONG"
                and conn.call(encode_command("INFO", "QUEUES")) is not None)

    def state(self) -> dict[str, Any]:
        """Returns the supervisor's process map (supervisor.json), or {} if unreadable."""
        try:
            return json.loads((self.data_dir / ".run" / "supervisor.json").read_text())
        except (OSError, ValueError):
            return {}

    def _extra_pids(self) -> list[int]:
        return [c["pid"] for c in self.state().get("children", []) if c.get("pid")]

    def pids(self) -> dict[str, int]:
        """Returns {"frontend": pid, "shard-0": pid, ...} of the running children."""
        out = {}
        for child in self.state().get("children", []):
            if child.get("pid"):
                role = child["role"] if child["role"] == "frontend" else \
                    f"shard-{child['index']}"
                out[role] = child["pid"]
        return out

    def rss_bytes(self) -> dict[str, int]:
        return {role: _rss(pid) for role, pid in self.pids().items()}

    def profile_targets(self) -> dict[str, int]:
        return self.pids()


class RedisServer(_Server):
    """Debian's redis-server: AOF (appendonly yes) with `appendfsync`, no RDB snapshots."""

    kind = "redis"

    def __init__(self, directory: Path, appendfsync: str = "everysec"):
        super().__init__(directory)
        self.binary = ensure_redis_server()
        self.appendfsync = appendfsync
        self.label = f"Redis (appendfsync {appendfsync})"

    def command(self) -> list[str]:
        # save "": AOF is the persistence under test; RDB snapshots would only add fork pauses
        # to Redis's figures. Everything else is Redis's default.
        return [self.binary, "--port", str(self.port), "--bind", self.host,
                "--dir", str(self.dir), "--appendonly", "yes",
                "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
                "--logfile", "", "--protected-mode", "yes"]

    def rss_bytes(self) -> dict[str, int]:
        return {"redis-server": _rss(self.proc.pid if self.proc else None)}

    def profile_targets(self) -> dict[str, int]:
        return {"redis-server": self.proc.pid} if self.proc else {}


SERVER_KINDS = ("floki", "redis")


def make_server(kind: str, directory: Path, durable: bool, shards: int) -> _Server:
    """Returns an unstarted server: `durable` selects fsync = "always" / appendfsync always
    instead of fsync = "interval" / appendfsync everysec."""
    if kind == "floki":
        return FlokiServer(directory, fsync="always" if durable else "interval", shards=shards)
    return RedisServer(directory, appendfsync="always" if durable else "everysec")
