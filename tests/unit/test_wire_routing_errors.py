import pytest

from floki import errors, reply, wire
from floki.routing import shard_for


def test_request_round_trip_keeps_binary_args():
    frames = wire.encode_request(2**64 - 1, wire.COMMAND, [b"RPUSH", b"q", b"\x00\r\n\xff"])
    assert wire.decode_request(frames) == (2**64 - 1, wire.COMMAND, [b"RPUSH", b"q", b"\x00\r\n\xff"])


def test_only_resp_payloads_may_stay_views():
    # The frontend keeps large frames as views of ZeroMQ's buffers (wire.py "Zero copy"); a
    # RESP payload goes to the client as is, any other is read as bytes (json.loads needs them).
    big = memoryview(b"x" * wire.ZERO_COPY_BYTES)
    header = wire.encode_reply(3, wire.RESP, b"")[0]
    _, _, payload = wire.decode_reply([header, big])
    assert payload is big
    for status in (wire.JSON, wire.PONG):
        header = wire.encode_reply(3, status, b"")[0]
        _, _, payload = wire.decode_reply([header, memoryview(b'{"a": 1}')])
        assert type(payload) is bytes and payload == b'{"a": 1}'


def test_reply_round_trip():
    frames = wire.encode_reply(7, wire.JSON, b"{}")
    assert wire.decode_reply(frames) == (7, wire.JSON, b"{}")


def _command(argv_bytes: bytes) -> list[bytes]:
    return [wire.encode_request(1, wire.PING)[0][:8] + wire.COMMAND + argv_bytes]


@pytest.mark.parametrize("frames", [
    [], [b"1234567"], [b"12345678?"], [b"12345678C"],
    wire.encode_request(1, wire.PING) * 2,
    _command(b"\x00\x00\x00\x00"),                         # zero args
    _command(b"\x01\x00\x00\x00"),                         # lengths missing
    _command(b"\x01\x00\x00\x00\x05\x00\x00\x00abc"),       # shorter than its length says
    _command(b"\x01\x00\x00\x00\x01\x00\x00\x00abc"),       # trailing bytes
    _command(b"\xff\xff\xff\xff"),                         # absurd count
])
def test_malformed_requests_raise_wire_error(frames):
    with pytest.raises(wire.WireError):
        wire.decode_request(frames)


def test_request_is_one_frame_and_empty_args_survive():
    frames = wire.encode_request(5, wire.COMMAND, [b"PING", b""])
    assert len(frames) == 1
    assert wire.decode_request(frames) == (5, wire.COMMAND, [b"PING", b""])
    assert wire.decode_request(wire.encode_request(6, wire.CANCEL)) == (6, wire.CANCEL, [])


@pytest.mark.parametrize("frames", [[b"12345678R"], [b"1", b""], [b"12345678?", b""],
                                    [b"12345678R", b"", b""]])
def test_malformed_replies_raise_wire_error(frames):
    with pytest.raises(wire.WireError):
        wire.decode_reply(frames)


def test_routing_is_stable_and_spreads():
    # crc32 is fixed: these values must never change, or queues would move between shards.
    assert shard_for("orders", 4) == shard_for("orders", 4)
    assert {shard_for(f"q{i}", 4) for i in range(100)} == {0, 1, 2, 3}
    assert shard_for("orders", 1) == 0
    assert [shard_for(n, 7) for n in ("a", "orders", "x.y:z")] == [
        __import__("zlib").crc32(n.encode()) % 7 for n in ("a", "orders", "x.y:z")]


def test_error_replies_keep_floki_codes():
    assert errors.to_reply(errors.QueueNotFound()) == b"-QNF Queue Not Found\r\n"
    assert errors.to_reply(errors.ChannelNotFound()) == b"-CNF Channel Not Found\r\n"
    assert errors.to_reply(errors.QueueAlreadyExists()) == b"-QAE Queue Already Exists\r\n"
    assert errors.to_reply(errors.ChannelAlreadyExists()) == b"-CAE Channel Already Exists\r\n"
    assert errors.to_reply(errors.WrongArity("GET")) == (
        b"-ERR wrong number of arguments for 'get' command\r\n")
    assert errors.to_reply(errors.UnknownCommand("foo", [b"a", b"b"])) == (
        b"-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n")


def test_non_floki_exceptions_become_internal_error_and_lines_stay_single():
    assert errors.to_reply(KeyError("x")) == b"-ERR internal error\r\n"
    line = errors.to_reply(errors.InvalidParameter("bad\r\nvalue"))
    assert line.count(b"\r\n") == 1 and line.endswith(b"\r\n")
    assert errors.is_fatal(errors.ProtocolError("x")) and not errors.is_fatal(errors.NoAuth())


def test_reply_encoders():
    assert reply.messages([(1, 2, b"ab"), (3, 4, b"")]) == (
        b"*2\r\n*3\r\n:1\r\n:2\r\n$2\r\nab\r\n*3\r\n:3\r\n:4\r\n$0\r\n\r\n")
    assert reply.null(2) == b"$-1\r\n" and reply.null(3) == b"_\r\n"
    assert reply.map_([(reply.bulk(b"k"), reply.integer(1))], 3) == b"%1\r\n$1\r\nk\r\n:1\r\n"
    assert reply.map_([(reply.bulk(b"k"), reply.integer(1))], 2) == b"*2\r\n$1\r\nk\r\n:1\r\n"
    assert reply.json_array(b"{}") == b"*1\r\n$2\r\n{}\r\n"
