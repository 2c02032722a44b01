"""The frontend <-> shard message format over ZeroMQ multipart frames (sans-I/O).

Owns: how requests and replies are framed between processes. Not pickle: shards may be remote
(tcp://) and unpickling network input runs code.

Request  (frontend DEALER -> shard ROUTER):  [request_id, kind, *args]
  kind COMMAND: args = the client's argv, verbatim (argv[0] the command name); the shard parses it
                with floki.commands.parse, so bodies travel as the bytes hiredis produced.
  kind CANCEL:  args = [] ; the client that sent request_id has gone: drop its parked long poll.
  kind PING:    args = [] ; heartbeat, answered with PONG.
Reply    (shard -> frontend):                [request_id, status, payload]
  status RESP:  payload is a complete RESP reply (also errors), sent to the client as is.
  status JSON:  payload is a JSON object, part of a fanned-out answer the frontend merges.
  status PONG:  payload is the shard's JSON status (index, pid, queue count).
request_id is 8 bytes, big-endian unsigned; ids are the frontend's own business.
"""
from __future__ import annotations

import struct

COMMAND = b"C"
CANCEL = b"X"
PING = b"P"
RESP = b"R"
JSON = b"J"
PONG = b"O"

_REQUEST_KINDS = (COMMAND, CANCEL, PING)
_REPLY_STATUSES = (RESP, JSON, PONG)
_ID = struct.Struct(">Q")


class WireError(ValueError):
    """A frame sequence that is not a valid message: drop it (and log), never crash."""


def encode_request(request_id: int, kind: bytes, args: list[bytes] | tuple = ()) -> list[bytes]:
    return [_ID.pack(request_id), kind, *args]


def decode_request(frames: list[bytes]) -> tuple[int, bytes, list[bytes]]:
    """Returns (request_id, kind, args). Raises WireError."""
    if len(frames) < 2 or len(frames[0]) != 8 or frames[1] not in _REQUEST_KINDS:
        raise WireError("malformed request")
    if frames[1] == COMMAND and len(frames) < 3:
        raise WireError("command request without argv")
    return _ID.unpack(frames[0])[0], frames[1], frames[2:]


def encode_reply(request_id: int, status: bytes, payload: bytes) -> list[bytes]:
    return [_ID.pack(request_id), status, payload]


def decode_reply(frames: list[bytes]) -> tuple[int, bytes, bytes]:
    """Returns (request_id, status, payload). Raises WireError."""
    if len(frames) != 3 or len(frames[0]) != 8 or frames[1] not in _REPLY_STATUSES:
        raise WireError("malformed reply")
    return _ID.unpack(frames[0])[0], frames[1], frames[2]
