"""faultfs: a fault-injecting file layer for tests (installed with floki.shard.fileio.install).

Owns: FaultyFileIO, which passes every storage operation through to the real files under one
root directory while it
  - remembers what was fsynced: per file the bytes at its last fsync, per directory the names
    at its last fsync and every state the directory went through since;
  - fails chosen calls: the n-th write/fsync/ftruncate/... (optionally only for paths
    containing some text) raises OSError(ENOSPC or EIO), a write optionally putting a prefix of
    its data on disk first, as a full disk does (a "write" rule also strikes writev, a write
    of its buffers one after the other; a "writev" rule strikes writev only);
  - builds the directory tree a power loss would leave (power_loss), or does so in the middle of
    the n-th call and then refuses every further call (crash_at), like SQLite's crash VFS.
The power-loss model (what the storage engine must survive):
  1. A file keeps the bytes it had at its last fsync. What was written since may reach the disk
     in part: a random prefix of what was appended, with optional zeroed 512-byte sectors inside
     it (writeback order is not file order); a file cut or rewritten since keeps either its
     synced bytes or a random prefix of its new bytes.
  2. A directory's names are those of its last fsync, or of any state it passed through since
     (a journaling filesystem commits directory changes in order), chosen at random. A file
     created, renamed or unlinked after the last fsync of its directory may therefore be lost
     (or come back). Directories are followed by path; files by inode, so a rename keeps data.
  3. Everything under the root when the layer is created counts as fsynced.
Limits: a file's synced bytes are read back at each fsync (fine for test-sized data); a file
created outside the layer (LOCK, by queue.py) that reuses the inode number of a deleted file
inherits that file's identity, which only matters if its contents do.
Also: OsLayer, the same operations looked up on `os` at call time, so tests that monkeypatch
os.fsync & co. keep working while fileio binds the os functions directly (tests/unit/shard
conftest installs it).
Threads: the shard's background worker calls the layer too, so every operation and power_loss
hold one lock (the call counts, rules, fsynced bytes and directory histories stay consistent,
and a power loss sees no operation half done); only a real os.fsync runs outside it.
"""
from __future__ import annotations

import errno as errno_module
import itertools
import os
import random
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from floki.shard import fileio

SECTOR_BYTES = 512
DIR = "<dir>"          # a directory entry that is a directory (followed by path)
# Calls that change what is on disk: the points where crash_at may cut the power.
MUTATING = frozenset({"write", "writev", "fsync", "ftruncate", "replace", "link", "unlink",
                      "create"})
WRITES = frozenset({"write", "writev"})      # _enter hands their rule back (partial_bytes)


class PowerLost(BaseException):
    """Raised by every call once a simulated power loss happened (crash_at). A BaseException,
    so the engine's `except OSError`/`except Exception` cleanup cannot swallow it."""


class OsLayer:
    """fileio's operations, looked up on the os module at each call (honours monkeypatch)."""

    def __getattr__(self, name: str):
        if name not in fileio.OPERATIONS:
            raise AttributeError(name)
        return lambda *args, **kwargs: getattr(os, name)(*args, **kwargs)


@dataclass
class Rule:
    """Fail matching calls: the nth one from now, then `times` calls in all (None: forever)."""
    op: str
    err: int
    nth: int = 1
    times: int | None = 1
    partial_bytes: int = 0          # a failing write first writes this many bytes
    path_contains: str | None = None
    seen: int = 0
    fired: int = 0

    def matches(self, op: str, path: str | None) -> bool:
        if op != self.op and not (self.op == "write" and op == "writev"):
            return False
        return self.path_contains is None or (path is not None and self.path_contains in path)

    def fires(self) -> bool:
        """Counts one matching call. Returns True when this call must fail."""
        self.seen += 1
        if self.seen < self.nth or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True

    @property
    def spent(self) -> bool:
        return self.times is not None and self.fired >= self.times


class FaultyFileIO:
    """The fault and power-loss layer for everything under `root` (see the module rules).

    real_fsync: also call os.fsync (off by default: durability is simulated, and tests stay fast
    on any disk). seed: the random choices of power_loss.
    """

    def __init__(self, root: Path, *, seed: int | None = None, real_fsync: bool = False):
        self.root = os.path.abspath(root)
        self.rng = random.Random(seed)
        self.real_fsync = real_fsync
        self.rules: list[Rule] = []
        self.calls: dict[str, int] = {}              # op -> calls seen (all paths)
        self.bytes_written = 0
        self.power_losses = 0
        self._object_ids = itertools.count(1)
        self._synced: dict[int, bytes] = {}           # file object -> bytes at its last fsync
        self._object_of_inode: dict[int, int] = {}
        # directory path -> its name states since its last fsync; [0] is the durable one
        self._history: dict[str, list[dict[str, object]]] = {}
        self._fd_paths: dict[int, str] = {}
        self._crash: tuple[int, Path, dict] | None = None
        self.lost = False
        self._lock = threading.RLock()      # see "Threads" in the module docstring
        self._baseline(self.root)

    # --- configuration --------------------------------------------------------------------------

    def fail(self, op: str, err: int = errno_module.EIO, *, nth: int = 1, times: int | None = 1,
             partial_bytes: int = 0, path_contains: str | None = None) -> Rule:
        """Makes the nth matching call of `op` from now (and `times` - 1 more; None: all) raise
        OSError(err). op: write (also strikes writev), writev, fsync, ftruncate, replace,
        unlink, open, pread. Returns the rule (its `fired` tells how often it struck)."""
        if op not in fileio.OPERATIONS:
            raise ValueError(f"unknown operation {op!r}")
        rule = Rule(op, err, nth, times, partial_bytes, path_contains)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Removes every failure rule (the disk is healthy again)."""
        with self._lock:
            self.rules.clear()

    def crash_at(self, n: int, image_dir: Path, **loss_options) -> None:
        """Cuts the power at the start of the n-th mutating call from now (that call does not
        happen): the power-loss image is written to `image_dir` (see power_loss, which takes
        `loss_options`) and this call and every later one raise PowerLost."""
        with self._lock:
            self._crash = (self._mutations() + n, Path(image_dir), loss_options)

    # --- what the tests ask -------------------------------------------------------------------

    def synced_bytes(self, path: Path) -> bytes:
        """Returns the bytes the file now at `path` had at its last fsync (b"" if never)."""
        with self._lock:
            return self._synced.get(self._object_of(os.stat(path).st_ino), b"")

    def power_loss(self, image_dir: Path, *, unsynced: str = "random", names: str = "random",
                   holes: bool = True) -> Path:
        """Writes to `image_dir` (which must not exist) the tree a power loss now would leave
        under root (module rules 1-3) and returns it.

        unsynced: "random" (a random part of what was written since the last fsync survives),
        "none" (only fsynced bytes: the strictest case), "all" (every write survives, as after
        a process crash). names: "random" (any directory state since its last fsync), "synced"
        (the names at the last directory fsync), "current". holes: zeroed sectors may appear
        inside what survives of unsynced appends ("random" only).
        """
        if unsynced not in ("random", "none", "all") or names not in ("random", "synced",
                                                                        "current"):
            raise ValueError(f"unknown power-loss option {unsynced!r} / {names!r}")
        with self._lock:
            self.power_losses += 1
            self._restore_dir(self.root, Path(image_dir), unsynced, names, holes)
        return Path(image_dir)

    def close_all(self) -> None:
        """Closes every fd opened through this layer and still open (the files of an engine
        abandoned after a power loss, which cannot close them itself)."""
        with self._lock:
            for fd in list(self._fd_paths):
                self.close(fd)

    # --- the operations (fileio.OPERATIONS) ----------------------------------------------------

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        path = os.path.abspath(path)
        with self._lock:
            creating = bool(flags & os.O_CREAT) and not os.path.lexists(path)
            self._enter("create" if creating else "open", path)
            fd = os.open(path, flags, mode)
            self._fd_paths[fd] = path
            if creating and self._tracked(path):
                self._object_of_inode[os.fstat(fd).st_ino] = next(self._object_ids)
                self._note_names(os.path.dirname(path))
            return fd

    def close(self, fd):
        with self._lock:
            self._fd_paths.pop(fd, None)
            return os.close(fd)

    def write(self, fd, data):
        with self._lock:
            path = self._path_of(fd)
            rule = self._enter("write", path)
            if rule is not None:
                if rule.partial_bytes:
                    self.bytes_written += os.write(fd, bytes(data[:rule.partial_bytes]))
                raise OSError(rule.err, os.strerror(rule.err))
            written = os.write(fd, data)
            self.bytes_written += written
            return written

    def writev(self, fd, buffers):
        with self._lock:
            path = self._path_of(fd)
            rule = self._enter("writev", path)
            if rule is not None:
                if rule.partial_bytes:
                    prefix = b"".join(map(bytes, buffers))[:rule.partial_bytes]
                    self.bytes_written += os.write(fd, prefix)
                raise OSError(rule.err, os.strerror(rule.err))
            written = os.writev(fd, buffers)
            self.bytes_written += written
            return written

    def pread(self, fd, size, offset):
        with self._lock:
            self._enter("pread", self._path_of(fd))
            return os.pread(fd, size, offset)

    def fsync(self, fd):
        with self._lock:
            path = self._path_of(fd)
            self._enter("fsync", path)
        if self.real_fsync:
            os.fsync(fd)
        with self._lock:
            if self.lost:        # the power went out while this fsync ran: it never returned
                raise PowerLost(f"fsync {path} during the power loss")
            info = os.fstat(fd)
            if path is None or not self._tracked(path):
                return None
            if stat.S_ISDIR(info.st_mode):
                self._history[path] = [self._scan(path)]
            else:
                with open(f"/proc/self/fd/{fd}", "rb") as f:
                    self._synced[self._object_of(info.st_ino)] = f.read()
            return None

    def ftruncate(self, fd, length):
        with self._lock:
            self._enter("ftruncate", self._path_of(fd))
            return os.ftruncate(fd, length)

    def fstat(self, fd):
        return os.fstat(fd)

    def replace(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        src, dst = os.path.abspath(src), os.path.abspath(dst)
        with self._lock:
            self._enter("replace", dst)
            os.replace(src, dst)
            for directory in {os.path.dirname(src), os.path.dirname(dst)}:
                self._note_names(directory)

    def link(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True):
        # A second name for the same inode, so the same file object (rule 2 follows files by
        # inode): only the directory that gained the name changes.
        src, dst = os.path.abspath(src), os.path.abspath(dst)
        with self._lock:
            self._enter("link", dst)
            os.link(src, dst)
            self._note_names(os.path.dirname(dst))

    def unlink(self, path, *, dir_fd=None):
        path = os.path.abspath(path)
        with self._lock:
            self._enter("unlink", path)
            os.unlink(path)
            self._note_names(os.path.dirname(path))

    # --- internals ----------------------------------------------------------------------------

    def _mutations(self) -> int:
        return sum(n for op, n in self.calls.items() if op in MUTATING)

    def _enter(self, op: str, path: str | None) -> Rule | None:
        """Counts a call, cuts the power if this is the crash point, and returns the failure
        rule that strikes this call (raising OSError itself for every op but the writes)."""
        if self.lost:
            raise PowerLost(f"{op} after the power loss")
        rule_op = "open" if op == "create" else op
        self.calls[op] = self.calls.get(op, 0) + 1
        if self._crash is not None and op in MUTATING and self._mutations() >= self._crash[0]:
            _, image_dir, options = self._crash
            self._crash = None
            self.power_loss(image_dir, **options)
            self.lost = True
            raise PowerLost(f"power lost at {op} {path}")
        for rule in self.rules:
            if rule.matches(rule_op, path) and rule.fires():
                if rule.spent:
                    self.rules.remove(rule)
                if op in WRITES:
                    return rule
                raise OSError(rule.err, os.strerror(rule.err), path)
        return None

    def _tracked(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def _path_of(self, fd: int) -> str | None:
        path = self._fd_paths.get(fd)
        if path is None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return None
        return path

    def _object_of(self, inode: int) -> int:
        obj = self._object_of_inode.get(inode)
        if obj is None:
            obj = self._object_of_inode[inode] = next(self._object_ids)
        return obj

    def _scan(self, directory: str) -> dict[str, object]:
        """Returns the names in `directory`: DIR for a subdirectory, else the file's object."""
        names: dict[str, object] = {}
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return names
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                names[entry.name] = DIR
            elif entry.is_file(follow_symlinks=False):
                names[entry.name] = self._object_of(entry.inode())
        return names

    def _note_names(self, directory: str) -> None:
        """Records the state `directory` is in now as one a power loss may leave (rule 2)."""
        if not self._tracked(directory):
            return
        history = self._history.setdefault(directory, [{}])
        names = self._scan(directory)
        if names != history[-1]:
            history.append(names)

    def _baseline(self, directory: str) -> None:
        """Rule 3: the tree as it is now counts as fsynced."""
        names = self._scan(directory)
        self._history[directory] = [names]
        for name, entry in names.items():
            path = os.path.join(directory, name)
            if entry == DIR:
                self._baseline(path)
            else:
                with open(path, "rb") as f:
                    self._synced[entry] = f.read()

    def _restore_dir(self, directory: str, image: Path, unsynced: str, names: str,
                     holes: bool) -> None:
        image.mkdir(parents=True)
        current = self._scan(directory)
        states = self._history.get(directory, [{}])
        chosen = {"random": lambda: self.rng.choice(states + [current]),
                  "synced": lambda: states[0], "current": lambda: current}[names]()
        for name, entry in sorted(chosen.items()):
            path = os.path.join(directory, name)
            if entry == DIR:
                self._restore_dir(path, image / name, unsynced, names, holes)
                continue
            linked_now = current.get(name) == entry
            data = self._file_after_loss(entry, path if linked_now else None, unsynced, holes)
            (image / name).write_bytes(data)

    def _file_after_loss(self, obj: int, path: str | None, unsynced: str, holes: bool
                         ) -> bytes:
        """Rule 1 for one file; `path` is where it is linked now (None: nowhere any more)."""
        synced = self._synced.get(obj, b"")
        if unsynced == "none" or path is None:
            return synced
        with open(path, "rb") as f:
            current = f.read()
        if current == synced or unsynced == "all":
            return current
        rng = self.rng
        if current.startswith(synced):
            extra = bytearray(current[len(synced):rng.randint(len(synced), len(current))])
            if holes and extra and rng.random() < 0.5:
                first = len(synced) // SECTOR_BYTES * SECTOR_BYTES   # sectors of the file
                for start in range(first, len(synced) + len(extra), SECTOR_BYTES):
                    if rng.random() < 0.25:
                        lo = max(start, len(synced)) - len(synced)
                        hi = min(start + SECTOR_BYTES, len(synced) + len(extra)) - len(synced)
                        extra[lo:hi] = bytes(hi - lo)
            return synced + bytes(extra)
        common = 0
        for common, (a, b) in enumerate(zip(synced, current)):
            if a != b:
                break
        else:
            common = min(len(synced), len(current))
        return rng.choice([synced, current[:rng.randint(common, len(current))]])
