"""Disk use follows data: an empty or small queue costs kilobytes, never a preallocated
segment (issue: 10,000 small queues must not cost 10,000 x segment_size)."""
from __future__ import annotations

import os

from floki.config import QueueSettings
from floki.shard.queue import Queue


def du_bytes(path) -> int:
    """Bytes actually allocated on disk under `path` (st_blocks, like du), not apparent sizes."""
    total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def test_many_small_queues_cost_kilobytes_each(tmp_path):
    settings = QueueSettings()              # segment_size 64 MiB
    count = 300
    for i in range(count):
        queue = Queue.create(tmp_path, f"small{i}", settings, "interval")
        queue.create_channel("c")
        queue.push([b"x" * 100] * 10, 1_700_000_000_000)
        queue.close()
    used = du_bytes(tmp_path)
    assert used < count * 64 * 1024, used                       # < 64 KiB per queue
    assert used < count * settings.segment_size // 1000


def test_segment_grows_with_its_data(tmp_path):
    queue = Queue.create(tmp_path, "grow", QueueSettings(), "interval")
    before = queue.info(0.0)["disk_usage"]
    queue.push([b"y" * 1000] * 1000, 1_700_000_000_000)
    after = queue.info(0.0)["disk_usage"]
    queue.close()
    assert before < 4096
    assert 1000 * 1000 < after < 1000 * 1000 + 64 * 1024
