"""reply.messages, the HMGET reply: the bytes must not depend on how the bodies are held.

Since segment.read hands out bodies of LARGE_BODY_BYTES and more as memoryview slices of one
pread buffer (never copied before the reply), these tests pin the encoding against a reference
spelled out the slow, obvious way, for bytes, memoryview and bytearray bodies of every size
class, and read the result back with hiredis (the parser the frontend and clients use).
"""
from __future__ import annotations

import random

import hiredis
import pytest
from hypothesis import given, settings, strategies as st

from floki import reply
from floki.shard.segment import LARGE_BODY_BYTES, Segment, encode_batch

SIZES = [0, 1, 100, LARGE_BODY_BYTES - 1, LARGE_BODY_BYTES, LARGE_BODY_BYTES + 1, 65536, 70000,
         5]


def reference_messages(items) -> bytes:
    """The RESP array of [id, ticket, body] arrays, one field at a time."""
    out = b"*" + str(len(items)).encode() + b"\r\n"
    for message_id, ticket, body in items:
        body = bytes(body)
        out += b"*3\r\n"
        out += b":" + str(message_id).encode() + b"\r\n"
        out += b":" + str(ticket).encode() + b"\r\n"
        out += b"$" + str(len(body)).encode() + b"\r\n" + body + b"\r\n"
    return out


def _parsed(data: bytes):
    reader = hiredis.Reader()
    reader.feed(data)
    value = reader.gets()
    assert reader.gets() is False                   # exactly one reply, nothing left over
    return value


@pytest.mark.parametrize("kind", [bytes, memoryview, bytearray])
def test_messages_match_the_reference_for_a_mix_of_sizes(kind):
    rng = random.Random(1)
    bodies = [rng.randbytes(n) for n in SIZES]
    items = [(1000 + i, (1 << 62) + i, kind(body)) for i, body in enumerate(bodies)]
    encoded = reply.messages(items)
    assert type(encoded) is bytes
    assert encoded == reference_messages(items)
    assert _parsed(encoded) == [[1000 + i, (1 << 62) + i, body] for i, body in enumerate(bodies)]


def test_no_messages_is_an_empty_array():
    assert reply.messages([]) == b"*0\r\n" == reference_messages([])


def test_messages_of_bodies_read_from_a_segment(tmp_path):
    """What Queue.get hands over: small bodies as bytes, large ones as views of one buffer."""
    rng = random.Random(2)
    bodies = [rng.randbytes(n) for n in SIZES]
    segment = Segment.create(tmp_path, 1, 0)
    try:
        data, offsets = encode_batch(1, 7, bodies, segment.size_bytes)
        segment.append(data, offsets, 7)
        out: list = []
        segment.read(1, len(bodies), out)
    finally:
        segment.close()
    assert {type(body) for _, body in out} == {bytes, memoryview}
    items = [(id_, 9000 + id_, body) for id_, body in out]
    assert reply.messages(items) == reference_messages(
        [(id_, 9000 + id_, original) for id_, original in zip(range(1, 10), bodies)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=2**63 - 1),
                          st.integers(min_value=0, max_value=2**63 - 1),
                          st.binary(max_size=2 * LARGE_BODY_BYTES),
                          st.sampled_from([bytes, memoryview, bytearray])), max_size=12))
def test_messages_match_the_reference_property(raw):
    items = [(message_id, ticket, kind(body)) for message_id, ticket, body, kind in raw]
    encoded = reply.messages(items)
    assert encoded == reference_messages(items)
    assert _parsed(encoded) == [[m, t, body] for m, t, body, _ in raw]
