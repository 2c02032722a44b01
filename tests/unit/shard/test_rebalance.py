"""floki rebalance: real queues made with Queue.create in per-shard data dirs (as stopped shard
hosts would leave them), moved to a new layout, then opened by the Catalog of their new shard."""
from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
from pathlib import Path

import pytest

from floki import cli
from floki.config import QueueSettings, ServerConfig
from floki.routing import shard_for
from floki.shard import files, rebalance
from floki.shard.catalog import Catalog
from floki.shard.queue import Queue
from floki.shard.rebalance import Action, apply_plan, make_plan, move_queue

NAMES = sorted(f"q{i}" for i in range(12))
T0_MS = 1_700_000_000_000


def make_queue(data_dir: Path, name: str) -> None:
    """Leaves a closed queue with channel "c", 3 messages, one of them consumed and acked."""
    queue = Queue.create(data_dir, name, QueueSettings(), "never")
    queue.create_channel("c")
    queue.push([f"{name}-{i}".encode() for i in range(3)], T0_MS)
    (_, ticket, _), = queue.get("c", 1, now=1.0)
    assert queue.ack("c", [ticket], now=1.0) == 1
    queue.close()


def old_cluster(tmp_path: Path, shard_count: int = 2, names=NAMES) -> list[Path]:
    """Per-shard data dirs of a stopped `shard_count`-shard cluster holding `names`."""
    dirs = [tmp_path / f"shard{i}" for i in range(shard_count)]
    for d in dirs:
        d.mkdir()
    for name in names:
        make_queue(dirs[shard_for(name, shard_count)], name)
    return dirs


def tree(*dirs: Path) -> dict[str, str]:
    """Every file under `dirs` -> a hash of its bytes (to prove nothing changed)."""
    out = {}
    for d in dirs:
        for path in sorted(d.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                out[str(path)] = "dir"
    return out


def queues_in(directory: Path) -> list[str]:
    return files.list_queue_names(directory)


def assert_served_by_new_owners(dirs: list[Path], names=NAMES) -> None:
    """Each shard's Catalog opens exactly its queues, with their messages and channel state."""
    count = len(dirs)
    for index, directory in enumerate(dirs):
        assert queues_in(directory) == [n for n in names if shard_for(n, count) == index]
        assert not [p.name for p in directory.iterdir()
                    if p.name.startswith((files.INCOMING_PREFIX, files.DELETING_PREFIX))]
        catalog = Catalog(directory, index, count, QueueSettings(), "never")
        catalog.open_all()
        try:
            assert not catalog.broken
            for name in catalog.queues:
                got = catalog.get(name).get("c", 10, now=2.0)
                # message 0 was acked before the move; 1 and 2 were never read
                assert [body for _, _, body in got] == [f"{name}-1".encode(), f"{name}-2".encode()]
        finally:
            catalog.close()


# --- planning and moving ----------------------------------------------------------------------

@pytest.mark.parametrize("copy", [False, True], ids=["rename", "copy"])
def test_growing_from_two_to_three_shard_hosts_moves_each_queue_to_its_new_owner(tmp_path, copy):
    old = old_cluster(tmp_path)
    new = [*old, tmp_path / "shard2"]
    new[2].mkdir()
    plan = make_plan(new)
    assert not plan.problems
    moves = {s.queue: s for s in plan.steps if s.action is Action.MOVE}
    assert set(moves) == {n for n in NAMES if shard_for(n, 3) != shard_for(n, 2)} != set()
    assert all(s.target == new[shard_for(q, 3)].resolve() for q, s in moves.items())
    apply_plan(plan, copy=copy)
    assert_served_by_new_owners(new)


def test_shrinking_empties_the_dropped_host_given_with_from(tmp_path, capsys):
    old = old_cluster(tmp_path, shard_count=3)
    toml = tmp_path / "new.toml"
    toml.write_text("[server]\nshards = 2\n")
    code = cli.main(["rebalance", "-c", str(toml), str(old[0]), str(old[1]),
                     "--from", str(old[2]), "--apply"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "done: " in out and "move  " in out
    assert queues_in(old[2]) == []
    assert_served_by_new_owners(old[:2])


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path):
    old = old_cluster(tmp_path)
    (old[0] / ".incoming-q1-abcd").mkdir()          # a leftover it would clean
    new = [*old, tmp_path / "shard2"]
    new[2].mkdir()
    before = tree(*new)
    out = io.StringIO()
    assert rebalance.run(ServerConfig(shards=3), [str(d) for d in new], out=out) == 0
    assert tree(*new) == before
    text = out.getvalue()
    assert "dry run: nothing changed" in text
    moved = [n for n in NAMES if shard_for(n, 3) != shard_for(n, 2)]
    assert all(f"move  {n}  " in text for n in moved)
    assert "clean " in text and ".incoming-q1-abcd" in text
    assert not [p for p in tree(*new) if p.endswith("/LOCK") and p not in before]


def test_one_shared_data_dir_needs_no_move(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in NAMES:
        make_queue(data, name)
    out = io.StringIO()
    assert rebalance.run(ServerConfig(shards=5), [str(data)], apply=True, out=out) == 0
    assert queues_in(data) == NAMES
    assert "move  " not in out.getvalue()


def test_a_queue_in_use_refuses_the_whole_run(tmp_path):
    old = old_cluster(tmp_path)
    new = [*old, tmp_path / "shard2"]
    new[2].mkdir()
    busy_name = NAMES[0]
    busy = Queue.open(old[shard_for(busy_name, 2)], busy_name, QueueSettings(), "never")
    try:
        before = tree(*new)
        out = io.StringIO()
        code = rebalance.run(ServerConfig(shards=3), [str(d) for d in new], apply=True, out=out)
        assert code == rebalance.EXIT_REFUSED
        assert f"REFUSED: queue {busy_name}: in use by a running server" in out.getvalue()
        assert tree(*new) == before
    finally:
        busy.close()


def test_a_running_supervisor_refuses_the_whole_run(tmp_path):
    old = old_cluster(tmp_path)
    run_dir = files.run_dir(old[1])
    run_dir.mkdir()
    fd = os.open(run_dir / rebalance.SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        plan = make_plan([old[0], old[1], old[0]])
        plan.release()
        assert [p for p in plan.problems if "a floki start is running" in p]
        with pytest.raises(ValueError):
            apply_plan(plan)
    finally:
        os.close(fd)


def test_a_queue_in_two_places_with_different_contents_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_queue(a, "twice")
    make_queue(b, "twice")
    queue = Queue.open(b, "twice", QueueSettings(), "never")
    queue.push([b"only in b"], T0_MS)
    queue.close()
    before = tree(a, b)
    out = io.StringIO()
    assert rebalance.run(ServerConfig(shards=2), [str(a), str(b)], apply=True,
                         out=out) == rebalance.EXIT_REFUSED
    assert "queue twice: found in 2 places" in out.getvalue()
    assert tree(a, b) == before


def test_an_identical_stale_copy_beside_the_owners_copy_is_dropped(tmp_path):
    # What a crash between "copy renamed into place" and "source removed" leaves.
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    name = next(n for n in NAMES if shard_for(n, 2) == 1)
    make_queue(a, name)
    shutil.copytree(a / name, b / name)
    plan = make_plan([a, b])
    assert [(s.action, s.source.parent) for s in plan.steps] == [
        (Action.KEEP, b.resolve()), (Action.DROP, a.resolve())]
    apply_plan(plan)
    assert (queues_in(a), queues_in(b)) == ([], [name])


def test_something_else_at_the_target_path_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    name = next(n for n in NAMES if shard_for(n, 2) == 1)
    make_queue(a, name)
    (b / name).mkdir()                      # an empty dir: not a queue, but in the way
    plan = make_plan([a, b])
    plan.release()
    assert [p for p in plan.problems if f"{b / name} exists and is not a queue" in p]


@pytest.mark.parametrize("dirs,message", [
    (["a"], None), (["a", "b"], "2 data directories for 3 shards"),
    (["a", "b", "missing"], "not a directory")])
def test_usage_errors(tmp_path, dirs, message):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    err = io.StringIO()
    code = rebalance.run(ServerConfig(shards=3), [str(tmp_path / d) for d in dirs], err=err)
    if message is None:
        assert code == 0
    else:
        assert code == rebalance.EXIT_USAGE and message in err.getvalue()


def test_a_failed_copy_leaves_the_source_whole_and_no_partial_copy(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_queue(a, "q")
    before = tree(a)
    calls = []

    def copy2_then_fail(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return shutil.copyfile(src, dst)

    monkeypatch.setattr(rebalance.shutil, "copy2", copy2_then_fail)
    with pytest.raises(OSError):
        move_queue(a / "q", b, copy=True)
    assert tree(a) == before and list(b.iterdir()) == []


# --- crash safety -----------------------------------------------------------------------------

class Crash(BaseException):
    """kill -9 at this point: nothing after it runs, no cleanup (BaseException, like the real
    interrupt; rebalance's cleanup only catches Exception)."""


OPS = [(os, "rename"), (os, "mkdir"), (shutil, "copy2"), (shutil, "rmtree")]


def crash_at(monkeypatch, at: int | None) -> list[str]:
    """Makes the `at`-th call (0-based) to any file-changing operation raise Crash before it
    runs. Returns the list of calls made (with at=None: a full run, to count them)."""
    calls: list[str] = []
    for module, name in OPS:
        real = getattr(module, name)

        def op(*args, _real=real, _name=name, **kwargs):
            if at is not None and len(calls) == at:
                raise Crash(_name)
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, op)
    return calls


def queue_contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != files.LOCK_FILE}


@pytest.mark.parametrize("copy", [False, True], ids=["rename", "copy"])
def test_a_crash_at_any_step_loses_no_queue_and_a_rerun_finishes(tmp_path, monkeypatch, copy):
    # one queue that moves and one that stays: every kind of step, few crash points
    names = [next(n for n in NAMES if shard_for(n, 3) != shard_for(n, 2)),
             next(n for n in NAMES if shard_for(n, 3) == shard_for(n, 2))]
    with monkeypatch.context() as m:                # how many file operations a full run makes
        scratch = tmp_path / "count"
        scratch.mkdir()
        old = old_cluster(scratch, names=names)
        dirs = [*old, scratch / "shard2"]
        dirs[2].mkdir()
        calls = crash_at(m, None)
        apply_plan(make_plan(dirs), copy=copy)
        total = len(calls)
    assert total >= (6 if copy else 1)   # copy: mkdir, copy2 per file, 2 renames, rmtree
    for at in range(total):
        base = tmp_path / f"crash{at}"
        base.mkdir()
        old = old_cluster(base, names=names)
        dirs = [*old, base / "shard2"]
        dirs[2].mkdir()
        originals = {n: queue_contents(old[shard_for(n, 2)] / n) for n in names}
        with monkeypatch.context() as m:
            crash_at(m, at)
            with pytest.raises(Crash):
                apply_plan(make_plan(dirs), copy=copy)
        # After the crash: every queue is still visible somewhere, and whole wherever it is.
        for name in names:
            places = [d for d in dirs if name in queues_in(d)]
            assert places, f"crash at op {at}: queue {name} vanished"
            assert all(queue_contents(d / name) == originals[name] for d in places), at
        plan = make_plan(dirs)
        assert not plan.problems, (at, plan.problems)
        apply_plan(plan, copy=copy)
        assert_served_by_new_owners(dirs, names)
