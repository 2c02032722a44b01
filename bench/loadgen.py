"""Load generator: RESP over raw sockets, one machinery for Floki and for Redis Streams.

Owns: encoding commands (`encode_command`), the two dialects that map queue/channel operations
to each server's commands (`FlokiDialect`, `RedisDialect`), a pipelined connection (`Connection`,
replies parsed by hiredis.Reader), and the producer/consumer loops that run in their own
processes (`produce`, `consume`, `produce_paced`, `consume_latency`, run by `run_jobs`).
Rules:
  1. The load generator must never be what limits a figure: commands are encoded once and
     reused (a batch is the same bytes every time it is sent; the paced producer only splices
     an 8-byte timestamp into a pre-encoded prefix), several batches are kept in flight, and
     producers and consumers run in separate processes.
  2. Both servers go through exactly the same loops; only the Dialect differs. Redis mapping:
     queue = stream, channel = consumer group, push = XADD (one message each, pipelined),
     get = XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS s >, ack = XACK.
  3. Every reply is checked: an error reply raises ServerError, a push reply must say the
     messages were stored, ack replies are summed and compared with what was delivered.
  4. The bytes in flight on one connection stay bounded (depth x batch), so blocking sendall
     and reading replies in turn cannot deadlock with the server's own flow control.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import resource
import queue as queue_mod
import select
import signal
import socket
import struct
import time
import traceback
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import hiredis

RECV_BYTES = 1 << 20             # one recv() takes up to this much
STALL_TIMEOUT_S = 30.0           # no progress for this long: the run is broken, not slow
STAMP = struct.Struct("<q")      # the paced producer's send time (monotonic ns) at body[0:8]
REDIS_FIELD = b"d"               # the one field each stream entry has
REDIS_CONSUMER = b"c"            # consumer name inside a group


class ServerError(Exception):
    """The server answered an error reply, or a reply that does not say what it must."""


# --- RESP encoding ---------------------------------------------------------------------------

def _arg_bytes(arg: bytes | str | int) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, int):
        return str(arg).encode()
    return arg.encode()


def encode_command(*args: bytes | str | int) -> bytes:
    """Returns the RESP array of bulk strings for one command (ints are sent as decimal text)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg_bytes(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


_PRINTABLE = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" * 4)
BATCH_VARIANTS = 16                  # distinct pre-encoded batches per queue (at most)
ENCODED_BUDGET_BYTES = 64 * 1024**2  # ... and at most this much encoded in all


def make_body(size_bytes: int, seed: int = 0) -> bytes:
    """Returns `size_bytes` of random printable bytes, the same for the same arguments.
    Random, so that no server gets to compress what it stores (Redis's AOF rewrite packs
    streams into compressed listpacks: identical bodies would shrink to nearly nothing)."""
    return random.Random(seed).randbytes(size_bytes).translate(_PRINTABLE)


@dataclass(frozen=True)
class Delivery:
    """One message handed to a consumer: its server id, what acks it, its body."""
    msg_id: Any          # Floki: int; Redis: b"ms-seq"
    token: bytes         # ticket (Floki) or entry id (Redis), ready to put into an ack command
    body: bytes


# --- dialects --------------------------------------------------------------------------------

class FlokiDialect:
    """Floki's commands: SET/RPUSH/HMGET/HDEL."""

    name = "floki"

    def create_commands(self, queue: str, channels: Sequence[str]) -> list[bytes]:
        """Returns the commands creating `queue` with `channels` (each answers +OK)."""
        cmds = [encode_command("SET", queue, channels[0])]
        cmds += [encode_command("SET", queue, ch, "NX") for ch in channels[1:]]
        return cmds

    def push_batch(self, queue: str, bodies: Sequence[bytes]) -> tuple[bytes, int]:
        """Returns (command bytes, number of replies) that store `bodies` in one RPUSH."""
        return encode_command("RPUSH", queue, *bodies), 1

    def push_one_prefix(self, queue: str, body_size: int) -> bytes:
        """Returns the bytes of a one-message push up to its body (body + CRLF follow)."""
        q = queue.encode()
        return b"*3\r\n$5\r\nRPUSH\r\n$%d\r\n%s\r\n$%d\r\n" % (len(q), q, body_size)

    def check_push(self, reply: Any, messages: int) -> None:
        """Raises ServerError unless `reply` says `messages` were stored."""
        if reply != messages:
            raise ServerError(f"RPUSH of {messages} answered {reply!r}")

    def get_command(self, queue: str, channel: str, count: int, block_ms: int | None) -> bytes:
        """Returns HMGET queue channel count [timeout_s]."""
        if block_ms is None:
            return encode_command("HMGET", queue, channel, count)
        return encode_command("HMGET", queue, channel, count, f"{block_ms / 1000:g}")

    def parse_get(self, reply: Any) -> list[Delivery]:
        """Returns the deliveries of an HMGET reply ([id, ticket, body] each)."""
        if not isinstance(reply, list):
            raise ServerError(f"HMGET answered {reply!r}")
        return [Delivery(m[0], str(m[1]).encode(), m[2]) for m in reply]

    def ack_command(self, queue: str, channel: str, tokens: Sequence[bytes]) -> bytes:
        """Returns HDEL queue channel ticket..."""
        return encode_command("HDEL", queue, channel, *tokens)


class RedisDialect:
    """Redis Streams: queue = stream, channel = consumer group."""

    name = "redis"

    def create_commands(self, queue: str, channels: Sequence[str]) -> list[bytes]:
        """Returns the commands creating stream `queue` with a group per channel, each at the
        stream's end ("$"): like a new Floki channel it sees only messages pushed later."""
        cmds = [encode_command("XGROUP", "CREATE", queue, channels[0], "$", "MKSTREAM")]
        cmds += [encode_command("XGROUP", "CREATE", queue, ch, "$") for ch in channels[1:]]
        return cmds

    def push_batch(self, queue: str, bodies: Sequence[bytes]) -> tuple[bytes, int]:
        """Returns (bytes, replies): one XADD per message, pipelined (Redis has no multi-entry
        XADD)."""
        return b"".join(encode_command("XADD", queue, "*", REDIS_FIELD, b) for b in bodies), \
            len(bodies)

    def push_one_prefix(self, queue: str, body_size: int) -> bytes:
        q = queue.encode()
        return b"*5\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n*\r\n$%d\r\n%s\r\n$%d\r\n" % (
            len(q), q, len(REDIS_FIELD), REDIS_FIELD, body_size)

    def check_push(self, reply: Any, messages: int) -> None:
        """XADD answers the new entry id; `messages` is always 1 per reply here."""
        if not isinstance(reply, bytes) or b"-" not in reply:
            raise ServerError(f"XADD answered {reply!r}")

    def get_command(self, queue: str, channel: str, count: int, block_ms: int | None) -> bytes:
        args: list[bytes | str | int] = ["XREADGROUP", "GROUP", channel, REDIS_CONSUMER,
                                         "COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        return encode_command(*args, "STREAMS", queue, ">")

    def parse_get(self, reply: Any) -> list[Delivery]:
        """Returns the deliveries of an XREADGROUP reply ([[stream, [[id, [f, v]], ...]]] or
        nil when nothing came)."""
        if reply is None:
            return []
        if not isinstance(reply, list):
            raise ServerError(f"XREADGROUP answered {reply!r}")
        out: list[Delivery] = []
        for _stream, entries in reply:
            for entry_id, fields in entries:
                out.append(Delivery(entry_id, entry_id, fields[1]))
        return out

    def ack_command(self, queue: str, channel: str, tokens: Sequence[bytes]) -> bytes:
        return encode_command("XACK", queue, channel, *tokens)


DIALECTS = {"floki": FlokiDialect(), "redis": RedisDialect()}


# --- connection ------------------------------------------------------------------------------

class Connection:
    """One TCP connection: blocking sends, replies parsed by hiredis.Reader."""

    def __init__(self, host: str, port: int, connect_timeout_s: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=connect_timeout_s)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        self.buf = bytearray(RECV_BYTES)
        self.view = memoryview(self.buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        n = self.sock.recv_into(self.view)
        if n == 0:
            raise ConnectionError("server closed the connection")
        self.reader.feed(self.view, 0, n)

    def next_reply(self) -> Any:
        """Returns the next reply, waiting for it. Raises ServerError for an error reply,
        ConnectionError if the server closed the connection."""
        reply = self.reader.gets()
        while reply is False:
            self._fill()
            reply = self.reader.gets()
        if isinstance(reply, hiredis.ReplyError):
            raise ServerError(str(reply))
        return reply

    def wait_readable(self, timeout_s: float) -> bool:
        """True if a reply is buffered or bytes arrive within `timeout_s`."""
        if self.reader.has_data():
            return True
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout_s))
        return bool(readable)

    def replies_ready(self) -> list[Any]:
        """Returns the replies that can be had without waiting (reads once if bytes wait)."""
        out: list[Any] = []
        readable, _, _ = select.select([self.sock], [], [], 0)
        if readable:
            self._fill()
        reply = self.reader.gets()
        while reply is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise ServerError(str(reply))
            out.append(reply)
            reply = self.reader.gets()
        return out

    def call(self, command: bytes) -> Any:
        """Sends one command and returns its reply (ServerError on an error reply)."""
        self.send(command)
        return self.next_reply()

    def close(self) -> None:
        self.sock.close()


# --- jobs (each runs in its own process) -----------------------------------------------------

@dataclass
class ProduceJob:
    """Push `messages_per_queue` bodies of `body_size` bytes into each of `queues`, `batch`
    per command (Floki) or pipelined group (Redis), `depth` batches in flight."""
    host: str
    port: int
    dialect: str
    queues: list[str]
    messages_per_queue: int
    body_size: int
    batch: int
    depth: int


@dataclass
class ConsumeJob:
    """Get and ack every message of `queues` on `channel` until `expected_per_queue` arrived
    from each; `count` per get, `depth` gets in flight; ids are checked when `track_ids`."""
    host: str
    port: int
    dialect: str
    queues: list[str]
    channel: str
    expected_per_queue: int
    count: int
    depth: int
    track_ids: bool = True


@dataclass
class PacedProduceJob:
    """Push one message per command at `rate_per_s` for `duration_s`; each body starts with
    its send time (time.monotonic_ns, the same clock in every process)."""
    host: str
    port: int
    dialect: str
    queue: str
    rate_per_s: float
    duration_s: float
    body_size: int


@dataclass
class LatencyConsumeJob:
    """Long-poll `channel` of `queue` (`count` per get, `block_ms` wait) and record each
    message's end-to-end latency; stops once it has every message the producer sent."""
    host: str
    port: int
    dialect: str
    queue: str
    channel: str
    count: int
    block_ms: int
    warmup_ns: int          # messages stamped before go + warmup_ns are not recorded
    max_wait_s: float       # give up this long after the producer finished


@dataclass
class Shared:
    """What a job shares with the parent and its siblings (set up by run_jobs)."""
    counter: Any                   # progress: messages done so far (RawValue 'q')
    go: Any                        # Event: set by the parent when every job is connected
    go_ns: Any                     # RawValue 'q': monotonic_ns at go
    produced_total: Any            # RawValue 'q': -1 until the paced producer finished


def _batches(dialect: Any, queues: list[str], per_queue: int, body_size: int,
             batch: int) -> Iterator[tuple[bytes, int, int]]:
    """Returns an iterator of (command bytes, replies, messages) round-robin over `queues`.
    Each queue gets a few batch variants with distinct bodies, encoded once up front and then
    cycled (rule 1). The encoding happens HERE, not at the first next(): a producer calls this
    before its timed phase starts (with 1,000 queues it is ~60 MB of commands)."""
    batch_bytes = max(1, batch * (body_size + 16))
    variants = max(1, min(BATCH_VARIANTS, ENCODED_BUDGET_BYTES // (batch_bytes * len(queues))))
    pool = [make_body(body_size, seed) for seed in range(variants * batch)]
    full = {q: [dialect.push_batch(q, pool[v * batch:(v + 1) * batch])
                for v in range(variants)] for q in queues}
    rest = per_queue % batch
    tail = {q: dialect.push_batch(q, pool[:rest]) for q in queues} if rest else {}

    def cycle() -> Iterator[tuple[bytes, int, int]]:
        for i in range(per_queue // batch):
            for q in queues:
                cmd, replies = full[q][i % variants]
                yield cmd, replies, batch
        if rest:
            for q in queues:
                cmd, replies = tail[q]
                yield cmd, replies, rest
    return cycle()


def produce(job: ProduceJob, shared: Shared, ready: Callable[[], None]) -> dict:
    """Runs a ProduceJob. Returns {"messages", "bytes", "end_ns"}. Raises ServerError."""
    dialect = DIALECTS[job.dialect]
    conn = Connection(job.host, job.port)
    batches = _batches(dialect, job.queues, job.messages_per_queue, job.body_size, job.batch)
    inflight: deque[list[int]] = deque()     # [replies still due, messages] per batch sent
    done = 0
    ready()
    shared.go.wait()
    last_progress = time.monotonic()

    def take_reply() -> None:
        nonlocal done, last_progress
        reply = conn.next_reply()
        head = inflight[0]
        dialect.check_push(reply, head[1])
        head[0] -= 1
        if head[0] == 0:
            inflight.popleft()
            done += head[1]
            shared.counter.value = done
            last_progress = time.monotonic()

    for cmd, replies, messages in batches:
        while len(inflight) >= job.depth:
            take_reply()
        conn.send(cmd)
        inflight.append([replies, messages])
    while inflight:
        take_reply()
    end_ns = time.monotonic_ns()
    conn.close()
    return {"messages": done, "bytes": done * job.body_size, "end_ns": end_ns}


@dataclass
class _QueueState:
    name: str
    get_cmd: bytes
    delivered: int = 0
    requested: int = 0                 # messages asked for by gets still in flight
    seen: set = field(default_factory=set)
    duplicates: int = 0


def consume(job: ConsumeJob, shared: Shared, ready: Callable[[], None]) -> dict:
    """Runs a ConsumeJob. Returns {"delivered", "acked", "unique", "duplicates", "bytes",
    "end_ns"}. Raises ServerError, TimeoutError (no progress for STALL_TIMEOUT_S)."""
    dialect = DIALECTS[job.dialect]
    conn = Connection(job.host, job.port)
    states = [_QueueState(q, dialect.get_command(q, job.channel, job.count, None))
              for q in job.queues]
    expected = job.expected_per_queue
    open_states = deque(states)        # queues still owed messages, served round-robin
    inflight: deque[tuple[str, _QueueState | None, int]] = deque()   # ("get"|"ack", state, n)
    gets_inflight = 0
    delivered = acked = body_bytes = 0
    ready()
    shared.go.wait()
    last_progress = time.monotonic()

    def send_gets() -> None:
        nonlocal gets_inflight
        tries = len(open_states)
        while gets_inflight < job.depth and tries > 0:
            state = open_states[0]
            open_states.rotate(-1)
            tries -= 1
            if state.requested >= expected - state.delivered:
                continue                    # enough asked already; don't ask for nothing
            conn.send(state.get_cmd)
            inflight.append(("get", state, job.count))
            state.requested += job.count
            gets_inflight += 1

    send_gets()
    while inflight:
        kind, state, n = inflight.popleft()
        reply = conn.next_reply()
        if kind == "ack":
            acked += reply
            continue
        gets_inflight -= 1
        state.requested -= n
        deliveries = dialect.parse_get(reply)
        if deliveries:
            last_progress = time.monotonic()
            tokens = [d.token for d in deliveries]
            conn.send(dialect.ack_command(state.name, job.channel, tokens))
            inflight.append(("ack", None, len(tokens)))
            state.delivered += len(deliveries)
            delivered += len(deliveries)
            body_bytes += sum(len(d.body) for d in deliveries)
            if job.track_ids:
                before = len(state.seen)
                state.seen.update(d.msg_id for d in deliveries)
                state.duplicates += len(deliveries) - (len(state.seen) - before)
            if state.delivered >= expected and state in open_states:
                open_states.remove(state)
            shared.counter.value = delivered
        elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
            raise TimeoutError(f"{job.channel}: no message for {STALL_TIMEOUT_S} s with "
                               f"{delivered} of {expected * len(states)} delivered")
        send_gets()
    end_ns = time.monotonic_ns()
    conn.close()
    return {"delivered": delivered, "acked": acked, "bytes": body_bytes, "end_ns": end_ns,
            "unique": sum(len(s.seen) for s in states) if job.track_ids else None,
            "duplicates": sum(s.duplicates for s in states),
            "short_queues": sum(1 for s in states if s.delivered != expected)}


def produce_paced(job: PacedProduceJob, shared: Shared, ready: Callable[[], None]) -> dict:
    """Runs a PacedProduceJob (open loop: sends when a message is due, whether or not earlier
    replies came). Returns {"messages", "end_ns", "behind_max_ms"}; also sets
    shared.produced_total so consumers know when they have everything."""
    dialect = DIALECTS[job.dialect]
    conn = Connection(job.host, job.port)
    prefix = dialect.push_one_prefix(job.queue, job.body_size)
    pad = make_body(job.body_size - STAMP.size) + b"\r\n"
    interval_ns = int(1e9 / job.rate_per_s)
    total = int(job.rate_per_s * job.duration_s)
    ready()
    shared.go.wait()
    start_ns = shared.go_ns.value
    sent = answered = 0
    behind_max_ns = 0
    while sent < total:
        now = time.monotonic_ns()
        due = start_ns + sent * interval_ns
        if due <= now:
            behind_max_ns = max(behind_max_ns, now - due)
            conn.send(prefix + STAMP.pack(now) + pad)
            sent += 1
            shared.counter.value = sent
            continue
        for reply in conn.replies_ready():
            dialect.check_push(reply, 1)
            answered += 1
        wait_s = (due - time.monotonic_ns()) / 1e9
        if wait_s > 0:
            conn.wait_readable(wait_s)      # sleeps in select(): wakes early for replies
    while answered < sent:
        dialect.check_push(conn.next_reply(), 1)
        answered += 1
    shared.produced_total.value = sent
    conn.close()
    return {"messages": sent, "end_ns": time.monotonic_ns(), "behind_max_ms": behind_max_ns / 1e6}


def consume_latency(job: LatencyConsumeJob, shared: Shared, ready: Callable[[], None]) -> dict:
    """Runs a LatencyConsumeJob. Returns {"delivered", "acked", "latencies_us" (array of
    int64 bytes, the recorded samples)}. Raises ServerError."""
    dialect = DIALECTS[job.dialect]
    conn = Connection(job.host, job.port)
    get_cmd = dialect.get_command(job.queue, job.channel, job.count, job.block_ms)
    latencies = array("q")
    delivered = acked = 0
    acks_due = 0
    ready()
    shared.go.wait()
    record_from_ns = shared.go_ns.value + job.warmup_ns
    gave_up_at: float | None = None
    while True:
        total = shared.produced_total.value
        if total >= 0 and delivered >= total:
            break
        if total >= 0:
            gave_up_at = gave_up_at or time.monotonic() + job.max_wait_s
            if time.monotonic() > gave_up_at:
                break
        conn.send(get_cmd)
        # acks sent before this get are answered before it (replies keep request order)
        while acks_due:
            acked += conn.next_reply()
            acks_due -= 1
        deliveries = dialect.parse_get(conn.next_reply())
        now = time.monotonic_ns()
        if not deliveries:
            continue
        for d in deliveries:
            stamp = STAMP.unpack_from(d.body)[0]
            if stamp >= record_from_ns:
                latencies.append((now - stamp) // 1000)
        delivered += len(deliveries)
        shared.counter.value = delivered
        conn.send(dialect.ack_command(job.queue, job.channel, [d.token for d in deliveries]))
        acks_due += 1
    while acks_due:
        acked += conn.next_reply()
        acks_due -= 1
    conn.close()
    return {"delivered": delivered, "acked": acked, "latencies_us": latencies.tobytes(),
            "end_ns": time.monotonic_ns()}


JOB_RUNNERS: dict[type, Callable[[Any, Shared, Callable[[], None]], dict]] = {
    ProduceJob: produce, ConsumeJob: consume,
    PacedProduceJob: produce_paced, LatencyConsumeJob: consume_latency,
}


# --- running jobs in processes ---------------------------------------------------------------

def _job_main(index: int, job: Any, shared: Shared, results: Any) -> None:
    # The parent turns SIGTERM/SIGHUP into KeyboardInterrupt for its cleanup; a job process
    # has nothing to clean up and must simply die when the parent terminates it.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        result = JOB_RUNNERS[type(job)](job, shared, lambda: results.put(("ready", index, None)))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu_s"] = usage.ru_utime + usage.ru_stime    # is the load generator busy?
        results.put(("done", index, result))
    except KeyboardInterrupt:
        pass
    except BaseException:   # noqa: BLE001 - reported to the parent, which raises it
        results.put(("error", index, traceback.format_exc()))


class JobFailed(Exception):
    """A job process raised, died or did not finish in time."""


def run_jobs(jobs: Sequence[Any], progress: Callable[[int], None] | None = None,
             timeout_s: float = 3600.0, connect_timeout_s: float = 30.0) -> tuple[int, list]:
    """Runs each job in its own process; they all start at once when every one is connected.

    `progress(n)` is called with the sum of the jobs' counters a few times a second.
    Returns (go_ns, results in job order), go_ns being time.monotonic_ns() at the start.
    Raises JobFailed (every job process is stopped first).
    """
    ctx = multiprocessing.get_context("fork")
    counters = [ctx.RawValue("q", 0) for _ in jobs]
    go, go_ns, produced_total = ctx.Event(), ctx.RawValue("q", 0), ctx.RawValue("q", -1)
    results = ctx.Queue()
    procs = []
    for i, job in enumerate(jobs):
        shared = Shared(counters[i], go, go_ns, produced_total)
        procs.append(ctx.Process(target=_job_main, args=(i, job, shared, results), daemon=True,
                                 name=f"bench-{type(job).__name__}-{i}"))
    out: list[Any] = [None] * len(jobs)
    try:
        for proc in procs:
            proc.start()
        _collect(procs, results, out, "ready", time.monotonic() + connect_timeout_s)
        go_ns.value = time.monotonic_ns()
        go.set()
        deadline = time.monotonic() + timeout_s
        while any(r is None for r in out):
            _collect(procs, results, out, "done", min(deadline, time.monotonic() + 0.2),
                     quiet_timeout=True)
            if progress is not None:
                progress(sum(c.value for c in counters))
            if time.monotonic() > deadline:
                raise JobFailed(f"jobs did not finish within {timeout_s} s")
        if progress is not None:
            progress(sum(c.value for c in counters))
        return go_ns.value, out
    finally:
        finished = all(r is not None for r in out)
        for proc in procs:
            proc.join(2.0 if finished else 0)   # a finished job is only flushing its result
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()


def _collect(procs: list, results: Any, out: list, want: str, until: float,
             quiet_timeout: bool = False) -> None:
    """Reads job messages until every job sent `want` or `until` passes; "done" results land
    in `out`. Raises JobFailed on an error message or a job that died silently."""
    waiting = {i for i in range(len(procs))} if want == "ready" else set()
    while True:
        remaining = until - time.monotonic()
        try:
            kind, index, payload = results.get(timeout=max(0.01, remaining))
        except queue_mod.Empty:
            dead = [p.name for i, p in enumerate(procs)
                    if not p.is_alive() and out[i] is None]
            if dead:
                raise JobFailed(f"job process died without a result: {dead}") from None
            if want == "ready" and waiting:
                if time.monotonic() >= until:
                    raise JobFailed("jobs could not connect in time") from None
                continue
            if quiet_timeout:
                return
            raise JobFailed("timed out waiting for jobs") from None
        if kind == "error":
            raise JobFailed(f"job {procs[index].name} failed:\n{payload}")
        if kind == "ready":
            waiting.discard(index)
            if want == "ready" and not waiting:
                return
        elif kind == "done":
            out[index] = payload
            if want == "done" and (time.monotonic() >= until
                                   or all(r is not None for r in out)):
                return
