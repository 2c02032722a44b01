"""Catalog: the set of queues one shard owns.

Owns: which queues this shard has open, opening them at start, creating and deleting them.
Rules:
  1. A shard opens only the queues that routing.shard_for assigns to it, so after the shard count
     changes every queue is still opened by exactly one shard (each Queue also holds a flock).
  2. A queue that fails to open (damaged beyond repair, locked by another process) is logged and
     listed in `broken`; the shard keeps serving every other queue.
  3. Names are validated before they reach a path (floki.names).
  4. At start a shard removes the `.deleting-<queue>-<token>` directories of the queues it
     owns: a queue is renamed there before its files go (Queue.delete, floki rebalance), so one
     left by a crash is garbage, never a queue.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from floki.config import QueueSettings
from floki.errors import QueueAlreadyExists, QueueNotFound
from floki.routing import shard_for
from floki.shard import files
from floki.shard.queue import Queue

log = logging.getLogger(__name__)


class Catalog:
    def __init__(self, data_dir: Path, index: int, shard_count: int,
                 defaults: QueueSettings, fsync: str):
        self.data_dir = Path(data_dir)
        self.index = index
        self.shard_count = shard_count
        self.defaults = defaults
        self.fsync = fsync
        self.queues: dict[str, Queue] = {}
        self.broken: dict[str, str] = {}  # queue name -> why it could not be opened

    def owns(self, name: str) -> bool:
        return shard_for(name, self.shard_count) == self.index

    def open_all(self) -> None:
        """Opens every queue on disk that this shard owns."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name in files.list_queue_names(self.data_dir):
            if not self.owns(name):
                continue
            try:
                self.queues[name] = Queue.open(self.data_dir, name, self.defaults, self.fsync)
            except Exception as exc:  # one bad queue must not take the shard down
                log.error("queue %r not opened: %s", name, exc, exc_info=True)
                self.broken[name] = str(exc)
        log.info("shard %d: %d queues open, %d broken", self.index, len(self.queues),
                 len(self.broken))
        self._remove_deleted_leftovers()

    def _remove_deleted_leftovers(self) -> None:
        """Rule 4. The owner of a name removes it, so two shards never race over one."""
        try:
            entries = list(os.scandir(self.data_dir))
        except OSError as exc:
            log.warning("could not list %s for leftovers of deleted queues: %s",
                        self.data_dir, exc)
            return
        for entry in entries:
            name = files.deleting_dir_queue(entry.name)
            if name is None or not self.owns(name) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                shutil.rmtree(entry.path)
            except OSError as exc:
                log.warning("could not remove %s, left by deleting queue %r: %s",
                            entry.path, name, exc)
            else:
                log.info("removed %s: what a crash left of deleting queue %r", entry.name, name)

    def get(self, name: str) -> Queue:
        """Returns the open queue. Raises QueueNotFound."""
        queue = self.queues.get(name)
        if queue is None:
            raise QueueNotFound()
        return queue

    def __contains__(self, name: str) -> bool:
        return name in self.queues

    def __iter__(self) -> Iterator[Queue]:
        return iter(list(self.queues.values()))

    def create(self, name: str) -> Queue:
        """Creates a new queue with the current defaults. Raises QueueAlreadyExists."""
        if name in self.queues or name in self.broken:
            raise QueueAlreadyExists()
        queue = Queue.create(self.data_dir, name, self.defaults, self.fsync)
        self.queues[name] = queue
        return queue

    def delete(self, name: str) -> bool:
        """Deletes the queue and its files. Returns False if there is no such queue.

        Raises StorageIOError: the queue is then closed with its files in place, and listed in
        `broken` (rule 2) until a restart opens it again.
        """
        queue = self.queues.pop(name, None)
        if queue is None:
            return False
        try:
            queue.delete()
        except Exception as exc:
            log.error("queue %r: delete failed, queue closed: %s", name, exc)
            self.broken[name] = f"delete failed: {exc}"
            raise
        return True

    def set_fsync(self, mode: str) -> None:
        self.fsync = mode
        for queue in self.queues.values():
            queue.fsync = mode

    def close(self) -> None:
        """Clean stop: every queue fsyncs and writes its final checkpoint."""
        for name, queue in list(self.queues.items()):
            try:
                queue.close()
            except Exception:
                log.exception("queue %r: close failed", name)
        self.queues.clear()
