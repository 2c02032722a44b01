"""The frontend <-> shard message format over ZeroMQ (sans-I/O).

Owns: how requests and replies are framed between processes. Not pickle: shards may be remote
(tcp://) and unpickling network input runs code.

Batching: ZeroMQ's cost is per message, not per frame (each message wakes an I/O thread on
both sides: ~100 us of CPU per round trip on a small VM, against ~25 us for a bare unix socket).
So a ZeroMQ message carries MANY requests, one frame each: the frontend sends every request for
a shard that one client read (or one loop turn) produced as one message, and the shard answers
a frontend with messages of [header, payload] frame pairs: what a pass produced, sent at its
end or once it adds up (ShardServer._take_batch). Each frame stands alone; a malformed one is
dropped without its neighbours.

Request  (frontend DEALER -> shard ROUTER): ONE frame
  header: request_id u64 big-endian, kind 1 byte
  then for kind COMMAND: argc u32 little-endian, argc lengths u32 little-endian, the args
  concatenated (argv[0] the command name, args as the client sent them). One frame per request
  because ZeroMQ and pyzmq cost per frame: an RPUSH of 100 messages as 102 frames spent most of
  the frontend's and the shard's time in framing.
  kind COMMAND: the shard parses argv with floki.commands.parse (it trusts no frontend).
  kind CANCEL:  no args; the client that sent request_id has gone: drop its parked long poll.
  kind PING:    no args; heartbeat, answered with PONG.
  kind STATS:   no args; the shard's numbers for /metrics, answered with JSON (see
                ShardServer.stats: pid, start time, counters per queue and channel, histograms).
Reply    (shard -> frontend): TWO frames [header, payload] per reply
  header: request_id u64 big-endian, status 1 byte; payload separate so large bodies are
  never copied into a header buffer.
  status RESP:  payload is a complete RESP reply (also errors), sent to the client as is.
  status JSON:  payload is a JSON object, part of a fanned-out answer the frontend merges.
  status PONG:  payload is the shard's JSON status (index, pid, queue count).
request_id values are the frontend's own business.

Zero copy: frames of ZERO_COPY_BYTES and more are not copied out of ZeroMQ on either side. The
shard sends them with copy=False; the frontend keeps a RESP payload that large as a memoryview
of the received frame and hands it to the client's transport as is (the view keeps the frame
alive). decode_reply turns any other payload into bytes, so JSON and PONG readers get bytes.
"""
from __future__ import annotations

import struct

COMMAND = b"C"
CANCEL = b"X"
PING = b"P"
STATS = b"S"
RESP = b"R"
JSON = b"J"
PONG = b"O"

_REQUEST_KINDS = (COMMAND, CANCEL, PING, STATS)
_REPLY_STATUSES = (RESP, JSON, PONG)
_HEADER = struct.Struct(">Qc")
_COUNT = struct.Struct("<I")
MAX_ARGS = 1 << 24
# Below this a copy costs less than pyzmq's bookkeeping for an uncopied frame. W4 consume
# (10 x 64 KiB per get): shard sends 220-249 -> 269-286 MB/s; frontend receives and writes
# 340 -> 450 MB/s (median of four alternating runs each).
ZERO_COPY_BYTES = 64 * 1024


class WireError(ValueError):
    """A frame sequence that is not a valid message: drop it (and log), never crash."""


def encode_request(request_id: int, kind: bytes, args: list[bytes] | tuple = ()) -> list[bytes]:
    """Returns the frames of one request (a single frame)."""
    header = _HEADER.pack(request_id, kind)
    if kind != COMMAND:
        return [header]
    count = len(args)
    return [header + struct.pack(f"<I{count}I", count, *map(len, args)) + b"".join(args)]


def decode_request(frames: list[bytes]) -> tuple[int, bytes, list[bytes]]:
    """Returns (request_id, kind, args) of a request's frames (one). Raises WireError."""
    if len(frames) != 1:
        raise WireError("malformed request")
    return decode_request_frame(frames[0])


def decode_request_frame(frame: bytes) -> tuple[int, bytes, list[bytes]]:
    """Returns (request_id, kind, args) of one request frame, as a shard takes them from a
    batched message (module doc: "Batching"). Raises WireError."""
    if len(frame) < _HEADER.size:
        raise WireError("malformed request")
    request_id, kind = _HEADER.unpack_from(frame)
    if kind not in _REQUEST_KINDS:
        raise WireError("unknown request kind")
    if kind != COMMAND:
        return request_id, kind, []
    end = len(frame)
    if end < _HEADER.size + 4:
        raise WireError("command request without argv")
    (count,) = _COUNT.unpack_from(frame, _HEADER.size)
    position = _HEADER.size + 4 + 4 * count
    if not 0 < count <= MAX_ARGS or position > end:
        raise WireError("bad argument count")
    args = []
    append = args.append
    for length in struct.unpack_from(f"<{count}I", frame, _HEADER.size + 4):
        stop = position + length
        append(frame[position:stop])
        position = stop
    if position != end:
        raise WireError("argument lengths do not match the frame")
    return request_id, kind, args


def encode_reply(request_id: int, status: bytes, payload: bytes) -> list[bytes]:
    return [_HEADER.pack(request_id, status), payload]


def decode_replies(frames: list[bytes]) -> list[tuple[int, bytes, bytes]]:
    """Returns the (request_id, status, payload) of every [header, payload] pair of one
    message, in order. Raises WireError if any pair is malformed (then none is trusted)."""
    if not frames or len(frames) % 2:
        raise WireError("malformed reply")
    return [decode_reply(frames[i:i + 2]) for i in range(0, len(frames), 2)]


def decode_reply(frames: list) -> tuple[int, bytes, bytes | memoryview]:
    """Returns (request_id, status, payload); only a RESP payload may be a memoryview (module
    doc: "Zero copy"). Raises WireError."""
    if len(frames) != 2 or len(frames[0]) != _HEADER.size:
        raise WireError("malformed reply")
    request_id, status = _HEADER.unpack(frames[0])
    if status not in _REPLY_STATUSES:
        raise WireError("unknown reply status")
    payload = frames[1]
    if status != RESP and not isinstance(payload, bytes):
        payload = bytes(payload)
    return request_id, status, payload
