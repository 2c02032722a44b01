"""floki/zmqcalls.py: the C-level calls both hot paths share."""
from __future__ import annotations

import zmq

from floki.zmqcalls import MORE, NOBLOCK, message_waiting, recv_frame, send_frame


def test_message_waiting_tells_without_a_failed_recv():
    context = zmq.Context()
    try:
        a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        a.bind("inproc://zmqcalls")
        b.connect("inproc://zmqcalls")
        assert not message_waiting(b)
        send_frame(a, b"one", MORE)
        send_frame(a, b"two", NOBLOCK)
        assert zmq.select([b], [], [], 5.0)[0] and message_waiting(b)
        first = recv_frame(b, NOBLOCK, False)
        assert first.bytes == b"one" and first.more
        assert recv_frame(b, NOBLOCK) == b"two"
        assert not message_waiting(b)
        a.close(0)
        b.close(0)
    finally:
        context.term()
