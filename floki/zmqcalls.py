"""pyzmq's C-level socket calls, bound once, for the frontend's router and the shard's loop.

Owns: the aliases and int flags both hot paths use, and `message_waiting`.
Rules:
  1. Hot paths call `send_frame` / `recv_frame` with the int flags below: the sugar's
     send_multipart/recv_multipart type-check every part and build a flag enum per frame (and
     recv_multipart one per getsockopt), together about three times the cost of the calls.
  2. Whether a message waits is asked with `message_waiting` (ZMQ_EVENTS, 2.4 us), never found
     out by a recv that fails: pyzmq builds an Again exception (strerror and all) for every
     EAGAIN, 8.7 us, and a lone command met two on each side. ZMQ_EVENTS is also what libzmq
     documents for reading its edge-triggered FD.
"""
from __future__ import annotations

import zmq

send_frame = zmq.backend.Socket.send
recv_frame = zmq.backend.Socket.recv
MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
NOBLOCK = int(zmq.NOBLOCK)

_get_option = zmq.backend.Socket.get
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def message_waiting(sock: zmq.Socket) -> bool:
    """True when a message can be received from `sock` now (rule 2)."""
    return bool(_get_option(sock, _EVENTS) & _POLLIN)
