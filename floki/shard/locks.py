"""Advisory locks (flock) that say a process owns a queue directory or a data directory.

Owns: taking an existing lock file without blocking, for the offline tools (floki check,
floki rebalance) that must refuse to touch what a running server holds.
Rule: a lock file is never created here (an offline tool leaves no trace); a missing file means
nobody ever held it.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the flock."""


def try_flock(path: Path) -> int | None:
    """Returns an fd holding `path`'s exclusive flock (close it to release), or None if the file
    does not exist. Raises LockHeld if another process holds it, OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockHeld() from None
        raise
    return fd
