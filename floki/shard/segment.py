"""Segment: one log file of records with consecutive ids, and its offset index.

Owns: the byte layout of segments and records (the constants below are the only copy; the
prose is in log_format.md next to this file), the record codec, appending a batch, reading runs
of records, and the recovery of ONE file: index validation, rebuilding it by scanning, and
truncating a torn tail. Which segments exist, rolling and ids across segments belong to wal.py.
Rules:
  1. A record is never served unless its CRC32C (covering every header byte after the CRC, the
     length included, and the body) matches and its id is the one the index promised.
  2. A length read from disk is bounds-checked against the file (or the next index entry) BEFORE
     it is used to read or allocate; a flipped length never reads past the file.
  3. Ids in a segment are dense: entry i of the index is the offset of id first_id + i, or
     NO_RECORD when that record is unreadable. Memory per message is that one u32 entry.
  4. A batch is one write (fileio.write, os.write in production), or, when a body is large,
     one writev of the headers and the uncopied bodies (one per IOV_MAX buffers); if it fails
     the file is cut back to its size before the batch, so no partial record is ever left
     where a later record would follow it.
  5. A sealed segment's bytes are never changed: damage there is skipped and counted. Only the
     active (last) segment is truncated, and only at a torn tail.
  6. The .idx file is a hint: appended once per batch, validated at open, rebuilt when wrong.
  7. After an unclean stop the active segment's records are checked one by one at open from the
     last durable position the caller knows (else from the header): writes that were never
     fsynced may reach the disk out of order (a hole, then valid records), and the log must end
     at the first bad record, never skip one. Records before that position were fsynced, like
     sealed segments, and are checked when read (rule 1).
  8. Open is cheap: a stored index is trusted when it starts right after the header and its
     last entry is a valid record with the right id (one pread); a wrong entry in the middle
     is found and fixed when read (the run reader never trusts an offset that does not grow),
     and the fixed index is written back. Only a failed cheap check costs a structural pass.
"""
from __future__ import annotations

import logging
import os
import struct
import sys
from array import array
from bisect import bisect_right
from pathlib import Path
from typing import Callable

import crc32c

from floki.shard import fileio, files

log = logging.getLogger(__name__)

# --- on-disk constants (log_format.md describes them; change both together) -----------------

SEGMENT_MAGIC = b"FLKSEG\x00\x00"
FORMAT_VERSION = 1
# magic 8s, format version u32, reserved u32 (0), first_id u64, created_ms u64; little-endian.
SEGMENT_HEADER = struct.Struct("<8sIIQQ")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size                  # 32
# crc32c u32, body_length u32, id u64, timestamp_ms u64; little-endian; then the body.
RECORD_HEADER = struct.Struct("<IIQQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size                    # 24
CRC_SIZE = 4                                               # the CRC covers bytes [4, 24 + len)
_COVERED_HEADER = struct.Struct("<IQQ")                    # the 20 header bytes after the CRC
_CRC = struct.Struct("<I")
_ID = struct.Struct("<Q")
# Index entries are u32 offsets; NO_RECORD marks an id whose record is unreadable. A segment
# file may therefore not exceed 2**32 - 1 bytes, so every record offset is below NO_RECORD.
NO_RECORD = 0xFFFFFFFF
MAX_SEGMENT_BYTES = 0xFFFFFFFF
INDEX_ENTRY_SIZE = 4

READ_CHUNK_BYTES = 1 << 20       # one pread covers a run of records up to this many bytes
# Bodies of at least this many bytes are never copied by the codec: they are written from the
# caller's object (writev) and read back as memoryview slices of the run's buffer. Below it a
# copy costs no more than the extra crc32c call, iovec or memoryview object (measured on 2
# cores: encode+write of 100 x 1 KiB bodies is even; from 1.5 KiB copying loses 1.8-3x, as the
# joined batch leaves malloc's heap; reading, views win from a few KiB and tie below, where
# bytes bodies are nicer to callers).
LARGE_BODY_BYTES = 1024
IOV_MAX = 1024                   # buffers per writev (Linux UIO_MAXIOV; more fail with EINVAL)
SCAN_CHUNK_BYTES = 1 << 20       # recovery scans read this much at a time
RESYNC_WINDOW_BYTES = 1 << 20    # corruption search reads this much at a time
RESYNC_IDS = 64                  # how many ids after a damaged record the search looks for

assert array("I").itemsize == INDEX_ENTRY_SIZE, "array('I') must hold 32-bit entries"
_SWAP_INDEX = sys.byteorder != "little"


class CorruptSegment(Exception):
    """A segment file that cannot be used as it is (bad header, name/header mismatch, too big).

    The queue that owns it refuses to open; the file is left untouched for an operator.
    """

    def __init__(self, path: Path, reason: str):
        super().__init__(f"segment {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class UnsupportedFormat(CorruptSegment):
    """A segment written in a format version this code does not know (e.g. by a newer Floki)."""


class UnfinishedSegment(CorruptSegment):
    """A segment whose header never fully reached the disk: shorter than the header, or a
    32-byte file of zeros. Only a crash while creating the newest segment leaves one."""


class BadRecord(ValueError):
    """decode_record was given bytes that are not exactly one valid record."""


# --- record codec ---------------------------------------------------------------------------

def record_size(body_length: int) -> int:
    """Returns the bytes a record with a body of `body_length` bytes takes on disk."""
    return RECORD_HEADER_SIZE + body_length


def encode_record(id_: int, timestamp_ms: int, body: bytes) -> bytes:
    """Returns the bytes of one record."""
    covered = _COVERED_HEADER.pack(len(body), id_, timestamp_ms)
    return _CRC.pack(crc32c.crc32c(body, crc32c.crc32c(covered))) + covered + bytes(body)


def encode_batch(first_id: int, timestamp_ms: int, bodies, start_offset: int
                 ) -> tuple[bytes | list, array]:
    """Returns (the batch's records for ids first_id.., their absolute offsets) for a batch
    that will be written at `start_offset`. The caller has checked that it fits the segment.
    The records are one bytes object when every body is below LARGE_BODY_BYTES, else a list
    of bytes-like buffers to be written in order (Segment.append takes both): the large bodies
    themselves, uncopied, between bytes objects holding everything else.

    Hot path (one call per push): per small record one header pack, one concatenation of the
    covered header with the body and ONE crc32c call over it (a call costs more than the bytes
    it covers at these sizes); per large record the CRC is chained over the header and the
    body instead, so neither the body nor the batch is copied.
    """
    parts: list[bytes] = []
    buffers = None                      # the writev list, once a large body was seen
    offsets = array("I")
    add_part, add_offset = parts.append, offsets.append
    covered_pack, crc_pack, crc = _COVERED_HEADER.pack, _CRC.pack, crc32c.crc32c
    large, header_size = LARGE_BODY_BYTES, RECORD_HEADER_SIZE
    pos, id_ = start_offset, first_id
    for body in bodies:
        length = len(body)
        if length < large:
            covered = covered_pack(length, id_, timestamp_ms) + body
            add_part(crc_pack(crc(covered)))
            add_part(covered)
        else:
            covered = covered_pack(length, id_, timestamp_ms)
            add_part(crc_pack(crc(body, crc(covered))))
            add_part(covered)
            if buffers is None:
                buffers = []
            buffers.append(b"".join(parts))     # the small records before it + its header
            buffers.append(body)
            parts.clear()
        add_offset(pos)
        pos += header_size + length
        id_ += 1
    if buffers is None:
        return b"".join(parts), offsets
    if parts:
        buffers.append(b"".join(parts))
    return buffers, offsets


def parse_record(buf, pos: int, limit: int) -> tuple[int, int, int] | None:
    """Checks the record starting at buf[pos], which must end at or before `limit`.

    Returns (id, timestamp_ms, end offset) when the header fits, the length stays within
    `limit` and the CRC matches; None otherwise (torn, corrupt or hostile).
    """
    if pos < 0 or pos + RECORD_HEADER_SIZE > limit or limit > len(buf):
        return None
    crc, length, id_, timestamp_ms = RECORD_HEADER.unpack_from(buf, pos)
    end = pos + RECORD_HEADER_SIZE + length
    if end > limit:                      # rule 2: before the length is used for anything
        return None
    if crc32c.crc32c(memoryview(buf)[pos + CRC_SIZE:end]) != crc:
        return None
    return id_, timestamp_ms, end


def decode_record(data: bytes) -> tuple[int, int, bytes]:
    """Returns (id, timestamp_ms, body) of `data`, which must be exactly one record.

    Raises BadRecord if it is shorter, longer, or fails its checksum.
    """
    parsed = parse_record(data, 0, len(data))
    if parsed is None or parsed[2] != len(data):
        raise BadRecord("not a valid record")
    return parsed[0], parsed[1], bytes(data[RECORD_HEADER_SIZE:])


def encode_segment_header(first_id: int, created_ms: int) -> bytes:
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0, first_id, created_ms)


def decode_segment_header(data: bytes, path: Path) -> tuple[int, int]:
    """Returns (first_id, created_ms). Raises CorruptSegment / UnsupportedFormat /
    UnfinishedSegment (the last only for a header that was never written)."""
    if len(data) < SEGMENT_HEADER_SIZE:
        raise UnfinishedSegment(path, f"{len(data)} bytes, shorter than the "
                                      f"{SEGMENT_HEADER_SIZE}-byte header")
    magic, version, _reserved, first_id, created_ms = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        if not any(data[:SEGMENT_HEADER_SIZE]):
            raise UnfinishedSegment(path, "header is all zeros")
        raise CorruptSegment(path, f"bad magic {magic!r} (expected {SEGMENT_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(path, f"unsupported format version {version} "
                                      f"(this Floki reads version {FORMAT_VERSION})")
    return first_id, created_ms


# --- small I/O helpers ------------------------------------------------------------------------

def write_all(fd: int, data) -> None:
    """Writes all of `data` with os.write, looping only when the kernel writes part of it.
    Raises OSError."""
    view = memoryview(data)
    while view:
        written = fileio.write(fd, view)
        view = view[written:]


def writev_all(fd: int, buffers: list) -> int:
    """Writes the bytes-like `buffers` in order with os.writev, IOV_MAX buffers per call,
    looping only when the kernel writes part of them. Returns the bytes written (all of
    them). Raises OSError (a prefix of the buffers may be in the file then)."""
    total = 0
    pending = buffers
    while pending:
        chunk = pending[:IOV_MAX] if len(pending) > IOV_MAX else pending
        written = fileio.writev(fd, chunk)
        total += written
        # The usual case: the whole chunk went in one call.
        done = 0
        for buffer in chunk:
            size = len(buffer)
            if written < size:
                break
            written -= size
            done += 1
        pending = pending[done:]
        if written:                     # the kernel stopped inside pending[0]
            pending[0] = memoryview(pending[0])[written:]
    return total


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Returns up to `size` bytes at `offset`; shorter only at end of file. Raises OSError."""
    data = fileio.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]            # large reads may come back in pieces (Linux caps one at ~2 GiB)
    got = len(data)
    while got < size:
        more = fileio.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def index_to_bytes(entries: array) -> bytes:
    """Returns the on-disk (little-endian u32) form of index entries."""
    if _SWAP_INDEX:
        entries = array("I", entries)
        entries.byteswap()
    return entries.tobytes()


def index_from_bytes(data: bytes) -> array:
    """Returns the entries of an .idx file's bytes; a trailing partial entry is ignored."""
    entries = array("I")
    entries.frombytes(data[:len(data) - len(data) % INDEX_ENTRY_SIZE])
    if _SWAP_INDEX:
        entries.byteswap()
    return entries


class _Reader:
    """Buffered positional reads over [0, limit) of one file, for recovery scans."""

    def __init__(self, fd: int, limit: int):
        self.fd, self.limit = fd, limit
        self.buf, self.start = b"", 0

    def view(self, pos: int, size: int):
        """Returns (buffer, offset of `pos` in it) covering `size` bytes, or None past limit."""
        if pos < 0 or pos + size > self.limit:
            return None
        if not (self.start <= pos and pos + size <= self.start + len(self.buf)):
            want = min(max(size, SCAN_CHUNK_BYTES), self.limit - pos)
            self.buf, self.start = pread_exact(self.fd, want, pos), pos
            if len(self.buf) < size:
                return None
        return self.buf, pos - self.start

    def record(self, pos: int) -> tuple[int, int, int] | None:
        """Returns (id, timestamp_ms, end) of a valid record at `pos`, else None."""
        got = self.view(pos, RECORD_HEADER_SIZE)
        if got is None:
            return None
        buf, rel = got
        length = RECORD_HEADER.unpack_from(buf, rel)[1]
        if pos + RECORD_HEADER_SIZE + length > self.limit:       # bound before reading
            return None
        got = self.view(pos, RECORD_HEADER_SIZE + length)
        if got is None:                  # the file shrank under us
            return None
        buf, rel = got
        parsed = parse_record(buf, rel, rel + RECORD_HEADER_SIZE + length)
        if parsed is None:
            return None
        return parsed[0], parsed[1], pos + RECORD_HEADER_SIZE + length


class Segment:
    """One `.seg` file and its in-memory index (array of u32 offsets, one per id).

    `data_end` is the end of the last indexed record; in the active segment it equals
    `size_bytes`. Sealed segments are opened read-only and never written.
    """

    def __init__(self, directory: Path, first_id: int, created_ms: int, fd: int,
                 writable: bool):
        self.directory = Path(directory)
        self.path = files.segment_path(directory, first_id)
        self.index_path = files.index_path(directory, first_id)
        self.first_id = first_id
        self.created_ms = created_ms
        self.fd = fd
        self.writable = writable
        self.offsets = array("I")
        self.size_bytes = SEGMENT_HEADER_SIZE
        self.data_end = SEGMENT_HEADER_SIZE
        self.first_timestamp_ms: int | None = None
        self.newest_timestamp_ms: int | None = None
        self.lost_records = 0            # unreadable ids found while rebuilding the index
        self._plausible_entries = 0      # stored index entries that looked structurally sane
        self._index_fd: int | None = None
        # The .idx file is complete on disk and opened for appending only at the first append,
        # so an idle queue holds one fd per segment, not two.
        self._index_deferred = False
        self._index_entries_on_disk = 0
        # entry -> stored offset of records found corrupt when read (NO_RECORD in memory only)
        self._marked_corrupt: dict[int, int] = {}
        self._index_stale = False        # the .idx file lags memory after a failed write
        self._tail_dirty = False         # a failed append could not be cut back yet
        self._unsynced = False

    # --- creation and recovery --------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, first_id: int, created_ms: int) -> "Segment":
        """Creates an empty active segment: header written and fsynced, empty .idx.

        The caller fsyncs the directory before any acknowledged record lands in it.
        Raises OSError (nothing is left behind then).
        """
        path = files.segment_path(directory, first_id)
        fd = fileio.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o644)
        segment = cls(directory, first_id, created_ms, fd, writable=True)
        try:
            write_all(fd, encode_segment_header(first_id, created_ms))
            fileio.fsync(fd)
            segment._index_fd = fileio.open(
                segment.index_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
                | os.O_CLOEXEC, 0o644)
        except OSError:
            segment.close()
            _unlink_quietly(path)
            raise
        return segment

    @classmethod
    def open(cls, directory: Path, first_id: int, *, active: bool,
             check_every_record: bool = False,
             durable: tuple[int, int] | None = None) -> "Segment":
        """Opens and recovers an existing segment (see log_format.md, "Recovery").

        active: the newest segment, which is opened for appending and whose torn tail is cut.
        check_every_record (active only): check every record one by one, the log ending at the
        first bad one (rule 7): from `durable` = (end_id, offset) when given and it matches the
        file (ids first_id..end_id-1 were fsynced and end exactly at `offset`), else from the
        header on.
        Raises CorruptSegment (or a subclass) for a file that cannot be used, OSError.
        """
        path = files.segment_path(directory, first_id)
        flags = (os.O_RDWR | os.O_APPEND) if active else os.O_RDONLY
        fd = fileio.open(path, flags | os.O_CLOEXEC)
        try:
            file_size = fileio.fstat(fd).st_size
            header_first_id, created_ms = decode_segment_header(
                fileio.pread(fd, SEGMENT_HEADER_SIZE, 0), path)
            if header_first_id != first_id:
                raise CorruptSegment(path, f"header says first id {header_first_id}, "
                                           f"the file name says {first_id}")
            if file_size > MAX_SEGMENT_BYTES:
                raise CorruptSegment(path, f"{file_size} bytes, above the "
                                           f"{MAX_SEGMENT_BYTES}-byte limit of u32 offsets")
            segment = cls(directory, first_id, created_ms, fd, writable=active)
        except BaseException:
            fileio.close(fd)
            raise
        try:
            segment._recover(file_size, check_every_record and active, durable)
        except BaseException:
            segment.close()
            raise
        return segment

    def _recover(self, file_size: int, check_every_record: bool,
                 durable: tuple[int, int] | None = None) -> None:
        try:
            with open(self.index_path, "rb") as f:
                raw_index = f.read()
        except FileNotFoundError:
            raw_index = None
            log.warning("segment %s: index missing; rebuilding it by scanning", self.path)
        stored = index_from_bytes(raw_index) if raw_index else array("I")
        if check_every_record:
            # rule 7: only what the durable position covers is taken from the stored index
            trusted = 0 if durable is None else self._durable_prefix(stored, file_size, *durable)
        else:
            trusted = self._validate_index(stored, file_size)
            if trusted < len(stored):
                log.warning("segment %s: index valid for %d of %d entries; rebuilding the "
                            "rest", self.path, trusted, len(stored))
        self.offsets = stored[:trusted]
        scanned_from = len(self.offsets)
        if self.writable:
            end = self._scan(self.data_end, file_size, resync=False)
            if end < file_size:
                # Torn write (rule 5): whatever follows the last good record was never
                # acknowledged as a whole batch; cut it so appends continue from a clean end.
                log.warning("segment %s: torn tail: truncating %d bytes after offset %d "
                            "(file was %d bytes, %d records kept)", self.path,
                            file_size - end, end, file_size, len(self.offsets))
                fileio.ftruncate(self.fd, end)
                self._unsynced = True
            self.size_bytes = end
        else:
            self._scan(self.data_end, file_size, resync=True)
            self.size_bytes = file_size
        if check_every_record:           # keep the stored entries the scan agrees with
            trusted = scanned_from = _common_prefix(stored, self.offsets)
        index_matches_disk = raw_index is not None and len(raw_index) == trusted * 4
        if len(self.offsets) != scanned_from or not index_matches_disk:
            self._rewrite_index_tail(trusted)
        else:
            self._index_entries_on_disk = len(self.offsets)
            self._index_deferred = self.writable
        self._load_timestamps()

    def _durable_prefix(self, entries: array, file_size: int, end_id: int, offset: int) -> int:
        """Returns how many stored entries a durable position covers (ids first_id..end_id-1
        fsynced, ending at `offset`), and sets data_end; 0 when the position does not match
        this file and its index exactly (then every record is checked, rule 7). One pread."""
        n = end_id - self.first_id
        if n == 0 and offset == SEGMENT_HEADER_SIZE:
            return 0
        if (0 < n <= len(entries) and offset <= file_size
                and entries[0] == SEGMENT_HEADER_SIZE and entries[n - 1] < offset
                and self._check_record_at(entries[n - 1], end_id - 1, file_size) == offset):
            self.data_end = offset
            self._plausible_entries = n
            return n
        log.warning("segment %s: the checkpointed durable position (id %d, offset %d) does not "
                    "match the file (%d bytes, %d index entries); checking every record",
                    self.path, end_id, offset, file_size, len(entries))
        return 0

    def _validate_index(self, entries: array, file_size: int) -> int:
        """Returns how many leading entries of a stored index can be trusted; sets data_end.

        Cheap by design (rule 8): the first entry and one record read for the last entry. Only
        when that fails, a structural pass and a binary search (damage from a crash is at the
        end).
        """
        n = len(entries)
        if n == 0:
            return 0
        if entries[0] == SEGMENT_HEADER_SIZE and entries[-1] < file_size:
            # Rule 8: the usual case costs one pread, not a pass over every entry.
            end = self._check_record_at(entries[-1], self.first_id + n - 1, file_size)
            if end is not None:
                self._plausible_entries = n
                self.data_end = end
                return n
        checked: dict[int, int | None] = {}
        n = self._structural_prefix(entries, file_size)
        self._plausible_entries = n

        def prefix_ok(k: int) -> int | None:
            """End of the last readable record among entries[:k] if it checks out."""
            if k in checked:
                return checked[k]
            j = k - 1
            while j >= 0 and entries[j] == NO_RECORD:
                j -= 1
            if j < 0:
                return SEGMENT_HEADER_SIZE
            checked[k] = self._check_record_at(entries[j], self.first_id + j, file_size)
            return checked[k]

        end = prefix_ok(n)
        if end is None:
            lo, hi = 0, n                # prefix_ok(lo) holds, prefix_ok(hi) does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if prefix_ok(mid) is None:
                    hi = mid
                else:
                    lo = mid
            n = lo
        # Trailing NO_RECORD entries are re-derived by the scan that follows.
        while n and entries[n - 1] == NO_RECORD:
            n -= 1
        self.data_end = prefix_ok(n) if n else SEGMENT_HEADER_SIZE
        return n

    @staticmethod
    def _structural_prefix(entries: array, file_size: int) -> int:
        """Returns the length of the longest prefix whose real offsets are increasing, at
        least a record header apart, start right after the segment header and fit the file."""
        previous = None
        for i, offset in enumerate(entries):
            if offset == NO_RECORD:
                continue
            if previous is None:
                if i == 0 and offset != SEGMENT_HEADER_SIZE or offset < SEGMENT_HEADER_SIZE:
                    return i
            elif offset < previous + RECORD_HEADER_SIZE:
                return i
            if offset + RECORD_HEADER_SIZE > file_size:
                return i
            previous = offset
        return len(entries)

    def _check_record_at(self, offset: int, id_: int, limit: int) -> int | None:
        """Returns the end of the record at `offset` if it is valid and has id `id_`."""
        reader = _Reader(self.fd, limit)
        parsed = reader.record(offset)
        if parsed is None or parsed[0] != id_:
            return None
        return parsed[2]

    def _scan(self, pos: int, limit: int, *, resync: bool) -> int:
        """Appends index entries for the records from `pos` up to `limit`; returns data_end.

        Without resync (active segment) the first bad record ends the scan. With resync
        (sealed segment) a bad record is skipped: the scan searches forward for the next
        valid record with a larger id, and the ids in between get NO_RECORD.
        """
        reader = _Reader(self.fd, limit)
        append, unpack, crc = self.offsets.append, RECORD_HEADER.unpack_from, crc32c.crc32c
        while pos < limit:
            expected = self.first_id + len(self.offsets)
            # Fast path: take the good records that lie wholly in the reader's buffer.
            got = reader.view(pos, RECORD_HEADER_SIZE)
            if got is not None:
                buf, rel = got
                base, size, view = pos - rel, len(buf), memoryview(buf)
                while rel + RECORD_HEADER_SIZE <= size:
                    checksum, length, id_, _timestamp = unpack(buf, rel)
                    end = rel + RECORD_HEADER_SIZE + length
                    if end > size or id_ != expected or crc(view[rel + CRC_SIZE:end]) != checksum:
                        break
                    append(base + rel)
                    expected += 1
                    rel = end
                view.release()
                if base + rel != pos:
                    pos = self.data_end = base + rel
                    continue
            # Slow path: a record crossing the buffer's end, or a bad one.
            parsed = reader.record(pos)
            if parsed is not None and parsed[0] == expected:
                self.offsets.append(pos)
                pos = self.data_end = parsed[2]
                continue
            if not resync:
                break
            found = self._resync(reader, pos, expected, limit)
            if found is None:
                # How many ids the lost bytes held is unknown; a plausible stored index
                # tells, otherwise count at least one so the loss is never silent.
                lost = max(1, self._plausible_entries - len(self.offsets))
                self.lost_records += lost
                log.error("segment %s: %d bytes from offset %d hold no readable record; "
                          "ids from %d in this segment (at least %d) are lost", self.path,
                          limit - pos, pos, expected, lost)
                break
            pos, found_id = found
            lost = found_id - expected
            self.offsets.extend(array("I", [NO_RECORD]) * lost)
            self.lost_records += lost
            log.error("segment %s: corrupt data; ids %d..%d unreadable, resuming at offset %d",
                      self.path, expected, found_id - 1, pos)
        return self.data_end

    def _resync(self, reader: _Reader, pos: int, expected: int, limit: int
                ) -> tuple[int, int] | None:
        """Returns (offset, id) of the nearest valid record after a bad one at `pos` whose id
        is `expected` or a little above it; None when the rest of the file has none.

        Fast path: the bad record's length still leads to a valid record. Otherwise search for
        the 8 id bytes of ids expected..expected+RESYNC_IDS-1 (bytes.find runs in C), window by
        window, and accept the nearest candidate that parses with a good CRC.
        """
        max_id = expected + (limit - pos) // RECORD_HEADER_SIZE
        got = reader.view(pos, RECORD_HEADER_SIZE)
        if got is not None:
            length = RECORD_HEADER.unpack_from(*got)[1]
            after = pos + RECORD_HEADER_SIZE + length
            parsed = reader.record(after) if after < limit else None
            if parsed is not None and expected <= parsed[0] <= max_id:
                return after, parsed[0]
        patterns = [(id_, _ID.pack(id_)) for id_ in range(expected, min(expected + RESYNC_IDS,
                                                                       max_id + 1))]
        window_start = pos + 1
        while window_start + RECORD_HEADER_SIZE <= limit:
            window_end = min(limit, window_start + RESYNC_WINDOW_BYTES)
            # The id field is 8 bytes at +8 in a record; cover candidates in [start, end).
            data = pread_exact(self.fd, window_end - window_start + 16, window_start)
            best = None
            for id_, pattern in patterns:
                at = data.find(pattern, 8)
                while at != -1:
                    candidate = window_start + at - 8
                    if best is not None and candidate >= best[0]:
                        break
                    parsed = reader.record(candidate)
                    if parsed is not None and parsed[0] == id_:
                        best = (candidate, id_)
                        break
                    at = data.find(pattern, at + 1)
            if best is not None:
                return best
            window_start = window_end
        return None

    def _open_index_for_append(self) -> bool:
        """Opens the deferred .idx for appending. Returns False (logged: the index is a hint and
        is rebuilt at the next open) when it cannot be opened; appends then skip it."""
        self._index_deferred = False
        try:
            self._index_fd = fileio.open(self.index_path, os.O_RDWR | os.O_APPEND | os.O_CREAT
                                         | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.warning("segment %s: cannot open index for appending (%s); it will be rebuilt "
                        "at the next open", self.path, exc)
            return False
        return True

    def _rewrite_index_tail(self, keep_entries: int, tail: array | None = None) -> None:
        """Cuts the .idx file to `keep_entries` and appends `tail` (default: the rest of the
        in-memory index). A read-only or full disk only costs a rebuild at the next open, so
        errors are logged."""
        if tail is None:
            tail = self.offsets[keep_entries:]
        if self._index_deferred:
            self._open_index_for_append()
        fd = self._index_fd
        if fd is None:
            try:
                fd = fileio.open(self.index_path,
                                 os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                log.warning("segment %s: cannot rewrite index: %s", self.path, exc)
                return
        try:
            fileio.ftruncate(fd, keep_entries * INDEX_ENTRY_SIZE)
            write_all(fd, index_to_bytes(tail))
            self._index_entries_on_disk = keep_entries + len(tail)
        except OSError as exc:
            log.warning("segment %s: cannot rewrite index: %s", self.path, exc)
            self._index_stale = True
        if self.writable:
            self._index_fd = fd
            self._unsynced = True        # sync() makes the rewritten index durable too
        else:
            fileio.close(fd)

    def _persist_repairs(self, first: int) -> None:
        """Writes back index entries from `first` on after read() found the records somewhere
        else than the stored index said (rule 8). Entries marked corrupt by read() keep their
        stored value on disk, so the next open checks (and counts) those records again."""
        if self._index_stale or self._index_entries_on_disk < len(self.offsets):
            return                       # sync() rewrites the whole index anyway
        tail = self.offsets[first:]
        for k, stored in self._marked_corrupt.items():
            if k >= first:
                tail[k - first] = stored
        self._rewrite_index_tail(first, tail)

    def _load_timestamps(self) -> None:
        first = next((j for j in range(len(self.offsets)) if self.offsets[j] != NO_RECORD),
                     None)
        if first is None:
            return
        last = next(j for j in reversed(range(len(self.offsets)))
                    if self.offsets[j] != NO_RECORD)
        self.first_timestamp_ms = self.timestamp_at(first)
        self.newest_timestamp_ms = self.timestamp_at(last)

    # --- state ------------------------------------------------------------------------------

    @property
    def end_id(self) -> int:
        """One past the last id this segment holds (== first_id when empty)."""
        return self.first_id + len(self.offsets)

    @property
    def index_bytes(self) -> int:
        return len(self.offsets) * INDEX_ENTRY_SIZE

    # --- appending --------------------------------------------------------------------------

    def append(self, data: bytes | list, offsets: array, timestamp_ms: int) -> None:
        """Appends a batch built by encode_batch(..., start_offset=self.size_bytes): its bytes,
        or its list of buffers (written with writev).

        Raises OSError; the file is then cut back to its size before the batch.
        """
        before = self.size_bytes
        if self._tail_dirty:            # a previous failed batch is still on disk: cut it now
            fileio.ftruncate(self.fd, before)
            self._tail_dirty = False
        try:
            if isinstance(data, list):
                size = writev_all(self.fd, data)
            else:
                write_all(self.fd, data)
                size = len(data)
        except OSError:
            try:
                fileio.ftruncate(self.fd, before)
            except OSError:
                self._tail_dirty = True
                log.error("segment %s: cannot cut a failed append back to %d bytes; will "
                          "retry before the next append", self.path, before)
            raise
        self._unsynced = True
        self.size_bytes = self.data_end = before + size
        self.offsets.extend(offsets)
        if self.first_timestamp_ms is None:
            self.first_timestamp_ms = timestamp_ms
        if self.newest_timestamp_ms is None or timestamp_ms > self.newest_timestamp_ms:
            self.newest_timestamp_ms = timestamp_ms
        self._append_index(offsets)

    def _append_index(self, offsets: array) -> None:
        if self._index_fd is None and not (self._index_deferred and
                                           self._open_index_for_append()):
            return
        if self._index_stale:
            return
        on_disk = self._index_entries_on_disk * INDEX_ENTRY_SIZE
        try:
            write_all(self._index_fd, index_to_bytes(offsets))
            self._index_entries_on_disk += len(offsets)
        except OSError as exc:
            # The records are safely in the segment; the index is only a hint. Stop appending
            # to it (a cut-off entry would shift all later ones) until sync() rewrites it.
            log.warning("segment %s: index append failed (%s); it will be rewritten",
                        self.path, exc)
            self._index_stale = True
            try:
                fileio.ftruncate(self._index_fd, on_disk)
            except OSError:
                pass

    def sync(self, *, force: bool = False) -> None:
        """fsyncs the segment and its index if anything was written since (always with
        force). Raises OSError."""
        if force and self._index_deferred:
            # Unchanged since open, but after kill -9 maybe only in the page cache: fsync it
            # without keeping a descriptor an idle queue would not use.
            files.fsync_file_if_present(self.index_path)
        if self._index_stale and self._index_fd is not None:
            fileio.ftruncate(self._index_fd, 0)
            write_all(self._index_fd, index_to_bytes(self.offsets))
            self._index_entries_on_disk = len(self.offsets)
            self._index_stale = False
            self._unsynced = True
        if self._unsynced or force:
            fileio.fsync(self.fd)
            if self._index_fd is not None:
                fileio.fsync(self._index_fd)
            self._unsynced = False

    def seal(self) -> None:
        """Ends appending: closes the index fd. The caller has synced the segment."""
        if self._index_fd is not None:
            fileio.close(self._index_fd)
            self._index_fd = None
        self._index_deferred = False
        self.writable = False

    # --- reading ----------------------------------------------------------------------------

    def _bound_after(self, j: int) -> int:
        """Returns where the record of entry j ends at the latest: the next readable entry's
        offset, or data_end."""
        offsets = self.offsets
        for k in range(j + 1, len(offsets)):
            if offsets[k] != NO_RECORD:
                return offsets[k]
        return self.data_end

    def span_within(self, from_id: int, count: int, budget: int,
                    at_least_one: bool) -> tuple[int, int]:
        """Returns (n, span): how many of the ids [from_id, from_id + count) read as a prefix
        stay within `budget` bytes of records by the index (at least 1 if `at_least_one`), and
        those bytes.

        The index is a hint (rule 8): an unreadable entry (NO_RECORD, far above data_end) only
        makes the prefix shorter; `span` is an estimate the caller's budget tolerates."""
        offsets = self.offsets
        i = from_id - self.first_id
        stop = min(i + count, len(offsets))
        start = offsets[i]
        end = offsets[stop] if stop < len(offsets) else self.data_end
        if start <= end and end - start <= budget:
            return stop - i, end - start                # the usual get: all of it fits
        if start == NO_RECORD:
            return 1, 0
        # offsets[k] <= start + budget: the records i .. k-1 end within the budget
        k = bisect_right(offsets, start + budget, i + 1, stop) - 1
        n = max(k - i, 1 if at_least_one else 0)
        after = offsets[i + n] if i + n < len(offsets) else self.data_end
        return n, max(after - start, 0)

    def read(self, from_id: int, count: int, out: list) -> list[int]:
        """Appends (id, body) for the readable ids in [from_id, from_id + count) to `out`. A
        body below LARGE_BODY_BYTES is bytes; a larger one is a read-only memoryview slice of
        the run's buffer (not copied: the reply copies it once; it compares and hashes like
        bytes and keeps that buffer, at most READ_CHUNK_BYTES or one record, alive).

        Returns the ids found corrupt during this call; they are marked NO_RECORD in memory so
        they are reported once and skipped afterwards. Raises OSError.

        Hot path: one pread per run of consecutive entries (up to READ_CHUNK_BYTES), records
        checked and sliced out of that one buffer. The index is a hint (rule 8): a run only
        extends while offsets grow, and a record that does not check out where its entry says
        is looked for where the previous one ends (_reread).
        """
        offsets = self.offsets
        first_id = self.first_id
        i = from_id - first_id
        stop = min(i + count, len(offsets))
        corrupt = []
        repaired_from = None
        unpack, crc, append = RECORD_HEADER.unpack_from, crc32c.crc32c, out.append
        header_size, data_end = RECORD_HEADER_SIZE, self.data_end
        large = LARGE_BODY_BYTES
        while i < stop:
            start = offsets[i]
            if start == NO_RECORD:
                i += 1
                continue
            # Where the index says the requested records end (NO_RECORD is above data_end).
            after = offsets[stop] if stop < len(offsets) else data_end
            if start < after <= min(start + READ_CHUNK_BYTES, data_end):
                j, span_end = stop - 1, after        # the usual get: all of it in one pread
            else:
                # A run of consecutive readable entries that starts within one chunk.
                j = i
                last = start
                # NO_RECORD is never below chunk_end, so `following < chunk_end` skips it.
                chunk_end = min(start + READ_CHUNK_BYTES, NO_RECORD)
                while j + 1 < stop:
                    following = offsets[j + 1]
                    if not last < following < chunk_end:
                        break
                    last = following
                    j += 1
                # Rule 2: a read never reaches past data_end, whatever the index says.
                span_end = min(max(self._bound_after(j), last + header_size), data_end)
            buf = pread_exact(self.fd, span_end - start, start) if span_end > start else b""
            view = memoryview(buf)
            last_header = len(buf) - header_size
            id_expected = first_id + i
            for k in range(i, j + 1):
                rel = offsets[k] - start
                # 0 <= rel: an index entry is a hint and may point anywhere (rule 8).
                if 0 <= rel <= last_header:
                    checksum, length, id_, _timestamp = unpack(buf, rel)
                    end = rel + header_size + length
                    # end <= len(buf) bounds a hostile length; the CRC covers the length.
                    if (id_ == id_expected and end <= last_header + header_size
                            and crc(view[rel + CRC_SIZE:end]) == checksum):
                        if length < large:
                            append((id_, buf[rel + header_size:end]))
                        else:
                            append((id_, view[rel + header_size:end]))
                        id_expected += 1
                        continue
                stored = offsets[k]
                if stored == NO_RECORD:             # known unreadable: skipped, not counted
                    id_expected += 1
                    continue
                body = self._reread(k)
                if body is not None:
                    append((id_expected, body))
                    if offsets[k] != stored and repaired_from is None:
                        repaired_from = k
                else:
                    corrupt.append(id_expected)
                    self._marked_corrupt[k] = stored
                    offsets[k] = NO_RECORD
                id_expected += 1
            view.release()
            i = j + 1
        if corrupt:
            log.error("segment %s: %d corrupt record(s) skipped (ids %d..%d): checksum, "
                      "length or id mismatch", self.path, len(corrupt), corrupt[0], corrupt[-1])
        if repaired_from is not None:
            self._persist_repairs(repaired_from)
        return corrupt

    def _reread(self, k: int) -> bytes | None:
        """Record k did not check out in a run read. The .idx file is only a hint, so before
        calling the record corrupt: read it alone up to data_end (the next entry may be the
        wrong one), then look where record k-1 ends (entry 0: right after the header); if a
        valid record k is there, entry k was wrong and is fixed in memory.
        Returns the body of record k, or None. Raises OSError."""
        id_ = self.first_id + k
        reader = _Reader(self.fd, self.data_end)
        candidates = [self.offsets[k]]
        if k == 0:
            candidates.append(SEGMENT_HEADER_SIZE)
        elif self.offsets[k - 1] != NO_RECORD:
            previous = self.offsets[k - 1]
            got = reader.view(previous, RECORD_HEADER_SIZE)
            if got is not None:
                _crc, length, previous_id, _timestamp = RECORD_HEADER.unpack_from(*got)
                if previous_id == id_ - 1:
                    candidates.append(previous + RECORD_HEADER_SIZE + length)
        for offset in candidates:
            parsed = reader.record(offset)
            if parsed is None or parsed[0] != id_:
                continue
            if offset != self.offsets[k]:
                log.warning("segment %s: index entry of id %d said offset %d; the record is "
                            "at %d", self.path, id_, self.offsets[k], offset)
                self.offsets[k] = offset
            buf, rel = reader.view(offset, parsed[2] - offset)
            return bytes(buf[rel + RECORD_HEADER_SIZE:rel + parsed[2] - offset])
        return None

    def timestamp_at(self, j: int) -> int | None:
        """Returns the timestamp in the header of entry j, or None if it is unreadable.
        Reads the 24-byte header only (one pread) and checks its id and length bounds."""
        offset = self.offsets[j]
        if offset == NO_RECORD:
            return None
        header = fileio.pread(self.fd, RECORD_HEADER_SIZE, offset)
        if len(header) < RECORD_HEADER_SIZE:
            return None
        _crc, length, id_, timestamp_ms = RECORD_HEADER.unpack(header)
        if id_ != self.first_id + j or offset + RECORD_HEADER_SIZE + length > self.data_end:
            return None
        return timestamp_ms

    def search_timestamp(self, timestamp_ms: int) -> int:
        """Returns the first entry whose timestamp is >= timestamp_ms (len(offsets) if none),
        by binary search over record headers: O(log n) preads, assuming timestamps grow with
        ids. An unreadable entry takes the verdict of the next readable one."""
        lo, hi = 0, len(self.offsets)
        while lo < hi:
            mid = (lo + hi) // 2
            j, found = mid, None
            while j < hi:
                found = self.timestamp_at(j)
                if found is not None:
                    break
                j += 1
            if found is None or found >= timestamp_ms:
                hi = mid
            else:
                lo = j + 1
        return lo

    def drop_entries_from(self, j: int) -> None:
        """Forgets the index entries from j on (memory only; the file is not changed)."""
        following = [o for o in self.offsets[j:] if o != NO_RECORD]
        if following:
            self.data_end = following[0]
        del self.offsets[j:]

    def find_entry(self, id_: int) -> int | None:
        """Returns the index entry of `id_` if this segment holds that id."""
        j = id_ - self.first_id
        return j if 0 <= j < len(self.offsets) else None

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the fds (no fsync; call sync() first when it matters)."""
        for fd in self._detach_fds():
            try:
                fileio.close(fd)
            except OSError:
                pass

    def _detach_fds(self) -> list[int]:
        """Returns the open fds (index, segment) and forgets them: the segment is closed."""
        fds = [fd for fd in (self._index_fd, self.fd) if fd is not None and fd >= 0]
        self._index_fd = None
        self.fd = -1
        return fds

    def unlink(self, release: Callable[[list[int]], None] | None = None) -> None:
        """Deletes the segment, then its index, and closes their fds: here, or by handing them
        to `release`, which then owns them (the last close of a removed file frees its page
        cache: ~45 ms for 64 MiB, which the loop hands to the background worker). Raises
        OSError if the segment file cannot be removed (nothing changed then); a leftover .idx
        is removed at the next open."""
        fileio.unlink(self.path)
        if release is None:
            self.close()
        else:
            release(self._detach_fds())
        try:
            fileio.unlink(self.index_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.index_path, exc)


def _unlink_quietly(path: Path) -> None:
    try:
        fileio.unlink(path)
    except OSError:
        pass


def _common_prefix(a: array, b: array) -> int:
    """Returns the length of the longest common prefix of two index arrays (array equality
    is a memcmp, so this is a few C-speed comparisons, not a Python loop per entry)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:                    # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
