"""Atomic small files: queue.json and channels.json are replaced whole, never edited in place.

Owns: the write protocol (write <name>.tmp -> fsync it -> rename over <name> -> fsync the
directory) and reading those files back as JSON objects.
Rules:
  1. A reader sees the old file or the new one, never a mix: rename is atomic, and the
     directory fsync makes the rename itself survive power loss (the step NSQ skips).
  2. A leftover .tmp is a write that never completed; it is ignored and removed, never read.
  3. A file that exists but is not a JSON object raises CheckpointCorrupt; deciding what to fall
     back to is the caller's job (a checkpoint is a hint, the segments are the truth).
  4. No state is kept here: the shard's background worker may write a checkpoint while the loop
     works on other files; the caller makes sure only one write of a given file (and of its
     .tmp) is ever in flight (background.py rule a).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from floki.shard import fileio, files
from floki.shard.segment import write_all

log = logging.getLogger(__name__)


class CheckpointCorrupt(Exception):
    """A checkpoint file exists but is not a JSON object."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` atomically and durably (rule 1).

    Raises DiskFull / StorageIOError; `path` is then unchanged and no .tmp is left behind.
    """
    path = Path(path)
    tmp = files.tmp_path(path)
    try:
        fd = fileio.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
            fileio.fsync(fd)
        finally:
            fileio.close(fd)
        fileio.replace(tmp, path)
    except OSError as exc:
        try:
            fileio.unlink(tmp)
        except OSError:
            pass
        raise files.storage_error(exc, f"write {path.name}") from exc
    try:
        files.fsync_directory(path.parent)
    except OSError as exc:
        raise files.storage_error(exc, f"write {path.name}") from exc


def read_json(path: Path) -> dict | None:
    """Returns the JSON object stored in `path`, or None if there is no such file.

    A stale `<path>.tmp` is removed (rule 2).
    Raises CheckpointCorrupt if the file is not a UTF-8 JSON object, StorageIOError if it
    cannot be read.
    """
    path = Path(path)
    tmp = files.tmp_path(path)
    try:
        fileio.unlink(tmp)
        log.info("removed %s: an atomic write that never completed", tmp)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove stale %s: %s", tmp, exc)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise CheckpointCorrupt(path, "is a directory") from None
    except OSError as exc:
        raise files.storage_error(exc, f"read {path.name}") from exc
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointCorrupt(path, f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointCorrupt(path, f"holds a JSON {type(obj).__name__}, not an object")
    return obj


def write_json(path: Path, obj: dict) -> None:
    """Replaces `path` with `obj` as compact JSON via write_atomic. Raises DiskFull /
    StorageIOError, TypeError/ValueError if `obj` cannot be encoded as JSON."""
    write_atomic(path, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8"))
