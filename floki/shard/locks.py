"""Advisory locks (flock) that say a process owns a queue directory or a data directory.

Owns: taking a lock without blocking (`hold`), for a queue's LOCK (queue.py) and for the
offline tools (floki check, floki rebalance) that must refuse to touch what a server holds.
Rule: try_flock never creates a lock file (an offline tool leaves no trace); a missing file
means nobody ever held it.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the flock."""


def hold(fd: int) -> int:
    """Takes the exclusive flock of the open file `fd` without blocking. Returns `fd`.
    On failure `fd` is closed. Raises LockHeld if another process holds it, OSError."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockHeld() from None
        raise
    return fd


def try_flock(path: Path) -> int | None:
    """Returns an fd holding `path`'s exclusive flock (close it to release), or None if the file
    does not exist. Raises LockHeld if another process holds it, OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    return hold(fd)
