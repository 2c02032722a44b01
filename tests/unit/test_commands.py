import pytest

from floki import requests as rq
from floki.commands import COMMANDS, Limits, parse
from floki.errors import (InvalidParameter, MessageTooLarge, MissingParameter, UnknownCommand,
                          WrongArity)

LIMITS = Limits(max_message_size=16, max_get_count=100)


def argv(text: str) -> list[bytes]:
    return [part.encode() for part in text.split()]


@pytest.mark.parametrize("text,expected", [
    ("RPUSH q a b", rq.Push("q", (b"a", b"b"))),
    ("rpush q a", rq.Push("q", (b"a",))),
    ("HMGET q c 10", rq.Get("q", "c", 10, 0.0)),
    ("hmget q c 0 2.5", rq.Get("q", "c", 0, 2.5)),
    ("HDEL q c 1 -2 9223372036854775807", rq.Ack("q", "c", (1, -2, 2**63 - 1))),
    ("HMSET q c ID 7", rq.SeekId("q", "c", 7)),
    ("hmset q c ts 1700000000.5", rq.SeekTimestamp("q", "c", 1700000000.5)),
    ("SET q c", rq.Create("q", "c", False)),
    ("SET q c nx", rq.Create("q", "c", True)),
    ("SETNX q c", rq.Create("q", "c", True)),
    ("DEL q", rq.Delete("q", None)),
    ("DEL q c", rq.Delete("q", "c")),
    ("SREM q *", rq.Purge("q", None)),
    ("SREM q c", rq.Purge("q", "c")),
    ("INFO", rq.InfoServer(bulk=True)),
    ("INFO server", rq.InfoServer()),
    ("INFO queues", rq.InfoQueues("")),
    ("INFO queues.or", rq.InfoQueues("or")),
    ("CONFIG GET server", rq.ConfigGetServer()),
    ("CONFIG GET queues.orders", rq.ConfigGetQueues("orders", exact=True)),
    ("CONFIG GET queues.ord*", rq.ConfigGetQueues("ord", exact=False)),
    ("CONFIG SET server.fsync always", rq.ConfigSetServer("fsync", "always")),
    ("CONFIG SET queues.a.b.message_timeout 5s", rq.QueueConfigSet("a.b", "message_timeout", "5s")),
    ("PING", rq.Ping(None)),
    ("ping hi", rq.Ping(b"hi")),
    ("HELLO 3 AUTH default pw SETNAME me", rq.Hello(3, ("default", b"pw"), "me")),
    ("client setinfo LIB-NAME redis-py", rq.ClientCommand("SETINFO", (b"LIB-NAME", b"redis-py"))),
    ("COMMAND DOCS", rq.CommandInfo("DOCS")),
    ("SELECT 0", rq.Select(0)),
])
def test_valid_commands_parse_to_requests(text, expected):
    assert parse(argv(text), LIMITS) == expected


@pytest.mark.parametrize("text,error,message", [
    ("RPUSH q", MissingParameter, "Queue or Value Missing"),
    ("HMGET q c", MissingParameter, "Queue or Channel or Count Missing"),
    ("HMGET q c x", InvalidParameter, "Invalid count value"),
    ("HMGET q c -1", InvalidParameter, "Invalid count value"),
    ("HMGET q c 101", InvalidParameter, "Invalid count value"),
    ("HMGET q c 99999999999999999999999999", InvalidParameter, "Invalid count value"),
    ("HMGET q c 1 nan", InvalidParameter, "Invalid timeout value"),
    ("HMGET q c 1 -1", InvalidParameter, "Invalid timeout value"),
    ("HMGET q c 1 1e12", InvalidParameter, "Invalid timeout value"),
    ("HMGET q c 1 2 3", WrongArity, "wrong number of arguments for 'hmget' command"),
    ("HDEL q c 1 x", InvalidParameter, "Invalid Ticket"),
    ("HMSET q c XX 1", InvalidParameter, "Invalid Seek Type Expected TS or ID"),
    ("HMSET q c ID -1", InvalidParameter, "Invalid ID"),
    ("HMSET q c TS soon", InvalidParameter, "Invalid Timestamp"),
    ("SET q c XX", InvalidParameter, "NX"),
    ("SET ../x c", InvalidParameter, "Invalid Identifier Name"),
    ("SET q /abs", InvalidParameter, "Invalid Identifier Name"),
    ("SET .hidden c", InvalidParameter, "Invalid Identifier Name"),
    ("INFO bogus", InvalidParameter, "Invalid INFO parameter"),
    ("CONFIG", MissingParameter, "Missing CONFIG Parameter"),
    ("CONFIG FOO x", InvalidParameter, "Invalid CONFIG Parameter"),
    ("CONFIG GET nothing", InvalidParameter, "Invalid CONFIG parameter"),
    ("CONFIG SET queues.x 1", InvalidParameter, "Invalid CONFIG SET parameter"),
    ("FLUSHALL", UnknownCommand, "unknown command 'FLUSHALL'"),
    ("PING a b", WrongArity, "'ping'"),
])
def test_bad_commands_raise_the_documented_error(text, error, message):
    with pytest.raises(error) as exc:
        parse(argv(text), LIMITS)
    assert message in exc.value.message


def test_oversized_message_rejects_the_whole_push():
    with pytest.raises(MessageTooLarge):
        parse([b"RPUSH", b"q", b"ok", b"x" * 17], LIMITS)


def test_empty_and_binary_names_are_refused():
    for name in (b"", b"a\x00b", b"x" * 201, "é".encode()):
        with pytest.raises(InvalidParameter):
            parse([b"SET", name, b"c"], LIMITS)
    assert parse([b"SET", b"x" * 200, b"c"], LIMITS).queue == "x" * 200


def test_no_argument_cap():
    bodies = [b"m"] * 5000
    assert len(parse([b"RPUSH", b"q", *bodies], LIMITS).bodies) == 5000


def test_every_request_type_is_produced_by_the_table():
    produced = {type(parse(argv(text), LIMITS)) for text in (
        "RPUSH q a", "HMGET q c 1", "HDEL q c 1", "HMSET q c ID 1", "HMSET q c TS 1", "SET q c",
        "DEL q", "SREM q *", "CONFIG SET queues.q.k v", "INFO", "INFO queues",
        "CONFIG GET server", "CONFIG GET queues", "CONFIG SET server.k v", "PING", "ECHO x",
        "QUIT", "SELECT 0", "AUTH pw", "HELLO", "CLIENT ID", "COMMAND")}
    assert produced == set(rq.SHARD_REQUESTS + rq.FANOUT_REQUESTS + rq.FRONTEND_REQUESTS)
    assert all(name == name.upper() for name in COMMANDS)


def test_rpush_and_hdel_carry_at_most_max_batch_each():
    # commands.py rule 4: a command a shard runs whole stays well below shard_timeout.
    from floki.commands import MAX_BATCH
    bodies = [b"x"] * MAX_BATCH
    assert len(parse([b"RPUSH", b"q", *bodies], Limits()).bodies) == MAX_BATCH
    with pytest.raises(InvalidParameter, match="Too many messages in one RPUSH"):
        parse([b"RPUSH", b"q", *bodies, b"x"], Limits())
    tickets = [b"7"] * MAX_BATCH
    assert len(parse([b"HDEL", b"q", b"c", *tickets], Limits()).tickets) == MAX_BATCH
    with pytest.raises(InvalidParameter, match="Too many tickets in one HDEL"):
        parse([b"HDEL", b"q", b"c", *tickets, b"7"], Limits())
