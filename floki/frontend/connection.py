"""One client connection (an asyncio.Protocol, shaped like uvicorn's), and the process-wide
state every connection shares (`Frontend`).

Owns: turning a client's bytes into commands and their replies into bytes, in order.
Rules:
  1. Every command reserves a reply slot when it is read, so replies leave in request order even
     when pipelined commands are answered by different shards, out of order. The completed
     slots at the head go out in one `transport.writelines` per batch (one writev with uvloop:
     large replies arrive as views of ZeroMQ's buffers and are never joined).
  2. A command runs where it belongs: a request with a `queue` goes to the shard
     `routing.shard_for` picks, and the shard's RESP bytes are written as they came; INFO and
     CONFIG go to every shard and `fanout.merge` joins the answers; PING, HELLO, CLIENT ... are
     answered here (`handlers`).
  3. Errors: a FlokiError becomes its reply and the connection lives on, unless the error is
     fatal (broken framing, too many clients): then the reply is the last thing written before
     closing. Anything else is a bug: logged with its traceback, answered `-ERR internal error`.
     `_fail` is the one place an exception becomes a reply.
  4. Flow control: reading pauses while more than HIGH_WATER_SLOTS replies are outstanding or
     the transport's write buffer is full, and resumes below LOW_WATER_SLOTS. A client whose
     unread replies pass `max_output_buffer` is disconnected.
  5. A client that goes away cancels its requests still at the shards (a parked long poll must
     not take messages nobody will read).
  6. Access (floki/frontend/access.py): one client more than max_connections gets `-ERR max
     number of clients reached`, a client refused by protected mode `-DENIED ...`; both are
     closed at once. With a password, every command but AUTH, HELLO and QUIT gets `-NOAUTH`
     until the session authenticates, and the reader holds Redis's pre-auth limits till then.
     The check is made once per read (which executor runs the batch), never per command.
  7. Idle clients (`timeout`): a sweep every fraction of the timeout closes a connection that
     read no complete command, owes no reply and wrote no byte since the last sweeps for
     `timeout` seconds. Bytes that never make a command do not count (a slowloris client
     is idle). The per-read cost is one flag; the sweep runs only when a timeout is set.
  8. Every command that parses is timed for /metrics (metrics.CommandTimes) from the read
     that completed it to its reply being ready (so a pipelined command's wait behind the
     ones before it counts): one clock read per read and one per reply, one dict lookup and
     one bisect per command. Long polls are not timed (they wait by design), nor are errors.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import socket
import time
from collections import deque
from time import perf_counter as _perf_counter
from typing import Any

from floki import __version__, wire
from floki.reply import EMPTY_ARRAY
from floki.commands import Limits, parse
from floki.config import ConfigError, ServerConfig
from floki.errors import (Denied, FlokiError, InternalError, InvalidParameter, NoAuth,
                          ProtocolError, ShardUnavailable, TooManyClients, is_fatal, to_reply)
from floki.frontend import access, fanout
from floki.frontend.handlers import Session, answer
from floki.frontend.metrics import CommandTimes
from floki.frontend.resp import FrameLimits, RequestReader
from floki.overrides import Overrides
from floki.requests import FANOUT_REQUESTS, ConfigSetServer
from floki.routing import shard_for

log = logging.getLogger(__name__)

HIGH_WATER_SLOTS = 1024
LOW_WATER_SLOTS = 512
WRITE_BUFFER_HIGH_BYTES = 4 * 1024**2       # transport's pause_writing threshold

_FANOUT_TYPES = frozenset(FANOUT_REQUESTS)
_BEFORE_AUTH_COMMANDS = frozenset({b"AUTH", b"HELLO", b"QUIT"})    # rule 6


class Frontend:
    """What every connection of the frontend process shares: router, live config, clients."""

    def __init__(self, config: ServerConfig, router: Any, loop: asyncio.AbstractEventLoop,
                 overrides: Overrides | None = None):
        self.config = config
        # CONFIG SET server.* values recorded for a restart in this run (floki/overrides.py)
        self.overrides = overrides if overrides is not None else Overrides(None, None)
        self.limits = Limits(config.max_message_size, config.max_get_count)
        # Shared by every connection's reader, so CONFIG SET holds from the next read.
        self.frame_limits = FrameLimits(max_bulk_bytes=config.max_bulk_len,
                                        max_multibulk_length=config.max_args,
                                        max_message_bytes=config.max_message_size)
        self.password = access.Password(config.requirepass) if config.requirepass else None
        self.before_auth_limits = FrameLimits.before_auth_of(self.frame_limits)
        self.protected = access.protected_mode_applies(config, access.bind_host(config.bind))
        self.max_output_bytes = config.max_output_buffer     # 0: no cap
        self.idle_timeout_s = config.timeout                 # 0: never
        self.denied_count = 0                                # clients refused by protected mode
        self.router = router                 # router.Router, or a stand-in in tests
        self.loop = loop
        self.shard_count = router.shard_count
        self.connections: set[Connection] = set()
        self.started_s = time.monotonic()
        self._client_ids = itertools.count(1)
        self.command_times = CommandTimes()        # rule 8

    def next_client_id(self) -> int:
        return next(self._client_ids)

    def sweep_idle(self, now_s: float) -> None:
        """Closes the connections idle for `timeout` seconds at `now_s` (rule 7)."""
        timeout_s = self.idle_timeout_s
        for conn in list(self.connections):
            conn.check_idle(now_s, timeout_s)

    def status(self) -> dict[str, Any]:
        """Returns the frontend's own part of INFO server."""
        return {"version": __version__, "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started_s, 3),
                "client_count": len(self.connections), "shards": self.shard_count}

    def config_value(self, key: str) -> str:
        """Returns server key `key` (or `queue.KEY`) as CONFIG SET takes it."""
        if key.startswith("queue."):
            return str(getattr(self.config.queue, key[len("queue."):]))
        return str(getattr(self.config, key))

    def apply_config(self, key: str, value: str) -> None:
        """Applies CONFIG SET server.<key> here too (new limits hold for the next command).

        Raises InvalidParameter.
        """
        try:
            config = self.config.with_value(key, value)
        except ConfigError as exc:
            raise InvalidParameter(f"Invalid CONFIG SET parameter: {exc}") from None
        try:
            self.overrides.record(key, value)
        except OSError as exc:
            # The shards applied it already: refusing here would leave them disagreeing with
            # this frontend now, not only after its restart.
            log.error("CONFIG SET server.%s applies, but a restart of this frontend will not "
                      "keep it: %s", key, exc)
        self.config = config
        self.limits = Limits(config.max_message_size, config.max_get_count)
        self.frame_limits.set_max_message_bytes(config.max_message_size)
        self.max_output_bytes = config.max_output_buffer
        if key == "log_level":
            logging.getLogger().setLevel(config.log_level.upper())


class _Slot:
    """The place of one command's reply in its connection's output order."""

    __slots__ = ("conn", "reply", "close", "request_id", "fanout", "long_poll", "timer",
                 "started_s")

    def __init__(self, conn: Connection):
        self.conn = conn
        self.reply: bytes | memoryview | None = None     # None until answered
        self.close = False                  # close the connection once this reply is written
        self.request_id = 0                 # the shard request answering it (0: none)
        self.fanout: _FanOut | None = None
        self.long_poll = False              # an HMGET that may wait at the shard
        self.timer = None                   # its command's latency Histogram (rule 8)
        self.started_s = 0.0                # perf_counter() at the read that completed it

    def shard_replied(self, status: bytes, payload: bytes) -> None:
        if status == wire.JSON:             # a shard bug: never write JSON to a client
            log.error("shard answered a queue command with JSON: %r", payload[:200])
            payload = to_reply(InternalError())
        self.reply = payload
        timer = self.timer
        if timer is not None:
            timer.observe(_perf_counter() - self.started_s)
        self.conn._slot_done(self)


def _undone(index: int, key: str, status: bytes, payload: bytes) -> None:
    """The reply of a shard told to set a partly failed CONFIG SET back."""
    if status != wire.JSON:
        log.error("shard %d could not set server.%s back (%s): CONFIG GET server names the "
                  "disagreement until it is set again", index, key, bytes(payload)[:200])


class _FanOut:
    """A request sent to every shard: collects the parts, then merges them into its slot."""

    __slots__ = ("slot", "request", "protover", "parts", "waiting", "request_ids")

    def __init__(self, slot: _Slot, request: object, protover: int, shard_count: int):
        self.slot = slot
        self.request = request
        self.protover = protover            # the protocol when the command was read
        self.parts: list = [None] * shard_count
        self.waiting = shard_count
        self.request_ids: list[int] = []

    def part_replied(self, index: int, status: bytes, payload: bytes) -> None:
        self.parts[index] = (status, payload)
        self.waiting -= 1
        if self.waiting == 0:
            self.slot.conn._merge(self)


class Connection(asyncio.Protocol):
    """One client: RESP in, commands out to handlers and shards, replies back in order."""

    def __init__(self, frontend: Frontend):
        self._frontend = frontend
        self._router = frontend.router
        self._loop = frontend.loop
        self._transport: asyncio.Transport | None = None
        self._reader = RequestReader(frontend.frame_limits if frontend.password is None
                                     else frontend.before_auth_limits)    # rule 6
        self._command_times = frontend.command_times.by_name               # rule 8
        self._read_s = 0.0             # perf_counter() at the read being executed (rule 8)
        self._slots: deque[_Slot] = deque()
        self.session: Session | None = None
        self._closing = False          # QUIT, fatal error, EOF or shutdown: read no commands
        self._close_when_idle = False  # close as soon as every slot is written (EOF, shutdown)
        self._reading_paused = False
        self._writing_paused = False
        self._flush_scheduled = False
        self._in_batch = False         # inside data_received: it flushes at its end
        self._active = True            # a command was read since the last idle sweep (rule 7)
        self._idle_since_s = 0.0
        self._output_seen = 0          # write buffer size at the last idle sweep

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        frontend = self._frontend
        if len(frontend.connections) >= frontend.config.max_connections:
            transport.write(to_reply(TooManyClients()))
            transport.close()
            self._closing = True
            return
        if frontend.protected and not access.peer_is_loopback(
                transport.get_extra_info("peername")):
            frontend.denied_count += 1
            log.log(logging.WARNING if frontend.denied_count == 1 else logging.DEBUG,
                    "protected mode: refused %s (not loopback, no password set; further "
                    "refusals are logged at debug level)",
                    _address(transport.get_extra_info("peername")))
            transport.write(to_reply(Denied()))
            transport.close()
            self._closing = True
            return
        frontend.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass                   # the peer already left; connection_lost follows
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        self.session = Session(frontend.next_client_id(),
                               _address(transport.get_extra_info("peername")),
                               _address(transport.get_extra_info("sockname")),
                               password=frontend.password)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        reader = self._reader
        reader.feed(data)
        self._in_batch = True
        try:
            while not self._closing:
                try:
                    batch = reader.commands()
                except ProtocolError as exc:
                    slot = _Slot(self)
                    self._slots.append(slot)
                    self._fail(slot, exc)
                    break
                if not batch:
                    break
                self._read_s = _perf_counter()
                self._active = True
                execute = (self._execute if self.session.authenticated
                           else self._execute_before_auth)
                for argv in batch:
                    execute(argv)
                    if self._closing:
                        break
        finally:
            self._in_batch = False
        self._router.flush()
        self._flush()

    def eof_received(self) -> bool:
        # The client sent everything (e.g. `printf 'PING\r\n' | nc`): answer it, then close.
        # A long poll cannot be what such a client waits for, and a client that vanished mid
        # poll looks the same: cancel parked polls now (empty answer), so no message is handed
        # to a connection that is going away.
        self._closing = True
        for slot in self._slots:
            if slot.long_poll and slot.reply is None:
                self._router.cancel(slot.request_id)
                slot.reply = EMPTY_ARRAY
        if not self._slots:
            return False               # the transport closes itself
        self._close_when_idle = True
        self._flush()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._transport = None
        cancel = self._router.cancel
        for slot in self._slots:
            if slot.reply is None:
                if slot.request_id:
                    cancel(slot.request_id)
                elif slot.fanout is not None:
                    fan = slot.fanout
                    if type(fan.request) is ConfigSetServer:
                        # The shards apply it whoever is left to hear: the frontend must still
                        # apply it (or set it back) once they answered (fanout.py rule 4).
                        continue
                    for request_id, part in zip(fan.request_ids, fan.parts):
                        if part is None:
                            cancel(request_id)
        self._slots.clear()
        self._frontend.connections.discard(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # --- commands -------------------------------------------------------------------------------

    def _execute(self, argv: list[bytes] | FlokiError) -> None:
        slot = _Slot(self)
        self._slots.append(slot)
        try:
            if argv.__class__ is not list:
                raise argv                 # refused by the reader (an oversized argument)
            started_s = self._read_s
            request = parse(argv, self._frontend.limits)
            # parse() knows the name, so a miss is a mixed-case spelling (rule 8)
            timer = self._command_times.get(argv[0]) or self._command_times[argv[0].upper()]
            queue = getattr(request, "queue", None)
            if queue is not None:
                if getattr(request, "timeout_s", 0) > 0:
                    slot.long_poll = True
                else:
                    slot.timer = timer
                    slot.started_s = started_s
                slot.request_id = self._router.send(
                    shard_for(queue, self._frontend.shard_count), argv, slot.shard_replied)
            elif type(request) in _FANOUT_TYPES:
                slot.timer = timer
                slot.started_s = started_s
                self._fan_out(slot, request, argv)
            else:
                slot.reply = answer(request, self.session)
                timer.observe(_perf_counter() - started_s)
                if self.session.quit:
                    slot.close = self._closing = True
        except Exception as exc:
            self._fail(slot, exc, argv)

    def _execute_before_auth(self, argv: list[bytes] | FlokiError) -> None:
        """Runs AUTH, HELLO and QUIT; anything else gets NOAUTH until authenticated (rule 6)."""
        session = self.session
        if session.authenticated:          # the rest of the batch that authenticated
            self._execute(argv)
            return
        if argv.__class__ is not list or argv[0].upper() not in _BEFORE_AUTH_COMMANDS:
            slot = _Slot(self)
            self._slots.append(slot)
            self._fail(slot, NoAuth())
            return
        self._execute(argv)
        if session.authenticated:
            self._reader.set_limits(self._frontend.frame_limits)

    def _fan_out(self, slot: _Slot, request: object, argv: list[bytes]) -> None:
        count = self._frontend.shard_count
        if type(request) is ConfigSetServer and self._router.shards_up < count:
            # Sent to the shards that are up it would apply there and not on the others
            # (fanout.py rules 4 and 5): refused before anything changes.
            raise ShardUnavailable()
        fan = slot.fanout = _FanOut(slot, request, self.session.protover, count)
        for index in range(count):
            fan.request_ids.append(
                self._router.send(index, argv, functools.partial(fan.part_replied, index)))

    def _merge(self, fan: _FanOut) -> None:
        slot = fan.slot
        if type(fan.request) is ConfigSetServer:
            self._undo_partial_config_set(fan)
        try:
            slot.reply = fanout.merge(fan.request, fan.parts, self._frontend, fan.protover)
        except Exception as exc:
            self._fail(slot, exc)
        else:
            slot.timer.observe(_perf_counter() - slot.started_s)
        self._slot_done(slot)

    def _undo_partial_config_set(self, fan: _FanOut) -> None:
        """fanout.py rule 4: a CONFIG SET server that some shard failed is set back, on the
        shards that applied it, to the value this frontend still runs (it applies a value
        only once every shard did)."""
        applied = [i for i, (status, _) in enumerate(fan.parts) if status == wire.JSON]
        if not applied or len(applied) == len(fan.parts):
            return
        key = fan.request.key
        previous = self._frontend.config_value(key)
        argv = [b"CONFIG", b"SET", b"server." + key.encode(), previous.encode()]
        log.warning("CONFIG SET server.%s failed on shard(s) %s: setting it back to %s on %s",
                    key, [i for i in range(len(fan.parts)) if i not in applied], previous,
                    applied)
        for index in applied:
            self._router.send(index, argv, functools.partial(_undone, index, key))

    def _fail(self, slot: _Slot, exc: BaseException, argv: list[bytes] | None = None) -> None:
        """Answers `slot` with the error reply for `exc` (rule 3)."""
        if not isinstance(exc, FlokiError):
            log.error("internal error answering %r", argv[0][:64] if argv else "a fan-out",
                      exc_info=exc)
        slot.reply = to_reply(exc)
        if is_fatal(exc):
            slot.close = self._closing = True

    # --- output ---------------------------------------------------------------------------------

    def _slot_done(self, slot: _Slot) -> None:
        """A shard answered: flush soon if that made the head of the line ready."""
        slots = self._slots
        if slots and slots[0] is slot and not self._in_batch and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Writes every completed reply at the head of the line, in one write (rule 1)."""
        self._flush_scheduled = False
        transport = self._transport
        slots = self._slots
        if transport is None or transport.is_closing():
            return                     # closed or closing: nothing more may be written
        if slots and slots[0].reply is not None:
            out = []
            close = False
            while slots and slots[0].reply is not None:
                slot = slots.popleft()
                out.append(slot.reply)
                if slot.close:
                    close = True
                    break
            transport.writelines(out)
            if close:
                self._close(transport)
                return
            limit = self._frontend.max_output_bytes
            if limit and transport.get_write_buffer_size() > limit:
                log.warning("client %d does not read its replies (%d bytes queued, "
                            "max_output_buffer is %d): closing", self.session.client_id,
                            transport.get_write_buffer_size(), limit)
                self._closing = True
                transport.abort()
                return
        if self._close_when_idle and not slots:
            self._close(transport)
            return
        self._update_reading()

    def _close(self, transport: asyncio.Transport) -> None:
        """Closes after the buffered writes; requests still at shards are cancelled."""
        self._closing = True
        transport.close()              # connection_lost cancels the rest (rule 5)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None:
            return
        outstanding = len(self._slots)
        if self._writing_paused or self._closing or outstanding > HIGH_WATER_SLOTS:
            if not self._reading_paused:
                self._reading_paused = True
                transport.pause_reading()
        elif self._reading_paused and outstanding <= LOW_WATER_SLOTS:
            self._reading_paused = False
            transport.resume_reading()

    # --- idle clients ----------------------------------------------------------------------------

    def check_idle(self, now_s: float, timeout_s: float) -> None:
        """Closes the connection if it has been idle for `timeout_s` at `now_s` (rule 7)."""
        transport = self._transport
        if transport is None:
            return
        queued = transport.get_write_buffer_size()
        if self._active or self._slots or (queued and queued != self._output_seen):
            self._active = False
            self._idle_since_s = now_s
            self._output_seen = queued
        elif now_s - self._idle_since_s >= timeout_s:
            log.debug("client %d idle for %.1f s (timeout): closing", self.session.client_id,
                      now_s - self._idle_since_s)
            self._closing = True
            transport.abort()          # unsent replies cannot be flushed to a silent client

    # --- graceful stop ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Takes no more commands; closes once the outstanding replies are written."""
        self._closing = True
        self._close_when_idle = True
        if self._transport is None:
            return
        if not self._slots:
            self._close(self._transport)
        else:
            self._update_reading()

    def abort(self) -> None:
        """Closes at once, dropping unwritten replies (the forced step of a stop)."""
        if self._transport is not None:
            self._transport.abort()


def _address(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr or "")
