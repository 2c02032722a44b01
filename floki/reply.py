"""RESP reply encoders (sans-I/O): values in, bytes out.

Owns: the bytes of every reply Floki sends. Shared by the shards (which answer data commands with
ready RESP bytes that the frontend forwards unchanged) and the frontend (local commands).
Rules:
  1. Replies that travel from a shard are protocol-neutral: they use only simple strings,
     errors, integers, bulk strings and arrays, whose bytes are the same in RESP2 and RESP3.
  2. Nulls and maps differ between RESP2 and RESP3, so their encoders take `protover`.
  3. Error replies come from errors.to_reply, never from here.
"""
from __future__ import annotations

from typing import Iterable

OK = b"+OK\r\n"
EMPTY_ARRAY = b"*0\r\n"


def simple(text: str) -> bytes:
    return b"+" + text.encode() + b"\r\n"


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def null(protover: int) -> bytes:
    return b"_\r\n" if protover >= 3 else b"$-1\r\n"


def array(items: Iterable[bytes]) -> bytes:
    """`items` are already-encoded replies."""
    items = list(items)
    return b"*%d\r\n" % len(items) + b"".join(items)


def map_(pairs: Iterable[tuple[bytes, bytes]], protover: int) -> bytes:
    """RESP3 map; RESP2 gets the same pairs as a flat array. Keys and values are encoded replies."""
    pairs = list(pairs)
    head = b"%%%d\r\n" % len(pairs) if protover >= 3 else b"*%d\r\n" % (2 * len(pairs))
    return head + b"".join(k + v for k, v in pairs)


def json_array(text: bytes) -> bytes:
    """INFO and CONFIG answers: a one-element array holding a JSON document."""
    return b"*1\r\n" + bulk(text)


def messages(items: list[tuple[int, int, bytes | memoryview]]) -> bytes:
    """HMGET reply: an array of [id, ticket, body] with id and ticket as RESP integers.

    Bodies may be any bytes-like object: Segment.read hands out large ones as memoryview
    slices of its read buffer, so the one join below is the only copy a body gets between
    the pread and the reply.
    """
    parts = [b"*%d\r\n" % len(items)]
    append = parts.append
    for message_id, ticket, body in items:
        append(b"*3\r\n:%d\r\n:%d\r\n$%d\r\n" % (message_id, ticket, len(body)))
        append(body)
        append(b"\r\n")
    return b"".join(parts)
