"""Every on-disk name of the storage engine, and the few filesystem steps that make names durable.

Owns: building and parsing the names under the data directory (LevelDB's filename.h), the
directory fsync that makes a create/rename/unlink durable, and the one map from an OSError of
the storage layer to a client-visible error (DiskFull / StorageIOError).
Rules:
  1. No other module formats or parses a file name; they call the functions below.
  2. A segment and its index are named by the zero-padded first id, so name order is id order.
  3. A queue directory name always passes floki.names.validate_name, so no name can reach a path
     outside the data directory; the runtime dir `.run` can never be a queue name (leading dot).
  4. Listing never deletes anything: names it does not know are skipped with a warning.
Layout:
  <data_dir>/<queue>/{first_id:020d}.seg   segment        <data_dir>/<queue>/queue.json
  <data_dir>/<queue>/{first_id:020d}.idx   its index      <data_dir>/<queue>/channels.json
  <data_dir>/<queue>/LOCK                  flock          <any of the files>.tmp  atomic write
  <data_dir>/<queue>/{queue,channels}.json.prev            previous good checkpoint generation
  <data_dir>/.run/                         runtime files (ipc sockets), never a queue
  <data_dir>/.deleting-<queue>-<token>/    a queue being deleted (renamed first, then removed)
  <data_dir>/.incoming-<queue>-<token>/    a queue being copied in by `floki rebalance`
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from floki.config import RUN_DIR_NAME
from floki.errors import DiskFull, FlokiError, InvalidParameter, StorageIOError
from floki.names import validate_name
from floki.shard import fileio

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
INDEX_SUFFIX = ".idx"
TMP_SUFFIX = ".tmp"
PREVIOUS_SUFFIX = ".prev"           # the previous good generation of a checkpoint file
DELETING_PREFIX = ".deleting-"      # a queue directory being removed (never a queue name)
INCOMING_PREFIX = ".incoming-"      # a queue directory being copied in (never a queue name)
QUEUE_FILE = "queue.json"
CHANNELS_FILE = "channels.json"
LOCK_FILE = "LOCK"
ID_DIGITS = 20          # 2**64 - 1 has 20 decimal digits
MAX_ID = 2**64 - 1      # ids are u64 on disk

_KNOWN_QUEUE_FILES = frozenset({QUEUE_FILE, CHANNELS_FILE, LOCK_FILE})


# --- names inside a queue directory ---------------------------------------------------------

def segment_name(first_id: int) -> str:
    """Returns the file name of the segment whose first id is `first_id`."""
    return f"{first_id:0{ID_DIGITS}d}{SEGMENT_SUFFIX}"


def segment_path(directory: Path, first_id: int) -> Path:
    return Path(directory) / segment_name(first_id)


def index_path(directory: Path, first_id: int) -> Path:
    """Returns the path of the `.idx` file that belongs to segment `first_id`."""
    return Path(directory) / f"{first_id:0{ID_DIGITS}d}{INDEX_SUFFIX}"


def queue_file(directory: Path) -> Path:
    return Path(directory) / QUEUE_FILE


def channels_file(directory: Path) -> Path:
    return Path(directory) / CHANNELS_FILE


def lock_path(directory: Path) -> Path:
    return Path(directory) / LOCK_FILE


def tmp_path(path: Path) -> Path:
    """Returns `<path>.tmp`, the temp file an atomic write of `path` goes through."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def previous_path(path: Path) -> Path:
    """Returns `<path>.prev`, where the previous good generation of checkpoint `path` is kept."""
    path = Path(path)
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def _parse_id_name(name: str, suffix: str) -> int | None:
    if not name.endswith(suffix):
        return None
    digits = name[:-len(suffix)]
    # isdigit() accepts non-ASCII digits; only the exact form we write is ours.
    if len(digits) != ID_DIGITS or not digits.isascii() or not digits.isdigit():
        return None
    value = int(digits)
    return value if 1 <= value <= MAX_ID else None


def parse_segment_name(name: str) -> int | None:
    """Returns the first id encoded in a segment file name, or None if `name` is not one."""
    return _parse_id_name(name, SEGMENT_SUFFIX)


def parse_index_name(name: str) -> int | None:
    """Returns the first id encoded in an index file name, or None if `name` is not one."""
    return _parse_id_name(name, INDEX_SUFFIX)


def _is_known_queue_file(name: str) -> bool:
    if name.endswith(TMP_SUFFIX):
        name = name[:-len(TMP_SUFFIX)]
    if name.endswith(PREVIOUS_SUFFIX):
        name = name[:-len(PREVIOUS_SUFFIX)]
    return (name in _KNOWN_QUEUE_FILES or parse_segment_name(name) is not None
            or parse_index_name(name) is not None)


def _list_ids(directory: Path, parse, warn_strays: bool) -> list[int]:
    ids = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        first_id = parse(entry.name)
        if first_id is not None:
            if entry.is_file(follow_symlinks=False):
                ids.append(first_id)
            elif warn_strays:
                log.warning("ignoring %s in %s: not a regular file", entry.name, directory)
        elif warn_strays and not _is_known_queue_file(entry.name):
            log.warning("ignoring stray file %s in %s", entry.name, directory)
    ids.sort()
    return ids


def list_segment_ids(directory: Path) -> list[int]:
    """Returns the first ids of the segment files in `directory`, ascending.

    Files that are not ours (or are ours but misnamed, e.g. `12.seg`) are skipped with a warning;
    a missing directory has no segments.
    """
    return _list_ids(Path(directory), parse_segment_name, warn_strays=True)


def list_index_ids(directory: Path) -> list[int]:
    """Returns the first ids of the `.idx` files in `directory`, ascending (no warnings)."""
    return _list_ids(Path(directory), parse_index_name, warn_strays=False)


# --- the data directory ---------------------------------------------------------------------

def queue_dir(data_dir: Path, name: str | bytes) -> Path:
    """Returns `<data_dir>/<name>`. Raises InvalidParameter if `name` is not a valid queue name."""
    return Path(data_dir) / validate_name(name)


def deleting_dir(data_dir: Path, name: str, token: str) -> Path:
    """Returns `<data_dir>/.deleting-<name>-<token>`: a queue directory is renamed there before
    its files are removed, so a crash never leaves a half-deleted queue under its own name (the
    leading dot keeps it from ever being listed as a queue)."""
    return Path(data_dir) / f"{DELETING_PREFIX}{validate_name(name)}-{token}"


def deleting_dir_queue(entry_name: str) -> str | None:
    """Returns the queue name a `deleting_dir` entry was made for, or None if `entry_name` is
    not one."""
    if not entry_name.startswith(DELETING_PREFIX):
        return None
    return entry_name[len(DELETING_PREFIX):].rpartition("-")[0] or None


def incoming_dir(data_dir: Path, name: str, token: str) -> Path:
    """Returns `<data_dir>/.incoming-<name>-<token>`: `floki rebalance` copies a queue there
    from another filesystem, fsyncs it, and only then renames it to `<data_dir>/<name>`, so a
    crash never leaves a partial copy under the queue's own name."""
    return Path(data_dir) / f"{INCOMING_PREFIX}{validate_name(name)}-{token}"


def run_dir(data_dir: Path) -> Path:
    """Returns the runtime directory (ipc sockets); its leading dot keeps it from being a queue."""
    return Path(data_dir) / RUN_DIR_NAME


def list_queue_names(data_dir: Path) -> list[str]:
    """Returns the names of the queues stored in `data_dir`, sorted.

    A queue is a real (non-symlink) subdirectory with a valid queue name that holds queue.json or
    at least one segment. Anything else is skipped with a warning and left untouched; the runtime
    directory is skipped silently.
    """
    names = []
    try:
        entries = list(os.scandir(data_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name == RUN_DIR_NAME:
            continue
        if not entry.is_dir(follow_symlinks=False):
            log.warning("ignoring %s in data directory %s: not a directory", entry.name, data_dir)
            continue
        try:
            name = validate_name(entry.name)
        except InvalidParameter:
            log.warning("ignoring directory %s in %s: not a valid queue name", entry.name, data_dir)
            continue
        path = Path(entry.path)
        has_segment = any(parse_segment_name(n) is not None for n in os.listdir(path))
        if not (queue_file(path).is_file() or has_segment):
            log.warning("ignoring directory %s in %s: no %s and no segment",
                        entry.name, data_dir, QUEUE_FILE)
            continue
        names.append(name)
    names.sort()
    return names


# --- durability and errors --------------------------------------------------------------------

def fsync_directory(directory: Path) -> None:
    """Makes the entries of `directory` (creates, renames, unlinks) durable. Raises OSError."""
    fd = fileio.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fileio.fsync(fd)
    finally:
        fileio.close(fd)


def fsync_file_if_present(path: Path) -> None:
    """fsyncs the file at `path` through a read-only fd of its own; nothing if it is gone (an
    index removed behind our back is rebuilt at the next open). Raises OSError."""
    try:
        fd = fileio.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fileio.fsync(fd)
    finally:
        fileio.close(fd)


def storage_error(exc: OSError, action: str) -> FlokiError:
    """Returns the client-visible error for an OSError raised while `action` (e.g. "append").

    ENOSPC and EDQUOT are expected conditions (DiskFull); anything else is a StorageIOError.
    The caller raises it `from exc` so the errno stays in the traceback and logs.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full ({action})")
    return StorageIOError(f"I/O error ({action}: {os.strerror(exc.errno) if exc.errno else exc})")
