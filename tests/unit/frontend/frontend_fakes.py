"""Test doubles for the frontend's tests: a scriptable fake shard and a loop runner.

FakeShard is a real ZeroMQ ROUTER bound where a shard would be. It answers PINGs (unless told
not to), records COMMAND and CANCEL requests, and replies only when the test says so, so tests
choose the order and timing of every answer.
"""
from __future__ import annotations

import asyncio

import zmq

from floki import wire


def run_async(coro, loop_factory=None, timeout_s: float = 20.0):
    """Runs `coro` on a fresh loop (pytest-asyncio is not a dependency)."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout_s)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(bounded())


class FakeShard:
    """A ROUTER socket playing a shard, driven from the test's event loop."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.answer_pings = True
        self.pings = 0
        self.commands: list[tuple[bytes, int, list[bytes]]] = []   # (identity, id, argv)
        self.cancels: list[int] = []
        self.messages = 0          # ZeroMQ messages received (each may carry many requests)
        self.auto_reply = None     # callable(argv) -> (status, payload), or None: test replies
        self._task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        while True:
            while self.socket.poll(0):
                identity, *requests = self.socket.recv_multipart()
                self.messages += 1
                for frame in requests:          # wire.py: one frame per request
                    self._handle(identity, frame)
            await asyncio.sleep(0.002)

    def _handle(self, identity: bytes, frame: bytes) -> None:
        request_id, kind, args = wire.decode_request_frame(frame)
        if kind == wire.PING:
            self.pings += 1
            if self.answer_pings:
                self.send(identity, request_id, wire.PONG, b'{"index":0}')
        elif kind == wire.CANCEL:
            self.cancels.append(request_id)
        elif self.auto_reply is not None:
            self.send(identity, request_id, *self.auto_reply(args))
        else:
            self.commands.append((identity, request_id, args))

    def send(self, identity: bytes, request_id: int, status: bytes, payload: bytes) -> None:
        self.socket.send_multipart([identity, *wire.encode_reply(request_id, status, payload)])

    def reply(self, request_id: int, status: bytes, payload: bytes) -> None:
        """Answers the recorded command `request_id`."""
        for identity, rid, _ in self.commands:
            if rid == request_id:
                self.send(identity, rid, status, payload)
                return
        raise AssertionError(f"no command {request_id} received")

    async def wait_commands(self, count: int, timeout_s: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(self.commands) < count:
            assert asyncio.get_running_loop().time() < deadline, self.commands
            await asyncio.sleep(0.005)

    def close(self) -> None:
        self._task.cancel()
        self.socket.close(linger=0)


async def wait_for(predicate, timeout_s: float = 5.0, interval_s: float = 0.005):
    """Polls `predicate` on the running loop until true; fails the test after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(interval_s)
