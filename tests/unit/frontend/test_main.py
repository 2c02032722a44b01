"""floki/frontend/main.py: the frontend process against fake shards, real TCP clients (redis-py)."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio

from floki import wire
from floki.config import ServerConfig, shard_endpoint
from floki.frontend import main
from floki.supervisor import ExitCode
from unit.frontend.frontend_fakes import FakeShard, run_async, wait_for

REPO = Path(__file__).resolve().parents[3]


def make_config(ipc_dir, **overrides):
    (ipc_dir / ".run").mkdir(exist_ok=True)
    values = dict(bind="127.0.0.1:0", data_dir=str(ipc_dir), shards=2, shard_timeout=0.5,
                  metrics_bind="")    # metrics are tested in test_metrics.py on free ports
    values.update(overrides)
    return ServerConfig(**values)


def fake_shards(config):
    shards = [FakeShard(shard_endpoint(config, i)) for i in range(config.shard_count)]
    for shard in shards:
        shard.auto_reply = lambda argv: ((wire.JSON, b'{"queue_count":1}') if argv[0] == b"INFO"
                                         else (wire.RESP, b":%d\r\n" % len(argv)))
    return shards


async def start(config):
    """Returns (serve task, (host, port)) once the frontend listens."""
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(main.serve(config, ready))
    done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    assert ready in done, task.result()
    return task, ready.result()


async def roundtrip(address, data: bytes, expect_len: int | None = None) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(data)
    out = await reader.readexactly(expect_len) if expect_len else await reader.read(65536)
    writer.close()
    return out


def test_redis_py_8_handshake_routing_fanout_and_pipelining(ipc_dir):
    async def scenario():
        config = make_config(ipc_dir)
        shards = fake_shards(config)
        task, (host, port) = await start(config)
        client = redis.asyncio.Redis(host=host, port=port, client_name="t1")  # HELLO 3 first
        assert await client.ping() is True
        assert await client.execute_command("RPUSH", "q", "a", "b") == 4
        info = await client.info()                                 # plain INFO: bulk text
        assert info["queue_count"] == 2 and info["shards_up"] == 2
        assert await client.client_getname() == "t1"
        client_info = await client.execute_command("CLIENT", "INFO")
        assert b"resp=3" in client_info and b"lib-name=redis-py" in client_info
        pipe = client.pipeline(transaction=False)
        for i in range(100):
            pipe.execute_command("RPUSH", f"q{i}", *["m"] * (i % 5 + 1))
        assert await pipe.execute() == [i % 5 + 3 for i in range(100)]
        assert sum(len(s.commands) for s in shards) == 0        # all auto-replied
        await client.aclose()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await task == ExitCode.OK
        for shard in shards:
            shard.close()
    run_async(scenario())


def test_redis_py_resp2_client_works_too(ipc_dir):
    async def scenario():
        config = make_config(ipc_dir)
        shards = fake_shards(config)
        task, (host, port) = await start(config)
        client = redis.asyncio.Redis(host=host, port=port, protocol=2)
        assert await client.ping() is True
        assert (await client.info())["shards"] == 2
        await client.aclose()
        os.kill(os.getpid(), signal.SIGTERM)
        assert await task == ExitCode.OK
        for shard in shards:
            shard.close()
    run_async(scenario())


def test_graceful_stop_finishes_outstanding_replies(ipc_dir):
    async def scenario():
        config = make_config(ipc_dir, shards=1)
        (shard,) = fake_shards(config)
        shard.auto_reply = None                                    # the test answers
        task, address = await start(config)
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"*5\r\n$5\r\nHMGET\r\n$1\r\nq\r\n$1\r\nc\r\n$1\r\n1\r\n$2\r\n10\r\n")
        await shard.wait_commands(1)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.1)
        assert not task.done()                                     # waiting for the reply
        with pytest.raises(OSError):                               # no longer accepting
            await asyncio.wait_for(roundtrip(address, b"PING\r\n", 7), 1.0)
        shard.reply(shard.commands[0][1], wire.RESP, b"*0\r\n")
        assert await reader.read(100) == b"*0\r\n"
        assert await reader.read(100) == b""                       # then closed
        assert await task == ExitCode.OK
        writer.close()
        shard.close()
    run_async(scenario())


def test_second_signal_forces_the_stop(ipc_dir):
    async def scenario():
        config = make_config(ipc_dir, shards=1)
        (shard,) = fake_shards(config)
        shard.auto_reply = None
        task, address = await start(config)
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"*5\r\n$5\r\nHMGET\r\n$1\r\nq\r\n$1\r\nc\r\n$1\r\n1\r\n$2\r\n60\r\n")
        await shard.wait_commands(1)
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        assert await task == ExitCode.FATAL
        assert time.monotonic() - started < 1.0
        assert await reader.read(100) == b""
        await wait_for(lambda: shard.cancels == [shard.commands[0][1]], timeout_s=1.0)
        writer.close()
        shard.close()
    run_async(scenario())


def test_over_max_connections_gets_the_redis_error(ipc_dir):
    async def scenario():
        config = make_config(ipc_dir, max_connections=1)
        shards = fake_shards(config)
        task, address = await start(config)
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"PING\r\n")
        assert await reader.readexactly(7) == b"+PONG\r\n"
        assert await roundtrip(address, b"") == b"-ERR max number of clients reached\r\n"
        writer.close()
        await asyncio.sleep(0.05)
        assert await roundtrip(address, b"PING\r\n", 7) == b"+PONG\r\n"
        os.kill(os.getpid(), signal.SIGTERM)
        assert await task == ExitCode.OK
        for shard in shards:
            shard.close()
    run_async(scenario())


def test_missing_shards_do_not_stop_the_frontend_from_serving(ipc_dir):
    async def scenario():
        config = make_config(ipc_dir, shards=1, shard_timeout=0.2)
        task, address = await start(config)                       # no shard at all
        out = await roundtrip(address, b"PING\r\nRPUSH q x\r\n",
                              len(b"+PONG\r\n-ERR shard unavailable, try again\r\n"))
        assert out == b"+PONG\r\n-ERR shard unavailable, try again\r\n"
        os.kill(os.getpid(), signal.SIGTERM)
        assert await task == ExitCode.OK
    run_async(scenario())


def test_stops_when_the_parent_process_goes_away(ipc_dir, monkeypatch):
    parent = os.getppid()
    monkeypatch.setattr(main, "PARENT_CHECK_INTERVAL_S", 0.02)

    async def scenario():
        config = make_config(ipc_dir, shards=1, shard_timeout=0.2)
        task, _ = await start(config)
        monkeypatch.setattr(main.os, "getppid", lambda: 1 if parent != 1 else 2)
        assert await asyncio.wait_for(task, 2.0) == ExitCode.OK
    run_async(scenario())


def test_bind_errors_give_exit_codes(ipc_dir):
    async def scenario():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = make_config(ipc_dir, bind=f"127.0.0.1:{port}", shards=1, shard_timeout=0.1)
            assert await main.serve(config) == ExitCode.FATAL      # may come free: restart
        config = make_config(ipc_dir, bind="203.0.113.77:0", shards=1, shard_timeout=0.1)
        assert await main.serve(config) == ExitCode.BOOT_ERROR     # not our address
    run_async(scenario())


def test_parse_bind():
    assert main.parse_bind("127.0.0.1:9797") == ("127.0.0.1", 9797)
    assert main.parse_bind("[::1]:80") == ("::1", 80)
    assert main.parse_bind("*:80") == (None, 80)


def test_run_as_a_process_stops_cleanly_on_sigterm(ipc_dir):
    """The real entry (uvloop when installed), and no module of floki.shard is loaded."""
    (ipc_dir / ".run").mkdir()
    code = (
        "import sys\n"
        "from floki import logs\n"
        "from floki.config import ServerConfig\n"
        "from floki.frontend.main import run\n"
        "logs.setup('frontend', 'info')\n"
        f"code = run(ServerConfig(bind='127.0.0.1:0', data_dir={str(ipc_dir)!r}, shards=1,"
        " shard_timeout=0.2))\n"
        "assert not [m for m in sys.modules if m.startswith('floki.shard')], 'imports shard'\n"
        "sys.exit(code)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = []
        while True:
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
            if "listening on" in line:
                break
        port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(100) == b"+PONG\r\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
