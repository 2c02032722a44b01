"""The frontend's side of the wire: one ZeroMQ DEALER per shard, request ids, shard liveness.

Owns: the sockets to the shards, the table of requests in flight (id -> who wants the reply), the
heartbeat, and each shard's state (UP or DOWN).
Rules:
  1. Nothing here waits for a shard. `send` queues a request and returns; the reply arrives
     through the callback, whenever it comes. A slow shard or a parked long poll holds only its
     own callbacks. There is no per-request timeout: a long poll (HMGET with a timeout) may
     legitimately wait as long as its client asked.
  2. Every request gets exactly one callback: the shard's reply, or ShardUnavailable. A shard is
     DOWN when it said nothing (PONG or any reply) for `shard_timeout_s`, or at once when its
     connection drops (socket monitor). Going DOWN fails all its requests in flight at once,
     and while DOWN new requests fail at once, so no client ever hangs on a dead shard.
  3. Going DOWN replaces the socket (LINGER 0): requests queued for the dead shard are dropped
     rather than delivered to its restarted successor. The shard is UP again at its next PONG.
  4. The DEALER runs with IMMEDIATE=1 (never queue to a connection that is not up), LINGER=0,
     and no high-water marks (a full pipe would block sends, or make the shard drop replies).
  5. ZeroMQ's FD is edge-triggered: every read drains the socket while ZMQ_EVENTS says a
     message waits, and after sends one more drain is scheduled, because a send can consume
     the FD's wake-up.
  6. `cancel(id)` forgets a request and tells its shard (CANCEL), so a parked long poll of a
     client that went away does not take messages that nobody will receive.
  7. Requests are batched (wire.py): `send` and `cancel` queue the request's frame for its
     shard, and everything queued for a shard leaves as ONE ZeroMQ message, either when
     `flush()` is called (a connection does once it ran every command of a read) or at the
     latest at the next loop turn (a callback scheduled by the first frame queued). Order per
     shard is kept (a CANCEL never overtakes its request). A send that fails then marks the
     shard DOWN, which fails every request queued or in flight for it (rule 2).
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from typing import Callable, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from floki import wire
from floki.errors import ShardUnavailable, to_reply
from floki.zmqcalls import MORE, NOBLOCK, message_waiting, recv_frame, send_frame

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.25
# Status of a reply the router makes itself (the shard is down); the payload is a RESP error.
UNAVAILABLE = b"!"
_MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED

OnReply = Callable[[bytes, bytes], None]   # (status, payload)

_ZERO_COPY_BYTES = wire.ZERO_COPY_BYTES


def _send_message(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Sends one multipart message without blocking. Raises zmq.ZMQError (EAGAIN: no peer)."""
    for frame in frames[:-1]:
        send_frame(sock, frame, MORE)
    send_frame(sock, frames[-1], NOBLOCK)


def _recv_message(sock: zmq.Socket) -> list[bytes | memoryview]:
    """Returns the next multipart message; frames of wire.ZERO_COPY_BYTES and more as views of
    ZeroMQ's buffers, not copies (wire.py "Zero copy"). Raises zmq.ZMQError (EAGAIN: none
    waiting)."""
    frame = recv_frame(sock, NOBLOCK, False)      # a zmq.Frame: `.more` costs no getsockopt
    frames = [frame.bytes]
    while frame.more:
        frame = recv_frame(sock, NOBLOCK, False)
        frames.append(frame.bytes if len(frame) < _ZERO_COPY_BYTES else frame.buffer)
    return frames


class ShardState(enum.Enum):
    UP = "up"        # answering: requests are sent
    DOWN = "down"    # silent or disconnected: requests fail at once with ShardUnavailable


class _Shard:
    """One shard's socket and liveness."""

    __slots__ = ("index", "endpoint", "socket", "monitor", "state", "last_reply_s",
                 "drain_scheduled", "outgoing", "flush_scheduled")

    def __init__(self, index: int, endpoint: str):
        self.index = index
        self.endpoint = endpoint
        self.socket: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.state = ShardState.DOWN        # until its first PONG
        self.last_reply_s = 0.0
        self.drain_scheduled = False
        self.outgoing: list[bytes] = []     # request frames for the next message (rule 7)
        self.flush_scheduled = False


class Router:
    """Sends client requests to shards and routes their replies back to callbacks."""

    def __init__(self, endpoints: Sequence[str], shard_timeout_s: float,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                 context: zmq.Context | None = None):
        self.shard_timeout_s = shard_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._context = context or zmq.Context.instance()
        self._shards = [_Shard(i, endpoint) for i, endpoint in enumerate(endpoints)]
        self._pending: dict[int, tuple[int, OnReply]] = {}   # request id -> (shard, callback)
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._all_up: asyncio.Event | None = None
        self._unavailable = to_reply(ShardUnavailable())

    # --- life cycle ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connects every shard socket and starts the heartbeat on `loop`."""
        self._loop = loop
        self._all_up = asyncio.Event()
        for shard in self._shards:
            self._open(shard)
        self._tick()

    def close(self) -> None:
        """Fails every request in flight, stops the heartbeat and closes the sockets."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for shard in self._shards:
            self._fail_pending(shard.index)
            self._close_socket(shard)
            shard.state = ShardState.DOWN

    async def wait_up(self, timeout_s: float) -> bool:
        """Returns True once every shard answered a PING, False after `timeout_s`."""
        try:
            await asyncio.wait_for(self._all_up.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    # --- requests ----------------------------------------------------------------------------

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    @property
    def shards_up(self) -> int:
        return sum(1 for shard in self._shards if shard.state is ShardState.UP)

    def state(self, index: int) -> ShardState:
        return self._shards[index].state

    @property
    def in_flight(self) -> int:
        """Number of requests waiting for a reply."""
        return len(self._pending)

    def send(self, index: int, argv: list[bytes], on_reply: OnReply,
             kind: bytes = wire.COMMAND) -> int:
        """Sends client `argv` to shard `index`; `on_reply(status, payload)` gets the answer.
        `kind` wire.STATS sends that request instead (argv unused).

        Returns the request id (for `cancel`). If the shard is down, `on_reply` is called before
        this returns, with status UNAVAILABLE and a ShardUnavailable error as payload.
        """
        shard = self._shards[index]
        request_id = next(self._ids)
        if shard.state is ShardState.UP:
            self._queue(shard, wire.encode_request(request_id, kind, argv)[0])
            self._pending[request_id] = (index, on_reply)
            return request_id
        on_reply(UNAVAILABLE, self._unavailable)
        return request_id

    def _queue(self, shard: _Shard, frame: bytes) -> None:
        """Adds a request frame to the shard's next message (rule 7)."""
        shard.outgoing.append(frame)
        if not shard.flush_scheduled:
            shard.flush_scheduled = True
            self._loop.call_soon(self._flush, shard)

    def flush(self) -> None:
        """Sends what is queued for every shard now (a connection calls it once it has run
        every command of a read, instead of waiting for the scheduled flush)."""
        for shard in self._shards:
            if shard.outgoing:
                self._flush(shard)

    def _flush(self, shard: _Shard) -> None:
        """Sends the shard's queued requests as one message (rule 7)."""
        shard.flush_scheduled = False
        frames, shard.outgoing = shard.outgoing, []
        if not frames or shard.socket is None or shard.state is not ShardState.UP:
            return                    # went DOWN since: its requests were failed then
        try:
            _send_message(shard.socket, frames)
        except zmq.ZMQError as exc:
            # IMMEDIATE=1: EAGAIN means no live connection to the shard any more.
            self._mark_down(shard, f"send failed ({exc})")
            return
        if not shard.drain_scheduled:
            shard.drain_scheduled = True
            self._loop.call_soon(self._drain, shard)

    def cancel(self, request_id: int) -> None:
        """Forgets request `request_id` (no callback will come) and tells its shard to drop it."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return                    # answered already, or failed
        shard = self._shards[entry[0]]
        if shard.state is ShardState.UP:
            # Queued behind its request if that was not sent yet; if the shard turns out to be
            # gone, nothing is parked there any more.
            self._queue(shard, wire.encode_request(request_id, wire.CANCEL)[0])

    async def call(self, index: int, argv: list[bytes],
                   kind: bytes = wire.COMMAND) -> tuple[bytes, bytes]:
        """Returns (status, payload) for `argv` sent to shard `index` (a coroutine form of
        `send`; a cancelled caller cancels the request)."""
        future = self._loop.create_future()

        def on_reply(status: bytes, payload: bytes) -> None:
            if not future.done():
                future.set_result((status, payload))

        request_id = self.send(index, argv, on_reply, kind)
        try:
            return await future
        finally:
            if not future.done():
                self.cancel(request_id)

    # --- heartbeat ---------------------------------------------------------------------------

    def _tick(self) -> None:
        self.heartbeat(self._loop.time())
        self._timer = self._loop.call_later(self.heartbeat_interval_s, self._tick)

    def heartbeat(self, now_s: float) -> None:
        """Marks DOWN every UP shard silent since `now_s - shard_timeout_s`; pings them all."""
        for shard in self._shards:
            if shard.state is ShardState.UP:
                # Read what is waiting first: a frontend that was itself stalled (CPU, swap)
                # must not blame shards whose PONGs sit unread in the socket.
                self._drain(shard)
                if now_s - shard.last_reply_s > self.shard_timeout_s:
                    self._mark_down(shard, f"no answer for {now_s - shard.last_reply_s:.2f} s")
            self._ping(shard)

    def _ping(self, shard: _Shard) -> None:
        try:
            _send_message(shard.socket, wire.encode_request(next(self._ids), wire.PING))
        except zmq.ZMQError:
            return                    # not connected yet (IMMEDIATE=1): try at the next tick
        if not shard.drain_scheduled:
            shard.drain_scheduled = True
            self._loop.call_soon(self._drain, shard)

    def _mark_up(self, shard: _Shard) -> None:
        shard.state = ShardState.UP
        log.info("shard %d is up (%s)", shard.index, shard.endpoint)
        if all(s.state is ShardState.UP for s in self._shards):
            self._all_up.set()

    def _mark_down(self, shard: _Shard, reason: str) -> None:
        if shard.state is ShardState.UP:
            log.warning("shard %d is down: %s", shard.index, reason)
        shard.state = ShardState.DOWN
        self._all_up.clear()
        shard.outgoing = []           # never delivered to a restarted successor (rule 3)
        self._fail_pending(shard.index)
        # A fresh socket: whatever was queued for the dead shard must not reach its successor.
        self._close_socket(shard)
        self._open(shard)

    def _fail_pending(self, index: int) -> None:
        failed = [rid for rid, entry in self._pending.items() if entry[0] == index]
        for rid in failed:
            self._pending.pop(rid)[1](UNAVAILABLE, self._unavailable)

    # --- sockets -----------------------------------------------------------------------------

    def _open(self, shard: _Shard) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        # A fresh inproc name each time: pyzmq's default derives it from the socket's FD, which
        # the replacement socket may reuse before the old monitor's endpoint is released.
        shard.monitor = sock.get_monitor_socket(
            _MONITOR_EVENTS, f"inproc://floki-router-{id(self)}-monitor-{next(self._ids)}")
        sock.connect(shard.endpoint)
        shard.socket = sock
        shard.drain_scheduled = False
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain, shard)
        self._loop.add_reader(shard.monitor.getsockopt(zmq.FD), self._watch, shard)
        # Anything that arrived before add_reader raised no edge: look once.
        self._loop.call_soon(self._drain, shard)
        self._loop.call_soon(self._watch, shard)

    def _close_socket(self, shard: _Shard) -> None:
        if shard.socket is None:
            return
        self._loop.remove_reader(shard.socket.getsockopt(zmq.FD))
        self._loop.remove_reader(shard.monitor.getsockopt(zmq.FD))
        shard.socket.disable_monitor()
        shard.monitor.close(linger=0)
        shard.socket.close(linger=0)
        shard.socket = shard.monitor = None

    def _drain(self, shard: _Shard) -> None:
        """Reads every reply waiting on the shard's socket (until EAGAIN: rule 5)."""
        shard.drain_scheduled = False
        sock = shard.socket
        if sock is None or sock.closed:
            return                    # replaced since this drain was scheduled
        pending = self._pending
        received = False
        while message_waiting(sock):
            try:
                frames = _recv_message(sock)
            except zmq.ZMQError:      # not expected after EVENTS said POLLIN; stop reading
                break
            received = True
            try:
                replies = wire.decode_replies(frames)
            except wire.WireError:
                log.warning("shard %d sent a malformed reply (%d frames)", shard.index,
                            len(frames))
                continue
            for request_id, status, payload in replies:
                if status == wire.PONG:
                    if shard.state is ShardState.DOWN:
                        shard.last_reply_s = self._loop.time()
                        self._mark_up(shard)
                    continue
                entry = pending.pop(request_id, None)
                if entry is not None:  # None: cancelled, or failed when the shard went down
                    entry[1](status, payload)
            if shard.socket is not sock:
                break                 # a callback replaced the socket (shard marked DOWN)
        if received:
            shard.last_reply_s = self._loop.time()

    def _watch(self, shard: _Shard) -> None:
        """Reads the socket monitor: a dropped connection makes the shard DOWN at once."""
        monitor = shard.monitor
        if monitor is None or monitor.closed:
            return
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and shard.state is ShardState.UP:
                self._mark_down(shard, "connection lost")
                return                # _mark_down replaced the socket and its monitor
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._ping(shard)     # a (re)started shard: get its PONG without waiting a tick
