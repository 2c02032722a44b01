"""Disk full and I/O errors (RELIABILITY rules 6 and 8, tests 14 and 15).

With the fault layer (faultfs.FaultyFileIO) and, where the machine allows a tmpfs mount, with a
real full filesystem:
  - the push that hits ENOSPC / EIO gets `-ERR disk full ...` / `-ERR I/O error ...`, nothing
    of it is stored and no partial record is ever served, not even after a restart;
  - gets, acks and other queues keep working, and pushes work again once the cause is gone;
  - "interval"/"never": after a failed fsync the queue refuses pushes until an fsync succeeds
    (probed by the next push or the fsync timer); "always": the shard stops without replying.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import hiredis
import pytest
import zmq

from faultfs import FaultyFileIO
from floki import wire
from floki.config import QueueSettings, ServerConfig
from floki.errors import DiskFull, StorageIOError
from floki.shard import fileio, files
from floki.shard.catalog import Catalog
from floki.shard.queue import Queue
from floki.shard.server import FsyncFailed, ShardServer
from floki.shard.wal import WalHealth

IDENTITY = b"frontend"
ERRORS = [(errno.ENOSPC, DiskFull, b"-ERR disk full"), (errno.EIO, StorageIOError,
                                                        b"-ERR I/O error")]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def faults(data_dir: Path):
    layer = FaultyFileIO(data_dir)
    with fileio.installed(layer):
        yield layer


def make_queue(data_dir: Path, name: str = "q", fsync: str = "interval") -> Queue:
    queue = Queue.create(data_dir, name, QueueSettings(segment_size=4096), fsync)
    queue.create_channel("c")
    return queue


def all_messages(queue: Queue) -> list[tuple[int, bytes]]:
    return queue._live_wal().read(1, 10**6)


def segment_bytes(queue: Queue) -> int:
    return sum(s.size_bytes for s in queue._live_wal().segments())


# --- appends --------------------------------------------------------------------------------

@pytest.mark.parametrize("err,error,_reply", ERRORS)
def test_a_failed_append_stores_nothing_of_the_push_and_the_next_one_works(
        data_dir, faults, err, error, _reply):
    queue = make_queue(data_dir)
    queue.push([b"one", b"two"], 1)
    size_before, next_before = segment_bytes(queue), queue._live_wal().next_id
    rule = faults.fail("write", err, partial_bytes=30, path_contains=".seg")
    with pytest.raises(error):
        queue.push([b"x" * 100, b"y" * 100], 2)
    assert rule.fired == 1
    # the 30 bytes that reached the file were cut away again
    assert files.segment_path(queue.directory, 1).stat().st_size == size_before
    assert queue._live_wal().next_id == next_before
    assert all_messages(queue) == [(1, b"one"), (2, b"two")]
    assert [m[2] for m in queue.get("c", 10, 0.0)] == [b"one", b"two"]   # gets still work
    assert queue.push([b"three"], 3) == (3, 3)                           # no id was used up
    queue.close()
    reopened = Queue.open(data_dir, "q", QueueSettings(), "interval")
    assert all_messages(reopened) == [(1, b"one"), (2, b"two"), (3, b"three")]
    assert reopened.info(0.0)["corrupt_records"] == 0
    reopened.close()


def test_a_cut_back_that_fails_too_is_done_before_the_next_append(data_dir, faults):
    queue = make_queue(data_dir)
    queue.push([b"one"], 1)
    size_before = segment_bytes(queue)
    faults.fail("write", errno.ENOSPC, partial_bytes=10, path_contains=".seg")
    faults.fail("ftruncate", errno.EIO, path_contains=".seg")
    with pytest.raises(DiskFull):
        queue.push([b"lost" * 10], 2)
    path = files.segment_path(queue.directory, 1)
    assert path.stat().st_size == size_before + 10         # the partial record is on disk ...
    assert all_messages(queue) == [(1, b"one")]             # ... but never served
    assert queue.push([b"two"], 3) == (2, 2)
    assert all_messages(queue) == [(1, b"one"), (2, b"two")]
    assert path.stat().st_size == size_before + 24 + 3      # cut first, then appended
    queue.close()


def test_a_partial_record_left_by_a_crash_is_cut_at_restart(data_dir, faults):
    queue = make_queue(data_dir)
    queue.push([b"one"], 1)
    faults.fail("write", errno.ENOSPC, partial_bytes=10, path_contains=".seg")
    faults.fail("ftruncate", errno.EIO, path_contains=".seg")
    with pytest.raises(DiskFull):
        queue.push([b"lost" * 10], 2)
    image = faults.power_loss(data_dir.parent / "image", unsynced="all", names="current")
    queue.close()
    with fileio.installed(FaultyFileIO(image)):
        reopened = Queue.open(image, "q", QueueSettings(), "interval")
        assert all_messages(reopened) == [(1, b"one")]
        assert reopened.info(0.0)["corrupt_records"] == 0
        reopened.close()


def test_disk_full_while_raising_the_id_high_water_mark_stores_nothing(data_dir, faults,
                                                                        monkeypatch):
    monkeypatch.setattr("floki.shard.queue.ID_BLOCK", 4)
    queue = make_queue(data_dir)            # its create reserved ids 1..4
    assert queue.push([b"a", b"b", b"c", b"d"], 1) == (1, 4)
    rule = faults.fail("write", errno.ENOSPC, times=None, path_contains=files.QUEUE_FILE)
    with pytest.raises(DiskFull):
        queue.push([b"m"], 1)               # id 5 must raise the high-water mark first
    assert rule.fired >= 1 and [i for i, _ in all_messages(queue)] == [1, 2, 3, 4]
    faults.clear()
    assert queue.push([b"m"], 1) == (5, 5)
    queue.close()


def test_a_checkpoint_whose_backup_link_fails_is_written_and_drops_the_stale_backup(
        data_dir, faults, caplog):
    queue = make_queue(data_dir)
    queue.push([b"a", b"b", b"c"], 1)
    queue.checkpoint()                        # channels.json is now known good
    queue.checkpoint()                        # ... so this one keeps it as .prev
    channels = files.channels_file(queue.directory)
    previous = files.previous_path(channels)
    assert previous.exists()
    got = queue.get("c", 2, 0.0)
    queue.ack("c", [ticket for _, ticket, _ in got], 0.0)
    rule = faults.fail("link", errno.EIO, path_contains=files.CHANNELS_FILE)
    with caplog.at_level(logging.WARNING):
        queue.checkpoint()
    assert rule.fired == 1 and "writing without a backup" in caplog.text
    # The .prev left would be two generations old: it must not pass for the one before.
    assert not previous.exists()
    assert json.loads(channels.read_text())["channels"]["c"] == {"next_id": 3, "unacked": []}
    faults.clear()
    queue.checkpoint()
    assert json.loads(previous.read_text())["channels"]["c"]["next_id"] == 3
    queue.close()


def test_a_full_disk_for_one_queue_leaves_the_others_and_all_reads_working(data_dir, faults):
    full, other = make_queue(data_dir, "full"), make_queue(data_dir, "other")
    full.push([b"a", b"b"], 1)
    faults.fail("write", errno.ENOSPC, times=None, path_contains=f"{os.sep}full{os.sep}")
    for _ in range(3):
        with pytest.raises(DiskFull):
            full.push([b"nope"], 2)
    assert other.push([b"fine"], 2) == (1, 1)
    got = full.get("c", 10, 0.0)
    assert [m[2] for m in got] == [b"a", b"b"]
    assert full.ack("c", [got[0][1]], 0.0) == 1
    faults.clear()
    assert full.push([b"c"], 3) == (3, 3)
    assert [m[2] for m in full.get("c", 10, 0.0)] == [b"c"]
    full.close()
    other.close()


# --- fsync failures: rule 6 -----------------------------------------------------------------

@pytest.mark.parametrize("err,error,_reply", ERRORS)
def test_after_a_failed_fsync_pushes_are_refused_until_an_fsync_succeeds(data_dir, faults, err,
                                                                         error, _reply):
    queue = make_queue(data_dir, fsync="interval")
    queue.push([b"m1", b"m2"], 1)
    faults.fail("fsync", err, times=None, path_contains=".seg")
    with pytest.raises(error):
        queue.sync()                                        # the fsync timer
    assert queue._live_wal().health is WalHealth.FAILED and queue.needs_sync
    for _ in range(2):                                      # each push probes, and is refused
        with pytest.raises(error):
            queue.push([b"refused"], 2)
    assert queue._live_wal().next_id == 3
    got = queue.get("c", 10, 0.0)                           # reads and acks keep working
    assert [m[2] for m in got] == [b"m1", b"m2"]
    assert queue.ack("c", [t for _, t, _ in got], 0.0) == 2
    faults.clear()
    queue.sync()                                            # the timer's probe succeeds
    assert queue._live_wal().health is WalHealth.OK and not queue.needs_sync
    assert queue.push([b"m3"], 3) == (3, 3)
    assert faults.synced_bytes(files.segment_path(queue.directory, 1)).endswith(b"m2")
    queue.close()


def test_the_next_push_is_the_probe_when_no_timer_runs(data_dir, faults):
    queue = make_queue(data_dir, fsync="never")
    queue.push([b"m1"], 1)
    faults.fail("fsync", errno.EIO, path_contains=".seg")
    with pytest.raises(StorageIOError):
        queue.sync()
    assert queue.push([b"m2"], 2) == (2, 2)                  # the probe's fsync works now
    assert queue._live_wal().health is WalHealth.OK
    queue.close()


def test_a_failed_fsync_when_a_segment_is_sealed_fails_the_push_and_is_probed(data_dir, faults):
    queue = make_queue(data_dir, fsync="never")
    body = b"x" * 1000
    while len(queue._live_wal().segments()) == 1:
        ids = queue.push([body], 1)
        if segment_bytes(queue) + 1024 > 4096:
            break
    faults.fail("fsync", errno.EIO, path_contains=".seg")
    with pytest.raises(StorageIOError):
        queue.push([body], 2)                                # needs a roll: fsync of the old
    assert len(queue._live_wal().segments()) == 1
    assert queue.push([body], 3) == (ids[1] + 1, ids[1] + 1)
    assert len(queue._live_wal().segments()) == 2
    queue.close()


# --- through the shard server: the replies ---------------------------------------------------

def resp_value(payload: bytes):
    reader = hiredis.Reader()
    reader.feed(payload)
    return reader.gets()


class ShardRig:
    """A ShardServer on a real ROUTER (inproc://); the test holds the DEALER."""

    def __init__(self, data_dir: Path, fsync: str):
        self.config = ServerConfig(data_dir=str(data_dir), shards=1, fsync=fsync,
                                   queue=QueueSettings(segment_size=4096))
        self.catalog = Catalog(data_dir, 0, 1, self.config.queue, fsync)
        self.catalog.open_all()
        self.context = zmq.Context()
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind("inproc://disk-full")
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.IDENTITY, IDENTITY)
        self.dealer.connect("inproc://disk-full")
        self.server = ShardServer(self.config, 0, self.catalog, router)
        self.router = router
        self.request_ids = iter(range(1, 10**6))

    def send(self, *argv: str | bytes) -> int:
        rid = next(self.request_ids)
        args = [a if isinstance(a, bytes) else a.encode() for a in argv]
        self.server.handle_frames([IDENTITY, *wire.encode_request(rid, wire.COMMAND, args)])
        return rid

    def call(self, *argv: str | bytes) -> bytes:
        """One request in its own loop pass. Returns its RESP reply."""
        rid = self.send(*argv)
        self.server._finish_pass()
        assert self.dealer.poll(1000), "no reply"
        got_rid, status, payload = wire.decode_reply(self.dealer.recv_multipart())
        assert (got_rid, status) == (rid, wire.RESP)
        return payload

    def timers(self, now: float) -> None:
        """Runs the shard's timers at `now` and waits for the background jobs they started
        (applied by the next push to their queue, or the next pass)."""
        self.server._run_timers(now)
        assert self.server.background.wait_idle(5.0)

    def close(self) -> None:
        self.server.stop_background()
        self.catalog.close()
        self.dealer.close()
        self.router.close()
        self.context.term()


@pytest.fixture
def make_shard(data_dir):
    rigs: list[ShardRig] = []

    def make(fsync: str) -> ShardRig:
        rigs.append(ShardRig(data_dir, fsync))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


@pytest.mark.parametrize("err,_error,reply_prefix", ERRORS)
def test_rpush_on_a_full_disk_gets_an_error_reply_and_reads_keep_working(make_shard, faults,
                                                                         err, _error,
                                                                         reply_prefix):
    rig = make_shard("interval")
    assert rig.call("SET", "q", "c") == b"+OK\r\n"
    assert rig.call("SET", "other", "c") == b"+OK\r\n"
    assert rig.call("RPUSH", "q", "kept") == b":1\r\n"
    faults.fail("write", err, times=None, partial_bytes=5, path_contains=f"{os.sep}q{os.sep}")
    reply = rig.call("RPUSH", "q", "a", "b")
    assert reply.startswith(reply_prefix) and reply.endswith(b"\r\n"), reply
    assert rig.call("RPUSH", "other", "fine") == b":1\r\n"
    got = resp_value(rig.call("HMGET", "q", "c", "10"))
    assert [(m[0], m[2]) for m in got] == [(1, b"kept")]        # nothing of the failed push
    assert rig.call("HDEL", "q", "c", str(got[0][1])) == b":1\r\n"
    faults.clear()
    assert rig.call("RPUSH", "q", "again") == b":1\r\n"


def test_after_a_failed_interval_fsync_rpush_is_refused_until_the_timer_probe_works(
        make_shard, faults):
    rig = make_shard("interval")
    rig.call("SET", "q", "c")
    assert rig.call("RPUSH", "q", "m1") == b":1\r\n"
    faults.fail("fsync", errno.EIO, times=None, path_contains=".seg")
    rig.timers(time.monotonic() + 10)             # the fsync timer: it fails (in the background)
    assert rig.call("RPUSH", "q", "m2").startswith(b"-ERR I/O error")
    assert b"m1" in rig.call("HMGET", "q", "c", "10")
    faults.clear()
    rig.timers(time.monotonic() + 20)             # the probe succeeds
    rig.server._finish_pass()                     # ... and is applied by the next pass
    assert rig.catalog.get("q")._live_wal().health is WalHealth.OK
    assert rig.call("RPUSH", "q", "m3") == b":1\r\n"


def test_with_fsync_always_a_failed_fsync_stops_the_shard_before_any_reply(make_shard, faults):
    rig = make_shard("always")
    rig.call("SET", "q", "c")
    assert rig.call("RPUSH", "q", "synced") == b":1\r\n"
    faults.fail("fsync", errno.EIO, path_contains=".seg")
    rig.send("RPUSH", "q", "never acknowledged")
    rig.send("HMGET", "q", "c", "10")
    with pytest.raises(FsyncFailed):
        rig.server._finish_pass()
    assert not rig.dealer.poll(50), "a reply left although the fsync failed"
    # what a restarted shard finds: the synced push (the unsynced one may or may not be there,
    # but it was never acknowledged)
    image = faults.power_loss(rig.catalog.data_dir.parent / "image", unsynced="none",
                              names="synced")
    with fileio.installed(FaultyFileIO(image)):
        queue = Queue.open(image, "q", QueueSettings(), "always")
        assert all_messages(queue) == [(1, b"synced")]
        queue.close()


# --- a real full filesystem (tmpfs) -----------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs mounted on tmp_path/fs (skipped where mounting is not allowed)."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                               str(mount_point)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=10)


def test_a_real_full_filesystem(small_fs):
    data = small_fs / "data"
    data.mkdir()
    queue = make_queue(data, "q")
    spare = make_queue(data, "spare")
    spare.push([b"s" * 60_000] * 4, 1)                         # space to free later
    acked: list[bytes] = []
    with pytest.raises(DiskFull):
        for n in range(1000):
            body = f"{n}:".encode() + b"x" * 20_000
            queue.push([body], 2)
            acked.append(body)
    assert acked, "the filesystem was full before the first push"
    for _ in range(3):                                         # still full, still refused
        with pytest.raises(DiskFull):
            queue.push([b"y" * 20_000], 3)
    got = queue.get("c", 5, 0.0)                               # reads and acks work
    assert [m[2] for m in got] == acked[:5]
    assert queue.ack("c", [t for _, t, _ in got], 0.0) == 5
    spare.delete()                                             # frees space
    queue.push([b"after"], 4)
    acked.append(b"after")
    queue.close()
    reopened = Queue.open(data, "q", QueueSettings(), "interval")
    assert [body for _, body in all_messages(reopened)] == acked
    assert reopened.info(0.0)["corrupt_records"] == 0
    reopened.close()
