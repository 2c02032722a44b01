"""Queue: one queue's directory, its Wal, its Channels, its settings, retention and checkpoints.

Owns: id allocation (never reused), delivery (get/ack/seek/purge over the Channels), retention,
the two checkpoint files (queue.json: settings, channel names, id high-water mark, clean flag;
channels.json: every channel's cursor and unacked ids) and the queue's LOCK.
Rules:
  1. Ids only grow, across purge, restart, lost checkpoints, torn tails and power loss: an id
     above the durable high-water mark (queue.json) is never handed out; the mark is raised by
     a block and made durable first. Only a clean close() records the exact next id, and only
     the primary queue.json's record of it is trusted: a previous generation (.prev) may be
     one raise of the mark behind, so ids then continue PREVIOUS_GENERATION_ID_MARGIN above it.
     The clean flag is cleared on disk before the log changes (first push or purge), not at
     open, so opening an idle queue after a clean stop writes nothing. A new queue's first
     queue.json already reserves the first block (and holds no clean flag), so its first push
     writes nothing either.
  2. Delivery is at-least-once. A channel restored from a checkpoint is never ahead of what it
     had acked: a bad channels.json falls back to the previous generation (channels.json.prev),
     then to the oldest retained id (full redelivery); a channel is never lost or skipped.
  3. With fsync = "always" no consumer sees an id that is not yet fsynced (wal.synced_next_id),
     so a crash can never take back a message someone already received.
  4. Retention removes whole segments, oldest first, stopping at the first one kept, never the
     active one. Soft retention never removes what a channel still needs; a queue with no
     channels keeps everything (nobody has consumed it). Hard retention ignores channels.
  5. Bodies are read from the Wal for one reply and never kept. A get stops adding messages
     once their bodies reach MAX_GET_BYTES (it always holds at least one), so one reply's
     memory is bounded whatever count and message sizes it meets; redeliveries left out stay
     due, before anything new.
  6. One process per queue: LOCK is flock'ed exclusively (non-blocking) for the Queue's life.
  7. channels.json also stores the log's durable position (wal.py rule 8), written only after
     the fsync it describes; it is refreshed with every checkpoint and whenever it lags the
     last fsync by POSITION_CHECKPOINT_BYTES, so after a crash only the records past it are
     checked one by one at open.
  8. Periodic disk work (the interval fsync, the maintenance checkpoint) may run on the shard's
     background worker as one job per queue (background.py rules a-g): the snapshot and the
     positions are captured here on the loop, the job writes them, and its outcome is applied
     here. Every synchronous write of this queue's files (queue.json, an explicit checkpoint,
     purge, close, delete, and through the Wal a roll or a segment removal) first waits for
     that job (_settle).
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
from operator import itemgetter
from pathlib import Path
from typing import Any, Sequence

from floki.config import ConfigError, QueueSettings
from floki.errors import (ChannelNotFound, FlokiError, InvalidParameter, QueueAlreadyExists,
                          QueueNotFound)
from floki.names import validate_name
from floki.shard import checkpoint, fileio, files, locks
from floki.shard.background import BackgroundWorker, Job, WorkerStopped, release_to
from floki.shard.channel import Channel
from floki.shard.checkpoint import CheckpointCorrupt
from floki.shard.segment import MAX_SEGMENT_BYTES, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE
from floki.shard.wal import DurablePosition, PendingSync, Wal

log = logging.getLogger(__name__)

FORMAT = 1                      # queue.json and channels.json "format"
ID_BLOCK = 65536                # the high-water mark is raised by at least this many ids
# The most ids one push can hold (a batch never splits and must fit one segment file).
MAX_BATCH_IDS = (MAX_SEGMENT_BYTES - SEGMENT_HEADER_SIZE) // RECORD_HEADER_SIZE
# One raise moves the mark from h to at most h + n + max(ID_BLOCK, 2n) for a batch of n ids,
# so a queue.json generation is never more than this ahead of the one before it (rule 1).
PREVIOUS_GENERATION_ID_MARGIN = 3 * max(ID_BLOCK, MAX_BATCH_IDS)
# channels.json is rewritten when the durable log position moved this far since the stored
# one: the most a restart after a crash re-checks record by record beyond the last fsync.
POSITION_CHECKPOINT_BYTES = 4 << 20
# The bodies one get returns at most, by the index (rule 5); at least one message always.
MAX_GET_BYTES = 64 << 20


class QueueLocked(Exception):
    """Another process (or another Queue object) holds this queue's LOCK."""


class UnsupportedQueueFormat(Exception):
    """queue.json or channels.json says a format this code does not know (a newer Floki)."""


class Queue:
    """One open queue. Create it with Queue.create() or Queue.open(); not thread-safe."""

    def __init__(self, data_dir: Path, name: str, directory: Path, lock_fd: int,
                 settings: QueueSettings, fsync: str):
        self.data_dir = data_dir
        self.name = name
        self.directory = directory
        self.settings = settings
        self.fsync = fsync                      # "never" | "interval" | "always"
        self._lock_fd: int | None = lock_fd
        self._wal: Wal | None = None
        self._channels: dict[str, Channel] = {}
        self._high_water = 0                    # durable: no id above it has been handed out
        self._dirty = False                     # channel state changed since the checkpoint
        # True once channels.json on disk is known good, so it may become the .prev generation
        self._channels_file_good = False
        self._queue_file_good = False
        self._clean_on_disk = False             # queue.json on disk records a clean stop
        self._stored_position: DurablePosition | None = None    # in channels.json on disk
        self.messages_pushed = 0                # since this process opened it (/metrics)
        # Rule 8: the background job in flight (at most one), and what ticks asked for while
        # it was (coalesced into the next job, background.py rule d).
        self._job: _PeriodicJob | None = None
        self._want_sync = False
        self._want_checkpoint = False

    # --- create / open ----------------------------------------------------------------------

    @classmethod
    def create(cls, data_dir: Path, name: str, settings: QueueSettings, fsync: str) -> "Queue":
        """Creates the queue's directory, files and first segment.

        Returns the open queue. Raises InvalidParameter (bad name), QueueAlreadyExists,
        QueueLocked, DiskFull / StorageIOError.
        """
        data_dir = Path(data_dir)
        name = validate_name(name)
        directory = files.queue_dir(data_dir, name)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            try:
                directory.mkdir()
            except FileExistsError:
                if _holds_a_queue(directory):
                    raise QueueAlreadyExists() from None
                # A create that crashed before its first file: nothing in it is data.
                log.warning("queue %r: reusing the empty directory of an unfinished create",
                            name)
            files.fsync_directory(data_dir)
        except OSError as exc:
            raise files.storage_error(exc, "create queue") from exc
        queue = cls(data_dir, name, directory, _lock(directory, name), settings, fsync)
        try:
            # Rule 1: the first block of ids is reserved (and no clean flag written) in the
            # queue.json a create writes anyway, so the first push needs no write of its own.
            queue._high_water = ID_BLOCK
            queue._write_queue_file(clean_next_id=None)
            queue._open_wal(segment_size=settings.segment_size, min_next_id=1)
            queue.checkpoint()
        except BaseException:
            queue._abandon_quietly()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        log.info("queue %r created", name)
        return queue

    @classmethod
    def open(cls, data_dir: Path, name: str, defaults: QueueSettings, fsync: str) -> "Queue":
        """Recovers an existing queue: settings and channel names from queue.json, the log from
        its segments, channel positions from channels.json (rule 2), ids per rule 1.

        Returns the open queue (a clean-stop flag on disk is cleared before the log first
        changes, rule 1).
        Raises InvalidParameter, QueueNotFound, QueueLocked, UnsupportedQueueFormat,
        CorruptSegment / UnsupportedFormat (unusable segment), DiskFull / StorageIOError.
        """
        data_dir = Path(data_dir)
        name = validate_name(name)
        directory = files.queue_dir(data_dir, name)
        if not directory.is_dir():
            raise QueueNotFound()
        queue = cls(data_dir, name, directory, _lock(directory, name), defaults, fsync)
        try:
            queue._recover(defaults)
        except BaseException:
            queue._abandon_quietly()
            raise
        return queue

    def _recover(self, defaults: QueueSettings) -> None:
        meta = self._read_checkpoint(files.queue_file(self.directory), "queue.json",
                                     _valid_queue_file)
        meta_is_primary = meta is not None and self._queue_file_good
        positions = self._read_checkpoint(files.channels_file(self.directory), "channels.json",
                                          _valid_channels_file)
        snapshots: dict[str, Any] = positions["channels"] if positions else {}
        stored_position = DurablePosition.from_dict(positions.get("log")) if positions else None
        clean_next_id = None
        if meta is not None:
            self.settings = _settings_from(meta.get("settings", {}), defaults, self.name)
            names = list(meta.get("channels", snapshots))
            self._high_water = meta["id_high_water"]
            if meta_is_primary:
                clean_next_id = meta.get("clean_next_id")
                min_next_id = (clean_next_id if clean_next_id is not None
                               else self._high_water + 1)
            else:
                # Rule 1: the lost primary may have raised the mark (and ids may have been
                # handed out above this one, then lost with a torn tail); its clean flag may
                # be older than pushes since. Skip every id the lost generation could cover.
                if meta.get("clean_next_id") is not None:
                    log.error("queue %r: not trusting the clean stop recorded in %s", self.name,
                              files.previous_path(files.queue_file(self.directory)).name)
                min_next_id = self._high_water + 1 + PREVIOUS_GENERATION_ID_MARGIN
        else:
            log.error("queue %r: queue.json and its previous generation are unusable: settings "
                      "are the server defaults, channel names come from channels.json, and ids "
                      "continue from the segments on disk (an id lost with a torn tail could "
                      "be handed out again)", self.name)
            names = list(snapshots)
            min_next_id = 1
        # An unacked id in a checkpoint was delivered, so it was handed out: never below it.
        min_next_id = max([min_next_id] + [_last_unacked(s) + 1 for s in snapshots.values()])
        self._open_wal(segment_size=self.settings.segment_size, min_next_id=min_next_id,
                       clean_stop=clean_next_id is not None, durable=stored_position)
        first_id = self._wal.first_id
        for channel_name in names:
            channel = self._restore_channel(channel_name, snapshots.get(channel_name), first_id)
            if channel is not None:
                self._channels[channel.name] = channel
        high_water = self._high_water
        self._high_water = max(self._high_water, self._wal.next_id - 1)
        # queue.json is rewritten only when it would say something else than it does: a
        # clean flag stays until the log first changes (rule 1), so an idle queue's open
        # costs no fsync.
        self._clean_on_disk = clean_next_id is not None
        unchanged = (meta_is_primary and self._high_water == high_water
                     and meta.get("settings") == self.settings.to_dict()
                     and meta.get("channels") == sorted(self._channels))
        if not unchanged:
            self._write_queue_file(clean_next_id=None)
        self._stored_position = stored_position if self._channels_file_good else None
        if not self._channels_file_good or self._dirty or self._stored_position_is_stale():
            self.checkpoint()
        log.info("queue %r opened: ids %d..%d, %d segment(s), %d channel(s)", self.name,
                 first_id, self._wal.next_id - 1, len(self._wal.segments()), len(self._channels))

    def _open_wal(self, **options) -> None:
        """Opens the Wal (Wal.open's options) and has it wait for this queue's background job
        before its own synchronous disk work (rule 8)."""
        self._wal = Wal.open(self.directory, **options)
        self._wal.settle_background = self._settle

    def _stored_position_is_stale(self) -> bool:
        """True when the position in channels.json is ahead of what recovery found durable in
        the same segment (damage made recovery cut the log below it): it must not survive to
        a later open. A position behind the log is merely old, and still true."""
        stored, durable = self._stored_position, self._live_wal().durable
        return (stored is not None and durable is not None and stored.segment == durable.segment
                and (stored.offset > durable.offset or stored.end_id > durable.end_id))

    def _position_lag_bytes(self, durable: DurablePosition | None = None) -> int:
        """Bytes of the active segment that a restart after a crash would check record by
        record because channels.json does not yet know they are durable (at the Wal's durable
        position, or at `durable`, the one a background fsync will make true)."""
        if durable is None:
            durable = self._live_wal().durable
        stored = self._stored_position
        if durable is None:
            return 0
        if stored is None or stored.segment != durable.segment:
            return durable.offset - SEGMENT_HEADER_SIZE
        return durable.offset - stored.offset

    def _restore_channel(self, name: Any, snapshot: Any, first_id: int) -> Channel | None:
        try:
            name = validate_name(name)
        except Exception:
            log.error("queue %r: dropping invalid channel name %r from a checkpoint", self.name,
                      name)
            return None
        channel = None
        if snapshot is not None:
            try:
                channel = Channel.from_snapshot(name, snapshot)
            except ValueError as exc:
                log.error("queue %r: %s", self.name, exc)
        if channel is None:
            # Position unknown: redeliver everything retained rather than skip anything.
            log.error("queue %r: channel %r has no usable checkpoint; it restarts at the oldest "
                      "retained id %d (everything retained is delivered again)", self.name,
                      name, first_id)
            channel = Channel(name, first_id)
            self._dirty = True
        channel.skip_to(first_id)
        return channel

    def _read_checkpoint(self, path: Path, label: str, valid) -> dict | None:
        """Returns the newest good generation of a checkpoint file (the file, else its .prev),
        or None when neither is usable. Raises UnsupportedQueueFormat, StorageIOError."""
        good_flag = "_queue_file_good" if label == "queue.json" else "_channels_file_good"
        for candidate in (path, files.previous_path(path)):
            try:
                data = checkpoint.read_json(candidate)
                if data is None:
                    problem = "missing"
                else:
                    if isinstance(data.get("format"), int) and data["format"] > FORMAT:
                        raise UnsupportedQueueFormat(
                            f"{candidate}: format {data['format']} is newer than this Floki "
                            f"understands ({FORMAT})")
                    problem = valid(data)
            except CheckpointCorrupt as exc:
                problem = exc.reason
            if problem is None:
                if candidate == path:
                    setattr(self, good_flag, True)
                else:
                    log.error("queue %r: using the previous generation %s", self.name,
                              candidate.name)
                return data
            if candidate == path:
                log.error("queue %r: %s is %s", self.name, label, problem)
            elif problem != "missing":
                log.error("queue %r: %s is %s", self.name, candidate.name, problem)
        return None

    # --- channels ---------------------------------------------------------------------------

    def channel_names(self) -> list[str]:
        return sorted(self._channels)

    def has_channel(self, name: str) -> bool:
        return name in self._channels

    def create_channel(self, name: str) -> bool:
        """Adds a channel that sees only messages pushed from now on (seek to replay).

        Returns False if it already existed. The channel is durable when this returns.
        Raises InvalidParameter, DiskFull / StorageIOError.
        """
        name = validate_name(name)
        if name in self._channels:
            return False
        self._channels[name] = Channel(name, self._live_wal().next_id)
        try:
            # Positions first, then names: a crash in between leaves the create undone.
            self.checkpoint()
            self._write_queue_file(clean_next_id=None)
        except BaseException:
            del self._channels[name]
            self._dirty = True
            raise
        return True

    def delete_channel(self, name: str) -> bool:
        """Removes a channel and its state. Returns False if there was no such channel.
        Raises DiskFull / StorageIOError."""
        channel = self._channels.pop(name, None)
        if channel is None:
            return False
        try:
            # Names first, then positions: a crash in between leaves the delete done.
            self._write_queue_file(clean_next_id=None)
        except BaseException:
            self._channels[name] = channel
            raise
        self._dirty = True
        self.checkpoint()
        return True

    def _channel(self, name: str) -> Channel:
        channel = self._channels.get(name)
        if channel is None:
            raise ChannelNotFound()
        return channel

    # --- push -------------------------------------------------------------------------------

    def push(self, bodies: Sequence[bytes], now_ms: int) -> tuple[int, int]:
        """Appends the bodies as consecutive new ids in one write (not yet fsynced; with
        fsync = "always" the caller calls sync() before replying).

        Returns (first_id, last_id).
        Raises MessageTooLarge, DiskFull / StorageIOError (nothing of the batch stored).
        """
        wal = self._live_wal()
        job = self._job
        if job is not None and job.done:
            # A finished job's outcome counts from now: above all a failed fsync, which makes
            # this push the probe (wal.py rule 7). A job still running is not waited for.
            self._settle()
        last_id = wal.next_id + len(bodies) - 1
        if last_id > self._high_water or self._clean_on_disk:
            # also clears a clean flag left from open before the log changes (rule 1)
            self._raise_high_water(max(self._high_water,
                                       last_id + max(ID_BLOCK, 2 * len(bodies))))
        ids = wal.append(bodies, now_ms)
        self.messages_pushed += len(bodies)
        return ids

    def _raise_high_water(self, high_water: int) -> None:
        previous = self._high_water
        self._high_water = high_water
        try:
            self._write_queue_file(clean_next_id=None)
        except BaseException:
            self._high_water = previous
            raise

    @property
    def needs_sync(self) -> bool:
        return self._live_wal().needs_sync

    def sync(self, worker: BackgroundWorker | None = None) -> None:
        """fsyncs everything appended so far, here and now (the "always" group commit; a job in
        flight is waited for first); then, if the durable position moved
        POSITION_CHECKPOINT_BYTES past the stored one, a checkpoint stores it (rule 7), on
        `worker` when given (its failure is logged, not raised: it only makes a restart after
        a crash slower).
        Raises DiskFull / StorageIOError when the fsync fails."""
        self._live_wal().sync()              # waits for the job in flight first (rule 8)
        if self._position_lag_bytes() < POSITION_CHECKPOINT_BYTES:
            return
        if worker is not None:
            self._start_periodic(worker)
            return
        try:
            self.checkpoint()
        except FlokiError as exc:
            log.warning("queue %r: cannot store the durable log position: %s", self.name, exc)

    # --- get / ack --------------------------------------------------------------------------

    def get(self, channel: str, count: int, now: float) -> list[tuple[int, int, bytes]]:
        """Hands out up to `count` messages: expired and restored deliveries first (each with
        a new ticket; one whose message is gone or unreadable is dropped), then new messages in
        id order, within the channel's max_in_flight.

        Returns [(id, ticket, body), ...]. Raises ChannelNotFound, StorageIOError.
        """
        wal = self._live_wal()
        ch = self._channel(channel)
        if count <= 0:
            return []
        cap = self.settings.max_in_flight
        timeout_s = self.settings.message_timeout
        out: list[tuple[int, int, bytes]] = []
        unread: set[int] = set()
        due = ch.take_due(now, count, cap)
        if due:
            self._dirty = True
            try:
                bodies, unread = self._read_ids(due, MAX_GET_BYTES)
            except BaseException:
                ch.return_due(due)          # an I/O error must not lose the redeliveries
                raise
            if unread:                      # past the reply's byte budget: due again
                ch.return_due(unread)
                due = [id_ for id_ in due if id_ not in unread]
            kept = [id_ for id_ in due if id_ in bodies]
            if len(kept) < len(due):
                log.warning("queue %r channel %r: %d redelivery(ies) dropped: message removed "
                            "or unreadable", self.name, channel, len(due) - len(kept))
            tickets = ch.hand_out(kept, now, timeout_s)
            ch.messages_redelivered += len(kept)
            out.extend((id_, t, bodies[id_]) for id_, t in zip(kept, tickets))
        room = min(count - len(out), cap - ch.in_flight_count)
        stop = self._readable_end()
        budget = MAX_GET_BYTES - sum(len(body) for _, _, body in out)
        if room > 0 and ch.next_id < stop and not unread and (budget > 0 or not out):
            self._dirty = True
            records, scanned_to = wal.read_within(ch.next_id, room, stop, budget)
            tickets = ch.hand_out(list(map(itemgetter(0), records)), now, timeout_s)
            out.extend([(id_, t, body) for (id_, body), t in zip(records, tickets)])
            # The ids below scanned_to that read_within did not return are removed, missing
            # or corrupt, and are never served: don't rescan them.
            ch.advance_to(scanned_to)
        ch.messages_delivered += len(out)
        return out

    def _read_ids(self, ids: Sequence[int], max_bytes: int) -> tuple[dict[int, bytes], set[int]]:
        """Returns ({id: body} for the ids still readable, the ids left unread because the
        bodies read reached `max_bytes`), one read per run of ids, in id order; the first id
        is always read."""
        found: dict[int, bytes] = {}
        ordered = sorted(ids)
        wal = self._live_wal()
        budget = max_bytes
        start = 0
        for k in range(1, len(ordered) + 1):
            if k == len(ordered) or ordered[k] != ordered[k - 1] + 1:
                first, last = ordered[start], ordered[k - 1]
                if budget <= 0 and found:
                    return found, {i for i in ordered[start:] if i not in found}
                pairs, scanned_to = wal.read_within(first, last - first + 1, last + 1, budget)
                found.update(pairs)
                budget -= sum(len(body) for _, body in pairs)
                if scanned_to <= last:
                    return found, {i for i in ordered[start:] if i >= scanned_to}
                start = k
        return found, set()

    def _readable_end(self) -> int:
        """One past the highest id a consumer may see (rule 3)."""
        wal = self._live_wal()
        return wal.synced_next_id if self.fsync == "always" else wal.next_id

    def has_available(self, channel: str, now: float) -> bool:
        """True when get(channel, 1, now) would (most likely) return a message: a due
        redelivery, or a new message within the in-flight cap. Unknown channel: False."""
        ch = self._channels.get(channel)
        if ch is None:
            return False
        cap = self.settings.max_in_flight
        if ch.has_due(now, cap):
            return True
        return (ch.in_flight_count < cap
                and max(ch.next_id, self._live_wal().first_id) < self._readable_end())

    def next_wakeup(self, channel: str) -> float | None:
        """Returns the earliest deadline in flight on the channel (when a redelivery becomes
        available without a push), or None."""
        ch = self._channels.get(channel)
        return None if ch is None else ch.next_deadline()

    def ack(self, channel: str, tickets: Sequence[int], now: float) -> int:
        """Returns how many tickets were live and unexpired (unknown channel: 0)."""
        ch = self._channels.get(channel)
        if ch is None:
            return 0
        acked = ch.ack(tickets, now)
        if acked:
            self._dirty = True
            ch.messages_acked += acked
        return acked

    # --- seek / purge -----------------------------------------------------------------------

    def seek_id(self, channel: str, id: int) -> None:
        """The channel next reads `id` (the oldest retained one if `id` is gone; nothing until
        it is written if it is in the future). Its deliveries in flight are dropped. Durable
        at return, so a restart never undoes a rewind. Raises ChannelNotFound,
        DiskFull / StorageIOError."""
        ch = self._channel(channel)
        ch.seek(max(id, self._live_wal().first_id))
        self._dirty = True
        self.checkpoint()

    def seek_timestamp(self, channel: str, timestamp_s: float) -> None:
        """The channel next reads the first message stamped at or after `timestamp_s` (Unix
        seconds). Otherwise as seek_id. Raises ChannelNotFound, DiskFull / StorageIOError."""
        self._channel(channel)
        if not math.isfinite(timestamp_s):
            raise InvalidParameter("Invalid Timestamp")
        # Rounding first keeps 0.29 s from becoming 290.00000000000006 -> 291 ms.
        timestamp_ms = math.ceil(round(timestamp_s * 1000, 6))
        self.seek_id(channel, self._live_wal().find_id_by_timestamp(timestamp_ms))

    def purge_channel(self, channel: str) -> bool:
        """Skips everything written so far for one channel; its in-flight set is dropped.
        Durable at return, as a seek is: a crash must not hand the purged messages out again.
        Returns False if there is no such channel. Raises DiskFull / StorageIOError."""
        ch = self._channels.get(channel)
        if ch is None:
            return False
        ch.purge(self._live_wal().next_id)
        self._dirty = True
        self.checkpoint()
        return True

    def purge(self) -> None:
        """Drops every message (ids keep growing) and moves every channel to the head.
        Raises DiskFull / StorageIOError."""
        wal = self._live_wal()
        if self._clean_on_disk:
            self._write_queue_file(clean_next_id=None)      # before the log changes (rule 1)
        wal.purge()
        for ch in self._channels.values():
            ch.purge(wal.next_id)
        self._dirty = True
        self.checkpoint()

    # --- settings ---------------------------------------------------------------------------

    def set_setting(self, key: str, raw: str) -> None:
        """Changes one of this queue's settings (floki.toml syntax); durable at return.
        Raises ConfigError (nothing changed), DiskFull / StorageIOError."""
        new = self.settings.with_value(key, raw)
        old, self.settings = self.settings, new
        try:
            self._write_queue_file(clean_next_id=None)
        except BaseException:
            self.settings = old
            raise
        self._live_wal().segment_size = new.segment_size

    # --- maintenance ------------------------------------------------------------------------

    def maintenance(self, now: float, now_ms: int, fsync_due: bool,
                    worker: BackgroundWorker | None = None) -> None:
        """One maintenance tick: retention (here), then a checkpoint if channel state changed
        (or the durable position lags, rule 7), and an fsync if `fsync_due` in "interval" mode.

        With `worker`, the fsync and the checkpoint are one background job (rule 8); a tick
        while this queue's job is in flight is coalesced: resume_background() submits it when
        that job is applied. Without one they run here, fsync first, so the checkpoint stores
        the position it made durable.
        Raises DiskFull / StorageIOError: of retention, and without a worker of the fsync or
        the checkpoint (with a worker their failures are handled when the job is applied).
        """
        self._apply_retention(now_ms, release_to(worker))
        self._want_checkpoint = True
        if fsync_due and self.fsync == "interval":
            self._want_sync = True
        self._start_periodic(worker)

    @property
    def unsynced_bytes(self) -> int:
        """Bytes written to the active segment that no completed fsync covers yet."""
        return self._live_wal().unsynced_bytes

    def interval_sync(self, worker: BackgroundWorker | None = None) -> None:
        """The fsync timer's tick ("interval" mode): what maintenance() does with fsync_due,
        without retention and without a checkpoint unless the durable position lags (rule 7).
        Raises as maintenance() does."""
        if self.fsync == "interval":
            self._want_sync = True
        self._start_periodic(worker)

    def resume_background(self, job: Job, worker: BackgroundWorker | None) -> None:
        """Loop side, once the worker completed `job` (this queue's): applies it unless
        something already waited for it, then submits the work ticks coalesced meanwhile
        (background.py rule d; with no worker, e.g. at shutdown, that work is left to the
        clean close). Never waits: a newer job in flight carries the coalesced work instead.
        Nothing for a closed queue.
        Raises what applying the job raises (only non-Exception errors, rule c)."""
        if self._job is job:
            job.apply()
        if self._wal is None or worker is None or self._job is not None:
            return
        if self._want_sync or self._want_checkpoint:
            self._start_periodic(worker)

    @property
    def background_job(self) -> "_PeriodicJob | None":
        """This queue's background job in flight, if any (rule 8)."""
        return self._job

    def _start_periodic(self, worker: BackgroundWorker | None) -> None:
        """Builds the periodic job ticks asked for and submits it to `worker`, or runs it here
        (no worker: errors raised; worker stopped: errors logged)."""
        if worker is None:
            self._settle()
        elif self._job is not None:
            return                          # coalesced (background.py rule d)
        job = self._build_periodic_job(inline=worker is None)
        if job is None:
            return
        self._job = job
        if worker is not None:
            try:
                worker.submit(job)
                return
            except WorkerStopped:
                log.info("queue %r: background worker stopped; doing its work here", self.name)
        job.run()
        job.apply()
        if job.inline and job.failure is not None:
            if job.failure is job.checkpoint_error:
                raise job.failure
            raise job.failure from job.sync_error

    def _build_periodic_job(self, inline: bool) -> "_PeriodicJob | None":
        """Captures, on the loop, what the periodic job will write (background.py rule b).
        Returns None when there is nothing to do. Raises OSError if the segment's fd cannot be
        duplicated."""
        wal = self._live_wal()
        want_sync = self._want_sync and self.fsync == "interval"
        want_checkpoint = self._want_checkpoint
        self._want_sync = self._want_checkpoint = False
        pending = wal.start_sync() if want_sync else None
        durable_now = wal.durable
        position = pending.position if pending is not None else durable_now
        store = ((want_checkpoint and self._dirty)
                 or self._position_lag_bytes(position) >= POSITION_CHECKPOINT_BYTES)
        if pending is None and not store:
            return None
        snapshot = None
        if store:
            snapshot = self._snapshot()
            # Cleared now: a change after this snapshot sets it again; a failed write of the
            # snapshot sets it again when the job is applied (rule c).
            self._dirty = False
        return _PeriodicJob(self, pending, snapshot, self._channels_file_good, durable_now,
                            inline)

    def _finish_job(self, job: "_PeriodicJob") -> None:
        """Loop side (Job.finish): applies a periodic job's outcome (background.py rules b, c).
        Raises what the job's work raised if that was not an Exception (a test's power loss)."""
        self._job = None
        wal = self._wal
        if job.sync is not None and wal is not None:
            job.failure = wal.finish_sync(job.sync, job.sync_error)
        if job.snapshot is not None:
            if job.checkpoint_error is None and job.stored:
                self._channels_file_good = True
                self._stored_position = job.stored_position
            else:
                self._dirty = True          # the next tick writes it (rule c)
                if job.failure is None:
                    job.failure = job.checkpoint_error
                if not job.inline:
                    log.error("queue %r: checkpoint failed (%s); retrying at the next tick",
                              self.name, job.checkpoint_error,
                              exc_info=not isinstance(job.checkpoint_error, FlokiError))
        if job.error is not None:
            raise job.error

    def _settle(self) -> None:
        """Waits for this queue's background job in flight, if any, and applies it (rule 8).
        Raises what applying it raises (only non-Exception errors)."""
        job = self._job
        if job is not None:
            job.apply()

    def _apply_retention(self, now_ms: int, release=None) -> None:
        """Removes whole segments from the oldest, stopping at the first one kept (rule 4);
        their fds are closed by `release` when given (background.release_to)."""
        wal = self._live_wal()
        s = self.settings
        hard_period_ms = s.hard_retention_period * 1000
        soft_period_ms = s.retention_period * 1000
        needed_from = min((ch.oldest_unacked() for ch in self._channels.values()), default=None)
        removed = []
        hard_end = 0          # end of what hard retention removed: only it drops unread ids
        for segment in wal.segments():
            if segment.active:
                break
            total_bytes = wal.disk_bytes()
            age_ms = (math.inf if segment.newest_timestamp_ms is None
                      else now_ms - segment.newest_timestamp_ms)
            hard = ((hard_period_ms and age_ms > hard_period_ms)
                    or (s.hard_retention_size and total_bytes > s.hard_retention_size))
            if not hard:
                consumed = needed_from is not None and needed_from >= segment.end_id
                keep_for_replay = ((soft_period_ms and age_ms <= soft_period_ms)
                                   or (s.retention_size and total_bytes <= s.retention_size))
                if not consumed or keep_for_replay:
                    break
            wal.remove_oldest_segment(release)
            removed.append(segment)
            if hard:
                hard_end = segment.end_id
            log.info("queue %r: %s retention removed ids %d..%d", self.name,
                     "hard" if hard else "soft", segment.first_id, segment.end_id - 1)
        if removed:
            first_id = wal.first_id
            for ch in self._channels.values():
                oldest = ch.oldest_unacked()
                if oldest < first_id:
                    # Soft retention removes only what every channel acked, so a channel
                    # behind first_id after it stands in a crash's id gap: nothing was lost.
                    if oldest < hard_end:
                        log.warning("queue %r channel %r: hard retention removed unacked "
                                    "messages below id %d", self.name, ch.name, hard_end)
                    ch.skip_to(first_id)
                    self._dirty = True

    # --- checkpoints ------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Writes channels.json (every cursor and unacked id runs) atomically, keeping the
        previous good file as channels.json.prev, here and now (a job in flight is waited for
        first). Raises DiskFull / StorageIOError."""
        self._settle()
        wal = self._live_wal()
        # Read before writing: the position was made true by an fsync that already returned.
        position = wal.durable
        data = _channels_data(self._snapshot(), position)
        self._replace(files.channels_file(self.directory), data, "_channels_file_good")
        self._stored_position = position
        self._dirty = False

    def _snapshot(self) -> dict:
        """Returns channels.json's content but the log position: fresh objects, never changed
        afterwards, so another thread may encode them (background.py rule b)."""
        return {"format": FORMAT,
                "channels": {n: ch.snapshot() for n, ch in sorted(self._channels.items())}}

    def _write_queue_file(self, clean_next_id: int | None) -> None:
        data = {"format": FORMAT, "settings": self.settings.to_dict(),
                "id_high_water": self._high_water, "clean_next_id": clean_next_id,
                "channels": sorted(self._channels)}
        self._replace(files.queue_file(self.directory), data, "_queue_file_good")
        self._clean_on_disk = clean_next_id is not None

    def _replace(self, path: Path, data: dict, good_flag: str) -> None:
        """Replaces a checkpoint file, first keeping the current one (known good) as .prev,
        after this queue's background job (rule 8). Raises DiskFull / StorageIOError."""
        self._settle()
        _replace_file(path, data, getattr(self, good_flag), self.name)
        setattr(self, good_flag, True)

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Clean stop: fsync, final checkpoint, exact next id recorded (so the restart leaves
        no id gap), LOCK released. Idempotent. Raises DiskFull / StorageIOError (the queue is
        closed anyway; the next open then treats the stop as a crash)."""
        wal = self._wal
        if wal is None:
            return
        try:
            self._settle()
            wal.sync()
            self.checkpoint()
            self._high_water = wal.next_id - 1
            self._write_queue_file(clean_next_id=wal.next_id)
        finally:
            self._abandon()

    def delete(self) -> None:
        """Closes the queue and removes its directory and every file in it. The object is dead
        afterwards. The directory is first renamed to a hidden name (still holding the LOCK),
        so a crash leaves either the whole queue or no queue.
        Raises StorageIOError if the rename fails (the queue is closed, its files untouched)."""
        try:
            self._settle()
            self._close_wal(sync=False)
            trash = files.deleting_dir(self.data_dir, self.name, secrets.token_hex(4))
            try:
                os.rename(self.directory, trash)
                files.fsync_directory(self.data_dir)
            except OSError as exc:
                raise files.storage_error(exc, "delete queue") from exc
        finally:
            self._unlock()
        shutil.rmtree(trash, ignore_errors=True)
        log.info("queue %r deleted", self.name)

    def _abandon(self) -> None:
        """Closes the Wal (with its fsync) and releases the LOCK, whatever fails."""
        try:
            self._close_wal(sync=True)
        finally:
            self._unlock()

    def _abandon_quietly(self) -> None:
        """_abandon() for a queue that failed to open: the first error is the one to report."""
        try:
            self._abandon()
        except Exception as exc:
            log.warning("queue %r: cleanup after a failed open: %s", self.name, exc)

    def _close_wal(self, sync: bool) -> None:
        wal, self._wal = self._wal, None
        if wal is None:
            return
        try:
            wal.close()
        except Exception as exc:
            if sync:
                raise
            log.warning("queue %r: closing the log before delete: %s", self.name, exc)

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)      # closing the descriptor releases the flock

    def _live_wal(self) -> Wal:
        if self._wal is None:
            raise ValueError(f"queue {self.name!r} is closed")
        return self._wal

    # --- INFO -------------------------------------------------------------------------------

    def info(self, now: float) -> dict:
        """Returns the queue's INFO entry: head (next id to be written), tail (oldest retained
        id), segments, disk_usage (bytes), corrupt_records, and per channel its position (next
        id it reads), in_flight (unexpired deliveries) and backlog (messages not yet read)."""
        wal = self._live_wal()
        segments = wal.segments()
        return {
            "head": wal.next_id, "tail": wal.first_id, "segments": len(segments),
            "disk_usage": wal.disk_bytes(), "corrupt_records": wal.corrupt_records,
            "channels": {
                name: {"position": ch.next_id, "in_flight": ch.live_in_flight_count(now),
                       "backlog": _backlog(segments, ch.next_id)}
                for name, ch in sorted(self._channels.items())},
        }

    def stats(self) -> dict:
        """Returns the queue's numbers for /metrics (cheap: no scan of the deliveries in
        flight, unlike info()): messages_pushed, disk_bytes, segments, and per channel its
        delivered / redelivered / acked counters, backlog (messages at or after its cursor,
        counted per segment: the ids skipped after a crash are not messages) and in_flight
        (deliveries not acked, expired ones not yet taken back included)."""
        wal = self._live_wal()
        segments = wal.segments()
        return {
            "messages_pushed": self.messages_pushed, "disk_bytes": wal.disk_bytes(),
            "segments": len(segments),
            "channels": {
                name: {"messages_delivered": ch.messages_delivered,
                       "messages_redelivered": ch.messages_redelivered,
                       "messages_acked": ch.messages_acked,
                       "backlog": _backlog(segments, ch.next_id),
                       "in_flight": ch.in_flight_count}
                for name, ch in self._channels.items()},
        }


# --- the periodic job (rule 8) -------------------------------------------------------------------

class _PeriodicJob(Job):
    """One queue's periodic disk work on the background worker: an interval fsync of its log,
    then channels.json with the snapshot taken on the loop and the position that fsync made
    durable (the one durable before it, if it failed). Either part may be absent."""

    def __init__(self, queue: Queue, sync: PendingSync | None, snapshot: dict | None,
                 keep_previous: bool, durable_before: DurablePosition | None, inline: bool):
        super().__init__(queue)
        self.queue = queue
        self.sync = sync
        self.snapshot = snapshot
        self.keep_previous = keep_previous     # channels.json on disk was known good
        self.durable_before = durable_before
        self.inline = inline                   # run by the caller, who raises its failure
        self.path = files.channels_file(queue.directory)
        self.name = queue.name
        self.sync_error: BaseException | None = None
        self.checkpoint_error: BaseException | None = None
        self.stored = False
        self.stored_position: DurablePosition | None = None
        self.failure: BaseException | None = None   # set by finish(): an inline caller raises it

    def work(self) -> None:
        if self.sync is not None:
            try:
                self.sync.run()
            except BaseException as exc:
                self.sync_error = exc
                if not isinstance(exc, Exception):
                    raise
            finally:
                self.fsync_seconds = self.sync.fsync_seconds
        if self.snapshot is not None:
            synced = self.sync is not None and self.sync_error is None
            position = self.sync.position if synced else self.durable_before
            try:
                _replace_file(self.path, _channels_data(self.snapshot, position),
                              self.keep_previous, self.name)
            except BaseException as exc:
                self.checkpoint_error = exc
                if not isinstance(exc, Exception):
                    raise
            else:
                self.stored, self.stored_position = True, position

    def finish(self) -> None:
        self.queue._finish_job(self)


# --- helpers ------------------------------------------------------------------------------------

def _channels_data(snapshot: dict, position: DurablePosition | None) -> dict:
    """Returns channels.json's content: the channels' snapshot (Queue._snapshot, not changed)
    plus the log position that was durable when it was taken, if any."""
    data = dict(snapshot)
    if position is not None:
        data["log"] = position.to_dict()
    return data


def _replace_file(path: Path, data: dict, keep_previous: bool, queue_name: str) -> None:
    """Replaces a checkpoint file; with `keep_previous` (the current file is known good) it is
    first kept as .prev. Touches only these files, and only through fileio, so the
    background worker may run it (background.py rule f).
    Raises DiskFull / StorageIOError, TypeError / ValueError (data not JSON)."""
    if keep_previous:
        previous = files.previous_path(path)
        link_tmp = files.tmp_path(previous)
        try:
            try:
                fileio.unlink(link_tmp)
            except FileNotFoundError:
                pass
            # A hard link keeps the current file in place until the new one replaces it,
            # so there is no moment without a primary; write_atomic's directory fsync
            # makes this rename durable too.
            fileio.link(path, link_tmp)
            fileio.replace(link_tmp, previous)
        except OSError as exc:
            log.warning("queue %r: cannot keep %s (%s); writing without a backup",
                        queue_name, previous.name, exc)
            # An older generation must never pass for the one just before the new file
            # (rule 1 bounds how far the primary is ahead of its .prev).
            try:
                fileio.unlink(previous)
            except FileNotFoundError:
                pass
            except OSError as unlink_exc:
                log.error("queue %r: cannot remove the stale %s either: %s", queue_name,
                          previous.name, unlink_exc)
    checkpoint.write_json(path, data)


def _backlog(segments: Sequence, position: int) -> int:
    """Messages at or after `position`, counted per segment: the ids a crash skipped (the
    high-water mark's gap between segments) are not messages."""
    return sum(max(0, seg.end_id - max(seg.first_id, position)) for seg in segments)


def _lock(directory: Path, name: str) -> int:
    """Takes the queue's LOCK. Returns its fd. Raises QueueLocked, StorageIOError."""
    try:
        fd = os.open(files.lock_path(directory), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise files.storage_error(exc, "open LOCK") from exc
    try:
        return locks.hold(fd)
    except locks.LockHeld:
        raise QueueLocked(f"queue {name!r} is in use by another process "
                          f"({files.lock_path(directory)} is locked)") from None
    except OSError as exc:
        raise files.storage_error(exc, "lock") from exc


def _holds_a_queue(directory: Path) -> bool:
    return files.queue_file(directory).exists() or bool(files.list_segment_ids(directory))


def _settings_from(data: Any, defaults: QueueSettings, name: str) -> QueueSettings:
    if isinstance(data, dict):
        try:
            return QueueSettings.from_dict(data, base=defaults)
        except ConfigError as exc:
            log.error("queue %r: stored settings unusable (%s); using the server defaults",
                      name, exc)
    return defaults


def _last_unacked(snapshot: Any) -> int:
    """Returns the highest unacked id a channel checkpoint entry lists (0 if none/garbled)."""
    try:
        last = snapshot["unacked"][-1][1]
    except (TypeError, KeyError, IndexError):
        return 0
    return last if _is_count(last) else 0


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_queue_file(data: dict) -> str | None:
    """Returns what is wrong with a queue.json object, or None."""
    if data.get("format") != FORMAT:
        return f"of unknown format {data.get('format')!r}"
    if not _is_count(data.get("id_high_water")):
        return "missing a valid id_high_water"
    clean = data.get("clean_next_id")
    if clean is not None and not (_is_count(clean) and clean >= 1):
        return "holding an invalid clean_next_id"
    channels = data.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        return "holding an invalid channel list"
    return None


def _valid_channels_file(data: dict) -> str | None:
    """Returns what is wrong with a channels.json object, or None (entries are checked one by
    one when restored)."""
    if data.get("format") != FORMAT:
        return f"of unknown format {data.get('format')!r}"
    if not isinstance(data.get("channels"), dict):
        return "missing its channels"
    return None

