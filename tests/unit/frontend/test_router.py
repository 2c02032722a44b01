"""floki/frontend/router.py against real ZeroMQ ROUTER sockets playing the shards."""
import asyncio

import pytest
import uvloop
import zmq

from floki import wire
from floki.frontend.router import UNAVAILABLE, Router, ShardState
from unit.frontend.frontend_fakes import FakeShard, run_async, wait_for

SHARD_TIMEOUT_S = 0.4
HEARTBEAT_S = 0.05
UNAVAILABLE_REPLY = b"-ERR shard unavailable, try again\r\n"


def endpoints(ipc_dir, count=1):
    return [f"ipc://{ipc_dir}/shard-{i}.ipc" for i in range(count)]


async def started(ipc_dir, count=1, **kwargs):
    """Returns (router, fake shards), every shard UP."""
    eps = endpoints(ipc_dir, count)
    shards = [FakeShard(ep) for ep in eps]
    router = Router(eps, kwargs.pop("shard_timeout_s", SHARD_TIMEOUT_S),
                    heartbeat_interval_s=HEARTBEAT_S, **kwargs)
    router.start(asyncio.get_running_loop())
    assert await router.wait_up(5.0)
    return router, shards


class Replies:
    """Collects (status, payload) per request tag."""

    def __init__(self):
        self.got = {}
        self.order = []

    def callback(self, tag):
        def on_reply(status, payload):
            assert tag not in self.got, f"second callback for {tag}"
            self.got[tag] = (status, payload)
            self.order.append(tag)
        return on_reply


@pytest.mark.parametrize("loop_factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_replies_are_matched_to_requests_out_of_order(ipc_dir, loop_factory):
    async def main():
        router, (shard,) = await started(ipc_dir)
        replies = Replies()
        ids = [router.send(0, [b"RPUSH", b"q", b"%d" % i], replies.callback(i)) for i in range(3)]
        await shard.wait_commands(3)
        assert [argv for _, _, argv in shard.commands] == [[b"RPUSH", b"q", b"%d" % i]
                                                          for i in range(3)]
        for request_id in reversed(ids):
            shard.reply(request_id, wire.RESP, b":%d\r\n" % request_id)
        await wait_for(lambda: len(replies.got) == 3)
        assert replies.order == [2, 1, 0]
        assert replies.got == {i: (wire.RESP, b":%d\r\n" % ids[i]) for i in range(3)}
        assert router.in_flight == 0
        router.close()
        shard.close()
    run_async(main(), loop_factory)


def test_many_requests_in_flight_across_shards(ipc_dir):
    async def main():
        router, shards = await started(ipc_dir, 3)
        for shard in shards:
            shard.auto_reply = lambda argv: (wire.RESP, b"+" + argv[1] + b"\r\n")
        replies = Replies()
        for i in range(600):
            router.send(i % 3, [b"ECHO", b"m%d" % i], replies.callback(i))
        await wait_for(lambda: len(replies.got) == 600)
        assert all(replies.got[i] == (wire.RESP, b"+m%d\r\n" % i) for i in range(600))
        router.close()
        for shard in shards:
            shard.close()
    run_async(main())


def test_silent_shard_fails_its_requests_within_timeout_and_recovers(ipc_dir):
    async def main():
        loop = asyncio.get_running_loop()
        router, (shard,) = await started(ipc_dir)
        replies = Replies()
        router.send(0, [b"HMGET", b"q", b"c", b"1", b"30"], replies.callback("long poll"))
        await shard.wait_commands(1)
        shard.answer_pings = False                  # hung: connected, but says nothing
        silent_since = loop.time()
        await wait_for(lambda: "long poll" in replies.got, timeout_s=SHARD_TIMEOUT_S + 1.0)
        assert loop.time() - silent_since <= SHARD_TIMEOUT_S + 0.5
        assert replies.got["long poll"] == (UNAVAILABLE, UNAVAILABLE_REPLY)
        assert router.state(0) is ShardState.DOWN and router.shards_up == 0

        # While DOWN, new requests fail at once (the callback runs inside send).
        router.send(0, [b"RPUSH", b"q", b"x"], replies.callback("while down"))
        assert replies.got["while down"] == (UNAVAILABLE, UNAVAILABLE_REPLY)
        assert len(shard.commands) == 1                 # and nothing was sent

        # A late answer to the failed request is dropped: its socket was replaced.
        shard.reply(shard.commands[0][1], wire.RESP, b"*0\r\n")

        shard.answer_pings = True
        await wait_for(lambda: router.state(0) is ShardState.UP, timeout_s=2.0)
        request_id = router.send(0, [b"RPUSH", b"q", b"y"], replies.callback("after"))
        await shard.wait_commands(2)
        shard.reply(request_id, wire.RESP, b":1\r\n")
        await wait_for(lambda: "after" in replies.got)
        assert replies.got["after"] == (wire.RESP, b":1\r\n")
        assert replies.order == ["long poll", "while down", "after"]
        router.close()
        shard.close()
    run_async(main())


def test_dead_shard_fails_requests_at_once_and_a_restarted_one_takes_over(ipc_dir):
    async def main():
        loop = asyncio.get_running_loop()
        router, (shard,) = await started(ipc_dir, shard_timeout_s=5.0)
        replies = Replies()
        router.send(0, [b"HMGET", b"q", b"c", b"1", b"30"], replies.callback("parked"))
        await shard.wait_commands(1)
        died = loop.time()
        shard.close()                                   # the process died: connection drops
        await wait_for(lambda: "parked" in replies.got, timeout_s=2.0)
        assert loop.time() - died < 1.0                 # far sooner than shard_timeout
        assert replies.got["parked"][0] == UNAVAILABLE

        successor = FakeShard(shard.endpoint)           # restarted at the same endpoint
        await wait_for(lambda: router.state(0) is ShardState.UP, timeout_s=3.0)
        request_id = router.send(0, [b"PINGQ"], replies.callback("new"))
        await successor.wait_commands(1)
        assert [argv for _, _, argv in successor.commands] == [[b"PINGQ"]]   # nothing stale
        successor.reply(request_id, wire.RESP, b"+ok\r\n")
        await wait_for(lambda: "new" in replies.got)
        router.close()
        successor.close()
    run_async(main())


def test_heartbeat_marks_a_silent_shard_down_from_the_given_clock(ipc_dir):
    async def main():
        router, (shard,) = await started(ipc_dir, shard_timeout_s=30.0)
        replies = Replies()
        router.send(0, [b"HMGET", b"q", b"c", b"1", b"60"], replies.callback("a"))
        now = asyncio.get_running_loop().time()
        router.heartbeat(now + 1.0)
        assert router.state(0) is ShardState.UP and not replies.got
        router.heartbeat(now + 31.0)
        assert router.state(0) is ShardState.DOWN
        assert replies.got == {"a": (UNAVAILABLE, UNAVAILABLE_REPLY)}
        router.close()
        shard.close()
    run_async(main())


def test_long_poll_is_never_timed_out_by_the_frontend(ipc_dir):
    async def main():
        router, (shard,) = await started(ipc_dir, shard_timeout_s=0.2)
        replies = Replies()
        request_id = router.send(0, [b"HMGET", b"q", b"c", b"1", b"1"], replies.callback("poll"))
        await shard.wait_commands(1)
        await asyncio.sleep(0.6)                        # 3 shard timeouts, pings answered
        assert replies.got == {} and router.state(0) is ShardState.UP
        shard.reply(request_id, wire.RESP, b"$-1\r\n")
        await wait_for(lambda: "poll" in replies.got)
        router.close()
        shard.close()
    run_async(main())


def test_cancel_tells_the_shard_and_drops_a_late_reply(ipc_dir):
    async def main():
        router, (shard,) = await started(ipc_dir)
        replies = Replies()
        request_id = router.send(0, [b"HMGET", b"q", b"c", b"1", b"30"], replies.callback("x"))
        await shard.wait_commands(1)
        router.cancel(request_id)
        router.cancel(request_id)                       # twice: harmless, one CANCEL
        await wait_for(lambda: shard.cancels == [request_id])
        shard.reply(request_id, wire.RESP, b"*0\r\n")
        router.send(0, [b"PING"], replies.callback("next"))
        await shard.wait_commands(2)
        shard.reply(shard.commands[1][1], wire.RESP, b"+PONG\r\n")
        await wait_for(lambda: "next" in replies.got)
        assert "x" not in replies.got and shard.cancels == [request_id]
        router.close()
        shard.close()
    run_async(main())


def test_malformed_and_unknown_replies_are_ignored(ipc_dir):
    async def main():
        router, (shard,) = await started(ipc_dir)
        replies = Replies()
        request_id = router.send(0, [b"PING"], replies.callback("p"))
        await shard.wait_commands(1)
        identity = shard.commands[0][0]
        shard.socket.send_multipart([identity, b"short"])                    # malformed
        shard.send(identity, 999_999, wire.RESP, b"+stray\r\n")              # unknown id
        shard.reply(request_id, wire.RESP, b"+PONG\r\n")
        await wait_for(lambda: "p" in replies.got)
        assert replies.got == {"p": (wire.RESP, b"+PONG\r\n")}
        assert router.state(0) is ShardState.UP
        router.close()
        shard.close()
    run_async(main())


def test_shard_never_started_is_down_and_requests_fail_at_once(ipc_dir):
    async def main():
        router = Router(endpoints(ipc_dir), SHARD_TIMEOUT_S, heartbeat_interval_s=HEARTBEAT_S)
        router.start(asyncio.get_running_loop())
        assert not await router.wait_up(0.2)
        replies = Replies()
        router.send(0, [b"RPUSH", b"q", b"x"], replies.callback("x"))
        assert replies.got == {"x": (UNAVAILABLE, UNAVAILABLE_REPLY)}
        shard = FakeShard(endpoints(ipc_dir)[0])      # starts late: picked up by the pings
        assert await router.wait_up(3.0)
        router.close()
        shard.close()
    run_async(main())


def test_call_and_close_fail_what_is_in_flight(ipc_dir):
    async def main():
        router, (shard,) = await started(ipc_dir)
        shard.auto_reply = lambda argv: (wire.JSON, b'{"queue_count":1}')
        assert await router.call(0, [b"INFO", b"server"]) == (wire.JSON, b'{"queue_count":1}')
        shard.auto_reply = None
        task = asyncio.ensure_future(router.call(0, [b"HMGET", b"q", b"c", b"1", b"9"]))
        await shard.wait_commands(1)
        router.close()
        assert await task == (UNAVAILABLE, UNAVAILABLE_REPLY)
        shard.close()
    run_async(main())


def test_dealer_options(ipc_dir):
    async def main():
        router, (shard,) = await started(ipc_dir)
        sock = router._shards[0].socket
        assert sock.getsockopt(zmq.IMMEDIATE) == 1 and sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.SNDHWM) == 0 and sock.getsockopt(zmq.RCVHWM) == 0
        router.close()
        shard.close()
    run_async(main())


@pytest.mark.parametrize("loop_factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_requests_of_one_loop_turn_go_to_a_shard_as_one_message(ipc_dir, loop_factory):
    async def main():
        router, (shard,) = await started(ipc_dir)
        shard.answer_pings = False           # only the requests below reach it as messages
        await asyncio.sleep(HEARTBEAT_S * 2)
        before, pings_before = shard.messages, shard.pings
        replies = Replies()
        ids = [router.send(0, [b"RPUSH", b"q", b"%d" % i], replies.callback(i))
               for i in range(50)]
        router.cancel(ids[-1])               # queued behind its own request
        await shard.wait_commands(50)
        await wait_for(lambda: shard.cancels == [ids[-1]])
        # The 50 requests and the cancel left in one message; heartbeats travel alone.
        assert shard.messages - before == 1 + (shard.pings - pings_before)
        assert [argv[2] for _, _, argv in shard.commands] == [b"%d" % i for i in range(50)]
        router.close()
        shard.close()
    run_async(main(), loop_factory)


def test_replies_sent_as_one_message_reach_each_callback(ipc_dir):
    async def main():
        router, (shard,) = await started(ipc_dir)
        replies = Replies()
        ids = [router.send(0, [b"RPUSH", b"q", b"%d" % i], replies.callback(i)) for i in range(5)]
        await shard.wait_commands(5)
        frames = []
        for request_id in reversed(ids):
            frames += wire.encode_reply(request_id, wire.RESP, b":%d\r\n" % request_id)
        shard.socket.send_multipart([shard.commands[0][0], *frames])
        await wait_for(lambda: len(replies.got) == 5)
        assert replies.order == [4, 3, 2, 1, 0]
        assert replies.got == {i: (wire.RESP, b":%d\r\n" % ids[i]) for i in range(5)}
        router.close()
        shard.close()
    run_async(main())


def test_large_replies_arrive_uncopied_and_small_ones_as_bytes(ipc_dir):
    async def main():
        router, (shard,) = await started(ipc_dir)
        replies = Replies()
        big = b"*1\r\n$%d\r\n%s\r\n" % (wire.ZERO_COPY_BYTES, b"b" * wire.ZERO_COPY_BYTES)
        ids = [router.send(0, [b"HMGET", b"q", b"c"], replies.callback(i)) for i in range(2)]
        await shard.wait_commands(2)
        shard.reply(ids[0], wire.RESP, big)
        shard.reply(ids[1], wire.RESP, b"*0\r\n")
        await wait_for(lambda: len(replies.got) == 2)
        status, payload = replies.got[0]
        assert status == wire.RESP and isinstance(payload, memoryview) and payload == big
        assert replies.got[1] == (wire.RESP, b"*0\r\n")
        assert type(replies.got[1][1]) is bytes
        router.close()
        shard.close()
    run_async(main())
