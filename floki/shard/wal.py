"""Wal: one queue's write-ahead log, an ordered list of segments in one directory.

Owns: which segments exist, the id sequence across them (next_id, first_id, synced_next_id),
rolling to a new segment, reads by id or timestamp across segments, retention's removal of the
oldest segment, purge, and recovery of the whole directory at open (see log_format.md).
Rules:
  1. Ids never go backwards: next_id = max(last id on disk + 1, first id of the newest segment,
     min_next_id). It is never derived from a checkpoint's list of segments: the directory is
     listed at every open.
  2. Ids inside a segment are dense. When next_id is not the active segment's end, the next
     append starts a new segment named next_id.
  3. A new segment's file and the directory entry are fsynced before the first acknowledged
     record lands in it; a segment is fsynced when it is sealed by a roll.
  4. Every append is one write of the whole batch, done before append returns; no record is
     held in user space and no per-message Python object is kept (4 bytes of index each).
  5. synced_next_id only moves in sync() and finish_sync() (or at open/roll/purge): every id
     below it is on disk.
  6. The active (last) segment is never removed by retention.
  7. A failed fsync makes the log FAILED (RELIABILITY rule 6): appends are refused with the
     error until an fsync succeeds again; the next append, or the next sync() (the shard's
     fsync timer), is that probe. Reads are never refused. A failed write needs no state: the
     batch was cut back, and the next append is its own probe.
  8. `durable` (a DurablePosition: active segment, byte offset, end id) only moves after the
     fsync that made it true succeeded, so a checkpoint that stores it is never ahead of the
     disk. After an unclean stop, open(durable=...) checks records one by one only after it
     (segment.py rule 7); a position that does not match the files exactly is ignored.
  9. The periodic fsync may run on the shard's background worker (background.py): start_sync()
     captures, on the loop, what it will cover (next_id, durable position) and dups the
     segment's fd; PendingSync.run() fsyncs on the worker; finish_sync(), on the loop again,
     moves synced_next_id and durable, or makes the log FAILED (rule 7). While one is pending,
     appends go on (they only write), but every synchronous fsync, roll, purge, segment removal
     and close first calls `settle_background` (set by the owner) to wait for the owner's job
     in flight, so only one fsync of this log is ever in flight and its outcome is applied
     before anything else touches the files.
"""
from __future__ import annotations

import enum
import logging
import os
import time
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from floki.errors import FlokiError, MessageTooLarge, StorageIOError
from floki.shard import fileio, files
from floki.shard.segment import (MAX_SEGMENT_BYTES, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE,
                                 CorruptSegment, Segment, UnfinishedSegment,
                                 UnsupportedFormat, encode_batch)

__all__ = ["Wal", "WalHealth", "SegmentInfo", "DurablePosition", "PendingSync",
           "CorruptSegment", "UnsupportedFormat"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentInfo:
    """What retention and INFO need to know about one segment."""
    first_id: int
    end_id: int                        # one past the last id
    size_bytes: int                    # the .seg file's size
    newest_timestamp_ms: int | None    # None while the segment holds no record
    active: bool                       # the newest segment, the one appends go to


@dataclass(frozen=True)
class DurablePosition:
    """Where the fsynced part of the active segment ends: every record of segment `segment`
    with an id below `end_id` is on disk and they end at byte `offset` (rule 8)."""
    segment: int            # the segment's first id (its name)
    offset: int             # bytes of the segment file that were fsynced (header included)
    end_id: int             # one past the last id those bytes hold

    def to_dict(self) -> dict:
        return {"segment": self.segment, "offset": self.offset, "end_id": self.end_id}

    @classmethod
    def from_dict(cls, data: object) -> "DurablePosition | None":
        """Returns the position a checkpoint stored, or None if `data` is not a sane one."""
        if not isinstance(data, dict):
            return None
        values = [data.get(key) for key in ("segment", "offset", "end_id")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        segment, offset, end_id = values
        if not (1 <= segment <= end_id and SEGMENT_HEADER_SIZE <= offset <= MAX_SEGMENT_BYTES):
            return None
        return cls(segment, offset, end_id)


@dataclass(eq=False)
class PendingSync:
    """One fsync of a log to be run off the loop (rule 9). Everything in it was captured on the
    loop by Wal.start_sync(); run() touches nothing else, so it is safe on another thread."""
    directory: Path
    segment_fd: int           # a dup of the active segment's fd, closed by run() (background g)
    index_path: Path          # the active segment's index, fsynced through a fd of run()'s own
    sync_directory: bool      # names changed since the last directory fsync (or a probe)
    probe: bool               # the log was FAILED: success makes it OK (rule 7)
    next_id: int              # synced_next_id once it succeeded
    position: DurablePosition  # durable once it succeeded (rule 8)
    fsync_seconds: float = 0.0
    ran: bool = False

    def run(self) -> None:
        """Worker side: fsyncs the segment, its index and, if needed, the directory; closes the
        dup'd fd whatever happens. Call once. Raises OSError."""
        started = time.perf_counter()
        try:
            fileio.fsync(self.segment_fd)
            files.fsync_file_if_present(self.index_path)
            if self.sync_directory:
                files.fsync_directory(self.directory)
        finally:
            self.ran = True
            self.fsync_seconds = time.perf_counter() - started
            fileio.close(self.segment_fd)

    def discard(self) -> None:
        """Releases the dup'd fd of a PendingSync that will never run."""
        if not self.ran:
            self.ran = True
            fileio.close(self.segment_fd)


class WalHealth(enum.Enum):
    OK = "ok"
    FAILED = "failed"       # an fsync failed; appends are refused until one succeeds (rule 7)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Wal:
    """The log of one queue. Create it with Wal.open(); it is not thread-safe."""

    def __init__(self, directory: Path, segments: list[Segment], *, segment_size: int,
                 next_id: int):
        self.directory = directory
        self._segments = segments
        self._first_ids = [s.first_id for s in segments]
        self.segment_size = segment_size
        self.next_id = next_id
        self.synced_next_id = next_id
        self.corrupt_records = sum(s.lost_records for s in segments)
        self._dir_dirty = False
        self._closed = False
        self.health = WalHealth.OK
        self.failure: FlokiError | None = None      # the error that made the log FAILED
        self._append_failing = False                # a write failed; logged once (rule 7)
        self.durable: DurablePosition | None = None  # set by open() and every sync (rule 8)
        self._pending: PendingSync | None = None     # a background fsync in flight (rule 9)
        # Waits for the owner's background job in flight and applies it (rule 9); the owner
        # (Queue) sets it. A Wal used alone never has one.
        self.settle_background: Callable[[], None] = _nothing

    # --- open and recovery ------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, *, segment_size: int, min_next_id: int = 1,
             clean_stop: bool = False, durable: DurablePosition | None = None) -> "Wal":
        """Opens (creating if needed) the log in `directory` and recovers it.

        min_next_id: the queue's durable high-water mark + 1; ids below it are never handed out.
        clean_stop: the log was closed cleanly (all fsynced), so the active segment's index is
        trusted and nothing is fsynced at open; otherwise the active segment's records are
        checked one by one (segment.py rule 7) after `durable`, the last position a checkpoint
        stored (rule 8), or from its start when there is none or it does not match.
        Returns the Wal, with at least one segment on disk.
        Raises CorruptSegment / UnsupportedFormat naming a segment file that cannot be used,
        StorageIOError / DiskFull for I/O errors.
        """
        directory = Path(directory)
        segments: list[Segment] = []
        newest: Segment | None = None
        try:
            if not directory.is_dir():
                directory.mkdir(parents=True)
                files.fsync_directory(directory.parent)
            ids = files.list_segment_ids(directory)
            floor = max(min_next_id, 1, ids[-1] if ids else 1)
            need_new_segment = not ids
            if ids:
                from_position = (None if durable is None or durable.segment != ids[-1]
                                 else (durable.end_id, durable.offset))
                try:
                    newest = Segment.open(directory, ids[-1], active=True,
                                          check_every_record=not clean_stop,
                                          durable=from_position)
                except UnfinishedSegment as exc:
                    # A crash while the newest segment was being created: it holds no record.
                    log.warning("%s; removing it and starting a fresh segment", exc)
                    fileio.unlink(files.segment_path(directory, ids[-1]))
                    _unlink_missing_ok(files.index_path(directory, ids[-1]))
                    need_new_segment = True
                for first_id in ids[:-1]:
                    segments.append(Segment.open(directory, first_id, active=False))
                if newest is not None:
                    segments.append(newest)
                    newest = None
            _clamp_overlaps(segments)
            _remove_orphan_indexes(directory, set(ids))
            next_id = max(floor, segments[-1].end_id if segments else 1)
            if need_new_segment:
                segments.append(Segment.create(directory, next_id, _now_ms()))
                files.fsync_directory(directory)
            else:
                # After kill -9 the recovered records may exist only in the page cache; make
                # them durable before anyone treats them as synced (rule 5). After a clean
                # stop everything was fsynced: only what recovery itself changed is.
                active = segments[-1]
                already_durable = clean_stop or (
                    durable is not None and durable.segment == active.first_id
                    and durable.offset == active.size_bytes
                    and durable.end_id == active.end_id)
                active.sync(force=not already_durable)
        except BaseException as exc:
            for segment in segments + ([newest] if newest is not None else []):
                segment.close()
            if isinstance(exc, OSError):
                raise files.storage_error(exc, f"open {directory}") from exc
            raise
        wal = cls(directory, segments, segment_size=segment_size, next_id=next_id)
        wal._note_durable()
        if wal.corrupt_records:
            log.error("queue log %s: %d record(s) unreadable", directory, wal.corrupt_records)
        return wal

    # --- state ------------------------------------------------------------------------------

    @property
    def first_id(self) -> int:
        """The oldest retained id; next_id when the log holds no record."""
        for segment in self._segments:
            if segment.end_id > segment.first_id:
                return segment.first_id
        return self.next_id

    @property
    def needs_sync(self) -> bool:
        """True when sync() has something to make durable, or must probe a FAILED log."""
        return (self.synced_next_id < self.next_id or self._dir_dirty
                or self.health is WalHealth.FAILED)

    @property
    def unsynced_bytes(self) -> int:
        """Bytes of the active segment no completed fsync has covered yet."""
        active = self._segments[-1]
        durable = self.durable
        if durable is not None and durable.segment == active.first_id:
            return active.size_bytes - durable.offset
        return active.size_bytes - SEGMENT_HEADER_SIZE

    def segments(self) -> list[SegmentInfo]:
        """Returns every segment, oldest first."""
        last = len(self._segments) - 1
        return [SegmentInfo(s.first_id, s.end_id, s.size_bytes, s.newest_timestamp_ms, i == last)
                for i, s in enumerate(self._segments)]

    def disk_bytes(self) -> int:
        """Returns the bytes of every segment and index file of this log."""
        return sum(s.size_bytes + s.index_bytes for s in self._segments)

    # --- writing ----------------------------------------------------------------------------

    def append(self, bodies: Sequence[bytes], timestamp_ms: int) -> tuple[int, int]:
        """Appends the bodies as consecutive ids stamped `timestamp_ms`, in one write.

        Returns (first_id, last_id) of the batch.
        Raises DiskFull / StorageIOError (nothing of the batch is kept, the Wal stays usable;
        while FAILED this is the probe's error, rule 7), MessageTooLarge when the batch cannot
        fit even an empty segment, ValueError when empty.
        """
        self._check_open()
        if not bodies:
            raise ValueError("append needs at least one body")
        if self.health is WalHealth.FAILED:
            self.sync()
        batch_bytes = len(bodies) * RECORD_HEADER_SIZE + sum(map(len, bodies))
        if SEGMENT_HEADER_SIZE + batch_bytes > MAX_SEGMENT_BYTES:
            raise MessageTooLarge(f"batch of {batch_bytes} bytes exceeds the "
                                  f"{MAX_SEGMENT_BYTES}-byte segment limit")
        active = self._segments[-1]
        limit = min(self.segment_size, MAX_SEGMENT_BYTES)
        if (active.end_id != self.next_id
                or active.end_id > active.first_id and active.size_bytes + batch_bytes > limit
                or active.size_bytes + batch_bytes > MAX_SEGMENT_BYTES):
            active = self._roll()
        first_id = self.next_id
        data, offsets = encode_batch(first_id, timestamp_ms, bodies, active.size_bytes)
        try:
            active.append(data, offsets, timestamp_ms)
        except OSError as exc:
            error = files.storage_error(exc, "append")
            if not self._append_failing:         # once per episode, not once per push
                log.error("queue log %s: %s; pushes fail until it is resolved",
                          self.directory, error)
                self._append_failing = True
            raise error from exc
        if self._append_failing:
            log.warning("queue log %s: appends work again", self.directory)
            self._append_failing = False
        self.next_id = first_id + len(bodies)
        return first_id, self.next_id - 1

    def _roll(self) -> Segment:
        """Seals the active segment and starts a new one named next_id (rules 2, 3).
        An empty active segment is removed instead of sealed. Returns the new segment.
        Raises DiskFull / StorageIOError with the old segment still active."""
        self._settle()
        old = self._segments[-1]
        old_is_empty = old.end_id == old.first_id
        if not old_is_empty:
            try:
                old.sync()
            except OSError as exc:
                raise self._fail(files.storage_error(exc, "sync")) from exc
            self.synced_next_id = max(self.synced_next_id, old.end_id)
        new = self._create_durable_segment("start a new segment")
        old.seal()
        if old_is_empty:
            try:
                old.unlink()
                self._segments.pop()
                self._first_ids.pop()
                self._dir_dirty = True
            except OSError as exc:      # harmless: an empty sealed segment holds no id
                log.warning("cannot remove empty segment %s: %s", old.path, exc)
        self._segments.append(new)
        self._first_ids.append(new.first_id)
        self._note_durable()                 # the new segment's header and name are fsynced
        log.info("queue log %s: new segment %s", self.directory, new.path.name)
        return new

    def _create_durable_segment(self, action: str) -> Segment:
        """Creates the segment named next_id and fsyncs the directory, so its name survives a
        power loss before any record lands in it. On failure nothing of it is left.
        Raises DiskFull / StorageIOError (naming `action`)."""
        try:
            new = Segment.create(self.directory, self.next_id, _now_ms())
        except OSError as exc:
            raise files.storage_error(exc, action) from exc
        try:
            files.fsync_directory(self.directory)
        except OSError as exc:
            new.close()
            _unlink_missing_ok(new.path)
            _unlink_missing_ok(new.index_path)
            raise files.storage_error(exc, action) from exc
        return new

    def sync(self) -> None:
        """fsyncs what was appended since the last sync (segment, index, directory entries).
        Cheap when there is nothing new. On a FAILED log this is the probe: everything is
        fsynced again and success makes the log OK (rule 7).
        Raises DiskFull / StorageIOError (the log is then FAILED)."""
        self._check_open()
        self._settle()
        if not self.needs_sync:
            return
        failed = self.health is WalHealth.FAILED
        try:
            self._segments[-1].sync(force=failed)
            if self._dir_dirty or failed:
                files.fsync_directory(self.directory)
                self._dir_dirty = False
        except OSError as exc:
            raise self._fail(files.storage_error(exc, "sync")) from exc
        self.synced_next_id = self.next_id
        self._note_durable()
        if failed:
            log.warning("queue log %s: fsync works again; accepting appends (it failed with: "
                        "%s)", self.directory, self.failure)
            self.health, self.failure = WalHealth.OK, None

    def _note_durable(self) -> None:
        """Records that the active segment is fsynced up to its end (rule 8). Call only right
        after an fsync that covered it (or at open, once recovery made it durable)."""
        active = self._segments[-1]
        self.durable = DurablePosition(active.first_id, active.size_bytes, active.end_id)

    def _fail(self, error: FlokiError) -> FlokiError:
        """Makes the log FAILED (rule 7). Returns `error` for the caller to raise."""
        if self.health is WalHealth.OK:
            log.error("queue log %s: %s; refusing appends until an fsync succeeds",
                      self.directory, error)
        self.health, self.failure = WalHealth.FAILED, error
        return error

    # --- background fsync (rule 9) ----------------------------------------------------------

    def start_sync(self) -> PendingSync | None:
        """Loop side: captures what an fsync started now covers, for a background worker to run
        (PendingSync.run) and finish_sync() to apply. At most one is pending at a time.

        Returns None when there is nothing to sync (needs_sync is False).
        Raises ValueError if one is already pending or the log is closed, OSError if the fd
        cannot be duplicated (nothing is pending then).
        """
        self._check_open()
        if self._pending is not None:
            raise ValueError(f"queue log {self.directory}: a background fsync is in flight")
        if not self.needs_sync:
            return None
        active = self._segments[-1]
        failed = self.health is WalHealth.FAILED
        # background.py rule g: the loop closes the segment's fd (roll, purge, close) only after
        # waiting for this sync, but a fd of its own keeps the job independent of that promise.
        fd = os.dup(active.fd)
        self._pending = PendingSync(
            self.directory, fd, active.index_path, sync_directory=self._dir_dirty or failed,
            probe=failed, next_id=self.next_id,
            position=DurablePosition(active.first_id, active.size_bytes, active.end_id))
        return self._pending

    def finish_sync(self, pending: PendingSync, error: BaseException | None
                    ) -> FlokiError | None:
        """Loop side: applies a PendingSync after it ran. With no error, synced_next_id and
        durable move to what it captured (never further, rule 8) and a probe makes the log OK
        again; with an error the log becomes FAILED (rule 7).

        Returns the client-visible error (DiskFull / StorageIOError) of a failed fsync, or None.
        Raises ValueError if `pending` is not this log's pending sync.
        """
        if pending is not self._pending:
            raise ValueError(f"queue log {self.directory}: not the pending fsync")
        self._pending = None
        pending.discard()
        if error is not None:
            if isinstance(error, OSError):
                return self._fail(files.storage_error(error, "sync"))
            return self._fail(StorageIOError(f"I/O error (sync: {error!r})"))
        # Nothing else fsynced or changed the directory while it ran (rule 9: all of that
        # settles first), so what it captured is exactly what became durable.
        self.synced_next_id = max(self.synced_next_id, pending.next_id)
        if pending.sync_directory:
            self._dir_dirty = False
        position, durable = pending.position, self.durable
        if (not self._closed and position.segment == self._segments[-1].first_id
                and (durable is None or durable.segment != position.segment
                     or position.offset > durable.offset)):
            self.durable = position
        if pending.probe and self.health is WalHealth.FAILED:
            log.warning("queue log %s: fsync works again; accepting appends (it failed with: "
                        "%s)", self.directory, self.failure)
            self.health, self.failure = WalHealth.OK, None
        return None

    def _settle(self) -> None:
        """Waits for the owner's background job (a pending fsync, or other work on this
        queue's files) and applies it (rule 9)."""
        self.settle_background()
        if self._pending is not None:
            raise RuntimeError(f"queue log {self.directory}: a background fsync is still "
                               "pending after its owner settled it")

    # --- reading ----------------------------------------------------------------------------

    def _position(self, id_: int) -> int:
        """Index in _segments of the segment whose range starts at or before `id_` (0 if none)."""
        return max(bisect_right(self._first_ids, id_) - 1, 0)

    def read(self, from_id: int, max_count: int, end_id: int | None = None
             ) -> list[tuple[int, bytes]]:
        """Returns up to max_count (id, body) pairs with from_id <= id < end_id (default
        next_id), in id order; an older from_id starts at first_id. Removed, missing and
        corrupt ids are skipped (corrupt ones counted in corrupt_records).
        Raises StorageIOError."""
        return self.read_within(from_id, max_count, end_id)[0]

    def read_within(self, from_id: int, max_count: int, end_id: int | None = None,
                    max_bytes: int | None = None) -> tuple[list[tuple[int, bytes]], int]:
        """read(), stopping once the records read add up to `max_bytes` (by the index; the
        first id is always read). Returns (pairs, scanned_to): every id below scanned_to from
        from_id on was returned or is removed, missing or corrupt.
        Raises StorageIOError."""
        self._check_open()
        stop = self.next_id if end_id is None else min(end_id, self.next_id)
        pos = max(from_id, self.first_id)
        out: list[tuple[int, bytes]] = []
        budget = max_bytes
        k = self._position(pos)
        try:
            while pos < stop and len(out) < max_count and k < len(self._segments):
                segment = self._segments[k]
                pos = max(pos, segment.first_id)
                segment_stop = min(stop, segment.end_id)
                if pos < segment_stop:
                    count = min(segment_stop - pos, max_count - len(out))
                    if budget is not None:
                        count, span = segment.span_within(pos, count, max(budget, 0),
                                                          not out)
                        if count == 0:
                            break
                        budget -= span
                    self.corrupt_records += len(segment.read(pos, count, out))
                    pos += count
                    if pos < segment_stop:
                        continue
                k += 1
            else:
                if k >= len(self._segments):
                    pos = stop          # past the last segment: ids no segment holds (lost)
        except OSError as exc:
            raise files.storage_error(exc, "read") from exc
        return out, max(from_id, min(pos, stop))

    def read_one(self, id: int) -> bytes | None:
        """Returns the body of `id`; None when removed by retention, not yet written, or corrupt.
        Raises StorageIOError."""
        if id < self.first_id or id >= self.next_id:
            return None
        found = self.read(id, 1, id + 1)
        return found[0][1] if found else None

    def timestamp_of(self, id: int) -> int | None:
        """Returns the timestamp_ms of `id` from its record header; None if it is not retained
        or unreadable. Raises StorageIOError."""
        self._check_open()
        if id < self.first_id or id >= self.next_id:
            return None
        segment = self._segments[self._position(id)]
        j = segment.find_entry(id)
        if j is None:
            return None
        try:
            return segment.timestamp_at(j)
        except OSError as exc:
            raise files.storage_error(exc, "read") from exc

    def find_id_by_timestamp(self, timestamp_ms: int) -> int:
        """Returns the first retained id whose timestamp is >= timestamp_ms: first_id when all
        are newer, next_id when none is. The segment is picked by its cached first/newest
        timestamps, then a binary search reads O(log n) record headers.
        Raises StorageIOError."""
        self._check_open()
        try:
            for segment in self._segments:
                if segment.newest_timestamp_ms is None:      # no record in it
                    continue
                if segment.newest_timestamp_ms >= timestamp_ms:
                    if (segment.first_timestamp_ms is not None
                            and segment.first_timestamp_ms >= timestamp_ms):
                        return segment.first_id
                    return segment.first_id + segment.search_timestamp(timestamp_ms)
        except OSError as exc:
            raise files.storage_error(exc, "read") from exc
        return self.next_id

    # --- retention and purge ----------------------------------------------------------------

    def remove_oldest_segment(self, release: Callable[[list[int]], None] | None = None
                              ) -> SegmentInfo:
        """Deletes the oldest segment (its .seg, then its .idx) and fsyncs the directory. Its
        fds are closed here, or handed to `release` (Segment.unlink).

        Returns what was removed. Raises ValueError if only the active segment is left,
        StorageIOError / DiskFull if it cannot be removed.
        """
        self._check_open()
        if len(self._segments) <= 1:
            raise ValueError("the active segment is never removed")
        self._settle()
        info = self.segments()[0]
        segment = self._segments[0]
        try:
            segment.unlink(release)
        except OSError as exc:
            raise files.storage_error(exc, "remove segment") from exc
        del self._segments[0]
        del self._first_ids[0]
        self._fsync_directory_or_mark("remove segment")
        return info

    def purge(self) -> None:
        """Drops every record: a new empty segment named next_id is made durable first, then
        every older segment is removed, oldest first (a crash in between leaves a suffix of
        the old data and the new segment; ids never go back).
        Raises DiskFull / StorageIOError."""
        self._check_open()
        self._settle()
        active = self._segments[-1]
        if not (active.end_id == active.first_id == self.next_id):
            try:
                # Sealed segments are fsynced whole (segment.py rule 7), even one about to go:
                # a power loss may bring it back if its removal was not yet durable.
                active.sync()
            except OSError as exc:
                raise files.storage_error(exc, "purge") from exc
            new = self._create_durable_segment("purge")
            active.seal()
            self._segments.append(new)
            self._first_ids.append(new.first_id)
        while len(self._segments) > 1:
            try:
                self._segments[0].unlink()
            except OSError as exc:
                raise files.storage_error(exc, "purge") from exc
            del self._segments[0]
            del self._first_ids[0]
        self._fsync_directory_or_mark("purge")
        self.synced_next_id = self.next_id
        self._note_durable()

    def _fsync_directory_or_mark(self, action: str) -> None:
        try:
            files.fsync_directory(self.directory)
        except OSError as exc:
            self._dir_dirty = True       # the next sync() retries
            raise files.storage_error(exc, action) from exc

    # --- lifetime ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"queue log {self.directory} is closed")

    def close(self) -> None:
        """fsyncs and closes every file. Idempotent. Raises StorageIOError if the final sync
        fails (the files are closed anyway)."""
        if self._closed:
            return
        try:
            self.sync()          # settles a background fsync first (rule 9)
        finally:
            self._closed = True
            for segment in self._segments:
                segment.close()


def _nothing() -> None:
    """The settle_background of a Wal no owner runs background fsyncs for."""


def _unlink_missing_ok(path: Path) -> None:
    try:
        fileio.unlink(path)
    except FileNotFoundError:
        pass


def _clamp_overlaps(segments: list[Segment]) -> None:
    """A segment may not hold ids at or above the next segment's first id; our writer never
    does that, so an overlap is damage (or a hand-copied file): serve each id once."""
    for older, newer in zip(segments, segments[1:]):
        if older.end_id > newer.first_id:
            log.error("segment %s holds ids up to %d, overlapping %s; ignoring ids from %d in it",
                      older.path, older.end_id - 1, newer.path.name, newer.first_id)
            older.drop_entries_from(newer.first_id - older.first_id)


def _remove_orphan_indexes(directory: Path, segment_ids: set[int]) -> None:
    """Deletes .idx files whose segment is gone (a crash between the two unlinks of a
    removal); they are ours by name and a later segment with that id would misread them."""
    for first_id in files.list_index_ids(directory):
        if first_id not in segment_ids:
            log.info("removing orphan index %s", files.index_path(directory, first_id))
            _unlink_missing_ok(files.index_path(directory, first_id))
