"""`floki rebalance`: move queue directories to the shards that own them under a new layout.

Owns: planning and carrying out the offline move of whole queue directories between the data
directories of shards (one per shard host, e.g. mounted volumes), after the shard count or the
set of shard hosts changed. One machine with one shared data dir never needs it: every shard
there opens the queues routing.shard_for gives it from the same directory.
Rules:
  1. Offline only. Every queue found has its LOCK taken (non-blocking) and every data dir's
     supervisor lock is probed; held means a server runs there, and then nothing moves. The
     queue locks stay held until the run ends, so no server can start on a queue mid-move.
  2. The whole plan is made, and every problem found, before the first change: a queue in two
     places, an unexpected path where a queue must go, or a lock held refuses the whole run.
     Two copies are no problem only when one is in its owner's directory and the other is a
     byte-identical leftover of an interrupted move (rule 3): that one is removed.
  3. A move never leaves a queue nowhere and never half anywhere. Same filesystem: one rename,
     then both directories fsynced. Otherwise: copy into `.incoming-<queue>-<token>` beside the
     target (files.incoming_dir), fsync every file and the directory, rename it to `<queue>`,
     fsync the target directory; only then the source is renamed to a `.deleting-` name and
     removed. A crash leaves the queue where it was, or in both places identical (a rerun
     drops the stale copy, rule 2).
  4. Without --apply nothing is written, created or removed (not even a LOCK file).
  5. `.incoming-` and `.deleting-` directories are garbage by construction once the cluster is
     stopped (the queue is still whole elsewhere); --apply removes them.
Exit codes: 0 done (dry run: nothing blocks the plan), 1 refused or a step failed (what was done
stays done and consistent; run it again), 2 usage error (a directory missing, wrong count).
"""
from __future__ import annotations

import enum
import errno
import filecmp
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TextIO

from floki.config import ServerConfig
from floki.routing import shard_for
from floki.shard import files
from floki.shard.locks import LockHeld, try_flock
from floki.supervisor import LOCK_FILE_NAME

EXIT_DONE, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
SUPERVISOR_LOCK = LOCK_FILE_NAME      # floki start's lock in <data_dir>/.run (one per data dir)


class Action(enum.Enum):
    KEEP = "keep"        # already in its owner's directory
    MOVE = "move"        # to its owner's directory
    DROP = "drop"        # an identical stale copy left by an interrupted move (rule 2)
    CLEAN = "clean"      # an .incoming-/.deleting- leftover (rule 5)


@dataclass(frozen=True)
class Step:
    """One thing the plan does. `source` is the queue (or leftover) directory itself; `target`
    the data directory a MOVE puts it in."""
    action: Action
    queue: str | None
    source: Path
    target: Path | None = None
    shard: int | None = None

    def line(self) -> str:
        if self.action is Action.MOVE:
            return (f"move  {self.queue}  {self.source.parent} -> {self.target}  "
                    f"(shard {self.shard})")
        if self.action is Action.KEEP:
            return f"keep  {self.queue}  {self.source.parent}  (shard {self.shard})"
        if self.action is Action.DROP:
            return (f"drop  {self.queue}  {self.source.parent}  (an identical copy left by an "
                    f"interrupted move; shard {self.shard}'s copy in {self.target} stays)")
        return f"clean {self.source}  (left by an interrupted copy or delete)"


@dataclass
class Plan:
    """What a run will do, what refuses it, and the locks it holds meanwhile (rule 1)."""
    shard_dirs: tuple[Path, ...]
    steps: list[Step] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lock_fds: list[int] = field(default_factory=list)

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.action is not Action.KEEP]

    def release(self) -> None:
        """Releases every lock the plan holds. Idempotent."""
        fds, self.lock_fds = self.lock_fds, []
        for fd in fds:
            os.close(fd)     # closing the descriptor releases the flock


class UsageError(ValueError):
    """The directories given cannot be used (missing, not a directory, wrong count)."""


def shard_dirs_for(config: ServerConfig,
                   data_dirs: Sequence[str | os.PathLike]) -> tuple[Path, ...]:
    """Returns the data directory of each shard of `config`, in index order.

    `data_dirs` holds one directory per shard, or one that every shard shares.
    Raises UsageError.
    """
    count = config.shard_count
    if len(data_dirs) not in (1, count):
        raise UsageError(f"{len(data_dirs)} data directories for {count} shards: give one per "
                         f"shard in index order (or one that every shard shares)")
    dirs = [Path(d).resolve() for d in data_dirs]
    return tuple(dirs * count if len(dirs) == 1 else dirs)


def make_plan(shard_dirs: Sequence[Path], sources: Sequence[Path] = ()) -> Plan:
    """Looks at every queue in `shard_dirs` (shard i's data directory is shard_dirs[i]) and
    `sources` (old directories no shard keeps) and plans where each goes (rules 1, 2, 5).

    The returned plan holds locks: call `release()` (or `apply_plan`, which does).
    Raises UsageError for a directory that does not exist.
    """
    shard_dirs = tuple(Path(d).resolve() for d in shard_dirs)
    plan = Plan(shard_dirs)
    directories = list(dict.fromkeys([*shard_dirs, *(Path(s).resolve() for s in sources)]))
    for directory in directories:
        if not directory.is_dir():
            raise UsageError(f"{directory}: not a directory")
    try:
        found: dict[str, list[Path]] = {}
        for directory in directories:
            _probe_supervisor_lock(directory, plan)
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                if entry.name.startswith((files.INCOMING_PREFIX, files.DELETING_PREFIX)) \
                        and entry.is_dir(follow_symlinks=False):
                    plan.steps.append(Step(Action.CLEAN, None, Path(entry.path)))
            for name in files.list_queue_names(directory):
                found.setdefault(name, []).append(directory)
                _take_queue_lock(directory / name, name, plan)
        for name, places in sorted(found.items()):
            _plan_queue(plan, name, places)
    except BaseException:
        plan.release()
        raise
    return plan


def _plan_queue(plan: Plan, name: str, places: list[Path]) -> None:
    shard = shard_for(name, len(plan.shard_dirs))
    owner = plan.shard_dirs[shard]
    if len(places) == 1:
        (place,) = places
        if place == owner:
            plan.steps.append(Step(Action.KEEP, name, place / name, shard=shard))
            return
        if os.path.lexists(owner / name):
            plan.problems.append(f"queue {name}: cannot move it from {place} to {owner}: "
                                 f"{owner / name} exists and is not a queue; move it away")
            return
        plan.steps.append(Step(Action.MOVE, name, place / name, owner, shard))
        return
    others = [p for p in places if p != owner]
    if owner in places and all(_same_queue_files(owner / name, p / name) for p in others):
        plan.steps.append(Step(Action.KEEP, name, owner / name, shard=shard))
        plan.steps += [Step(Action.DROP, name, p / name, owner, shard) for p in others]
        return
    plan.problems.append(
        f"queue {name}: found in {len(places)} places ({', '.join(map(str, places))}) with "
        f"different contents; shard {shard} serves the copy in {owner} (if any). Keep one, "
        f"move the others out of the data directories, and run again")


def _same_queue_files(a: Path, b: Path) -> bool:
    """True if the queue directories hold the same files with the same bytes (LOCK aside)."""
    try:
        names_a = sorted(n for n in os.listdir(a) if n != files.LOCK_FILE)
        names_b = sorted(n for n in os.listdir(b) if n != files.LOCK_FILE)
        if names_a != names_b:
            return False
        return all((a / n).is_file() and (b / n).is_file()
                   and filecmp.cmp(a / n, b / n, shallow=False) for n in names_a)
    except OSError:
        return False


def _probe_supervisor_lock(directory: Path, plan: Plan) -> None:
    path = files.run_dir(directory) / SUPERVISOR_LOCK
    try:
        fd = try_flock(path)
    except LockHeld:
        plan.problems.append(f"{directory}: a floki start is running on it ({path} is locked)")
        return
    if fd is not None:
        os.close(fd)    # free now; the queue locks are what keep servers out


def _take_queue_lock(directory: Path, name: str, plan: Plan) -> None:
    try:
        fd = try_flock(files.lock_path(directory))
    except LockHeld:
        plan.problems.append(f"queue {name}: in use by a running server "
                             f"({files.lock_path(directory)} is locked); stop it first")
        return
    if fd is not None:
        plan.lock_fds.append(fd)


# --- doing it -------------------------------------------------------------------------------

def apply_plan(plan: Plan, out: TextIO | None = None, *, copy: bool | None = None) -> None:
    """Carries out every step of a plan without problems, printing each as it is done, then
    releases the plan's locks. `copy` goes to move_queue. Raises ValueError if the plan has
    problems, OSError if a step fails (the steps before it are done and durable; the failed
    one left things as rule 3 says).
    """
    if plan.problems:
        plan.release()
        raise ValueError("a plan with problems cannot be applied")
    try:
        for step in plan.changes:
            if step.action is Action.CLEAN:
                _remove_dir(step.source)
            elif step.action is Action.DROP:
                _remove_queue_dir(step.source, step.queue)
            else:
                move_queue(step.source, step.target, copy=copy)
            if out is not None:
                print(f"done  {step.line()}", file=out)
    finally:
        plan.release()


def move_queue(source: Path, target_dir: Path, *, copy: bool | None = None) -> Path:
    """Moves queue directory `source` into `target_dir` (rule 3). Returns the new path.

    `copy`: None picks a rename when both are on one filesystem, else a copy; True forces the
    copy (a rename that fails with EXDEV also falls back to it). Raises OSError.
    """
    source, target_dir = Path(source), Path(target_dir)
    name = source.name
    destination = target_dir / name
    if copy is None:
        copy = os.stat(source.parent).st_dev != os.stat(target_dir).st_dev
    if not copy:
        try:
            os.rename(source, destination)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        else:
            files.fsync_directory(target_dir)
            files.fsync_directory(source.parent)
            return destination
    incoming = files.incoming_dir(target_dir, name, secrets.token_hex(4))
    try:
        _copy_queue_files(source, incoming)
        os.rename(incoming, destination)
    except Exception:
        # A failed copy (disk full...) is removed at once. An interrupt or a crash leaves it:
        # the next run removes it (rule 5), the source being still in place.
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    files.fsync_directory(target_dir)
    _remove_queue_dir(source, name)
    return destination


def _copy_queue_files(source: Path, incoming: Path) -> None:
    """Copies every file of queue directory `source` (LOCK aside: a server makes its own) into
    the new directory `incoming` and makes all of it durable. Raises OSError."""
    os.mkdir(incoming)
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        if entry.name == files.LOCK_FILE:
            continue
        if not entry.is_file(follow_symlinks=False):
            raise OSError(errno.EINVAL, f"{entry.path}: not a regular file; a queue directory "
                                        "holds only files")
        destination = incoming / entry.name
        shutil.copy2(entry.path, destination)
        fd = os.open(destination, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    files.fsync_directory(incoming)


def _remove_queue_dir(directory: Path, name: str) -> None:
    """Removes a queue directory the way a queue delete does: renamed to a hidden name first,
    so a crash leaves all of it or none of it under its name. Raises OSError."""
    trash = files.deleting_dir(directory.parent, name, secrets.token_hex(4))
    os.rename(directory, trash)
    files.fsync_directory(directory.parent)
    _remove_dir(trash)


def _remove_dir(directory: Path) -> None:
    shutil.rmtree(directory)
    files.fsync_directory(directory.parent)


# --- command line -------------------------------------------------------------------------

def run(config: ServerConfig, data_dirs: Sequence[str], *, sources: Sequence[str] = (),
        apply: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`floki rebalance`: plans (and with `apply`, makes) the moves. Returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        shard_dirs = shard_dirs_for(config, data_dirs)
        plan = make_plan(shard_dirs, [Path(s) for s in sources])
    except UsageError as exc:
        print(f"floki rebalance: {exc}", file=err)
        return EXIT_USAGE
    except OSError as exc:
        print(f"floki rebalance: {exc}", file=err)
        return EXIT_USAGE
    try:
        queues = {s.queue for s in plan.steps if s.queue is not None}
        print(f"floki rebalance: {len(shard_dirs)} shard(s), {len(queues)} queue(s)", file=out)
        for step in plan.steps:
            print(step.line(), file=out)
        for problem in plan.problems:
            print(f"REFUSED: {problem}", file=out)
        if plan.problems:
            print("nothing changed", file=out)
            return EXIT_REFUSED
        moves = sum(s.action is Action.MOVE for s in plan.steps)
        if not apply:
            print(f"dry run: nothing changed; --apply makes {len(plan.changes)} change(s) "
                  f"({moves} move(s))", file=out)
            return EXIT_DONE
        try:
            apply_plan(plan, out)
        except OSError as exc:
            print(f"floki rebalance: stopped: {exc}. What was done is durable; fix the cause "
                  f"and run it again", file=err)
            return EXIT_REFUSED
        print(f"done: {len(plan.changes)} change(s) ({moves} move(s))", file=out)
        return EXIT_DONE
    finally:
        plan.release()

