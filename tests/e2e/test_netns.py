"""Shards and frontends on separate hosts: network namespaces made by the test (root only).

Topology (addresses exist only inside the namespaces made here; nothing touches the host's own
network):
    ns fe  (two frontends on 127.0.0.1:7001 and :7002 of that namespace)
      veth 10.200.1.1/24 <-> 10.200.1.2/24  ns s0  (shard 0, binds tcp://0.0.0.0:9800)
      veth 10.200.2.1/24 <-> 10.200.2.2/24  ns s1  (shard 1, binds tcp://0.0.0.0:9800)
The test's clients open their sockets inside ns fe (a helper thread enters it with setns(2);
a socket stays in the namespace it was made in). Cutting s1's link off must turn requests for
shard 1's queues into prompt errors while shard 0's queues keep working through both frontends,
and reconnecting it must bring them back with their data.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time

import pytest
import redis
from redis.connection import Connection

from helpers import write_toml
from standalone import FlokiProcess, raw_client

from floki.config import SERVER_KEYS
from floki.routing import shard_for

CLONE_NEWNET = 0x40000000
SHARD_TIMEOUT_S = 1.0
MESSAGE_TIMEOUT_S = 1.0        # redelivery of what a request lost in the cut took
FRONTEND_PORTS = (7001, 7002)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="network namespaces are Linux only")


def ip(*args: str) -> None:
    """Runs `ip ARGS`. Raises RuntimeError with ip's message."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class Namespaces:
    """The namespaces and veth pairs of the topology above; `delete()` removes all of them
    (deleting a namespace deletes the veth ends inside it)."""

    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.fe, self.s = f"floki-{token}-fe", [f"floki-{token}-s0", f"floki-{token}-s1"]
        # veth pair i: fe_links[i] in ns fe, shard_links[i] in ns s<i> (names: 15 chars at most)
        self.fe_links = [f"fk{token}f0", f"fk{token}f1"]
        self.shard_links = [f"fk{token}s0", f"fk{token}s1"]
        self.made: list[str] = []

    def create(self) -> None:
        for ns in (self.fe, *self.s):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for i, (ns, fe_link, link) in enumerate(zip(self.s, self.fe_links, self.shard_links)):
            # Both ends are created inside the namespaces: nothing appears on the host.
            ip("-n", self.fe, "link", "add", fe_link, "type", "veth", "peer", "name", link,
               "netns", ns)
            ip("-n", self.fe, "addr", "add", f"10.200.{i + 1}.1/24", "dev", fe_link)
            ip("-n", ns, "addr", "add", f"10.200.{i + 1}.2/24", "dev", link)
            ip("-n", self.fe, "link", "set", fe_link, "up")
            ip("-n", ns, "link", "set", link, "up")

    def set_shard_link(self, index: int, up: bool) -> None:
        ip("-n", self.s[index], "link", "set", self.shard_links[index], "up" if up else "down")

    def delete(self) -> None:
        for ns in reversed(self.made):
            try:
                ip("netns", "delete", ns)
            except RuntimeError:
                pass
        self.made.clear()


def _setns_connection_class(namespace: str) -> type:
    """A redis-py Connection whose sockets are made inside `namespace` (by a short-lived
    thread that entered it: setns(2) changes only the calling thread)."""
    libc = ctypes.CDLL(None, use_errno=True)

    class NamespacedConnection(Connection):
        def _connect(self):
            result: dict = {}

            def connect_inside() -> None:
                fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                    result["sock"] = Connection._connect(self)
                except BaseException as exc:   # noqa: BLE001 - handed to the caller's thread
                    result["error"] = exc
                finally:
                    os.close(fd)

            thread = threading.Thread(target=connect_inside)
            thread.start()
            thread.join()
            if "error" in result:
                raise result["error"]
            return result["sock"]

    return NamespacedConnection


@pytest.fixture
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` command")
    spaces = Namespaces()
    try:
        try:
            spaces.create()
        except RuntimeError as exc:
            pytest.skip(f"network namespaces not permitted here: {exc}")
        yield spaces
    finally:
        spaces.delete()


def test_shards_and_frontends_on_separate_hosts(namespaces, tmp_path):
    toml = tmp_path / "floki.toml"
    server = {"shard_timeout": f"{SHARD_TIMEOUT_S}s", "log_level": "info"}
    if "metrics_bind" in SERVER_KEYS:
        server["metrics_bind"] = ""       # two frontends in one namespace: one metrics port
    write_toml(toml, server,
               {"message_timeout": f"{MESSAGE_TIMEOUT_S}s"},
               [f"tcp://10.200.{i + 1}.2:9800" for i in range(2)])
    procs: list[FlokiProcess] = []

    def run(ns: str, kind: str, *args: str) -> FlokiProcess:
        proc = FlokiProcess(kind, ["-c", str(toml), *args], tmp_path / f"{kind}-{len(procs)}.log",
                            prefix=("ip", "netns", "exec", ns))
        procs.append(proc)
        return proc

    try:
        for i, ns in enumerate(namespaces.s):
            run(ns, "shard", "--index", str(i), "--bind", "tcp://0.0.0.0:9800",
                "--data-dir", str(tmp_path / f"host-s{i}"))
        for port in FRONTEND_PORTS:
            run(namespaces.fe, "frontend", "--bind", f"127.0.0.1:{port}",
                "--data-dir", str(tmp_path / "host-fe"))
        for proc in procs:
            proc.wait_ready()
        conn_class = _setns_connection_class(namespaces.fe)
        a, b = [raw_client("127.0.0.1", port, conn_class, retry=None) for port in FRONTEND_PORTS]
        q0, q1 = [next(f"q{i}" for i in range(100) if shard_for(f"q{i}", 2) == s)
                  for s in (0, 1)]

        # Produce through A, consume and ack through B, on both shard hosts.
        for name in (q0, q1):
            assert a.execute_command("SET", name, "c")
            assert a.rpush(name, b"one", b"two") == 2
            got = b.execute_command("HMGET", name, "c", 10)
            assert [m[2] for m in got] == [b"one", b"two"]
            assert b.execute_command("HDEL", name, "c", *[m[1] for m in got]) == 2
        assert json.loads(a.execute_command("INFO", "server")[0])["shards_up"] == 2
        assert a.rpush(q1, b"kept") == 1

        # Cut shard 1's host off: its queues fail promptly, shard 0's keep working.
        namespaces.set_shard_link(1, up=False)
        started = time.monotonic()
        with pytest.raises(redis.ResponseError, match="shard unavailable"):
            a.rpush(q1, b"lost")
        assert time.monotonic() - started < SHARD_TIMEOUT_S + 3.0
        started = time.monotonic()
        with pytest.raises(redis.ResponseError, match="shard unavailable"):
            b.execute_command("HMGET", q1, "c", 10)
        assert time.monotonic() - started < SHARD_TIMEOUT_S + 3.0   # B notices on its own
        for client in (a, b):
            assert client.rpush(q0, b"still") == 1
        assert len(b.execute_command("HMGET", q0, "c", 10)) == 2
        info = json.loads(b.execute_command("INFO", "server")[0])
        assert info["shards_up"] == 1

        # Reconnect: shard 1's queue is served again, with what it held. A request already on
        # its way when the link went down may still have been carried out (its client got the
        # error): "lost" may have been stored, and a get may have taken "kept" with a ticket
        # nobody holds, which then comes back after message_timeout (at-least-once).
        namespaces.set_shard_link(1, up=True)
        deadline = time.monotonic() + 20
        seen: list[bytes] = []
        while b"kept" not in seen:
            assert time.monotonic() < deadline, (seen, procs[1].log())
            try:
                seen += [m[2] for m in a.execute_command("HMGET", q1, "c", 10, 0.5)]
            except redis.ResponseError as exc:
                assert "shard unavailable" in str(exc)
                time.sleep(0.1)
        assert set(seen) <= {b"kept", b"lost"}, seen
    finally:
        for proc in reversed(procs):
            proc.stop()
