"""fileio: the one doorway through which the storage engine touches files.

Owns: the file operations segment.py, wal.py, checkpoint.py, files.py and queue.py use to
change or read their files (open, close, write, writev, pread, fsync, ftruncate, fstat,
replace, link, unlink), and the hook that lets a test put a fault-injecting layer in front of
them (tests/faultfs.py: failing writes/fsyncs with ENOSPC or EIO, simulating power loss).
Rules:
  1. Storage code calls `fileio.write(fd, data)`, never `os.write`: the module attributes below
     ARE the os functions in production, so the cost is the one attribute lookup `os.write`
     would cost too. No wrapper, no per-call check, no per-record work.
  2. install() swaps every operation at once and returns the layer it replaced, so a test can
     always put the previous one back (use `installed(layer)` as a context manager).
  3. A layer raises OSError exactly where the os function would; callers map it to DiskFull /
     StorageIOError with files.storage_error, whatever layer is installed.
  4. Directory listing and mkdir stay with os/pathlib: they change nothing a power loss could
     tear, and a fault layer sees their effect when the directory is fsynced.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

# The operations a layer must provide, with os's signatures (rule 2 swaps exactly these).
OPERATIONS = ("open", "close", "write", "writev", "pread", "fsync", "ftruncate", "fstat",
              "replace", "link", "unlink")

# Rule 1: in production these names are bound to the os functions themselves.
open = os.open              # noqa: A001 - deliberately the os name, see rule 1
close = os.close
write = os.write
writev = os.writev
pread = os.pread
fsync = os.fsync
ftruncate = os.ftruncate
fstat = os.fstat
replace = os.replace
link = os.link
unlink = os.unlink

_installed: object | None = None          # None: the real os functions


def install(layer: object | None) -> object | None:
    """Routes every operation in OPERATIONS to `layer`'s method of the same name; None
    restores the os functions.

    Returns the layer that was installed before (None for the os functions).
    Raises AttributeError (nothing changed) if `layer` lacks one of the operations.
    """
    global _installed
    source = os if layer is None else layer
    bound = {name: getattr(source, name) for name in OPERATIONS}
    previous, _installed = _installed, layer
    globals().update(bound)
    return previous


def current() -> object | None:
    """Returns the installed layer, or None when the os functions are in use."""
    return _installed


@contextmanager
def installed(layer: object) -> Iterator[object]:
    """Installs `layer` for the duration of a with-block and puts the previous one back."""
    previous = install(layer)
    try:
        yield layer
    finally:
        install(previous)
