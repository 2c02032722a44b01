"""Test helpers: free ports, polling, process checks and FlokiServer (a real `floki start`).

Owns: FlokiServer, which runs one `python -m floki start` in a tmp dir and can always clean it
up (the `floki_server` fixture in conftest.py is the usual way to get one). Rules:
  1. cleanup() leaves nothing running, whatever the test did: SIGTERM, then SIGKILL of the
     whole process group (the server runs in its own session) and of any pid still listed in
     its supervisor.json.
  2. Nothing waits with a bare sleep where a condition can be polled (`wait_until`).
Import as `from helpers import ...` (pytest puts tests/ on sys.path for conftest.py).
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 80

T = TypeVar("T")
FLOKI_RAW_REPLIES = ("INFO", "HMSET")


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when `port` can be bound (with SO_REUSEADDR, as a restarted frontend would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Polls `predicate` until it returns a truthy value and returns that value.

    Exceptions from `predicate` count as "not yet". Raises TimeoutError (with the last
    exception, if any) after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:   # noqa: BLE001 - "not ready yet" takes many forms
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout} s"
                               + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


def process_alive(pid: int | None, create_time: float | None = None) -> bool:
    """True if `pid` runs (zombies count as dead); with `create_time`, only that same process."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.05:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(str(value))   # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {value!r} to floki.toml")


def write_toml(path: Path, server: dict[str, Any], queue: dict[str, Any],
               shard_endpoints: list[str] = ()) -> None:
    """Writes a floki.toml with a [server] and a [queue] table, and [[shard]] tables if given."""
    lines = ["[server]"] + [f"{k} = {_toml_value(v)}" for k, v in server.items()]
    lines += ["", "[queue]"] + [f"{k} = {_toml_value(v)}" for k, v in queue.items()]
    for endpoint in shard_endpoints:
        lines += ["", "[[shard]]", f"endpoint = {_toml_value(endpoint)}"]
    path.write_text("\n".join(lines) + "\n")


class FlokiServer:
    """One `floki start` (supervisor + shards + frontend) in its own directory.

    Overrides are floki.toml keys: server keys by name (`shards=2`, `fsync="always"`), queue
    defaults as `queue={"message_timeout": "1s"}` or `queue_message_timeout="1s"`, explicit
    shard endpoints as `shard_endpoints=["tcp://127.0.0.1:PORT", ...]` ([[shard]] tables).
    """

    # metrics off unless a test asks (with a free port): parallel servers must not share 9798
    DEFAULTS: dict[str, Any] = {"shards": 1, "log_level": "info", "metrics_bind": ""}

    def __init__(self, directory: Path, **overrides: Any):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.toml_path = self.dir / "floki.toml"
        self.log_path = self.dir / "floki.log"
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.overrides: dict[str, Any] = dict(self.DEFAULTS)
        self.overrides.update(overrides)
        self.proc: subprocess.Popen | None = None
        self.last_state: dict | None = None

    # -- lifecycle --

    def write_config(self) -> Path:
        server: dict[str, Any] = {"bind": f"{self.host}:{self.port}", "data_dir": self.data_dir}
        queue: dict[str, Any] = {}
        endpoints: list[str] = []
        for key, value in self.overrides.items():
            if key == "shard_endpoints":
                endpoints = list(value)
            elif key == "queue":
                queue.update(value)
            elif key.startswith("queue_"):
                queue[key[len("queue_"):]] = value
            else:
                server[key] = value
        write_toml(self.toml_path, server, queue, endpoints)
        return self.toml_path

    def launch(self) -> subprocess.Popen:
        """Starts `floki start -c floki.toml` without waiting for it. Returns the process."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.write_config()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"=== floki start (port {self.port}) ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "floki", "start", "-c", str(self.toml_path)],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def start(self, timeout: float = READY_TIMEOUT_S) -> "FlokiServer":
        """Launches and waits until ready (see wait_ready). Returns self."""
        self.launch()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Waits until PING works and every shard answers (`INFO QUEUES` needs all of them).

        Raises RuntimeError with the log tail if the supervisor exits or time runs out.
        """
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"floki start exited with {code} before it was ready\n"
                                   + self.log_tail())
            client = self.client(socket_timeout=1.0, socket_connect_timeout=0.5)
            try:
                if client.ping() and self.shards_answer(client):
                    return
            except Exception as exc:   # noqa: BLE001 - refused, reset, shard not up yet...
                last_error = exc
            finally:
                client.close()
            time.sleep(0.05)
        raise RuntimeError(f"floki not ready within {timeout} s (last error: {last_error!r})\n"
                           + self.log_tail())

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Sends `sig` to the supervisor and waits for it. Returns its exit code.

        Raises TimeoutError (after killing the group) if it did not exit within `timeout`.
        """
        assert self.proc is not None
        if self.proc.poll() is None:
            self._remember_state()
            os.kill(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            self.proc.wait()
            raise TimeoutError(f"supervisor did not exit within {timeout} s after "
                               f"{signal.Signals(sig).name}\n{self.log_tail()}") from None
        return code

    def restart(self, timeout: float = READY_TIMEOUT_S, **overrides: Any) -> "FlokiServer":
        """Stops (if running), applies `overrides`, starts again on the same data dir and port."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        self.overrides.update(overrides)
        return self.start(timeout)

    def cleanup(self) -> None:
        """Makes sure nothing this server started still runs (rule 1). Safe to call twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._remember_state()
            try:
                self.stop(timeout=10.0)
            except TimeoutError:
                pass
        self._kill_group()
        for entry in (self.last_state or {}).get("children", []):
            if process_alive(entry.get("pid"), entry.get("create_time")):
                try:
                    os.kill(entry["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()

    def _kill_group(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # the session leader's pid is the pgid
        except (ProcessLookupError, PermissionError):
            pass

    # -- clients and processes --

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, **kwargs: Any):
        """Returns a redis.Redis for this server (RESP3 unless `protocol=` says otherwise)."""
        import redis
        kwargs.setdefault("protocol", 3)
        kwargs.setdefault("socket_timeout", 10.0)
        kwargs.setdefault("socket_connect_timeout", 5.0)
        client = redis.Redis(host=self.host, port=self.port, **kwargs)
        # redis-py reshapes INFO and HMSET replies for Redis's meaning of them; Floki's replies
        # (a JSON array, a seek count) are wanted as they are (README: "With redis-py").
        for name in FLOKI_RAW_REPLIES:
            client.response_callbacks.pop(name, None)
        return client

    def shards_answer(self, client=None) -> bool:
        """True when every shard answers: `INFO QUEUES` needs all of them (a down shard makes
        it an error). Raises redis errors (connection refused, ShardUnavailable...)."""
        client = client or self.client(socket_timeout=2.0)
        # The raw reply is enough: redis-py's INFO parser expects the Redis text format.
        client.set_response_callback("INFO", lambda response, **options: response)
        return client.execute_command("INFO", "QUEUES") is not None

    @property
    def state_path(self) -> Path:
        return self.data_dir / ".run" / "supervisor.json"

    def state(self) -> dict:
        """Returns supervisor.json (the supervisor's process map). Raises OSError, ValueError."""
        state = json.loads(self.state_path.read_text())
        self.last_state = state
        return state

    def _remember_state(self) -> None:
        try:
            self.state()
        except (OSError, ValueError):
            pass

    def pids(self) -> dict[str, Any]:
        """Returns {"supervisor": pid, "shards": {index: pid or None}, "frontend": pid or None}."""
        state = self.state()
        shards = {c["index"]: c["pid"] for c in state["children"] if c["role"] == "shard"}
        frontend = next((c["pid"] for c in state["children"] if c["role"] == "frontend"), None)
        return {"supervisor": state["pid"], "shards": shards, "frontend": frontend}

    def child_pids(self) -> list[int]:
        """Returns the pids of the running children, from supervisor.json."""
        return [c["pid"] for c in self.state()["children"] if c["pid"]]

    def kill_shard(self, index: int, sig: int = signal.SIGKILL) -> int:
        """Sends `sig` to shard `index`. Returns the pid signalled."""
        pid = self.pids()["shards"][index]
        assert pid, f"shard {index} is not running"
        os.kill(pid, sig)
        return pid

    def kill_frontend(self, sig: int = signal.SIGKILL) -> int:
        """Sends `sig` to the frontend. Returns the pid signalled."""
        pid = self.pids()["frontend"]
        assert pid, "the frontend is not running"
        os.kill(pid, sig)
        return pid

    def kill_supervisor(self, sig: int = signal.SIGKILL) -> int:
        """Sends `sig` to the supervisor only (not its children). Returns its pid."""
        assert self.proc is not None
        self._remember_state()
        os.kill(self.proc.pid, sig)
        return self.proc.pid

    def wait_until(self, predicate: Callable[[], T], timeout: float = 10.0,
                   interval: float = 0.05, message: str = "condition") -> T:
        """wait_until() that adds this server's log tail to the TimeoutError."""
        try:
            return wait_until(predicate, timeout, interval, message)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return f"--- last {lines} lines of {self.log_path} ---\n" + \
            "\n".join(text.splitlines()[-lines:])
