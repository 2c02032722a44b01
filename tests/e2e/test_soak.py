"""Soak: producers and consumers on several queues while shards and the frontend die by SIGKILL.

RELIABILITY.md section 3, tests A1 and A2, Jepsen style: a history recorder logs every client
call, a checker decides afterwards whether anything was lost, invented, mangled or renumbered.
Rules:
  1. Every client call goes through History.call, which logs (process, op, args, outcome, reply
     or error, start and end time). Outcomes: OK (a reply arrived), FAIL (a definite error reply:
     the call did nothing) or INDETERMINATE (no reply: connection lost, timeout, or `shard
     unavailable`, which the frontend also answers for requests the dead shard may have run).
     Clients never retry on their own (redis-py's retries are off): a retried RPUSH may store
     its bodies twice, legitimately, and would hide a duplication bug.
  2. Bodies are unique and self-checking (`queue:producer:seq:pad:crc32`), so a lost,
     duplicated, misrouted, invented or mangled body is decidable from the history alone.
  3. check_history only reads the history; the soak test asserts on its Report. Each invariant
     is also run against a hand-made history that breaks it, so none of them can pass vacuously.
Longer runs: `pytest tests/e2e/test_soak.py --cycles 200 [--soak-seed N] -s`.
"""
from __future__ import annotations

import enum
import json
import os
import random
import signal
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from floki.routing import shard_for
from helpers import process_alive

SHARDS = 2
QUEUES_PER_SHARD = 2
PRODUCERS_PER_QUEUE = 2
# "solo" has one consumer, so its delivery order is that consumer's and is checked;
# "shared" has two consumers splitting its messages (order between them is not defined).
CHANNEL_CONSUMERS = {"solo": 1, "shared": 2}
BATCH_MAX = 8                   # bodies per RPUSH: 1..BATCH_MAX
PRODUCER_PAUSE_S = 0.03         # a producer sleeps up to this between pushes (keeps CI load low)
RETRY_PAUSE_S = (0.05, 0.15)    # sleep after a failed call (the broker is restarting)
GET_COUNT = 50
LONG_POLL_S = 1                 # HMGET timeout: short, so a consumer notices stop quickly
MESSAGE_TIMEOUT_S = 2.0         # redelivery of deliveries whose reply or ack was lost
SOCKET_TIMEOUT_S = 5.0          # > LONG_POLL_S + shard_timeout: an answer always comes first
KILL_GAP_S = (0.2, 1.0)         # traffic runs this long (uniform) between restarts and kills
RESTART_TIMEOUT_S = 30.0        # generous: the machine is small and shared
FLOW_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 90.0
QUIET_POLLS = 3                 # consecutive empty long polls before a consumer counts as drained
SERVER_SETTINGS = {
    "shards": SHARDS,
    "queue_message_timeout": f"{MESSAGE_TIMEOUT_S}s",
    "queue_segment_size": "64kb",   # many segment rolls and deletions to crash in
}


# --- bodies ----------------------------------------------------------------------------------

def make_body(queue: str, producer: str, seq: int) -> bytes:
    """Returns the unique, self-checking body number `seq` of `producer` on `queue`."""
    pad = format(seq * 2654435761 % 2**32, "08x") * (seq % 7)      # varied lengths
    prefix = f"{queue}:{producer}:{seq}:{pad}"
    return f"{prefix}:{zlib.crc32(prefix.encode()):08x}".encode()


def parse_body(body: Any) -> tuple[str, str, int] | None:
    """Returns (queue, producer, seq) of a body make_body wrote, or None if it is mangled."""
    if not isinstance(body, bytes):
        return None
    try:
        prefix, _crc = body.decode("ascii").rsplit(":", 1)
        queue, producer, seq, _pad = prefix.split(":")
        seq_number = int(seq)
    except (UnicodeDecodeError, ValueError):
        return None
    if make_body(queue, producer, seq_number) != body:     # checks the pad and the crc
        return None
    return queue, producer, seq_number


# --- the history recorder --------------------------------------------------------------------

class Outcome(enum.Enum):
    OK = "ok"                        # the reply arrived (it is the op's value)
    FAIL = "fail"                    # a definite error reply: nothing happened
    INDETERMINATE = "indeterminate"  # no reply: it may or may not have happened


@dataclass
class Op:
    process: str          # the thread that made the call
    name: str             # "RPUSH", "HMGET", "HDEL"
    queue: str
    args: tuple           # everything after the queue name
    t_start: float        # time.monotonic() just before the call
    t_end: float          # ... and just after it returned or raised
    outcome: Outcome
    value: Any            # the reply (OK) or the error text


@dataclass
class History:
    """Every client call of a run, in the order the calls returned (per process: call order)."""
    ops: list[Op] = field(default_factory=list)
    nemesis: list[str] = field(default_factory=list)    # what the kill loop did, for reports
    error_kinds: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, process: str, client: redis.Redis, name: str, queue: str, *args: Any) -> Op:
        """Runs one command on `client` and logs it. Returns the logged Op (never raises
        redis errors: they are outcomes)."""
        t_start = time.monotonic()
        try:
            value: Any = client.execute_command(name, queue, *args)
        except redis.RedisError as exc:
            value = exc
        return self._log(process, name, queue, args, t_start, value)

    def call_pipelined(self, process: str, client: redis.Redis,
                       commands: list[tuple[str, str, tuple]]) -> list[Op]:
        """Sends `commands` ((name, queue, args) each) in one pipeline and logs each of them.
        Returns their Ops, in order. If the connection fails, every one is indeterminate."""
        pipe = client.pipeline(transaction=False)
        for name, queue, args in commands:
            pipe.execute_command(name, queue, *args)
        t_start = time.monotonic()
        try:
            values: list[Any] = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            values = [exc] * len(commands)
        return [self._log(process, name, queue, args, t_start, value)
                for (name, queue, args), value in zip(commands, values)]

    def _log(self, process: str, name: str, queue: str, args: tuple, t_start: float,
             value: Any) -> Op:
        if isinstance(value, redis.ResponseError):
            text = str(value)
            # The frontend fails requests in flight to a shard that died; it may have run them.
            if "shard unavailable" in text:
                outcome, kind = Outcome.INDETERMINATE, "shard unavailable"
            else:
                outcome, kind = Outcome.FAIL, f"error reply {text[:40]!r}"
            value = text
        elif isinstance(value, redis.RedisError):   # refused, reset, timeout, bad framing
            outcome, kind = Outcome.INDETERMINATE, type(value).__name__
            value = f"{kind}: {value}"
        else:
            outcome, kind = Outcome.OK, None
            if name == "HMGET" and isinstance(value, list):
                value = [tuple(m) if isinstance(m, (list, tuple)) else m for m in value]
        op = Op(process, name, queue, args, t_start, time.monotonic(), outcome, value)
        with self._lock:
            self.ops.append(op)
            if kind is not None:
                self.error_kinds[kind] += 1
        return op


# --- the checker -----------------------------------------------------------------------------

@dataclass
class Report:
    pushes_acked: int = 0           # RPUSH calls whose integer reply arrived
    messages_acked: int = 0         # bodies in them
    pushes_indeterminate: int = 0   # RPUSH calls without a reply
    indeterminate_stored: int = 0   # bodies of those that were delivered (stored after all)
    deliveries: int = 0             # (id, ticket, body) triples received
    duplicates: int = 0             # deliveries of a (queue, channel, id) after its first
    late_first: int = 0             # first deliveries out of id order after a lost HMGET reply
    lost: int = 0                   # (stored body, channel) pairs never delivered
    corrupt: int = 0                # bodies served that differ from every body sent to the queue
    violations: list[str] = field(default_factory=list)     # each distinct text once
    _distinct: set[str] = field(default_factory=set, repr=False)

    def violate(self, text: str) -> None:
        if text not in self._distinct:
            self._distinct.add(text)
            self.violations.append(text)


def check_history(history: History, channels: dict[str, list[str]],
                  ordered: set[tuple[str, str]]) -> Report:
    """Checks a run's history. `channels`: queue -> its channels (all created before the first
    push); `ordered`: the (queue, channel) pairs read by one consumer, whose first deliveries
    must come in id order.

    Returns the Report; report.violations is empty when every invariant holds:
      - every acknowledged body is delivered on every channel of its queue (at least once);
      - an unacknowledged RPUSH is stored all or nothing, and if stored, seen on every channel;
      - no body is served that was not sent to that queue (mangled, invented or misrouted);
      - per queue an id always carries the same body and a body always the same id (ids are
        never reused and nothing is stored twice); the ids of one RPUSH increase in argument
        order; a push that started after another push was acknowledged gets higher ids;
      - on an ordered channel, first deliveries come in increasing id order, except for ids
        that a lost HMGET reply may have carried (they come back after their timeout): an id
        handed out first in a lost reply is above every id the consumer had seen before that
        HMGET started, so a late first delivery must be above the highest id seen before the
        channel's first lost reply;
      - RPUSH replies count the bodies sent, and no call gets a definite error reply.
    """
    report = Report()
    sent: set[bytes] = set()                               # every body any RPUSH carried
    id_of: dict[tuple[str, bytes], int] = {}               # (queue, body) -> id
    body_of: dict[tuple[str, int], bytes] = {}             # (queue, id) -> body
    seen: dict[tuple[str, str], set[int]] = defaultdict(set)
    high: dict[tuple[str, str], int] = defaultdict(int)    # highest first-delivered id
    # (queue, channel) -> highest first-delivered id when its first HMGET reply was lost
    lost_floor: dict[tuple[str, str], int] = {}
    for op in history.ops:
        if op.outcome is Outcome.FAIL:
            report.violate(f"{op.process}: {op.name} {op.queue} got an error reply: {op.value}")
        if op.name == "RPUSH":
            sent.update(op.args)
            if op.outcome is Outcome.OK:
                report.pushes_acked += 1
                report.messages_acked += len(op.args)
                if op.value != len(op.args):
                    report.violate(f"{op.process}: RPUSH of {len(op.args)} replied {op.value!r}")
            elif op.outcome is Outcome.INDETERMINATE:
                report.pushes_indeterminate += 1

    for op in history.ops:
        if op.name != "HMGET":
            continue
        queue, channel = op.queue, op.args[0]
        key = (queue, channel)
        if op.outcome is not Outcome.OK:
            lost_floor.setdefault(key, high[key])
            continue
        if not isinstance(op.value, list):
            report.violate(f"{op.process}: HMGET replied {op.value!r:.80}, not an array")
            continue
        for message in op.value:
            report.deliveries += 1
            if not (isinstance(message, tuple) and len(message) == 3
                    and isinstance(message[0], int) and isinstance(message[1], int)):
                report.corrupt += 1
                report.violate(f"{op.process}: malformed message in an HMGET reply: {message!r}")
                continue
            id_, _ticket, body = message
            parsed = parse_body(body)
            if parsed is None or body not in sent or parsed[0] != queue:
                report.corrupt += 1
                why = ("mangled" if parsed is None else "never sent" if body not in sent
                       else f"sent to {parsed[0]}")
                report.violate(f"{queue}/{channel}: id {id_} served a body that was {why}: "
                               f"{body!r:.120}")
                continue
            known_body = body_of.setdefault((queue, id_), body)
            if known_body != body:
                report.violate(f"{queue}: id {id_} served two bodies: {known_body!r:.80} and "
                               f"{body!r:.80} (id reused)")
            known_id = id_of.setdefault((queue, body), id_)
            if known_id != id_:
                report.violate(f"{queue}: body {body!r:.80} stored twice, ids {known_id} and "
                               f"{id_}")
            if id_ in seen[key]:
                report.duplicates += 1
                continue
            seen[key].add(id_)
            if key in ordered:
                if id_ < high[key]:
                    if id_ > lost_floor.get(key, id_):
                        report.late_first += 1
                    else:
                        report.violate(f"{queue}/{channel}: first delivery of id {id_} after "
                                       f"id {high[key]}, and no lost HMGET reply can have "
                                       f"carried it")
                high[key] = max(high[key], id_)

    pushes_by_queue: dict[str, list[tuple[Op, list[int | None]]]] = defaultdict(list)
    for op in history.ops:
        if op.name != "RPUSH":
            continue
        queue = op.queue
        ids = [id_of.get((queue, body)) for body in op.args]
        stored = [id_ is not None for id_ in ids]
        if op.outcome is Outcome.OK:
            missing = len(channels[queue]) * len(op.args) - sum(
                1 for body, id_ in zip(op.args, ids) for ch in channels[queue]
                if id_ is not None and id_ in seen[(queue, ch)])
            if missing:
                report.lost += missing
                report.violate(f"{op.process}: acknowledged RPUSH to {queue} at "
                               f"{op.t_end:.3f}: {missing} (body, channel) deliveries missing "
                               f"(ids {ids})")
        elif any(stored):
            report.indeterminate_stored += sum(stored)
            if not all(stored):
                report.violate(f"{op.process}: unacknowledged RPUSH to {queue} partly stored "
                               f"(ids {ids}): a push is all or nothing")
            for body, id_ in zip(op.args, ids):
                absent = [ch for ch in channels[queue]
                          if id_ is not None and id_ not in seen[(queue, ch)]]
                if absent:
                    report.lost += len(absent)
                    report.violate(f"{queue}: id {id_} of an unacknowledged RPUSH was delivered "
                                   f"on some channels but never on {absent}")
            if op.outcome is Outcome.FAIL:
                report.violate(f"{op.process}: RPUSH to {queue} was refused but stored")
        known = [id_ for id_ in ids if id_ is not None]
        if known != sorted(set(known)):
            report.violate(f"{op.process}: RPUSH to {queue} stored its bodies out of order: "
                           f"ids {ids}")
        if known:
            pushes_by_queue[queue].append((op, known))

    # Real-time order: a push that started after another push's reply arrived got higher ids
    # (across restarts too: ids never go back). Acked pushes' reply times vs all pushes' starts.
    for queue, pushes in pushes_by_queue.items():
        acked = sorted((op.t_end, max(ids)) for op, ids in pushes if op.outcome is Outcome.OK)
        started = sorted((op.t_start, min(ids), op.process) for op, ids in pushes)
        before, index = 0, 0
        for t_start, first_id, process in started:
            while index < len(acked) and acked[index][0] < t_start:
                before = max(before, acked[index][1])
                index += 1
            if first_id <= before:
                report.violate(f"{process}: RPUSH to {queue} started at {t_start:.3f} got id "
                               f"{first_id}, not above id {before} acknowledged before it")
    return report


# --- the workload ----------------------------------------------------------------------------

class Worker(threading.Thread):
    """A producer or consumer with its own client; reconnects (redis-py does) after errors."""

    def __init__(self, server, history: History, name: str, seed: int, protocol: int):
        super().__init__(name=name, daemon=True)
        self.server, self.history = server, history
        self.rng = random.Random(f"{seed}/{name}")
        self.protocol = protocol
        self.stop = threading.Event()
        self.last_ok_start = 0.0        # start of the last call that got a reply
        self.crash: BaseException | None = None

    def client(self) -> redis.Redis:
        return self.server.client(protocol=self.protocol, socket_timeout=SOCKET_TIMEOUT_S,
                                  socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))

    def call(self, client: redis.Redis, name: str, queue: str, *args: Any) -> Op:
        op = self.history.call(self.name, client, name, queue, *args)
        if op.outcome is Outcome.OK:
            self.last_ok_start = op.t_start
        else:
            time.sleep(self.rng.uniform(*RETRY_PAUSE_S))
        return op

    def run(self) -> None:
        try:
            client = self.client()
            try:
                self.work(client)
            finally:
                client.close()
        except BaseException as exc:   # a bug in the test itself: reported by the test
            self.crash = exc

    def work(self, client: redis.Redis) -> None:
        raise NotImplementedError


class Producer(Worker):
    def __init__(self, server, history: History, queue: str, number: int, seed: int):
        super().__init__(server, history, f"p{number}", seed, protocol=3)
        self.queue = queue
        self.pipelined = number % 2 == 1

    def work(self, client: redis.Redis) -> None:
        seq = 0
        while not self.stop.is_set():
            # Odd producers pipeline a few pushes of different sizes: a reply that reached the
            # wrong request (or the wrong client after a reconnect) shows as a wrong count.
            commands = []
            for _ in range(self.rng.randint(2, 4) if self.pipelined else 1):
                count = self.rng.randint(1, BATCH_MAX)
                bodies = tuple(make_body(self.queue, self.name, seq + i) for i in range(count))
                seq += count
                commands.append(("RPUSH", self.queue, bodies))
            ops = self.history.call_pipelined(self.name, client, commands)
            if all(op.outcome is Outcome.OK for op in ops):
                self.last_ok_start = ops[0].t_start
                time.sleep(self.rng.uniform(0, PRODUCER_PAUSE_S))
            else:
                time.sleep(self.rng.uniform(*RETRY_PAUSE_S))


class Consumer(Worker):
    def __init__(self, server, history: History, queue: str, channel: str, number: int,
                 seed: int):
        # Half the consumers speak RESP2: reconnects must work with both protocols.
        super().__init__(server, history, f"c{number}", seed, protocol=2 + number % 2)
        self.queue, self.channel = queue, channel
        self.quiet_since: float | None = None   # start of the current run of empty polls
        self.empty_polls = 0

    def work(self, client: redis.Redis) -> None:
        while not self.stop.is_set():
            op = self.call(client, "HMGET", self.queue, self.channel, GET_COUNT, LONG_POLL_S)
            if op.outcome is not Outcome.OK:
                self.quiet_since, self.empty_polls = None, 0
            elif not op.value:
                if self.quiet_since is None:
                    self.quiet_since = op.t_start
                self.empty_polls += 1
            else:
                self.quiet_since, self.empty_polls = None, 0
                # An ack that fails is fine: the message comes again after its timeout.
                self.call(client, "HDEL", self.queue, self.channel, *[m[1] for m in op.value])

    def drained_since(self, t: float, now: float) -> bool:
        """True after at least QUIET_POLLS empty polls in a row that have lasted, since `t`,
        longer than a message timeout (so any delivery lost in a reply before them is back)."""
        quiet = self.quiet_since
        return (quiet is not None and self.empty_polls >= QUIET_POLLS
                and now - max(quiet, t) > MESSAGE_TIMEOUT_S + LONG_POLL_S)


def queue_names() -> list[str]:
    """Returns QUEUES_PER_SHARD queue names owned by each shard."""
    names: list[str] = []
    for shard in range(SHARDS):
        names += [n for n in (f"soak{i}" for i in range(1000))
                  if shard_for(n, SHARDS) == shard][:QUEUES_PER_SHARD]
    return names


# --- the nemesis ------------------------------------------------------------------------------

def child_pid(server, target: str) -> int | None:
    pids = server.pids()
    return pids["frontend"] if target == "frontend" else pids["shards"][int(target.split()[1])]


def kill(server, target: str) -> int:
    """SIGKILLs the running `target` ("shard I" or "frontend"). Returns the pid killed."""
    pid = server.wait_until(lambda: child_pid(server, target), RESTART_TIMEOUT_S,
                            message=f"{target} running")
    os.kill(pid, signal.SIGKILL)
    return pid


def restarted(server, target: str, old_pid: int) -> int | None:
    pid = child_pid(server, target)
    return pid if pid not in (None, old_pid) and process_alive(pid) else None


def channels_settled(server, client: redis.Redis, queues: list[str]) -> bool:
    """True when INFO shows every channel of `queues` at its queue's head with nothing in
    flight."""
    info = json.loads(client.execute_command("INFO", "queues")[0])
    return all(ch["backlog"] == 0 and ch["in_flight"] == 0
               for name in queues for ch in info[name]["channels"].values())


def run_soak(server, cycles: int, seed: int) -> tuple[History, dict, dict]:
    """Runs the workload under `cycles` random SIGKILLs, then drains. Returns (history,
    channels by queue, figures of the run)."""
    rng = random.Random(seed)
    history = History()
    queues = queue_names()
    channels = {queue: list(CHANNEL_CONSUMERS) for queue in queues}
    admin = server.client(socket_timeout=SOCKET_TIMEOUT_S)
    for queue in queues:
        for channel in CHANNEL_CONSUMERS:
            admin.execute_command("SET", queue, channel, "NX")
    producers = [Producer(server, history, queue, i * PRODUCERS_PER_QUEUE + j, seed)
                 for i, queue in enumerate(queues) for j in range(PRODUCERS_PER_QUEUE)]
    consumers = [Consumer(server, history, queue, channel, number, seed)
                 for number, (queue, channel) in enumerate(
                     (queue, channel) for queue in queues
                     for channel, count in CHANNEL_CONSUMERS.items() for _ in range(count))]
    workers: list[Worker] = [*producers, *consumers]
    figures: dict[str, Any] = {"kills": Counter(), "restart_s": [], "flow_s": []}
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        flow_from = time.monotonic()
        server.wait_until(lambda: all(w.last_ok_start >= flow_from for w in workers),
                          FLOW_TIMEOUT_S, message="traffic flowing before the first kill")
        targets: list[str] = []
        for cycle in range(cycles):
            if not targets:   # every process dies once per round, in a random order
                targets = [*(f"shard {i}" for i in range(SHARDS)), "frontend"]
                rng.shuffle(targets)
            target = targets.pop()
            time.sleep(rng.uniform(*KILL_GAP_S))
            t_kill = time.monotonic()
            old = kill(server, target)
            new = server.wait_until(lambda: restarted(server, target, old), RESTART_TIMEOUT_S,
                                    message=f"cycle {cycle}: {target} restarted")
            t_back = time.monotonic()
            server.wait_until(lambda: all(w.last_ok_start >= t_back for w in workers),
                              FLOW_TIMEOUT_S, message=f"cycle {cycle}: traffic after {target}")
            t_flow = time.monotonic()
            figures["kills"][target] += 1
            figures["restart_s"].append(t_back - t_kill)
            figures["flow_s"].append(t_flow - t_kill)
            history.nemesis.append(f"{t_kill:.3f} cycle {cycle}: SIGKILL {target} pid {old}; "
                                   f"pid {new} at +{t_back - t_kill:.2f} s, traffic at "
                                   f"+{t_flow - t_kill:.2f} s")
        for producer in producers:
            producer.stop.set()
        for producer in producers:
            producer.join(SOCKET_TIMEOUT_S * 3)
        assert not any(p.is_alive() for p in producers), "a producer hangs"
        quiet_from = time.monotonic()
        server.wait_until(
            lambda: (all(c.drained_since(quiet_from, time.monotonic()) for c in consumers)
                     and channels_settled(server, admin, queues)),
            DRAIN_TIMEOUT_S, interval=0.2, message="every channel drained")
    finally:
        for worker in workers:
            worker.stop.set()
        for worker in workers:
            worker.join(SOCKET_TIMEOUT_S * 3)
        admin.close()
    assert not any(w.is_alive() for w in workers), "a worker hangs"
    crashed = [f"{w.name}: {w.crash!r}" for w in workers if w.crash]
    assert not crashed, crashed
    figures["duration_s"] = time.monotonic() - started
    return history, channels, figures


# --- the tests --------------------------------------------------------------------------------

@pytest.fixture
def soak_cycles(request: pytest.FixtureRequest) -> int:
    """--cycles (conftest.py), default 20; conftest scales this test's time limit with it."""
    return request.config.getoption("--cycles")


@pytest.fixture
def soak_seed(request: pytest.FixtureRequest) -> int:
    seed = request.config.getoption("--soak-seed")
    return seed if seed is not None else random.SystemRandom().randrange(2**32)


@pytest.mark.parametrize("fsync", ["interval", "always"])
def test_soak_random_sigkills_lose_nothing_acknowledged(floki_server, soak_cycles, soak_seed,
                                                        fsync):
    # fsync = "always" runs a fifth of the cycles: kill -9 keeps what was written to the OS
    # in both modes; "always" adds group commit and "deliver only what is durable" to the mix.
    cycles = soak_cycles if fsync == "interval" else max(1, soak_cycles // 5)
    print(f"\nsoak: seed {soak_seed} (rerun with --soak-seed {soak_seed}), fsync {fsync}, "
          f"{cycles} cycles")
    server = floki_server(fsync=fsync, **SERVER_SETTINGS)
    history, channels, figures = run_soak(server, cycles, soak_seed)
    ordered = {(queue, channel) for queue in channels
               for channel, count in CHANNEL_CONSUMERS.items() if count == 1}
    report = check_history(history, channels, ordered)
    restart_s, flow_s = figures["restart_s"], figures["flow_s"]
    print(f"soak: fsync {fsync}, seed {soak_seed}, cycles {cycles} "
          f"({', '.join(f'{k} x{v}' for k, v in sorted(figures['kills'].items()))}), "
          f"{figures['duration_s']:.1f} s; pushes acknowledged {report.pushes_acked} "
          f"({report.messages_acked} messages), indeterminate {report.pushes_indeterminate} "
          f"({report.indeterminate_stored} messages stored), deliveries {report.deliveries}, "
          f"duplicates {report.duplicates}, late first deliveries after lost replies "
          f"{report.late_first}, messages lost: {report.lost}, corrupt bodies served: "
          f"{report.corrupt}; restart max {max(restart_s, default=0):.2f} s, traffic back "
          f"max {max(flow_s, default=0):.2f} s; client errors {dict(history.error_kinds)}")
    assert cycles == 0 or report.pushes_acked > cycles, "the workload did not run"
    if report.violations:
        pytest.fail(f"{len(report.violations)} violations (seed {soak_seed}):\n"
                    + "\n".join(report.violations[:30]) + "\nkills:\n"
                    + "\n".join(history.nemesis), pytrace=False)


# --- the checker against hand-made histories: each invariant can fail ---------------------------

CHANNELS = {"q": ["a", "b"]}
ORDERED = {("q", "a")}


def push(history: History, bodies: list[bytes], t: float, outcome: Outcome = Outcome.OK,
         process: str = "p0") -> None:
    value = len(bodies) if outcome is Outcome.OK else "ConnectionError"
    history.ops.append(Op(process, "RPUSH", "q", tuple(bodies), t, t + 0.01, outcome, value))


def get(history: History, channel: str, messages: list[tuple[int, bytes]], t: float,
        outcome: Outcome = Outcome.OK) -> None:
    value = [(id_, 1000 + id_, body) for id_, body in messages] \
        if outcome is Outcome.OK else "TimeoutError"
    history.ops.append(Op("c0", "HMGET", "q", (channel, GET_COUNT, LONG_POLL_S), t, t + 0.01,
                          outcome, value))


def bodies(count: int, start: int = 0) -> list[bytes]:
    return [make_body("q", "p0", seq) for seq in range(start, start + count)]


def clean_history() -> History:
    """Two acked pushes (ids 1-3, 4-5), both delivered on both channels; a redelivery on b."""
    history = History()
    first, second = bodies(3), bodies(2, 3)
    push(history, first, 1.0)
    push(history, second, 2.0)
    for channel in ("a", "b"):
        get(history, channel, list(enumerate(first + second, 1)), 3.0)
    get(history, "b", [(2, first[1])], 4.0)
    return history


def test_checker_accepts_a_clean_history_and_counts_duplicates():
    report = check_history(clean_history(), CHANNELS, ORDERED)
    assert report.violations == []
    assert (report.pushes_acked, report.messages_acked, report.deliveries) == (2, 5, 11)
    assert (report.duplicates, report.lost, report.corrupt) == (1, 0, 0)


def test_checker_finds_a_lost_acknowledged_push():
    history = clean_history()
    push(history, bodies(1, 5), 5.0)
    get(history, "a", [(6, bodies(1, 5)[0])], 6.0)          # never delivered on b
    report = check_history(history, CHANNELS, ORDERED)
    assert report.lost == 1 and len(report.violations) == 1


def test_checker_finds_mangled_invented_and_misrouted_bodies():
    history = clean_history()
    good = bodies(1, 5)[0]
    push(history, [good], 5.0)
    mangled = good[:-3] + b"000"
    get(history, "a", [(6, good), (7, mangled), (8, make_body("q", "p9", 1)),
                       (9, make_body("other", "p0", 9))], 6.0)
    get(history, "b", [(6, good)], 6.0)
    report = check_history(history, CHANNELS, ORDERED)
    assert report.corrupt == 3 and report.lost == 0
    assert len(report.violations) == 3


def test_checker_finds_a_reused_id_and_a_body_stored_twice():
    history = clean_history()
    extra = bodies(1, 5)[0]
    push(history, [extra], 5.0)
    get(history, "a", [(3, extra)], 6.0)                    # id 3 carried another body before
    get(history, "b", [(6, extra), (7, extra)], 6.0)        # the same body under two ids
    report = check_history(history, CHANNELS, ORDERED)
    texts = "\n".join(report.violations)
    assert "id 3 served two bodies" in texts
    assert "stored twice" in texts


def test_checker_finds_ids_going_back_after_an_acknowledged_push():
    history = History()
    early, late = bodies(1), bodies(1, 1)
    push(history, early, 1.0)
    push(history, late, 2.0, process="p1")                  # started after early was acked
    for channel in ("a", "b"):
        get(history, channel, [(5, late[0])], 3.0)
        get(history, channel, [(7, early[0])], 3.5)
    report = check_history(history, CHANNELS, set())
    assert len(report.violations) == 1 and "not above id 7" in report.violations[0]


def test_checker_finds_a_partly_stored_or_one_channel_unacknowledged_push():
    history = clean_history()
    maybe = bodies(2, 5)
    push(history, maybe, 5.0, Outcome.INDETERMINATE)
    get(history, "a", [(6, maybe[0])], 6.0)                 # half of it, on one channel only
    report = check_history(history, CHANNELS, ORDERED)
    texts = "\n".join(report.violations)
    assert "partly stored" in texts and "never on ['b']" in texts
    assert report.indeterminate_stored == 1


@pytest.mark.parametrize("lost_reply_at", [None, 2, 3])
def test_checker_allows_late_first_deliveries_only_from_a_lost_reply(lost_reply_at):
    history = History()
    sent = bodies(3)
    push(history, sent, 1.0)
    get(history, "b", list(enumerate(sent, 1)), 2.0)
    get(history, "a", [(2, sent[1]), (3, sent[2])], 2.0)
    get(history, "a", [(1, sent[0])], 3.0)                  # 1 after 3
    if lost_reply_at is not None:
        history.ops.insert(lost_reply_at, Op("c0", "HMGET", "q", ("a", GET_COUNT, LONG_POLL_S),
                                             1.5, 1.6, Outcome.INDETERMINATE, "TimeoutError"))
    report = check_history(history, CHANNELS, ORDERED)
    if lost_reply_at == 2:      # lost before 2 and 3 were seen: it may have carried 1
        assert report.violations == [] and report.late_first == 1
    else:                       # no lost reply, or one lost after 3 was seen: 1 was not in it
        assert len(report.violations) == 1 and "first delivery of id 1" in report.violations[0]


def test_checker_flags_error_replies_and_wrong_push_counts():
    history = clean_history()
    history.ops.append(Op("c0", "HMGET", "q", ("a", 1, 1), 5.0, 5.1, Outcome.FAIL,
                          "QNF Queue Not Found"))
    history.ops.append(Op("p0", "RPUSH", "q", tuple(bodies(2, 9)), 5.0, 5.1, Outcome.OK, 1))
    report = check_history(history, CHANNELS, ORDERED)
    texts = "\n".join(report.violations)
    assert "QNF" in texts and "replied 1" in texts
