"""Server fuzz (issue 4, RELIABILITY.md test 28): random frames and random commands against a
live `floki start`.

Pass: every command gets a reply or a clean disconnect; no process of the server restarts; the
frontend's memory does not grow with the inputs; an observer connection is served throughout;
the queue no fuzz input may touch ("keep") is unchanged, every message in it is read back intact;
every body served was one that some client sent; nothing appears in or beside the data directory
but valid queue names.

Three sources of input, all seeded (FLOKI_FUZZ_SEED, printed on failure):
  1. the fixed corpus in tests/data/resp, replayed whole on fresh connections;
  2. raw frames on fresh connections that then half-close: random bytes, mutated valid frames,
     RESP token soup and hostile headers (negative and huge lengths, wrong type bytes, missing
     CRLF, million-element multibulk headers, binary junk, inline commands);
  3. well-framed commands with random arguments on long-lived connections: wrong types, huge or
     negative counts, empty and non-UTF-8 names, `*` as a name, timeouts near 2**32.
FLOKI_FUZZ_SCALE multiplies the number of inputs (default 1: about 20-40 s on 2 CPU cores).
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import zlib
from pathlib import Path

import hiredis
import psutil
import pytest

from helpers import FlokiServer

SCALE = float(os.environ.get("FLOKI_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("FLOKI_FUZZ_SEED", "20260404"))
COMMANDS = int(12000 * SCALE)         # well-framed commands with random arguments
RAW_FRAMES = int(4000 * SCALE)        # raw byte frames, one connection each
PARK_S = 0.2                          # an HMGET timeout above this may park the command
REPLY_TIMEOUT_S = 5.0
CORPUS = Path(__file__).resolve().parents[1] / "data" / "resp"
KEEP_MESSAGES = 200
NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,200}\Z")

# Names the command fuzzer uses: valid ones (its own queues), and ones that must be refused.
VALID_NAMES = [b"fz0", b"fz1", b"fz.2", b"fz:3", b"fz_4"]
BAD_NAMES = [b"", b"*", b"../fz", b"/abs", b"fz/0", b"a\x00b", b"\xff\xfe", b"x" * 10240,
             b".hidden", b"..", b"keep\x00", b"k eep", "ké".encode(), b"fz0\r\n"]
CHANNELS = [b"c0", b"c1", b"*", b"", b"\x80", b"c" * 201]
NUMBERS = [b"0", b"1", b"2", b"10", b"-1", b"-0", b"01", b"+1", b"1.5", b"1e3", b"nan", b"inf",
           b"-inf", b"9223372036854775807", b"9223372036854775808", b"18446744073709551616",
           b"-9223372036854775809", b"99999999999999999999999", b"10001", b"1000000", b"abc",
           b"", b" 1", b"0x10"]
TIMEOUTS = [b"0", b"0.05", b"0.1", b"-1", b"4294967295", b"4294967296", b"4294967297",
            b"2147483648", b"31536001", b"1e10", b"nan", b"inf", b"-0.5", b"x", b"", b"1e-9"]
KEYWORDS = [b"NX", b"nx", b"TS", b"ts", b"ID", b"id", b"XX", b"*", b"queues", b"server",
            b"queues.fz0", b"queues.fz*", b"queues.*", b"server.bogus", b"server.shards",
            b"server.requirepass", b"queues.fz0.message_timeout", b"queues.fz1.retention_size",
            b"queues.fz0.bogus", b"queues.keep\x00.message_timeout", b"queues..x"]
NAMES = [b"RPUSH", b"HMGET", b"HDEL", b"HMSET", b"SET", b"SETNX", b"DEL", b"SREM", b"INFO",
         b"CONFIG", b"PING", b"ECHO", b"QUIT", b"SELECT", b"AUTH", b"HELLO", b"CLIENT",
         b"COMMAND", b"rpush", b"hMgEt", b"GET", b"SUBSCRIBE", b"", b"\x00", b"\xff" * 3]


def resp(argv: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(argv) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in argv)


def make_body(rng: random.Random, tag: bytes) -> bytes:
    payload = rng.randbytes(rng.randint(0, 64))
    return b"%s:%08x:" % (tag, zlib.crc32(payload)) + payload


def body_is_intact(body: bytes) -> bool:
    tag, crc, payload = body.split(b":", 2)
    return zlib.crc32(payload) == int(crc, 16)


# --- generators ----------------------------------------------------------------------------

def random_arg(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(VALID_NAMES + BAD_NAMES)
    if kind < 0.5:
        return rng.choice(NUMBERS + TIMEOUTS)
    if kind < 0.65:
        return rng.choice(KEYWORDS + CHANNELS)
    return rng.randbytes(rng.choice([0, 1, 3, 8, 40, 300]))


def random_command(rng: random.Random) -> list[bytes]:
    """A command from the table with arguments of the right type in each place, or not."""
    name = rng.choice(NAMES)
    valid, bad = rng.choice(VALID_NAMES), rng.choice(BAD_NAMES)
    queue = valid if rng.random() < 0.7 else bad
    channel = rng.choice(CHANNELS[:2]) if rng.random() < 0.7 else rng.choice(CHANNELS)
    shapes = {
        b"RPUSH": [queue] + [make_body(rng, b"fzb") for _ in range(rng.randint(0, 4))],
        b"HMGET": [queue, channel, rng.choice(NUMBERS)] + (
            [rng.choice(TIMEOUTS)] if rng.random() < 0.5 else []),
        b"HDEL": [queue, channel] + [rng.choice(NUMBERS) for _ in range(rng.randint(0, 5))],
        b"HMSET": [queue, channel, rng.choice([b"ID", b"TS", b"id", b"XX"]),
                   rng.choice(NUMBERS + [b"%d" % int(time.time())])],
        b"SET": [queue, channel] + ([rng.choice([b"NX", b"nx", b"YY"])]
                                    if rng.random() < 0.4 else []),
        b"SETNX": [queue, channel],
        b"DEL": [queue] + ([channel] if rng.random() < 0.7 else []),
        b"SREM": [queue, rng.choice([channel, b"*"])],
        b"INFO": [rng.choice([b"queues", b"server", b"queues.fz", b"bogus", b""])][
            :rng.randint(0, 1)],
        b"CONFIG": [rng.choice([b"GET", b"SET", b"get", b"RESETSTAT"]), rng.choice(KEYWORDS),
                    rng.choice(NUMBERS + [b"1s", b"10mb", b"always"])][:rng.randint(0, 3)],
        b"HELLO": [rng.choice([b"2", b"3", b"4", b"0", b"-1", b"x"])] + rng.choice(
            [[], [b"AUTH", b"default", b"pw"], [b"SETNAME", rng.choice([b"n1", b"a b", b""])],
             [b"AUTH", b"someone", b"pw"], [b"AUTH"]]),
        b"CLIENT": [rng.choice([b"SETNAME", b"GETNAME", b"ID", b"INFO", b"SETINFO", b"LIST",
                                b"KILL", b"HELP"])] + [random_arg(rng) for _ in
                                                       range(rng.randint(0, 2))],
    }
    args = shapes.get(name.upper(), [random_arg(rng) for _ in range(rng.randint(0, 4))])
    if rng.random() < 0.15:                   # wrong arity: drop or add arguments
        args = args[:rng.randint(0, len(args))] if args and rng.random() < 0.5 else \
            args + [random_arg(rng) for _ in range(rng.randint(1, 6))]
    elif rng.random() < 0.15:                 # wrong type somewhere
        if args:
            args[rng.randrange(len(args))] = random_arg(rng)
    return [name] + args


HOSTILE = [
    b"*1000000\r\n$5\r\nRPUSH\r\n", b"*2097152\r\n", b"*-5\r\n*-1\r\n*0\r\nPING\r\n",
    b"*3000000000\r\n", b"*99999999999999999999\r\n", b"*1\r\n$-1\r\n", b"*1\r\n$-10\r\n",
    b"*2\r\n$4\r\nECHO\r\n$2000000000\r\n", b"*2\r\n$4\r\nECHO\r\n$100000000\r\nabc",
    b"*1\r\n:1\r\n", b"*1\r\n+PING\r\n", b"*1\r\n*1\r\n$1\r\nx\r\n", b"*1\n$4\nPING\n",
    b"*2\r\n$4\r\nECHO\r\n$3\r\nabcd\r\n", b"*1\r\n$4\r\nPING", b"$4\r\nPING\r\n",
    b"\x00", b"*\x00", b"$\x00", b'set "a b\r\n', b"PING\r\n\r\n\n\nPING\r\n",
    b"\xff\xfe\xfd junk\r\n", b"*1\r\n$4\r\nQUIT\r\n*1\r\n$4\r\nPING\r\n",
    b"*5\r\n$5\r\nHMGET\r\n$3\r\nrq0\r\n$1\r\nc\r\n$1\r\n1\r\n$10\r\n4294967296\r\n",
]


def raw_frame(rng: random.Random) -> bytes:
    """Bytes a broken or hostile client might send (never naming the fuzzer's own queues)."""
    kind = rng.random()
    if kind < 0.2:
        return rng.randbytes(rng.randint(1, 300))
    if kind < 0.35:
        return rng.choice(HOSTILE) * rng.randint(1, 3)
    if kind < 0.55:
        tokens = [b"*", b"$", b"\r\n", b"\r", b"\n", b"1", b"0", b"-", b"3", b"x", b"*1\r\n",
                  b"*2\r\n", b"$1\r\n", b"$0\r\n", b"PING", b" ", b"\"", b"'", b"\x00", b":",
                  b"+", b"999999999999"]
        return b"".join(rng.choice(tokens) for _ in range(rng.randint(1, 60)))
    # A mutated valid frame: raw frames use queues named rq*, never the fuzzer's fz* or keep.
    argv = [rng.choice([b"RPUSH", b"HMGET", b"SET", b"HDEL", b"PING", b"ECHO", b"DEL"]),
            b"rq%d" % rng.randint(0, 3), b"c", rng.choice(NUMBERS)]
    data = bytearray(resp(argv[:rng.randint(1, 4)]) * rng.randint(1, 3))
    for _ in range(rng.randint(1, 4)):
        op, at = rng.random(), rng.randrange(len(data) + 1)
        if op < 0.3 and at < len(data):
            data[at] = rng.randrange(256)                        # flip a byte
        elif op < 0.5:
            data[at:at] = rng.randbytes(rng.randint(1, 8))      # insert junk
        elif op < 0.7:
            del data[at:at + rng.randint(1, 6)]                 # drop bytes (e.g. a CRLF)
        elif op < 0.85:
            data = data[:at]                                    # truncate
        else:
            data[at:at] = rng.choice(HOSTILE)                   # splice a hostile header
    return bytes(data) or b"\r\n"


def might_park(argv: list[bytes]) -> bool:
    """True for an HMGET whose timeout may hold its reply (until a message, or for days)."""
    if argv[0].upper() != b"HMGET" or len(argv) != 5:
        return False
    try:
        return float(argv[4]) > PARK_S
    except ValueError:
        return False


# --- clients ---------------------------------------------------------------------------------

class Outcome(Exception):
    """A fuzz input that broke the rules (the message says which)."""


def read_replies(sock: socket.socket, reader, count: int | None, timeout_s: float) -> tuple[
        list, bool]:
    """Reads `count` replies (None: until the server closes). Returns (replies, closed).

    Raises Outcome on bytes that are not RESP, or on silence past timeout_s."""
    replies, deadline = [], time.monotonic() + timeout_s
    while count is None or len(replies) < count:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return replies, True
        except socket.timeout:
            raise Outcome(f"no reply within {timeout_s} s (got {len(replies)})") from None
        if not data:
            return replies, True
        reader.feed(data)
        try:
            while (value := reader.gets()) is not False:
                replies.append(value)
        except hiredis.ProtocolError as exc:
            raise Outcome(f"the server sent bytes that are not RESP: {exc}") from None
    return replies, False


def raw_case(server: FlokiServer, data: bytes) -> list:
    """Sends `data` on a fresh connection, half-closes, and reads until the server closes.

    Returns the replies. Raises Outcome unless the server answers in RESP and closes cleanly
    (a Protocol error, if any, is the last reply)."""
    sock = socket.create_connection((server.host, server.port), timeout=REPLY_TIMEOUT_S)
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                               # closed on us mid-send: read what it said
        replies, _ = read_replies(sock, hiredis.Reader(), None, REPLY_TIMEOUT_S)
    finally:
        sock.close()
    errors = [str(r) for r in replies if isinstance(r, hiredis.ReplyError)]
    fatal = [e for e in errors if e.startswith("ERR Protocol error")]
    if fatal and not str(replies[-1]).startswith("ERR Protocol error"):
        raise Outcome(f"replies after a protocol error: {replies[-3:]!r}")
    return replies


class CommandConnection:
    """A long-lived connection for well-framed commands: one reply per command, in order."""

    def __init__(self, server: FlokiServer):
        self.server = server
        self.sock: socket.socket | None = None
        self.reader = None
        self.reconnects = -1
        self.connect()

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.create_connection((self.server.host, self.server.port),
                                             timeout=REPLY_TIMEOUT_S)
        self.reader = hiredis.Reader()
        self.reconnects += 1

    def call(self, argv: list[bytes]):
        """Returns the reply; reconnects after QUIT or a close. Raises Outcome."""
        self.sock.sendall(resp(argv))
        replies, closed = read_replies(self.sock, self.reader, 1, REPLY_TIMEOUT_S)
        if not replies:
            raise Outcome(f"connection closed without a reply to {argv[:4]!r}")
        if closed or argv[0].upper() == b"QUIT":
            self.connect()
        return replies[0]


# --- the test ------------------------------------------------------------------------------------

@pytest.fixture
def server(floki_server):
    return floki_server(shards=2, max_message_size="64kb", queue_message_timeout="1s")


def keep_state(client: CommandConnection) -> dict:
    return json.loads(client.call([b"INFO", b"queues.keep"])[0])["keep"]


@pytest.mark.timeout(max(120.0, 60.0 * SCALE))
def test_server_fuzz(server, request):
    rng = random.Random(SEED)
    request.node.user_properties.append(("fuzz_seed", SEED))
    stats = {"corpus": 0, "raw": 0, "commands": 0, "replies": 0, "errors": 0,
             "protocol_errors": 0, "reconnects": 0, "parked": 0, "observer_pings": 0}

    # The queue nothing may touch, and what it holds.
    observer = CommandConnection(server)
    assert observer.call([b"SET", b"keep", b"c"]) == b"OK"
    keep_bodies = [make_body(rng, b"keep") for _ in range(KEEP_MESSAGES)]
    assert observer.call([b"RPUSH", b"keep", *keep_bodies]) == KEEP_MESSAGES
    keep_before = keep_state(observer)
    pids_before = server.pids()
    frontend = psutil.Process(pids_before["frontend"])
    parent_before = sorted(os.listdir(server.data_dir.parent))
    sent_bodies: set[bytes] = set()           # every body a command-path RPUSH carried
    raw_sent: list[bytes] = []
    worst_ping_s = 0.0

    def observe() -> None:
        nonlocal worst_ping_s
        started = time.monotonic()
        assert observer.call([b"PING"]) in (b"PONG", "PONG"), "the observer was not served"
        worst_ping_s = max(worst_ping_s, time.monotonic() - started)
        stats["observer_pings"] += 1

    # 1. The fixed corpus, replayed against the server.
    for kind in ("valid", "invalid"):
        for path in sorted((CORPUS / kind).glob("*.resp")):
            expected = json.loads(path.with_suffix(".json").read_text())
            replies = raw_case(server, path.read_bytes())
            if kind == "invalid":
                assert str(replies[-1]) == "ERR " + expected["error"], path.name
                assert len(replies) == len(expected["commands"]) + 1, path.name
            else:
                assert not any(str(r).startswith("ERR Protocol") for r in replies), path.name
            stats["corpus"] += 1
    observe()

    # 2 and 3, interleaved: raw frames on fresh connections, commands on long-lived ones.
    workers = [CommandConnection(server) for _ in range(3)]
    rss_warm = None
    total = COMMANDS + RAW_FRAMES
    for step in range(total):
        if rng.random() < RAW_FRAMES / total:
            data = raw_frame(rng)
            raw_sent.append(data)
            try:
                replies = raw_case(server, data)
            except Outcome as exc:
                raise AssertionError(f"seed {SEED} step {step}: {exc}; frame {data[:200]!r}")
            stats["raw"] += 1
            stats["replies"] += len(replies)
            stats["protocol_errors"] += sum(str(r).startswith("ERR Protocol") for r in replies)
        else:
            argv = random_command(rng)
            if argv[0].upper() == b"RPUSH":
                sent_bodies.update(argv[2:])
            worker = rng.choice(workers)
            try:
                if might_park(argv):
                    # Its own connection, half-closed: a parked poll must then be answered
                    # (empty) and the connection closed, with nothing taken from the queue.
                    (reply,) = raw_case(server, resp(argv))
                    stats["parked"] += 1
                else:
                    reply = worker.call(argv)
            except Outcome as exc:
                raise AssertionError(f"seed {SEED} step {step}: {exc}; command {argv[:6]!r}")
            stats["commands"] += 1
            stats["replies"] += 1
            stats["errors"] += isinstance(reply, hiredis.ReplyError)
            if argv[0].upper() == b"HMGET" and isinstance(reply, list):
                for message in reply:
                    body = message[2]
                    assert body in sent_bodies or any(body in raw for raw in raw_sent), \
                        f"seed {SEED} step {step}: served a body nobody sent: {body[:80]!r}"
        if step % 50 == 0:
            observe()
        if step == total // 10:
            rss_warm = frontend.memory_info().rss
    stats["reconnects"] = sum(w.reconnects for w in workers)

    # The server never restarted, kept its memory, and served the observer throughout.
    assert server.pids() == pids_before, "a process of the server restarted"
    rss_end = frontend.memory_info().rss
    assert rss_end - rss_warm < 40 * 1024**2, (rss_warm, rss_end)
    assert worst_ping_s < 2.0

    # The untouched queue: same state, every message intact (messages lost: 0, corrupt: 0).
    assert keep_state(observer) == keep_before
    got = observer.call([b"HMGET", b"keep", b"c", b"%d" % KEEP_MESSAGES])
    bodies = [m[2] for m in got]
    assert bodies == keep_bodies and all(body_is_intact(b) for b in bodies)

    # Only valid queue names exist, all inside the data directory.
    entries = os.listdir(server.data_dir)
    assert all(e == ".run" or (NAME.match(e) and not e.startswith(".")) for e in entries), entries
    assert sorted(os.listdir(server.data_dir.parent)) == parent_before
    for worker in workers:
        worker.sock.close()
    observer.sock.close()
    print(f"\nfuzz seed {SEED} scale {SCALE}: {stats}; worst observer ping "
          f"{worst_ping_s * 1000:.1f} ms; frontend RSS {rss_warm >> 20} -> {rss_end >> 20} MiB; "
          f"keep: {KEEP_MESSAGES} messages, lost 0, corrupt 0")
