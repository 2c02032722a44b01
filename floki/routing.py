"""Queue name -> shard index: the only place routing is decided.

Rule: a stable hash (CRC32 of the name's bytes, never Python's salted hash()) modulo the shard
count, so every process, on every host and after every restart, agrees on a queue's shard.
"""
from __future__ import annotations

import zlib


def shard_for(queue: str, shard_count: int) -> int:
    """Returns the index (0..shard_count-1) of the shard that owns `queue`."""
    return zlib.crc32(queue.encode("ascii")) % shard_count
