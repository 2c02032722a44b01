"""Catalog: which queues a shard opens, broken queues, create / delete / close.

Real queues in tmp_path; queues are made with Queue.create (as an earlier run of a shard would
have left them) and the Catalog opens them.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from floki.config import QueueSettings
from floki.errors import QueueAlreadyExists, QueueNotFound, StorageIOError
from floki.routing import shard_for
from floki.shard import files
from floki.shard.catalog import Catalog
from floki.shard.queue import Queue

NAMES = sorted(f"queue{i}" for i in range(12))
T0_MS = 1_700_000_000_000


def make_queue(data_dir: Path, name: str, messages: int = 0) -> None:
    """Leaves a closed queue with one channel and `messages` messages on disk."""
    queue = Queue.create(data_dir, name, QueueSettings(), "never")
    queue.create_channel("c")
    if messages:
        queue.push([b"m%d" % i for i in range(messages)], T0_MS)
    queue.close()


def new_catalog(data_dir: Path, index: int = 0, shard_count: int = 1, fsync: str = "never",
                defaults: QueueSettings | None = None) -> Catalog:
    return Catalog(data_dir, index, shard_count, defaults or QueueSettings(), fsync)


@pytest.fixture
def catalogs():
    """Closes every catalog a test opened (releasing the queue locks)."""
    opened: list[Catalog] = []
    yield opened
    for catalog in opened:
        catalog.close()


def opened(catalogs: list, catalog: Catalog) -> Catalog:
    catalog.open_all()
    catalogs.append(catalog)
    return catalog


# --- open_all ---------------------------------------------------------------------------------

def test_open_all_opens_exactly_the_queues_routing_gives_this_shard(tmp_path, catalogs):
    for name in NAMES:
        make_queue(tmp_path, name, messages=2)
    shard0 = opened(catalogs, new_catalog(tmp_path, 0, 3))
    shard1 = opened(catalogs, new_catalog(tmp_path, 1, 3))
    shard2 = opened(catalogs, new_catalog(tmp_path, 2, 3))
    for index, catalog in enumerate((shard0, shard1, shard2)):
        expected = sorted(n for n in NAMES if shard_for(n, 3) == index)
        assert sorted(catalog.queues) == expected
        assert all(catalog.owns(n) == (shard_for(n, 3) == index) for n in NAMES)
        assert catalog.broken == {}
    # together they open every queue, each once (a double open would have failed on the LOCK)
    assert sorted([*shard0.queues, *shard1.queues, *shard2.queues]) == sorted(NAMES)
    any_name = next(iter(shard1.queues))
    assert shard1.get(any_name).info(0.0)["head"] == 3


def test_open_all_removes_what_a_crash_left_of_its_own_deleted_queues(tmp_path, catalogs):
    # A kill -9 between Queue.delete's rename and its rmtree left these (found by a crash
    # hunt): only `floki check --repair` removed them.
    mine, theirs = [n for n in NAMES if shard_for(n, 2) == 0][0], \
        [n for n in NAMES if shard_for(n, 2) == 1][0]
    for name in (mine, theirs):
        leftover = tmp_path / f"{files.DELETING_PREFIX}{name}-0a1b2c3d"
        leftover.mkdir()
        (leftover / "00000000000000000001.log").write_bytes(b"x" * 100)
    make_queue(tmp_path, "kept-queue", messages=1)
    catalog = opened(catalogs, new_catalog(tmp_path, 0, 2))
    assert not (tmp_path / f"{files.DELETING_PREFIX}{mine}-0a1b2c3d").exists()
    assert (tmp_path / f"{files.DELETING_PREFIX}{theirs}-0a1b2c3d").exists()   # shard 1's
    assert (tmp_path / "kept-queue").is_dir()
    assert sorted(catalog.queues) == sorted(n for n in ["kept-queue"] if shard_for(n, 2) == 0)


def test_open_all_after_the_shard_count_changes_reassigns_queues(tmp_path, catalogs):
    for name in NAMES:
        make_queue(tmp_path, name)
    one = new_catalog(tmp_path, 0, 1)
    one.open_all()
    assert sorted(one.queues) == NAMES
    one.close()
    two = [opened(catalogs, new_catalog(tmp_path, i, 2)) for i in range(2)]
    assert sorted([*two[0].queues, *two[1].queues]) == NAMES
    assert not set(two[0].queues) & set(two[1].queues)


def test_open_all_creates_a_missing_data_dir_and_skips_what_is_not_a_queue(tmp_path, catalogs):
    data_dir = tmp_path / "new" / "data"
    catalog = opened(catalogs, new_catalog(data_dir))
    assert data_dir.is_dir() and catalog.queues == {} and catalog.broken == {}
    make_queue(data_dir, "real")
    (data_dir / ".run").mkdir()
    (data_dir / "stray-file").write_text("x")
    (data_dir / "empty-dir").mkdir()
    again = new_catalog(data_dir)
    catalog.close()
    opened(catalogs, again)
    assert list(again.queues) == ["real"] and again.broken == {}


def test_a_queue_that_fails_to_open_is_broken_and_the_others_still_open(tmp_path, catalogs):
    for name in ("good1", "newer", "good2"):
        make_queue(tmp_path, name, messages=1)
    for path in (tmp_path / "newer" / "queue.json", tmp_path / "newer" / "queue.json.prev"):
        if path.exists():
            data = json.loads(path.read_text())
            data["format"] = 99                       # written by a future Floki
            path.write_text(json.dumps(data))
    catalog = opened(catalogs, new_catalog(tmp_path))
    assert sorted(catalog.queues) == ["good1", "good2"]
    assert list(catalog.broken) == ["newer"] and "format 99" in catalog.broken["newer"]
    assert "newer" not in catalog
    with pytest.raises(QueueNotFound):
        catalog.get("newer")
    assert catalog.get("good2").info(0.0)["head"] == 2


def test_a_queue_locked_by_another_holder_is_broken(tmp_path, catalogs):
    make_queue(tmp_path, "held")
    make_queue(tmp_path, "free")
    holder = Queue.open(tmp_path, "held", QueueSettings(), "never")
    try:
        catalog = opened(catalogs, new_catalog(tmp_path))
        assert list(catalog.queues) == ["free"]
        assert "in use by another process" in catalog.broken["held"]
    finally:
        holder.close()


# --- create / get / delete ----------------------------------------------------------------------

def test_create_uses_the_current_defaults_and_fsync_mode(tmp_path, catalogs):
    catalog = opened(catalogs, new_catalog(tmp_path, fsync="always",
                                           defaults=QueueSettings(message_timeout=3.0)))
    queue = catalog.create("q")
    assert catalog.get("q") is queue and "q" in catalog
    assert queue.settings.message_timeout == 3.0 and queue.fsync == "always"
    assert files.queue_file(tmp_path / "q").is_file()
    catalog.defaults = QueueSettings(message_timeout=9.0)
    assert catalog.create("r").settings.message_timeout == 9.0
    assert queue.settings.message_timeout == 3.0                 # existing queues keep theirs
    assert sorted(q.name for q in catalog) == ["q", "r"]


def test_create_of_an_existing_or_broken_name_is_queue_already_exists(tmp_path, catalogs):
    make_queue(tmp_path, "held")
    holder = Queue.open(tmp_path, "held", QueueSettings(), "never")
    try:
        catalog = opened(catalogs, new_catalog(tmp_path))
        catalog.create("q")
        with pytest.raises(QueueAlreadyExists):
            catalog.create("q")
        assert "held" in catalog.broken
        with pytest.raises(QueueAlreadyExists):
            catalog.create("held")
        assert "held" not in catalog
    finally:
        holder.close()
    # the broken queue's files were not touched by the refused create
    reopened = Queue.open(tmp_path, "held", QueueSettings(), "never")
    assert reopened.channel_names() == ["c"]
    reopened.close()


def test_delete_removes_the_queue_and_its_files(tmp_path, catalogs):
    make_queue(tmp_path, "q", messages=3)
    catalog = opened(catalogs, new_catalog(tmp_path))
    assert catalog.delete("q") is True
    assert "q" not in catalog and not (tmp_path / "q").exists()
    assert [p.name for p in tmp_path.iterdir()] == []           # no .deleting-* left behind
    assert catalog.delete("q") is False
    assert catalog.delete("never-was") is False
    queue = catalog.create("q")                                  # the name is free again
    assert queue.info(0.0)["head"] == 1 and queue.channel_names() == []


def test_a_failed_delete_lists_the_queue_as_broken(tmp_path, catalogs, monkeypatch):
    make_queue(tmp_path, "q", messages=1)
    catalog = opened(catalogs, new_catalog(tmp_path))

    def rename(src, dst):
        raise OSError(errno.EIO, "injected rename failure")

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", rename)
        with pytest.raises(StorageIOError):
            catalog.delete("q")
    # the queue is closed and its files untouched: visible as broken, not silently gone
    assert "q" not in catalog and "q" in catalog.broken
    with pytest.raises(QueueAlreadyExists):
        catalog.create("q")
    catalog.close()
    again = opened(catalogs, new_catalog(tmp_path))             # a restart serves it again
    assert again.get("q").info(0.0)["head"] == 2 and again.broken == {}


def test_iterating_is_a_snapshot_so_queues_can_be_deleted_meanwhile(tmp_path, catalogs):
    for name in ("a", "b", "c"):
        make_queue(tmp_path, name)
    catalog = opened(catalogs, new_catalog(tmp_path))
    for queue in catalog:
        catalog.delete(queue.name)
    assert catalog.queues == {}


# --- fsync mode and close -----------------------------------------------------------------------

def test_set_fsync_switches_every_open_queue_and_later_creates(tmp_path, catalogs):
    make_queue(tmp_path, "a")
    make_queue(tmp_path, "b")
    catalog = opened(catalogs, new_catalog(tmp_path, fsync="interval"))
    assert {q.fsync for q in catalog} == {"interval"}
    catalog.set_fsync("always")
    assert catalog.fsync == "always" and {q.fsync for q in catalog} == {"always"}
    assert catalog.create("c").fsync == "always"


def test_close_is_a_clean_stop_of_every_queue(tmp_path):
    make_queue(tmp_path, "a")
    catalog = new_catalog(tmp_path)
    catalog.open_all()
    catalog.get("a").push([b"x", b"y"], T0_MS)
    catalog.close()
    assert catalog.queues == {}
    meta = json.loads(files.queue_file(tmp_path / "a").read_text())
    assert meta["clean_next_id"] == 3
    queue = Queue.open(tmp_path, "a", QueueSettings(), "never")   # LOCK was released
    assert queue.push([b"z"], T0_MS) == (3, 3)                     # no id gap after a clean stop
    queue.close()


def test_close_goes_on_when_one_queue_fails_to_close(tmp_path, caplog):
    make_queue(tmp_path, "a")
    make_queue(tmp_path, "b")
    catalog = new_catalog(tmp_path)
    catalog.open_all()
    shutil.rmtree(tmp_path / "a")         # its final checkpoint cannot be written any more
    catalog.close()
    assert catalog.queues == {}
    assert any("'a': close failed" in r.getMessage() for r in caplog.records)
    assert json.loads(files.queue_file(tmp_path / "b").read_text())["clean_next_id"] == 1
