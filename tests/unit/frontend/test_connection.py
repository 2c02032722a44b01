"""floki/frontend/connection.py driven through a MockTransport and a fake router (no sockets)."""
import json
import logging

import hiredis
import pytest

from floki import wire
from floki.config import ServerConfig
from floki.errors import ShardUnavailable, to_reply
from floki.frontend import connection as connection_module
from floki.frontend.connection import Connection, Frontend
from floki.frontend.router import UNAVAILABLE
from floki.routing import shard_for

UNAVAILABLE_REPLY = to_reply(ShardUnavailable())


class MockTransport:
    """The parts of asyncio.Transport a Connection uses, recording every call."""

    def __init__(self, peer=("127.0.0.1", 50000)):
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.read_paused = False
        self.buffer_size = 0
        self.peer = peer

    @property
    def output(self) -> bytes:
        return b"".join(self.writes)

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def writelines(self, chunks) -> None:
        # One call is one write to the socket (uvloop: one writev).
        assert not self.closed, "write after close"
        self.writes.append(b"".join(chunks))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        assert not self.read_paused
        self.read_paused = True

    def resume_reading(self) -> None:
        assert self.read_paused
        self.read_paused = False

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def get_extra_info(self, name, default=None):
        return {"peername": self.peer, "sockname": ("127.0.0.1", 9797)}.get(name, default)


class MockLoop:
    """call_soon only queues; the test runs the queue (uvicorn's MockLoop)."""

    def __init__(self):
        self.ready = []

    def call_soon(self, callback, *args):
        self.ready.append((callback, args))

    def run_ready(self) -> None:
        while self.ready:
            callback, args = self.ready.pop(0)
            callback(*args)


class FakeRouter:
    """Records sends; the test answers them in any order. Shards in `down` fail at once."""

    def __init__(self, shard_count=2):
        self.shard_count = shard_count
        self.sent = {}             # request id -> (shard, argv, on_reply)
        self.cancelled = []
        self.down = set()
        self._next = 0

    def send(self, index, argv, on_reply):
        self._next += 1
        if index in self.down:
            on_reply(UNAVAILABLE, UNAVAILABLE_REPLY)
        else:
            self.sent[self._next] = (index, argv, on_reply)
        return self._next

    def cancel(self, request_id):
        self.cancelled.append(request_id)

    @property
    def shards_up(self):
        return self.shard_count - len(self.down)

    def flush(self):
        pass                       # sends are recorded at once: nothing is ever queued

    def answer(self, request_id, payload, status=wire.RESP):
        self.sent.pop(request_id)[2](status, payload)

    def ids_for(self, argv0):
        return [rid for rid, (_, argv, _) in self.sent.items() if argv[0] == argv0]


class Client:
    """One Connection with its transport, loop and router, plus RESP helpers."""

    def __init__(self, frontend=None, router=None, config=None):
        self.router = router or FakeRouter()
        self.loop = MockLoop()
        self.frontend = frontend or Frontend(config or ServerConfig(), self.router, self.loop)
        self.transport = MockTransport()
        self.conn = Connection(self.frontend)
        self.conn.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)

    def replies(self) -> list:
        """Every reply written so far, parsed (errors as hiredis ReplyError objects)."""
        reader = hiredis.Reader()
        reader.feed(self.transport.output)
        out = []
        while (reply := reader.gets()) is not False:
            out.append(reply)
        return out

    def settle(self) -> None:
        self.loop.run_ready()


def resp(*argv: bytes) -> bytes:
    return b"*%d\r\n" % len(argv) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in argv)


def queue_on(shard: int, shard_count: int = 2) -> bytes:
    """A queue name that routes to `shard`."""
    return next(b"q%d" % i for i in range(1000) if shard_for("q%d" % i, shard_count) == shard)


# --- local commands -----------------------------------------------------------------------

def test_ping_inline_and_array_and_echo():
    client = Client()
    client.send(b"PING\r\n" + resp(b"PING", b"hi") + resp(b"ECHO", b"x\r\ny"))
    assert client.transport.output == b"+PONG\r\n$2\r\nhi\r\n$4\r\nx\r\ny\r\n"
    assert len(client.transport.writes) == 1            # one write for the batch


def test_unknown_command_is_an_error_and_the_connection_lives():
    client = Client()
    client.send(resp(b"FOO", b"a") + resp(b"ping"))
    assert client.transport.output == (b"-ERR unknown command 'FOO', with args beginning with: "
                                       b"'a' \r\n+PONG\r\n")
    assert not client.transport.closed


def test_quit_answers_ok_closes_and_ignores_the_rest():
    client = Client()
    q = queue_on(0)
    client.send(resp(b"PING") + resp(b"QUIT") + resp(b"RPUSH", q, b"lost"))
    assert client.transport.output == b"+PONG\r\n+OK\r\n"
    assert client.transport.closed and client.router.sent == {}


def test_select_auth_and_hello():
    client = Client()
    client.send(resp(b"SELECT", b"0") + resp(b"SELECT", b"1") + resp(b"AUTH", b"pw"))
    assert client.transport.output == (
        b"+OK\r\n-ERR DB index is out of range\r\n"
        b"-ERR AUTH <password> called without any password configured for the default user. "
        b"Are you sure your configuration is correct?\r\n")
    client.transport.writes.clear()
    client.send(resp(b"HELLO", b"4"))
    assert client.transport.output == b"-NOPROTO unsupported protocol version\r\n"
    client.transport.writes.clear()
    client.send(resp(b"HELLO", b"3", b"AUTH", b"default", b"pw", b"SETNAME", b"me"))
    hello = client.transport.output
    assert hello.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nfloki\r\n")
    assert b"$5\r\nproto\r\n:3\r\n" in hello and b"$4\r\nmode\r\n$10\r\nstandalone\r\n" in hello
    assert b"$7\r\nmodules\r\n*0\r\n" in hello and b"$4\r\nrole\r\n$6\r\nmaster\r\n" in hello
    assert client.conn.session.protover == 3 and client.conn.session.name == "me"
    client.transport.writes.clear()
    client.send(resp(b"HELLO") + resp(b"HELLO", b"2"))  # keep 3, then back to 2 (flat array)
    out = client.transport.output
    assert out.startswith(b"%7\r\n") and b"*14\r\n$6\r\nserver\r\n" in out
    assert client.conn.session.protover == 2


def test_client_subcommands():
    client = Client()
    client.send(resp(b"CLIENT", b"GETNAME") + resp(b"CLIENT", b"SETNAME", b"worker-1")
                + resp(b"CLIENT", b"GETNAME") + resp(b"CLIENT", b"ID")
                + resp(b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py")
                + resp(b"CLIENT", b"SETINFO", b"lib-ver", b"8.1.0")
                + resp(b"CLIENT", b"SETNAME", b"bad name")
                + resp(b"CLIENT", b"NOPE") + resp(b"CLIENT", b"INFO"))
    replies = client.replies()
    assert replies[:6] == [None, b"OK", b"worker-1", client.conn.session.client_id, b"OK", b"OK"]
    assert str(replies[6]) == ("ERR Client names cannot contain spaces, newlines or special "
                               "characters.")
    assert str(replies[7]) == "ERR unknown subcommand 'NOPE'. Try CLIENT HELP."
    info = replies[8].decode()
    assert info.startswith(f"id={client.conn.session.client_id} addr=127.0.0.1:50000 ")
    assert "name=worker-1" in info and "lib-name=redis-py lib-ver=8.1.0" in info


def test_command_docs_count_and_table():
    client = Client()
    client.send(resp(b"COMMAND", b"DOCS") + resp(b"COMMAND", b"COUNT") + resp(b"COMMAND")
                + resp(b"COMMAND", b"BOGUS"))
    docs, count, table, bogus = client.replies()
    assert docs == [] and count == len(table) and count >= 18
    rpush = next(entry for entry in table if entry[0] == b"rpush")
    assert rpush[1] == -3                                # RPUSH queue msg [msg ...]
    assert str(bogus) == "ERR unknown subcommand 'BOGUS'. Try COMMAND HELP."
    client.transport.writes.clear()
    client.send(resp(b"HELLO", b"3") + resp(b"COMMAND", b"DOCS"))
    assert client.transport.output.endswith(b"%0\r\n")  # an empty RESP3 map


# --- shard commands: ordering -------------------------------------------------------------

def test_pipelined_replies_keep_request_order_across_shards():
    client = Client()
    q0, q1 = queue_on(0), queue_on(1)
    client.send(resp(b"RPUSH", q0, b"a") + resp(b"RPUSH", q1, b"b") + resp(b"PING")
                + resp(b"HMGET", q0, b"c", b"1"))
    assert client.transport.writes == []                 # the head waits for shard 0
    (a,), (b,), (g,) = (client.router.ids_for(b"RPUSH")[:1], client.router.ids_for(b"RPUSH")[1:],
                        client.router.ids_for(b"HMGET"))
    assert client.router.sent[a][0] == 0 and client.router.sent[b][0] == 1
    assert client.router.sent[a][1] == [b"RPUSH", q0, b"a"]   # argv passed through verbatim
    client.router.answer(g, b"*0\r\n")                   # last first
    client.router.answer(b, b":7\r\n")
    client.settle()
    assert client.transport.writes == []                 # still waiting for the head
    client.router.answer(a, b":1\r\n")
    client.settle()
    assert client.transport.writes == [b":1\r\n:7\r\n+PONG\r\n*0\r\n"]   # one write


def test_a_reply_is_flushed_once_per_loop_pass():
    client = Client()
    q = queue_on(1)
    client.send(resp(b"RPUSH", q, b"a") + resp(b"RPUSH", q, b"b"))
    a, b = client.router.ids_for(b"RPUSH")
    client.router.answer(a, b":1\r\n")
    client.router.answer(b, b":2\r\n")
    assert len(client.loop.ready) == 1                   # one flush scheduled, not two
    client.settle()
    assert client.transport.writes == [b":1\r\n:2\r\n"]


def test_shard_unavailable_is_an_error_reply():
    router = FakeRouter()
    router.down.add(0)
    client = Client(router=router)
    client.send(resp(b"RPUSH", queue_on(0), b"x") + resp(b"PING"))
    assert client.transport.output == UNAVAILABLE_REPLY + b"+PONG\r\n"
    assert not client.transport.closed


def test_bad_arguments_are_refused_before_reaching_a_shard():
    client = Client(config=ServerConfig(max_message_size=3))
    client.send(resp(b"RPUSH", b"q", b"toolong") + resp(b"HMGET", b"q", b"c", b"x")
                + resp(b"RPUSH", b"../etc", b"x"))
    errors = [str(e) for e in client.replies()]
    assert errors[0].startswith("ERR message too large")
    assert errors[1] == "IPA Invalid count value"
    assert errors[2] == "IPA Invalid Identifier Name"
    assert client.router.sent == {}


# --- fan-out ------------------------------------------------------------------------------------

def answer_all(client, argv0, payloads, status=wire.JSON):
    ids = client.router.ids_for(argv0)
    assert len(ids) == len(payloads)
    for rid in ids:
        shard = client.router.sent[rid][0]
        client.router.answer(rid, payloads[shard], status)
    client.settle()


def test_info_queues_is_the_union_of_every_shard():
    client = Client()
    client.send(resp(b"INFO", b"queues"))
    assert sorted(s for s, _, _ in client.router.sent.values()) == [0, 1]
    answer_all(client, b"INFO", [b'{"a":{"head":1}}', b'{"b":{"head":2}}'])
    (reply,) = client.replies()
    assert json.loads(reply[0]) == {"a": {"head": 1}, "b": {"head": 2}}


def test_info_server_adds_the_frontends_own_fields_and_counts_shards_up():
    router = FakeRouter(3)
    router.down.add(2)
    client = Client(router=router)
    client.send(resp(b"INFO", b"server"))
    answer_all(client, b"INFO", {0: b'{"queue_count":2,"blocked_client_count":1}',
                                 1: b'{"queue_count":3,"blocked_client_count":0}'})
    info = json.loads(client.replies()[0][0])
    assert info["queue_count"] == 5 and info["blocked_client_count"] == 1
    assert info["shards"] == 3 and info["shards_up"] == 2 and info["client_count"] == 1
    assert {"version", "uptime_s", "pid"} <= set(info)


def test_plain_info_is_a_bulk_of_key_value_lines():
    client = Client()
    client.send(resp(b"INFO"))
    answer_all(client, b"INFO", [b'{"queue_count":1}', b'{"queue_count":1}'])
    (text,) = client.replies()
    assert isinstance(text, bytes) and text.startswith(b"# Server\r\n")
    assert b"\r\nqueue_count:2\r\n" in text and b"\r\nshards_up:2\r\n" in text


def test_config_get_of_a_missing_queue_is_qnf_and_shard_errors_win():
    client = Client()
    client.send(resp(b"CONFIG", b"GET", b"queues.nope") + resp(b"INFO", b"queues"))
    answer_all(client, b"CONFIG", [b"{}", b"{}"])
    assert client.transport.output == b"-QNF Queue Not Found\r\n"   # INFO still outstanding
    ids = client.router.ids_for(b"INFO")
    client.router.answer(ids[0], b"-IPA broken\r\n", wire.RESP)
    client.router.answer(ids[1], b"{}")
    client.settle()
    assert client.transport.output == b"-QNF Queue Not Found\r\n-IPA broken\r\n"


def test_config_set_needs_every_shard_then_applies_to_the_frontend():
    client = Client(config=ServerConfig(max_get_count=100))
    client.send(resp(b"CONFIG", b"SET", b"server.max_get_count", b"5"))
    answer_all(client, b"CONFIG", [b'{"ok":true}', b'{"ok":true}'])
    assert client.transport.output == b"+OK\r\n"
    assert client.frontend.limits.max_get_count == 5
    client.transport.writes.clear()
    client.send(resp(b"HMGET", b"q", b"c", b"6"))        # the new limit holds at once
    assert client.transport.output == b"-IPA Invalid count value (max 5)\r\n"

    client.transport.writes.clear()
    client.send(resp(b"CONFIG", b"SET", b"server.max_get_count", b"7"))
    ids = client.router.ids_for(b"CONFIG")
    client.router.answer(ids[0], b'{"ok":true}', wire.JSON)
    client.router.answer(ids[1], b"-IPA Invalid CONFIG SET parameter\r\n", wire.RESP)
    client.settle()
    assert client.transport.output == b"-IPA Invalid CONFIG SET parameter\r\n"
    assert client.frontend.limits.max_get_count == 5


def test_config_set_that_one_shard_fails_is_set_back_on_the_others():
    client = Client(config=ServerConfig(max_get_count=100), router=FakeRouter(shard_count=3))
    client.send(resp(b"CONFIG", b"SET", b"server.max_get_count", b"5"))
    first, second, third = client.router.ids_for(b"CONFIG")
    client.router.answer(first, b'{"ok":true}', wire.JSON)
    client.router.answer(second, UNAVAILABLE_REPLY, UNAVAILABLE)     # died on the way
    client.router.answer(third, b'{"ok":true}', wire.JSON)
    client.settle()
    assert client.transport.output == UNAVAILABLE_REPLY
    assert client.frontend.limits.max_get_count == 100
    undo = {rid: client.router.sent[rid][:2] for rid in client.router.ids_for(b"CONFIG")}
    assert sorted(undo.values()) == [
        (0, [b"CONFIG", b"SET", b"server.max_get_count", b"100"]),
        (2, [b"CONFIG", b"SET", b"server.max_get_count", b"100"])]
    for rid in undo:
        client.router.answer(rid, b'{"ok":true}', wire.JSON)
    assert client.transport.output == UNAVAILABLE_REPLY           # nothing more to the client


def test_config_set_while_a_shard_is_down_reaches_no_shard():
    """Sent to the shards that are up, it would apply there only (found with real processes:
    max_get_count 5 on shard 0, 10000 on shard 1, and CONFIG GET showing 5)."""
    client = Client(config=ServerConfig(max_get_count=100))
    client.router.down.add(1)
    client.send(resp(b"CONFIG", b"SET", b"server.max_get_count", b"5"))
    assert client.transport.output == b"-ERR shard unavailable, try again\r\n"
    assert client.router.ids_for(b"CONFIG") == []
    assert client.frontend.limits.max_get_count == 100


# --- errors, flow control, lifecycle ---------------------------------------------------------

def test_protocol_error_waits_for_earlier_replies_then_closes():
    client = Client()
    client.send(resp(b"RPUSH", queue_on(0), b"x") + resp(b"PING") + b"*1\r\n$x\r\n"
                + resp(b"PING"))
    assert client.transport.writes == [] and not client.transport.closed
    assert client.transport.read_paused                  # nothing more is read
    (rid,) = client.router.sent
    client.router.answer(rid, b":1\r\n")
    client.settle()
    assert client.transport.output == (b":1\r\n+PONG\r\n"
                                       b"-ERR Protocol error: invalid bulk length\r\n")
    assert client.transport.closed
    client.send(resp(b"PING"))                           # late bytes are ignored
    assert client.transport.output.endswith(b"invalid bulk length\r\n")


def test_a_bug_is_logged_and_answered_internal_error(caplog):
    class BrokenRouter(FakeRouter):
        def send(self, index, argv, on_reply):
            raise RuntimeError("boom")
    client = Client(router=BrokenRouter())
    with caplog.at_level(logging.ERROR):
        client.send(resp(b"RPUSH", b"q", b"x") + resp(b"PING"))
    assert client.transport.output == b"-ERR internal error\r\n+PONG\r\n"
    assert "boom" in caplog.text and "Traceback" in caplog.text
    assert not client.transport.closed


def test_json_from_a_shard_for_a_queue_command_is_not_written():
    client = Client()
    client.send(resp(b"RPUSH", b"q", b"x"))
    (rid,) = client.router.sent
    client.router.answer(rid, b'{"x":1}', wire.JSON)
    client.settle()
    assert client.transport.output == b"-ERR internal error\r\n"


def test_reading_pauses_above_the_high_water_mark_and_resumes_below(monkeypatch):
    monkeypatch.setattr(connection_module, "HIGH_WATER_SLOTS", 10)
    monkeypatch.setattr(connection_module, "LOW_WATER_SLOTS", 4)
    client = Client()
    q = queue_on(0)
    client.send(resp(b"RPUSH", q, b"x") * 10)
    assert not client.transport.read_paused
    client.send(resp(b"RPUSH", q, b"x"))
    assert client.transport.read_paused
    ids = sorted(client.router.sent)
    for rid in ids[:6]:
        client.router.answer(rid, b":1\r\n")
    client.settle()
    assert client.transport.read_paused                  # 5 outstanding: not yet
    client.router.answer(ids[6], b":1\r\n")
    client.settle()
    assert not client.transport.read_paused              # 4 outstanding


def test_a_full_write_buffer_pauses_reading():
    client = Client()
    client.conn.pause_writing()
    assert client.transport.read_paused
    client.conn.resume_writing()
    assert not client.transport.read_paused


def test_a_client_that_never_reads_is_disconnected():
    client = Client(config=ServerConfig(max_output_buffer=100))
    client.send(resp(b"PING"))
    client.transport.buffer_size = 101
    client.send(resp(b"PING"))
    assert client.transport.aborted


def test_connection_lost_cancels_requests_still_at_the_shards():
    client = Client()
    client.send(resp(b"RPUSH", queue_on(0), b"x") + resp(b"HMGET", queue_on(1), b"c", b"1", b"30")
                + resp(b"INFO", b"queues"))
    rpush, hmget = client.router.ids_for(b"RPUSH")[0], client.router.ids_for(b"HMGET")[0]
    info_ids = client.router.ids_for(b"INFO")
    client.router.answer(rpush, b":1\r\n")
    client.router.answer(info_ids[0], b"{}", wire.JSON)
    client.conn.connection_lost(None)
    assert sorted(client.router.cancelled) == sorted([hmget, info_ids[1]])
    assert client.conn not in client.frontend.connections
    client.settle()                                      # a flush scheduled before: harmless


def test_a_config_set_whose_client_left_still_applies_to_the_frontend():
    """Found by a hostile-client hunt: CONFIG SET server.max_message_size then a reset left
    the shards (and CONFIG GET) at the new value and the frontend at the old one."""
    client = Client(config=ServerConfig(max_get_count=100))
    client.send(resp(b"CONFIG", b"SET", b"server.max_get_count", b"5")
                + resp(b"INFO", b"queues"))
    client.conn.connection_lost(None)
    config_ids, info_ids = client.router.ids_for(b"CONFIG"), client.router.ids_for(b"INFO")
    assert sorted(client.router.cancelled) == sorted(info_ids)
    for rid in config_ids:
        client.router.answer(rid, b'{"ok":true}', wire.JSON)
    client.settle()
    assert client.frontend.limits.max_get_count == 5
    assert client.transport.output == b""                   # nobody to answer


def test_max_connections_refuses_one_more():
    router, loop = FakeRouter(), MockLoop()
    frontend = Frontend(ServerConfig(max_connections=2), router, loop)
    clients = [Client(frontend=frontend) for _ in range(3)]
    assert len(frontend.connections) == 2
    extra = clients[2].transport
    assert extra.output == b"-ERR max number of clients reached\r\n" and extra.closed
    clients[2].send(resp(b"PING"))
    assert extra.output == b"-ERR max number of clients reached\r\n"
    clients[0].conn.connection_lost(None)
    assert Client(frontend=frontend).transport.closed is False


def test_eof_answers_what_was_sent_then_closes():
    client = Client()
    client.send(resp(b"RPUSH", queue_on(0), b"x"))
    assert client.conn.eof_received() is True            # keep the transport open for replies
    (rid,) = client.router.sent
    client.router.answer(rid, b":1\r\n")
    client.settle()
    assert client.transport.output == b":1\r\n" and client.transport.closed
    idle = Client()
    assert idle.conn.eof_received() is False


def test_shutdown_finishes_outstanding_replies_then_closes():
    client = Client()
    client.send(resp(b"RPUSH", queue_on(0), b"x"))
    client.conn.shutdown()
    assert not client.transport.closed and client.transport.read_paused
    client.send(resp(b"PING"))                           # no new commands once stopping
    (rid,) = client.router.sent
    client.router.answer(rid, b":1\r\n")
    client.settle()
    assert client.transport.output == b":1\r\n" and client.transport.closed
    idle = Client()
    idle.conn.shutdown()
    assert idle.transport.closed


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_commands_split_across_reads(chunk):
    client = Client()
    data = resp(b"ECHO", b"hello") + b"PING\r\n" + resp(b"ECHO", b"")
    for i in range(0, len(data), chunk):
        client.send(data[i:i + chunk])
    assert client.transport.output == b"$5\r\nhello\r\n+PONG\r\n$0\r\n\r\n"


# --- access and limits (issue 4) ------------------------------------------------------------

NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"


def test_with_a_password_only_auth_hello_and_quit_run_before_auth():
    client = Client(config=ServerConfig(requirepass="pw"))
    client.send(resp(b"PING") + resp(b"RPUSH", b"q", b"x") + resp(b"INFO") + b"NOSUCH cmd\r\n"
                + resp(b"AUTH", b"bad") + resp(b"AUTH", b"other", b"pw") + resp(b"HELLO", b"3"))
    out = client.transport.output
    assert out.startswith(NOAUTH * 4 + WRONGPASS * 2 + b"-NOAUTH HELLO must be called")
    assert client.router.sent == {} and not client.transport.closed
    client.transport.writes.clear()
    client.send(resp(b"AUTH", b"pw") + resp(b"PING") + resp(b"RPUSH", b"q", b"x"))
    assert client.transport.output == b"+OK\r\n+PONG\r\n"
    assert [argv for _, argv, _ in client.router.sent.values()] == [[b"RPUSH", b"q", b"x"]]


def test_hello_auth_and_two_argument_auth_authenticate():
    client = Client(config=ServerConfig(requirepass="pw"))
    client.send(resp(b"HELLO", b"3", b"AUTH", b"default", b"pw") + resp(b"PING"))
    assert client.transport.output.startswith(b"%7\r\n") and client.transport.output.endswith(
        b"+PONG\r\n")
    other = Client(frontend=client.frontend)
    other.send(resp(b"AUTH", b"default", b"pw") + resp(b"PING"))
    assert other.transport.output == b"+OK\r\n+PONG\r\n"


def test_quit_before_auth_closes():
    client = Client(config=ServerConfig(requirepass="pw"))
    client.send(resp(b"QUIT") + resp(b"PING"))
    assert client.transport.output == b"+OK\r\n" and client.transport.closed


def test_pre_auth_limits_close_the_connection():
    client = Client(config=ServerConfig(requirepass="pw"))
    client.send(resp(*[b"x"] * 11))
    assert client.transport.output == b"-ERR Protocol error: unauthenticated multibulk length\r\n"
    assert client.transport.closed
    client = Client(config=ServerConfig(requirepass="pw"))
    client.send(b"*2\r\n$4\r\nAUTH\r\n$16385\r\n")
    assert client.transport.output == b"-ERR Protocol error: unauthenticated bulk length\r\n"
    assert client.transport.closed


def test_a_big_command_pipelined_behind_auth_runs_once_authenticated():
    client = Client(config=ServerConfig(requirepass="pw"))
    body = b"m" * 100_000
    client.send(resp(b"AUTH", b"pw") + resp(b"RPUSH", b"q", body) + resp(b"PING"))
    assert client.transport.output == b"+OK\r\n"     # PING waits for RPUSH (order)
    ((_, argv, _),) = client.router.sent.values()
    assert argv == [b"RPUSH", b"q", body] and not client.transport.closed


def test_the_same_pipeline_with_a_wrong_password_is_a_protocol_error():
    client = Client(config=ServerConfig(requirepass="pw"))
    client.send(resp(b"AUTH", b"no") + resp(b"RPUSH", b"q", b"m" * 100_000) + resp(b"PING"))
    assert client.transport.output == (WRONGPASS + b"-ERR Protocol error: unauthenticated "
                                       b"bulk length\r\n")
    assert client.transport.closed and client.router.sent == {}


def test_readers_hold_the_limits_of_their_session():
    client = Client()
    assert client.conn.session.authenticated
    assert client.conn._reader.limits is client.frontend.frame_limits
    authed = Client(config=ServerConfig(requirepass="pw"))
    assert authed.conn._reader.limits is authed.frontend.before_auth_limits
    authed.send(resp(b"AUTH", b"pw"))
    assert authed.conn._reader.limits is authed.frontend.frame_limits


def public_client(config, peer):
    router, loop = FakeRouter(), MockLoop()
    frontend = Frontend(config, router, loop)
    client = Client.__new__(Client)
    client.router, client.loop, client.frontend = router, loop, frontend
    client.transport = MockTransport(peer=peer)
    client.conn = Connection(frontend)
    client.conn.connection_made(client.transport)
    return client


def test_protected_mode_denies_non_loopback_clients_of_a_public_bind():
    public = ServerConfig(bind="0.0.0.0:9797")
    denied = public_client(public, ("192.0.2.7", 40000))
    assert denied.transport.output.startswith(b"-DENIED Floki is running in protected mode")
    assert denied.transport.output.endswith(b"\r\n") and denied.transport.closed
    assert denied.frontend.connections == set()
    denied.send(resp(b"PING"))
    assert denied.transport.output.count(b"\r\n") == 1
    for peer in (("127.0.0.1", 1), ("::1", 1, 0, 0), ("::ffff:127.0.0.1", 1, 0, 0)):
        local = public_client(public, peer)
        local.send(resp(b"PING"))
        assert local.transport.output == b"+PONG\r\n"
    for config in (ServerConfig(bind="0.0.0.0:9797", requirepass="pw"),
                   ServerConfig(bind="0.0.0.0:9797", protected_mode=False)):
        remote = public_client(config, ("192.0.2.7", 40000))
        remote.send(resp(b"PING"))
        assert not remote.transport.output.startswith(b"-DENIED") and not remote.transport.closed


def test_an_oversized_argument_is_refused_and_the_connection_lives():
    client = Client(config=ServerConfig(max_message_size=65536))
    client.send(resp(b"RPUSH", b"q", b"ok", b"x" * 70_000) + resp(b"PING"))
    assert client.transport.output == (b"-ERR message too large (70000 bytes, max_message_size "
                                       b"is 65536)\r\n+PONG\r\n")
    assert client.router.sent == {} and not client.transport.closed


@pytest.mark.parametrize("config,data,error", [
    (ServerConfig(max_args=8), resp(*[b"a"] * 9), b"invalid multibulk length"),
    (ServerConfig(max_bulk_len=1024), b"*2\r\n$4\r\nECHO\r\n$1025\r\n", b"invalid bulk length"),
])
def test_max_args_and_max_bulk_len_close_the_connection(config, data, error):
    client = Client(config=config)
    client.send(resp(b"PING") + data)
    assert client.transport.output == b"+PONG\r\n-ERR Protocol error: " + error + b"\r\n"
    assert client.transport.closed


def test_idle_clients_are_closed_after_the_timeout():
    frontend = Frontend(ServerConfig(timeout=10), FakeRouter(), MockLoop())
    idle, busy, polling, slowloris = (Client(frontend=frontend) for _ in range(4))
    polling.send(resp(b"HMGET", queue_on(0), b"c", b"1", b"60"))
    slowloris.send(b"*1\r\n$4\r\nPI")
    frontend.sweep_idle(100.0)                 # first sweep: everyone counts as just active
    frontend.sweep_idle(105.0)
    busy.send(resp(b"PING"))
    slowloris.send(b"N")
    frontend.sweep_idle(109.9)
    assert not any(c.transport.closed for c in (idle, busy, polling, slowloris))
    frontend.sweep_idle(110.0)
    assert idle.transport.aborted and slowloris.transport.aborted
    assert not busy.transport.closed and not polling.transport.closed   # a parked poll waits
    frontend.sweep_idle(119.8)                 # its PING was seen by the sweep at 109.9
    assert not busy.transport.closed
    frontend.sweep_idle(119.9)
    assert busy.transport.aborted


def test_a_client_reading_slowly_is_not_idle_but_a_stuck_one_is():
    frontend = Frontend(ServerConfig(timeout=10), FakeRouter(), MockLoop())
    client = Client(frontend=frontend)
    client.transport.buffer_size = 5000
    frontend.sweep_idle(0.0)
    for now in (8.0, 16.0, 24.0):
        client.transport.buffer_size -= 1000   # the client reads
        frontend.sweep_idle(now)
    assert not client.transport.closed
    frontend.sweep_idle(33.0)
    assert not client.transport.closed
    frontend.sweep_idle(34.0)                  # nothing read for 10 s
    assert client.transport.aborted
