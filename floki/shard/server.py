"""ShardServer: the shard's ZeroMQ ROUTER loop.

Owns: turning wire requests into calls on the Catalog's queues, group commit, parked long polls,
the shard's timers (fsync interval, maintenance) and its background worker.
Rules:
  1. Single-threaded loop (the periodic disk work runs on one worker thread, rule 6). One
     pass: take every request waiting on the socket (up to a cap), execute them, then
     (fsync = "always") fsync each queue that was appended to ONCE, and only then send the
     replies: pushes that arrive while one fsync runs share the next one. Without group commit
     a long pass also sends what it holds once that reaches STREAM_REPLY_BYTES or
     STREAM_REPLY_S (see _take_batch).
  2. A reply is sent only after the work it reports is done (written to the OS; fsynced in
     "always" mode). If that fsync fails the shard exits without replying (the supervisor
     restarts it and recovery decides what is on disk): an unsynced push is never acknowledged.
  3. A long poll (HMGET with a timeout and nothing available) is parked, not busy-waited. It is
     answered when a push or an expired delivery makes a message available to its channel, when
     its deadline passes (empty array), or dropped when the frontend cancels it (client gone),
     so a vanished client never swallows messages. A frontend that dies cannot cancel: once the
     socket reports a disconnect, a parked poll is answered only after its frontend was heard
     from again (it pings every 0.25 s), and dropped when it stays silent (`shard_timeout`).
     Otherwise a frontend restarted within `shard_timeout` had its predecessor's polls take
     the next messages, in flight to nobody until their message timeout.
  4. Every handler is in HANDLERS, keyed by request type; errors become replies via errors.py.
  5. STATS (wire.py) is answered with `stats()`, the numbers the frontend's /metrics shows: built
     from counters the queues keep as plain ints, so a scrape costs no scan of anything in
     flight. Counters start at 0 with the process; `start_time_s` tells a new life.
  6. The timers' disk work (interval fsync, maintenance checkpoints) is handed to `background`,
     one BackgroundWorker thread, per queue.py rule 8 and background.py rules a-g: each pass
     first applies the jobs it completed and resubmits what their queues' ticks coalesced;
     serve() stops and joins it before returning, so the queues' clean close comes after.
     In "interval" mode a push that leaves SYNC_AHEAD_BYTES unfsynced in its segment also
     starts that background fsync (coalesced with one in flight), so the fsync a segment roll
     does on the loop (wal.py rule 3) finds little left to write.
"""
from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from floki import __version__, commands, reply, wire
from floki import requests as rq
from floki.config import RUNTIME_KEYS, ConfigError, ServerConfig
from floki.errors import (ChannelAlreadyExists, DiskFull, FlokiError, InvalidParameter,
                          QueueAlreadyExists, StorageIOError, WrongShard, to_reply)
from floki.histogram import Histogram
from floki.overrides import Overrides
from floki.shard.background import BackgroundWorker
from floki.shard.catalog import Catalog
from floki.zmqcalls import MORE, NOBLOCK, message_waiting, recv_frame, send_frame

log = logging.getLogger(__name__)

MAX_BATCH = 4096            # requests taken from the socket per loop pass
MAX_POLL_S = 0.1            # the loop wakes at least this often (signals, parked polls)
MAX_PASS_S = 0.05           # work per pass before replies are sent (see _take_batch)
# Rule 6: fsync ahead in the background once this much is unfsynced. A roll fsyncs the sealed
# 64 MiB segment on the loop; with W4's 640 KiB pushes that stalled the shard 120-180 ms every
# quarter second (3 s of W4 produce's 5.5 s).
SYNC_AHEAD_BYTES = 8 * 1024 * 1024
STREAM_REPLY_BYTES = 64 * 1024  # replies held in a pass before they are sent (_take_batch)
STREAM_REPLY_S = 0.0005         # ... or time since the last send (bench/README item 29)
MONITOR_S = 0.05                # peer disconnects are read at least this often (rule 3)
# Stale deadline entries (answered or cancelled polls) tolerated beyond twice the parked ones
DEADLINE_SLACK = 64
# What a failed Queue.sync raises: the OSError arrives wrapped as a client-visible error.
_SYNC_ERRORS = (OSError, DiskFull, StorageIOError)
# Upper bounds of the fsync latency histogram's buckets (seconds): a local SSD's fsync is well
# under a millisecond, a busy disk or network volume's can take seconds.
FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The hot path uses floki/zmqcalls.py. ROUTER_MANDATORY is off, so a reply to a vanished
# frontend is dropped by ZeroMQ rather than raising; a full pipe raises Again.
# Reply frames this large go to ZeroMQ without a copy (pyzmq keeps the bytes alive until
# ZeroMQ is done with them): wire.py, "Zero copy".
ZERO_COPY_BYTES = wire.ZERO_COPY_BYTES


class FsyncFailed(Exception):
    """fsync failed in "always" mode: the shard must exit without acknowledging anything."""


@dataclass(eq=False)
class Parked:
    identity: bytes
    request_id: int
    request: rq.Get
    deadline: float
    active: bool = True


@dataclass
class _Timers:
    next_maintenance: float = 0.0
    next_fsync: float = 0.0


class ShardServer:
    def __init__(self, config: ServerConfig, index: int, catalog: Catalog, socket: zmq.Socket,
                 overrides: Overrides | None = None):
        self.config = config
        # CONFIG SET server.* values recorded for a restart in this run (floki/overrides.py)
        self.overrides = overrides if overrides is not None else Overrides(None, None)
        self.index = index
        self.catalog = catalog
        self.socket = socket
        self.limits = commands.Limits(config.max_message_size, config.max_get_count)
        # replies of this pass: frontend identity -> [header, payload, header, payload, ...]
        self.outbox: dict[bytes, list[bytes]] = {}
        self.outbox_bytes = 0                 # payload bytes in it
        self.flushed_s = time.monotonic()     # when it was last sent
        self.appended: set[str] = set()        # queues appended to in this pass
        # parked long polls: queue -> channel -> FIFO of waiters; plus lookup and deadlines
        self.parked: dict[str, dict[str, deque[Parked]]] = {}
        self.parked_by_id: dict[tuple[bytes, int], Parked] = {}
        self.peer_seen: dict[bytes, float] = {}  # frontend identity -> last message (monotonic)
        self.disconnected_s = float("-inf")     # the socket's last peer disconnect (rule 3)
        self._monitor: zmq.Socket | None = None   # its monitor while serve() runs
        self.monitor_due = 0.0
        self.deadlines: list[tuple[float, int, Parked]] = []
        self._seq = itertools.count()
        now = time.monotonic()
        self.timers = _Timers(now + config.maintenance_interval, now + config.fsync_interval)
        self.started = time.time()
        self.fsync_seconds = Histogram(FSYNC_BUCKETS_S)   # Queue.sync() calls that fsynced
        # and background jobs that fsynced (rule 6)
        self.background = BackgroundWorker(f"floki-shard-{index}-disk")
        self.handlers: dict[type, Callable] = {
            rq.Push: self.push, rq.Get: self.get, rq.Ack: self.ack,
            rq.SeekId: self.seek_id, rq.SeekTimestamp: self.seek_timestamp,
            rq.Create: self.create, rq.Delete: self.delete, rq.Purge: self.purge,
            rq.QueueConfigSet: self.queue_config_set,
            rq.InfoServer: self.info_server, rq.InfoQueues: self.info_queues,
            rq.ConfigGetServer: self.config_get_server,
            rq.ConfigGetQueues: self.config_get_queues,
            rq.ConfigSetServer: self.config_set_server,
        }

    # --- the loop ----------------------------------------------------------------------------

    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Runs until should_stop() is true, then stops the background worker (rule 6).
        Raises FsyncFailed (the caller exits non-zero at once: the worker is not joined)."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        # Rule 3: peer disconnects, read when the poll reports one, else every MONITOR_S
        monitor = self._monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller.register(monitor, zmq.POLLIN)
        busy = False
        try:
            while not should_stop():
                # A pass that took requests is followed by another attempt without polling:
                # under load the socket is rarely empty, and zmq_poll costs more than asking
                # ZMQ_EVENTS.
                if busy:
                    busy = self._take_batch() > 0
                else:
                    ready = poller.poll(self._poll_timeout_ms())
                    if ready:
                        busy = self._take_batch() > 0
                        if len(ready) > 1 or ready[0][0] is monitor:
                            self.take_disconnects()
                self._finish_pass()
                self._run_timers(time.monotonic())
                self._finish_pass()
        finally:
            self._monitor = None
            self.socket.disable_monitor()
            monitor.close(linger=0)
        self.stop_background()

    def take_disconnects(self) -> None:
        """Notes the peer disconnects the socket monitor reported (rule 3)."""
        monitor = self._monitor
        self.monitor_due = time.monotonic() + MONITOR_S
        while monitor is not None and message_waiting(monitor):
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.disconnected_s = time.monotonic()
                log.info("a frontend connection closed: its long polls wait for its next "
                         "ping before they are answered")

    def stop_background(self) -> None:
        """Shard shutdown (background.py rule e): the worker takes no more jobs, finishes the
        queued ones and is joined; their outcomes are applied here. Coalesced work is left to
        the queues' clean close, which fsyncs and checkpoints anyway. Idempotent."""
        for job in self.background.stop():
            self._complete_job(job, None)

    def _apply_background(self) -> None:
        """Applies the jobs the worker completed since the last pass, and submits what their
        queues' ticks coalesced meanwhile (rule 6)."""
        for job in self.background.take_completed():
            self._complete_job(job, self.background)

    def _complete_job(self, job, worker: BackgroundWorker | None) -> None:
        if job.fsync_seconds is not None:
            self.fsync_seconds.observe(job.fsync_seconds)
        if job.owner is None:                 # CloseFiles (background.py): no queue to resume
            job.apply()
            return
        try:
            job.owner.resume_background(job, worker)
        except Exception:
            log.exception("queue %r: applying its background job failed", job.owner.name)

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        wake = min(now + MAX_POLL_S, self.timers.next_maintenance)
        if self.config.fsync == "interval":
            wake = min(wake, self.timers.next_fsync)
        if self.deadlines:
            wake = min(wake, self.deadlines[0][0])
        return max(0, int((wake - now) * 1000) + 1)

    def _take_batch(self) -> int:
        """Executes the requests waiting on the socket. Returns how many it took."""
        # A pass ends after MAX_BATCH requests or MAX_PASS_S of work, whichever comes first, so
        # replies (and heartbeat PONGs) go out promptly even under a burst of slow commands
        # (e.g. hundreds of queue creations, each fsyncing its files).
        deadline = time.monotonic() + MAX_PASS_S
        sock = self.socket
        handle = self.handle_frames
        # Without group commit a pass need not hold its replies to the end: once they add up
        # to STREAM_REPLY_BYTES, or STREAM_REPLY_S passed since the last send, they leave with
        # the long polls the pass's pushes woke, so the frontend works on them while the pass
        # goes on (W2's big get replies). Small replies stay together: every ZeroMQ message
        # costs CPU on both sides (W3). With "always", pushes are answered and polls woken
        # only after the pass's fsync.
        taken = 0
        while taken < MAX_BATCH and message_waiting(sock):
            try:
                identity = recv_frame(sock, NOBLOCK, False)
            except zmq.Again:
                return taken
            # ROUTER: [identity, request, request, ...] (wire.py: one frame per request)
            frames = [identity.bytes]
            frame = identity
            while frame.more:
                frame = recv_frame(sock, NOBLOCK, False)
                frames.append(frame.bytes)
            handle(frames)
            if (self.outbox_bytes >= STREAM_REPLY_BYTES
                    or time.monotonic() - self.flushed_s >= STREAM_REPLY_S) \
                    and self.config.fsync != "always":
                if self.appended:
                    appended, self.appended = self.appended, set()
                    self._wake_queues(appended)
                self._flush_outbox()
            taken += len(frames) - 1
            if time.monotonic() > deadline:
                return taken
        return taken

    def handle_frames(self, frames: list[bytes]) -> None:
        """One message from the ROUTER: [identity, request frame, request frame, ...]."""
        identity = frames[0]
        self.peer_seen[identity] = time.monotonic()
        if len(frames) < 2:
            log.warning("dropped a malformed wire message: no request")
            return
        decode = wire.decode_request_frame
        for i in range(1, len(frames)):
            try:
                request_id, kind, args = decode(frames[i])
            except wire.WireError as exc:
                log.warning("dropped a malformed wire message: %s", exc)
                continue
            if kind == wire.COMMAND:
                self._execute(identity, request_id, args)
            elif kind == wire.PING:
                self._send(identity, request_id, wire.PONG, self._status())
            elif kind == wire.CANCEL:
                self._cancel(identity, request_id)
            else:
                self._send(identity, request_id, wire.JSON, _json(self.stats()))

    def _execute(self, identity: bytes, request_id: int, argv: list[bytes]) -> None:
        try:
            request = commands.parse(argv, self.limits)
            handler = self.handlers.get(type(request))
            if handler is None:
                raise InvalidParameter("command is not served by shards")
            queue_name = getattr(request, "queue", None)
            if queue_name is not None and not self.catalog.owns(queue_name):
                raise WrongShard()
            result = handler(request, identity, request_id)
        except FlokiError as exc:
            result = (wire.RESP, to_reply(exc))
        except Exception as exc:
            log.exception("internal error executing %r", argv[:1])
            result = (wire.RESP, to_reply(exc))
        if result is not None:
            self._send(identity, request_id, *result)

    def _send(self, identity: bytes, request_id: int, status: bytes, payload: bytes) -> None:
        outbox = self.outbox.get(identity)
        if outbox is None:
            outbox = self.outbox[identity] = []
        outbox += wire.encode_reply(request_id, status, payload)
        self.outbox_bytes += len(payload)

    def _finish_pass(self) -> None:
        """Background completions, group commit, then replies, then wake long polls on queues
        that got messages."""
        self._apply_background()
        appended, self.appended = self.appended, set()
        if appended and self.config.fsync == "always":
            for name in appended:
                queue = self.catalog.queues.get(name)
                if queue is not None and queue.needs_sync:
                    try:
                        self._sync(queue)
                    except _SYNC_ERRORS as exc:
                        raise FsyncFailed(f"queue {name!r}: {exc}") from exc
        self._flush_outbox()
        self._wake_queues(appended)
        self._flush_outbox()

    def _wake_queues(self, names) -> None:
        """Answers the parked polls of queues `names` while messages are available to them."""
        now = time.monotonic()
        for name in names:
            self._wake_queue(name, now)

    def _sync(self, queue) -> None:
        """queue.sync(), timed into the fsync histogram. Raises what queue.sync raises."""
        started = time.perf_counter()
        queue.sync(self.background)
        self.fsync_seconds.observe(time.perf_counter() - started)

    def _flush_outbox(self) -> None:
        """Sends each frontend everything this pass answered it, as one message (wire.py)."""
        self.flushed_s = time.monotonic()
        if not self.outbox:
            return
        outbox, self.outbox = self.outbox, {}
        self.outbox_bytes = 0
        sock = self.socket
        for identity, frames in outbox.items():
            try:
                send_frame(sock, identity, MORE)
                last = len(frames) - 1
                for i in range(last):
                    frame = frames[i]
                    send_frame(sock, frame, MORE, len(frame) < ZERO_COPY_BYTES)
                frame = frames[last]
                send_frame(sock, frame, NOBLOCK, len(frame) < ZERO_COPY_BYTES)
            except zmq.Again:
                # The frontend is gone or not reading; its requests will be failed there.
                log.warning("reply dropped: frontend %r not reachable", identity)

    # --- timers ------------------------------------------------------------------------------

    def _run_timers(self, now: float) -> None:
        timers = self.timers
        # The ticks only capture and submit; the fsyncs and checkpoint writes run on the
        # background worker (rule 6), their failures handled when applied (background.py c).
        fsync_due = self.config.fsync == "interval" and now >= timers.next_fsync
        if fsync_due:
            timers.next_fsync = now + self.config.fsync_interval
        maintenance_due = now >= timers.next_maintenance
        if maintenance_due:
            timers.next_maintenance = now + self.config.maintenance_interval
            now_ms = time.time_ns() // 1_000_000
            for queue in self.catalog:
                try:
                    queue.maintenance(now, now_ms, fsync_due, self.background)
                except Exception:
                    log.exception("queue %r: maintenance failed", queue.name)
        elif fsync_due:
            for queue in self.catalog:
                if queue.needs_sync:
                    try:
                        queue.interval_sync(self.background)
                    except Exception:
                        log.exception("queue %r: fsync failed", queue.name)
        if now >= self.monitor_due:
            self.take_disconnects()
        self._forget_dead_peers(now)
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, parked = heapq.heappop(self.deadlines)
            if parked.active:
                self._unpark(parked)
                self._send(parked.identity, parked.request_id, wire.RESP, reply.EMPTY_ARRAY)
        # Expired deliveries make messages available again without any push.
        for name in list(self.parked):
            self._wake_queue(name, now)

    # --- parked long polls -------------------------------------------------------------------

    def _park(self, request: rq.Get, identity: bytes, request_id: int) -> None:
        parked = Parked(identity, request_id, request, time.monotonic() + request.timeout_s)
        by_channel = self.parked.setdefault(request.queue, {})
        by_channel.setdefault(request.channel, deque()).append(parked)
        self.parked_by_id[(identity, request_id)] = parked
        heapq.heappush(self.deadlines, (parked.deadline, next(self._seq), parked))

    def _unpark(self, parked: Parked) -> None:
        parked.active = False
        self.parked_by_id.pop((parked.identity, parked.request_id), None)
        by_channel = self.parked.get(parked.request.queue)
        if by_channel is None:
            return
        waiters = by_channel.get(parked.request.channel)
        if waiters is not None:
            try:
                waiters.remove(parked)
            except ValueError:
                pass
            if not waiters:
                del by_channel[parked.request.channel]
        if not by_channel:
            del self.parked[parked.request.queue]
        self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        """Answered and cancelled polls leave their heap entries until their deadline (lazy
        deletion); with long timeouts those would pile up with every poll served, so the heap is
        rebuilt once they outnumber the parked polls (amortised O(1) per poll)."""
        if len(self.deadlines) > 2 * len(self.parked_by_id) + DEADLINE_SLACK:
            self.deadlines = [entry for entry in self.deadlines if entry[2].active]
            heapq.heapify(self.deadlines)

    def _cancel(self, identity: bytes, request_id: int) -> None:
        parked = self.parked_by_id.get((identity, request_id))
        if parked is not None:
            self._unpark(parked)
        log.debug("cancel of request %d: %s", request_id,
                  "parked poll dropped" if parked else "nothing parked")

    def _wake_queue(self, name: str, now: float) -> None:
        """Answers parked polls of queue `name` while messages are available to them."""
        by_channel = self.parked.get(name)
        if not by_channel:
            return
        queue = self.catalog.queues.get(name)
        for channel, waiters in list(by_channel.items()):
            for parked in list(waiters):        # in arrival order; _unpark edits `waiters`
                if not self._peer_alive(parked.identity, now):
                    # Its frontend died (no heartbeat): a reply would be dropped with the
                    # messages in it, leaving them in flight until their timeout.
                    self._unpark(parked)
                    continue
                if self.peer_seen.get(parked.identity, now) <= self.disconnected_s:
                    continue        # maybe the frontend that went away (rule 3): not yet
                try:
                    if queue is None or not queue.has_channel(channel):
                        # Deleted while waiting: re-running the get reports QNF/CNF.
                        payload = self._get_reply(parked.request, now)
                    elif not queue.has_available(channel, now):
                        break
                    else:
                        payload = self._get_reply(parked.request, now)
                        if payload == reply.EMPTY_ARRAY:
                            break
                except FlokiError as exc:
                    payload = to_reply(exc)
                self._unpark(parked)
                self._send(parked.identity, parked.request_id, wire.RESP, payload)

    def _peer_alive(self, identity: bytes, now: float) -> bool:
        """True while the frontend `identity` has been heard from (it pings every 0.25 s)."""
        return now - self.peer_seen.get(identity, now) <= self.config.shard_timeout

    def _forget_dead_peers(self, now: float) -> None:
        """Drops the parked polls of frontends that stopped pinging, and their bookkeeping."""
        dead = {identity for identity in self.peer_seen if not self._peer_alive(identity, now)}
        if not dead:
            return
        for parked in [p for p in self.parked_by_id.values() if p.identity in dead]:
            self._unpark(parked)
        for identity in dead:
            del self.peer_seen[identity]
        log.info("dropped state of %d frontend connection(s) that stopped pinging", len(dead))

    def _get_reply(self, request: rq.Get, now: float) -> bytes:
        queue = self.catalog.get(request.queue)
        return reply.messages(queue.get(request.channel, request.count, now))

    @property
    def parked_count(self) -> int:
        return len(self.parked_by_id)

    # --- handlers: each returns (status, payload), or None when the request is parked ---------

    def push(self, request: rq.Push, identity: bytes, request_id: int):
        queue = self.catalog.get(request.queue)
        queue.push(request.bodies, time.time_ns() // 1_000_000)
        self.appended.add(request.queue)
        if self.config.fsync == "interval" and queue.unsynced_bytes >= SYNC_AHEAD_BYTES:
            try:
                queue.interval_sync(self.background)     # rule 6: fsync ahead
            except Exception:
                log.exception("queue %r: fsync ahead failed", queue.name)
        return wire.RESP, reply.integer(len(request.bodies))

    def get(self, request: rq.Get, identity: bytes, request_id: int):
        queue = self.catalog.get(request.queue)
        if request.count == 0:
            if not queue.has_channel(request.channel):
                queue.get(request.channel, 0, time.monotonic())  # raises ChannelNotFound
            return wire.RESP, reply.EMPTY_ARRAY
        items = queue.get(request.channel, request.count, time.monotonic())
        if items or request.timeout_s <= 0:
            return wire.RESP, reply.messages(items)
        self._park(request, identity, request_id)
        return None

    def ack(self, request: rq.Ack, identity: bytes, request_id: int):
        queue = self.catalog.get(request.queue)
        return wire.RESP, reply.integer(queue.ack(request.channel, request.tickets,
                                                  time.monotonic()))

    def seek_id(self, request: rq.SeekId, identity: bytes, request_id: int):
        self.catalog.get(request.queue).seek_id(request.channel, request.id)
        self._wake_queue(request.queue, time.monotonic())
        return wire.RESP, reply.integer(2)  # Floki's original HMSET reply

    def seek_timestamp(self, request: rq.SeekTimestamp, identity: bytes, request_id: int):
        self.catalog.get(request.queue).seek_timestamp(request.channel, request.timestamp_s)
        self._wake_queue(request.queue, time.monotonic())
        return wire.RESP, reply.integer(2)

    def create(self, request: rq.Create, identity: bytes, request_id: int):
        if request.queue in self.catalog:
            queue = self.catalog.get(request.queue)
            if not request.nx:
                if queue.has_channel(request.channel):
                    raise ChannelAlreadyExists()
                raise QueueAlreadyExists()
        else:
            queue = self.catalog.create(request.queue)
        queue.create_channel(request.channel)
        return wire.RESP, reply.OK

    def delete(self, request: rq.Delete, identity: bytes, request_id: int):
        if request.channel is None:
            deleted = self.catalog.delete(request.queue)
        else:
            queue = self.catalog.queues.get(request.queue)
            deleted = queue is not None and queue.delete_channel(request.channel)
        if deleted:
            self._wake_queue(request.queue, time.monotonic())
        return wire.RESP, reply.integer(int(deleted))

    def purge(self, request: rq.Purge, identity: bytes, request_id: int):
        queue = self.catalog.queues.get(request.queue)
        if queue is None:
            return wire.RESP, reply.integer(0)
        if request.channel is None:
            queue.purge()
            done = True
        else:
            done = queue.purge_channel(request.channel)
        return wire.RESP, reply.integer(int(done))

    def queue_config_set(self, request: rq.QueueConfigSet, identity: bytes, request_id: int):
        queue = self.catalog.get(request.queue)
        try:
            queue.set_setting(request.key, request.value)
        except ConfigError as exc:
            raise InvalidParameter(f"Invalid CONFIG SET parameter: {exc}") from None
        self._wake_queue(request.queue, time.monotonic())
        return wire.RESP, reply.OK

    def info_server(self, request: rq.InfoServer, identity: bytes, request_id: int):
        return wire.JSON, _json({
            "index": self.index, "pid": os.getpid(), "queue_count": len(self.catalog.queues),
            "blocked_client_count": self.parked_count, "broken_queues": self.catalog.broken,
            "uptime_s": round(time.time() - self.started, 3), "version": __version__,
        })

    def info_queues(self, request: rq.InfoQueues, identity: bytes, request_id: int):
        now = time.monotonic()
        return wire.JSON, _json({name: queue.info(now)
                                 for name, queue in sorted(self.catalog.queues.items())
                                 if name.startswith(request.prefix)})

    def config_get_server(self, request: rq.ConfigGetServer, identity: bytes, request_id: int):
        return wire.JSON, _json(self.config.to_dict())

    def config_get_queues(self, request: rq.ConfigGetQueues, identity: bytes, request_id: int):
        if request.exact:
            selected = {request.prefix: self.catalog.queues.get(request.prefix)}
        else:
            selected = {n: q for n, q in self.catalog.queues.items()
                        if n.startswith(request.prefix)}
        return wire.JSON, _json({name: queue.settings.to_dict()
                                 for name, queue in sorted(selected.items()) if queue})

    def config_set_server(self, request: rq.ConfigSetServer, identity: bytes, request_id: int):
        key = request.key
        if key not in RUNTIME_KEYS and not key.startswith("queue."):
            raise InvalidParameter(f"Invalid CONFIG SET parameter: {key!r} cannot be changed "
                                   "at runtime")
        try:
            config = self.config.with_value(key, request.value)
        except ConfigError as exc:
            raise InvalidParameter(f"Invalid CONFIG SET parameter: {exc}") from None
        try:
            self.overrides.record(key, request.value)   # overrides.py rule 3: first
        except OSError as exc:
            log.error("CONFIG SET server.%s refused: cannot record it for a restart: %s",
                      key, exc)
            raise StorageIOError(f"cannot record CONFIG SET for a restart: {exc}") from None
        self.apply_config(config)
        return wire.JSON, _json({"ok": True})

    def apply_config(self, config: ServerConfig) -> None:
        """Makes a changed server configuration take effect on this live shard."""
        self.config = config
        self.limits = commands.Limits(config.max_message_size, config.max_get_count)
        self.catalog.defaults = config.queue
        if config.fsync != self.catalog.fsync:
            self.catalog.set_fsync(config.fsync)
            if config.fsync == "always":
                # "always" serves only synced ids: what was pushed before the switch is synced
                # by this pass's group commit, or it would stay hidden until the next push.
                self.appended.update(q.name for q in self.catalog if q.needs_sync)
        logging.getLogger().setLevel(config.log_level.upper())
        now = time.monotonic()
        self.timers.next_fsync = min(self.timers.next_fsync, now + config.fsync_interval)
        self.timers.next_maintenance = min(self.timers.next_maintenance,
                                           now + config.maintenance_interval)

    def stats(self) -> dict:
        """Returns this shard's numbers for /metrics (rule 5): index, pid, start_time_s (Unix
        seconds this process started serving), blocked_clients (parked long polls),
        broken_queues (count), fsync_seconds (Histogram.to_dict) and, per queue, Queue.stats()."""
        return {
            "index": self.index, "pid": os.getpid(), "start_time_s": self.started,
            "version": __version__, "blocked_clients": self.parked_count,
            "broken_queues": len(self.catalog.broken),
            "fsync_seconds": self.fsync_seconds.to_dict(),
            "queues": {name: queue.stats() for name, queue in self.catalog.queues.items()},
        }

    def _status(self) -> bytes:
        return _json({"index": self.index, "pid": os.getpid(),
                      "queues": len(self.catalog.queues)})


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
