"""Offline check and repair of a data directory: `floki check DATA_DIR [--repair]`.

Owns: verifying every segment (header, every record's CRC, length bounds and id, the index
hint) and every checkpoint of every queue without a server, reporting what is damaged, and
the few repairs that are safe offline (redis-check-aof's `--fix`).
Rules:
  1. Without --repair nothing is written, created or removed (not even a LOCK or a stale .tmp).
  2. --repair changes only what the server's own recovery would change: it cuts the newest
     segment's torn tail (after an unclean stop from its first bad record, as recovery does:
     unsynced writes may reach the disk out of order), writes a fresh header on a newest
     segment whose header never reached the disk, rewrites a stale or missing index, removes
     orphan indexes, stale .tmp files and leftovers of an interrupted queue delete, and
     restores a checkpoint from its good .prev generation. It never rewrites a bad header,
     never changes a sealed segment, never deletes a segment.
  3. A queue whose LOCK is held (a server runs on it) is skipped and reported: stop it first.
  4. Findings have a severity: NOTE (harmless, the server fixes it by itself), REPAIRABLE
     (left by an interrupted write or an unclean stop; --repair does what the server's recovery
     would do, and a power loss never leaves anything worse), DAMAGE (data or state lost or
     unusable for another reason: a bit flip, a bad header, a deleted file).
Exit codes (EXIT_*): 0 nothing but notes (with --repair: after the repairs); 1 damage found, or
left after --repair; 2 usage error, unreadable data directory, or a queue in use.
"""
from __future__ import annotations

import enum
import json
import mmap
import os
import shutil
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from floki.config import RUN_DIR_NAME
from floki.errors import InvalidParameter
from floki.names import validate_name
from floki.shard import checkpoint, fileio, files
from floki.shard.locks import LockHeld, try_flock
from floki.shard.queue import FORMAT as CHECKPOINT_FORMAT
from floki.shard.queue import _valid_channels_file, _valid_queue_file
from floki.shard.segment import (MAX_SEGMENT_BYTES, NO_RECORD, RECORD_HEADER, RECORD_HEADER_SIZE,
                                 RESYNC_IDS, RESYNC_WINDOW_BYTES, SEGMENT_HEADER_SIZE,
                                 CorruptSegment, UnfinishedSegment, decode_segment_header,
                                 encode_segment_header, index_from_bytes, index_to_bytes,
                                 parse_record)

EXIT_CLEAN, EXIT_DAMAGE, EXIT_USAGE = 0, 1, 2
_ID_FIELD_OFFSET = 8            # where a record's u64 id starts (log_format.md)


class Severity(enum.Enum):
    NOTE = "note"               # harmless; the server fixes it by itself at start
    REPAIRABLE = "repairable"   # --repair fixes it the way the server's recovery would
    DAMAGE = "damage"           # lost or unusable data or state


@dataclass
class Finding:
    path: Path
    severity: Severity
    what: str
    repair: Callable[[], None] | None = None    # only for NOTE and REPAIRABLE findings
    repaired: bool = False
    repair_error: str | None = None

    def line(self) -> str:
        done = (" [repaired]" if self.repaired else
                f" [repair failed: {self.repair_error}]" if self.repair_error else "")
        return f"  {self.severity.value}: {self.path.name}: {self.what}{done}"


@dataclass
class QueueReport:
    name: str
    directory: Path
    findings: list[Finding] = field(default_factory=list)
    segments: int = 0
    records: int = 0
    first_id: int | None = None
    last_id: int | None = None
    in_use: bool = False

    def add(self, path: Path, severity: Severity, what: str,
            repair: Callable[[], None] | None = None) -> None:
        self.findings.append(Finding(Path(path), severity, what, repair))

    @property
    def worst(self) -> Severity | None:
        order = [Severity.DAMAGE, Severity.REPAIRABLE, Severity.NOTE]
        present = {f.severity for f in self.findings if not f.repaired}
        return next((s for s in order if s in present), None)


@dataclass
class CheckReport:
    data_dir: Path
    queues: list[QueueReport] = field(default_factory=list)
    other: QueueReport | None = None        # findings about the data directory itself

    @property
    def exit_code(self) -> int:
        if any(q.in_use for q in self.queues):
            return EXIT_USAGE
        reports = self.queues + ([self.other] if self.other else [])
        if any(r.worst in (Severity.DAMAGE, Severity.REPAIRABLE) for r in reports):
            return EXIT_DAMAGE
        return EXIT_CLEAN


@dataclass
class _SegmentScan:
    """What a full read of one segment found."""
    first_id: int
    offsets: array                   # like the in-memory index: NO_RECORD for unreadable ids
    data_end: int                    # end of the last good record
    file_size: int
    bad_runs: list[tuple[int, int, int, int]] = field(default_factory=list)
    # (first lost id, last lost id, offset of the bad bytes, offset where records resume)
    tail_start: int | None = None    # bytes from here to the end hold no valid record

    @property
    def end_id(self) -> int:
        return self.first_id + len(self.offsets)


# --- the data directory -------------------------------------------------------------------

def check_data_dir(data_dir: Path, *, repair: bool = False) -> CheckReport:
    """Checks (and with `repair`, repairs per rule 2) every queue in `data_dir`.

    Returns the report; its exit_code is the process exit code.
    Raises OSError when `data_dir` cannot be listed (EXIT_USAGE for the caller).
    """
    data_dir = Path(data_dir)
    report = CheckReport(data_dir, other=QueueReport("(data directory)", data_dir))
    entries = sorted(os.scandir(data_dir), key=lambda e: e.name)
    for entry in entries:
        path = Path(entry.path)
        if entry.name == RUN_DIR_NAME:
            continue
        if entry.name.startswith(files.DELETING_PREFIX) and entry.is_dir(follow_symlinks=False):
            report.other.add(path, Severity.NOTE, "left by an interrupted queue delete; "
                             "nothing reads it", _remove_tree(path, data_dir))
            continue
        if not entry.is_dir(follow_symlinks=False):
            report.other.add(path, Severity.NOTE, "not a directory; ignored by the server")
            continue
        try:
            name = validate_name(entry.name)
        except InvalidParameter:
            report.other.add(path, Severity.NOTE, "not a valid queue name; ignored")
            continue
        names = os.listdir(path)
        if files.QUEUE_FILE not in names and not any(
                files.parse_segment_name(n) is not None for n in names):
            report.other.add(path, Severity.NOTE, f"no {files.QUEUE_FILE} and no segment: not "
                             "a queue; ignored by the server")
            continue
        report.queues.append(check_queue(path, name, repair=repair))
    if repair:
        _apply_repairs(report.other)
    return report


def check_queue(directory: Path, name: str, *, repair: bool = False) -> QueueReport:
    """Checks one queue directory (holding its LOCK meanwhile, rule 3); with `repair`, applies
    the repairs and checks again. Returns the report of what is left (repaired findings kept,
    marked). Raises nothing for damage; OSError only for an unreadable directory."""
    directory = Path(directory)
    try:
        lock_fd = try_flock(files.lock_path(directory))
    except LockHeld:
        return QueueReport(name, directory, in_use=True)
    try:
        report = _inspect_queue(directory, name)
        if repair and any(f.repair for f in report.findings):
            _apply_repairs(report)
            after = _inspect_queue(directory, name)
            after.findings = [f for f in report.findings if f.repaired] + after.findings
            report = after
        return report
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _apply_repairs(report: QueueReport) -> None:
    for finding in report.findings:
        if finding.repair is None or finding.repaired:
            continue
        try:
            finding.repair()
            finding.repaired = True
        except OSError as exc:
            finding.repair_error = os.strerror(exc.errno) if exc.errno else str(exc)
        except Exception as exc:     # DiskFull / StorageIOError from checkpoint.write_atomic
            finding.repair_error = str(exc)


# --- one queue ----------------------------------------------------------------------------

def _inspect_queue(directory: Path, name: str) -> QueueReport:
    report = QueueReport(name, directory)
    names = sorted(os.listdir(directory))
    segment_ids, index_ids = [], set()
    for entry in names:
        path = directory / entry
        if files.parse_segment_name(entry) is not None:
            segment_ids.append(files.parse_segment_name(entry))
        elif files.parse_index_name(entry) is not None:
            index_ids.add(files.parse_index_name(entry))
        elif entry.endswith(files.TMP_SUFFIX):
            report.add(path, Severity.NOTE, "an atomic write that never completed",
                       _unlink(path, directory))
        elif entry not in (files.QUEUE_FILE, files.CHANNELS_FILE, files.LOCK_FILE,
                           files.QUEUE_FILE + files.PREVIOUS_SUFFIX,
                           files.CHANNELS_FILE + files.PREVIOUS_SUFFIX):
            report.add(path, Severity.NOTE, "not a Floki file; ignored by the server")
    for first_id in sorted(index_ids - set(segment_ids)):
        path = files.index_path(directory, first_id)
        report.add(path, Severity.NOTE, "index without its segment (an interrupted removal)",
                   _unlink(path, directory))
    _check_checkpoint(report, files.queue_file(directory), _valid_queue_file,
                      "settings fall back to the server defaults and ids continue from the "
                      "segments")
    _check_checkpoint(report, files.channels_file(directory), _valid_channels_file,
                      "every channel restarts at the oldest retained id (all is delivered "
                      "again)")
    clean_stop = _stopped_cleanly(files.queue_file(directory))
    scans = []
    for k, first_id in enumerate(segment_ids):
        scan = _check_segment(report, directory, first_id, newest=k == len(segment_ids) - 1,
                              clean_stop=clean_stop)
        if scan is not None:
            scans.append(scan)
    for older, newer in zip(scans, scans[1:]):
        if older.end_id > newer.first_id:
            report.add(files.segment_path(directory, older.first_id), Severity.DAMAGE,
                       f"holds ids up to {older.end_id - 1}, overlapping "
                       f"{files.segment_name(newer.first_id)}; ids from {newer.first_id} in it "
                       "are ignored")
    report.segments = len(segment_ids)
    for scan in scans:
        readable = [i for i, o in enumerate(scan.offsets) if o != NO_RECORD]
        report.records += len(readable)
        if readable:
            if report.first_id is None:
                report.first_id = scan.first_id + readable[0]
            report.last_id = scan.first_id + readable[-1]
    return report


def _check_checkpoint(report: QueueReport, path: Path, valid, consequence: str) -> None:
    """One checkpoint file and its .prev generation (queue.py reads the file, else .prev)."""
    problem = _checkpoint_problem(path, valid)
    if problem is None:
        return
    previous = files.previous_path(path)
    previous_problem = _checkpoint_problem(previous, valid)
    if problem == "missing" and path.name == files.CHANNELS_FILE and previous_problem:
        # a queue created before its first checkpoint was written: nothing to lose yet
        report.add(path, Severity.NOTE, "missing; channels start at the oldest id")
        return
    if previous_problem is None:
        report.add(path, Severity.REPAIRABLE, f"{problem}; the previous generation "
                   f"{previous.name} is good (the server falls back to it)",
                   _restore_previous(path, previous))
    else:
        report.add(path, Severity.DAMAGE, f"{problem}, and {previous.name} is "
                   f"{previous_problem}: {consequence}")


def _stopped_cleanly(queue_file: Path) -> bool:
    """True when queue.json records a clean stop (the server then trusts the newest index)."""
    try:
        data = json.loads(queue_file.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("clean_next_id") is not None


def _checkpoint_problem(path: Path, valid) -> str | None:
    """Returns what is wrong with a checkpoint file ("missing" if absent), or None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except IsADirectoryError:
        return "a directory"
    except OSError as exc:
        return f"unreadable ({os.strerror(exc.errno)})"
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return f"not valid JSON ({len(data)} bytes)"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object"
    if isinstance(obj.get("format"), int) and obj["format"] > CHECKPOINT_FORMAT:
        return f"of format {obj['format']}, newer than this Floki ({CHECKPOINT_FORMAT})"
    return valid(obj)


# --- one segment --------------------------------------------------------------------------

def _check_segment(report: QueueReport, directory: Path, first_id: int, newest: bool,
                   clean_stop: bool) -> _SegmentScan | None:
    """Reports on one segment and its index. Returns its scan (None if it has no records to
    speak of: unusable header)."""
    path = files.segment_path(directory, first_id)
    with open(path, "rb") as f:
        size = fileio.fstat(f.fileno()).st_size
        head = f.read(SEGMENT_HEADER_SIZE)
        try:
            header_first_id, _created_ms = decode_segment_header(head, path)
        except UnfinishedSegment as exc:
            if newest:
                report.add(path, Severity.REPAIRABLE, f"{exc.reason}: the segment was being "
                           "created when the process stopped; it holds no record",
                           _fresh_header(path, first_id, directory))
            else:
                report.add(path, Severity.DAMAGE, f"{exc.reason}, but it is not the newest "
                           "segment: the queue will not open")
            return None
        except CorruptSegment as exc:
            report.add(path, Severity.DAMAGE, f"{exc.reason}: the queue will not open")
            return None
        if header_first_id != first_id:
            report.add(path, Severity.DAMAGE, f"header says first id {header_first_id}, the "
                       f"name says {first_id}: the queue will not open")
            return None
        if size > MAX_SEGMENT_BYTES:
            report.add(path, Severity.DAMAGE, f"{size} bytes, above the {MAX_SEGMENT_BYTES}"
                       "-byte limit: the queue will not open")
            return None
        if size == SEGMENT_HEADER_SIZE:
            scan = _SegmentScan(first_id, array("I"), SEGMENT_HEADER_SIZE, size)
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                scan = _scan_records(buf, first_id, size)
    if newest and not clean_stop and scan.bad_runs:
        # After an unclean stop the server ends the active log at its first bad record
        # (segment.py rule 7): what follows was written after the last fsync, out of order.
        lost_first, _, bad_at, _ = scan.bad_runs[0]
        cut = _SegmentScan(first_id, scan.offsets[:lost_first - first_id], bad_at, size,
                           tail_start=bad_at)
        report.add(path, Severity.REPAIRABLE, f"unclean stop: id {lost_first} at offset "
                   f"{bad_at} is unreadable and {size - bad_at} byte(s) follow (writes that "
                   f"were never fsynced, on disk out of order); recovery ends the log there "
                   f"(ids {lost_first}..{scan.end_id - 1})", _cut_tail(path, cut, directory))
        return cut
    for lost_first, lost_last, bad_at, resume_at in scan.bad_runs:
        where = (f"ids {lost_first}..{lost_last}" if lost_last > lost_first
                 else f"id {lost_first}")
        report.add(path, Severity.DAMAGE, f"{where} unreadable (bytes {bad_at}..{resume_at});"
                   " skipped when read")
    if scan.tail_start is not None:
        tail = size - scan.tail_start
        if newest and not scan.bad_runs:
            report.add(path, Severity.REPAIRABLE, f"torn tail: {tail} byte(s) after offset "
                       f"{scan.tail_start} hold no complete record (a write cut short; ids "
                       f"from {scan.end_id} were never fully written)",
                       _cut_tail(path, scan, directory))
            return scan
        report.add(path, Severity.DAMAGE, f"{tail} byte(s) after offset {scan.tail_start} hold"
                   f" no valid record (ids from {scan.end_id} in this segment are lost)")
    _check_index(report, directory, scan)
    return scan


def _scan_records(buf, first_id: int, limit: int) -> _SegmentScan:
    """Reads every record from the end of the header; a bad one is skipped by searching for
    the next valid record (as the server's resynchronisation does, log_format.md)."""
    scan = _SegmentScan(first_id, array("I"), SEGMENT_HEADER_SIZE, limit)
    offsets = scan.offsets
    pos, expected = SEGMENT_HEADER_SIZE, first_id
    while pos < limit:
        parsed = parse_record(buf, pos, limit)
        if parsed is not None and parsed[0] == expected:
            offsets.append(pos)
            pos = scan.data_end = parsed[2]
            expected += 1
            continue
        found = _resync(buf, pos, expected, limit)
        if found is None:
            scan.tail_start = pos
            break
        resume_at, found_id = found
        scan.bad_runs.append((expected, found_id - 1, pos, resume_at))
        offsets.extend(array("I", [NO_RECORD]) * (found_id - expected))
        pos, expected = resume_at, found_id
    return scan


def _resync(buf, pos: int, expected: int, limit: int) -> tuple[int, int] | None:
    """Returns (offset, id) of the nearest valid record after a bad one at `pos` with an id in
    expected..expected+RESYNC_IDS-1, or None when there is none before `limit`."""
    if pos + RECORD_HEADER_SIZE <= limit:
        length = RECORD_HEADER.unpack_from(buf, pos)[1]
        after = pos + RECORD_HEADER_SIZE + length
        if after < limit:
            parsed = parse_record(buf, after, limit)
            if parsed is not None and expected <= parsed[0] < expected + RESYNC_IDS:
                return after, parsed[0]
    patterns = [(id_, id_.to_bytes(8, "little")) for id_ in range(expected, expected + RESYNC_IDS)]
    window_start = pos + 1
    while window_start + RECORD_HEADER_SIZE <= limit:
        window_end = min(limit, window_start + RESYNC_WINDOW_BYTES)
        best = None
        for id_, pattern in patterns:
            at = buf.find(pattern, window_start + _ID_FIELD_OFFSET,
                          window_end + _ID_FIELD_OFFSET + len(pattern))
            while at != -1:
                candidate = at - _ID_FIELD_OFFSET
                if best is not None and candidate >= best[0]:
                    break
                parsed = parse_record(buf, candidate, limit)
                if parsed is not None and parsed[0] == id_:
                    best = (candidate, id_)
                    break
                at = buf.find(pattern, at + 1, window_end + _ID_FIELD_OFFSET + len(pattern))
        if best is not None:
            return best
        window_start = window_end
    return None


def _check_index(report: QueueReport, directory: Path, scan: _SegmentScan) -> None:
    path = files.index_path(directory, scan.first_id)
    try:
        stored = index_from_bytes(path.read_bytes())
    except FileNotFoundError:
        report.add(path, Severity.NOTE, "index missing (the server rebuilds it by scanning)",
                   _write_index(path, scan.offsets))
        return
    # An entry of an unreadable record may keep its offset: the record is bad, not the hint.
    wrong = next((i for i, (a, b) in enumerate(zip(stored, scan.offsets))
                  if a != b and b != NO_RECORD), None)
    if wrong is not None or len(stored) != len(scan.offsets):
        same = wrong if wrong is not None else min(len(stored), len(scan.offsets))
        report.add(path, Severity.NOTE, f"index stale: {same} of {len(scan.offsets)} entries "
                   f"right, {len(stored)} stored (a hint; the server rebuilds it)",
                   _write_index(path, scan.offsets))


# --- repairs (closures run by _apply_repairs; each makes its change durable) ----------------

def _unlink(path: Path, directory: Path) -> Callable[[], None]:
    def repair() -> None:
        fileio.unlink(path)
        files.fsync_directory(directory)
    return repair


def _remove_tree(path: Path, parent: Path) -> Callable[[], None]:
    def repair() -> None:
        shutil.rmtree(path)
        files.fsync_directory(parent)
    return repair


def _write_index(path: Path, offsets: array) -> Callable[[], None]:
    def repair() -> None:
        checkpoint.write_atomic(path, index_to_bytes(offsets))
    return repair


def _restore_previous(path: Path, previous: Path) -> Callable[[], None]:
    def repair() -> None:
        checkpoint.write_atomic(path, previous.read_bytes())
    return repair


def _fresh_header(path: Path, first_id: int, directory: Path) -> Callable[[], None]:
    """Like Wal.open: the unfinished newest segment becomes an empty one under the same name
    (the name still counts toward the next id)."""
    def repair() -> None:
        checkpoint.write_atomic(path, encode_segment_header(first_id, time.time_ns() // 10**6))
        index = files.index_path(directory, first_id)
        if index.exists():
            checkpoint.write_atomic(index, b"")
    return repair


def _cut_tail(path: Path, scan: _SegmentScan, directory: Path) -> Callable[[], None]:
    """Truncates the newest segment after its last good record (what Wal.open does) and
    writes its index to match."""
    def repair() -> None:
        fd = fileio.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fileio.ftruncate(fd, scan.data_end)
            fileio.fsync(fd)
        finally:
            fileio.close(fd)
        checkpoint.write_atomic(files.index_path(directory, scan.first_id),
                                index_to_bytes(scan.offsets))
    return repair


# --- command line -------------------------------------------------------------------------

def run(data_dir: str, *, repair: bool = False, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """`floki check`: checks `data_dir`, prints a report to `out`. Returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = Path(data_dir)
    if not path.is_dir():
        print(f"floki check: {data_dir}: not a directory", file=err)
        return EXIT_USAGE
    try:
        report = check_data_dir(path, repair=repair)
    except OSError as exc:
        print(f"floki check: {data_dir}: cannot read it ({exc.strerror or exc})", file=err)
        return EXIT_USAGE
    _print_report(report, out, repair)
    return report.exit_code


def _print_report(report: CheckReport, out: TextIO, repair: bool) -> None:
    print(f"floki check {report.data_dir}: {len(report.queues)} queue(s)", file=out)
    for queue in report.queues:
        if queue.in_use:
            print(f"queue {queue.name}: SKIPPED, in use by a running server (its LOCK is held)",
                  file=out)
            continue
        ids = (f"ids {queue.first_id}..{queue.last_id}" if queue.first_id is not None
               else "no records")
        worst = queue.worst
        state = "clean" if worst in (None, Severity.NOTE) else worst.value
        print(f"queue {queue.name}: {state} ({queue.segments} segment(s), {queue.records} "
              f"record(s), {ids})", file=out)
        for finding in queue.findings:
            print(finding.line(), file=out)
    if report.other and report.other.findings:
        print("data directory:", file=out)
        for finding in report.other.findings:
            print(finding.line(), file=out)
    code = report.exit_code
    verdict = {EXIT_CLEAN: "clean", EXIT_DAMAGE: "damage found" + (" (left after repair)"
                                                                  if repair else ""),
               EXIT_USAGE: "not fully checked: stop the server first"}[code]
    if code == EXIT_DAMAGE and not repair and any(
            f.severity is Severity.REPAIRABLE for q in report.queues for f in q.findings):
        verdict += "; run with --repair to fix what is repairable"
    print(f"result: {verdict} (exit code {code})", file=out)
