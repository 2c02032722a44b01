"""Background disk work (floki/shard/background.py rules a-g) with a real worker thread.

A GatedLayer (a fileio layer over whatever the test installed) holds every fsync made on the
worker thread until the test releases it, so a test can act while a background fsync is "slow":
push, read, close... and see what the loop does meanwhile and what it records afterwards.
The Wal's half (start_sync / finish_sync) is tested in test_wal.py, a new queue's reserved ids in
test_queue.py, and background fsyncs under simulated power loss in test_power_loss.py.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from faultfs import FaultyFileIO
from floki.config import QueueSettings
from floki.errors import StorageIOError
from floki.shard import fileio, files
from floki.shard.background import BackgroundWorker, CloseFiles, Job, WorkerStopped, release_to
from floki.shard.queue import Queue
from floki.shard.wal import WalHealth
from unit.shard.test_server import IDENTITY, make_rig  # noqa: F401 - make_rig is a fixture

T0_MS = 1_700_000_000_000
WAIT_S = 10.0               # a safety net: every wait below ends as soon as its event happens
BLOCKED_S = 0.2             # how long a blocked operation is watched for staying blocked


class GatedLayer:
    """Passes every operation to `inner`; an fsync on the worker thread (named `worker_name`)
    waits until `release` is set. `log` records (thread name, op, path) of every operation."""

    def __init__(self, inner, worker_name: str):
        self.inner = inner
        self.worker_name = worker_name
        self.entered = threading.Event()      # the worker reached an fsync
        self.release = threading.Event()
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def _note(self, op: str, where) -> None:
        with self._lock:
            self.log.append((threading.current_thread().name, op, str(where)))

    def __getattr__(self, name: str):
        if name not in fileio.OPERATIONS:
            raise AttributeError(name)
        operation = getattr(self.inner, name)

        def call(*args, **kwargs):
            where = args[0] if args else ""
            if isinstance(where, int):
                try:
                    where = os.readlink(f"/proc/self/fd/{where}")
                except OSError:
                    pass
            self._note(name, where)
            return operation(*args, **kwargs)
        return call

    def fsync(self, fd):
        if threading.current_thread().name == self.worker_name:
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the gate"
        self._note("fsync", os.readlink(f"/proc/self/fd/{fd}"))
        return self.inner.fsync(fd)

    def ops_by(self, thread_name: str) -> list[tuple[str, str]]:
        with self._lock:
            return [(op, where) for name, op, where in self.log if name == thread_name]


@pytest.fixture
def worker():
    w = BackgroundWorker("test-disk-worker")
    yield w
    w.stop()


@pytest.fixture
def gate(worker):
    layer = GatedLayer(fileio.current(), worker.name)
    with fileio.installed(layer):
        try:
            yield layer
        finally:
            layer.release.set()


def new_queue(tmp_path: Path, fsync: str = "interval", **settings) -> Queue:
    queue = Queue.create(tmp_path, "q", QueueSettings(**settings), fsync)
    queue.create_channel("c")
    return queue


def finish(queue: Queue, worker: BackgroundWorker) -> None:
    """The loop's next pass: waits for the worker, applies what it completed (repeatedly, as
    applying may submit the coalesced follow-up)."""
    while True:
        assert worker.wait_idle(WAIT_S)
        completed = worker.take_completed()
        if not completed:
            return
        for job in completed:
            if job.owner is None:               # CloseFiles: as ShardServer._complete_job
                job.apply()
            else:
                queue.resume_background(job, worker)


def channels_json(queue: Queue) -> dict:
    return json.loads(files.channels_file(queue.directory).read_text())


# --- the worker itself ------------------------------------------------------------------------

class Recorder(Job):
    def __init__(self, log: list, name: str, fail: BaseException | None = None):
        super().__init__(owner=None)
        self.log, self.name, self.fail = log, name, fail

    def work(self) -> None:
        self.log.append((self.name, threading.current_thread().name))
        if self.fail is not None:
            raise self.fail

    def finish(self) -> None:
        self.log.append((self.name, "finished"))


def test_jobs_run_in_order_on_the_worker_thread_and_finish_on_the_caller(worker):
    log: list = []
    jobs = [Recorder(log, f"j{i}") for i in range(3)]
    for job in jobs:
        worker.submit(job)
    assert worker.wait_idle(WAIT_S)
    assert worker.outstanding == 0
    assert log == [(f"j{i}", worker.name) for i in range(3)]
    assert worker.take_completed() == jobs and worker.take_completed() == []
    for job in jobs:
        job.apply()
        job.apply()                                     # once only
    assert log[3:] == [(f"j{i}", "finished") for i in range(3)]


def test_an_error_in_a_job_is_kept_for_the_loop_and_the_worker_goes_on(worker):
    log: list = []
    bad, good = Recorder(log, "bad", fail=ValueError("boom")), Recorder(log, "good")
    worker.submit(bad)
    worker.submit(good)
    assert worker.wait_idle(WAIT_S)
    assert isinstance(bad.error, ValueError) and good.error is None and good.done


def test_stop_finishes_queued_jobs_joins_and_refuses_new_ones(worker):
    log: list = []
    jobs = [Recorder(log, f"j{i}") for i in range(5)]
    for job in jobs:
        worker.submit(job)
    completed = worker.stop()
    assert completed == jobs and all(job.done for job in jobs)      # rule e
    assert not any(t.name == worker.name for t in threading.enumerate())
    with pytest.raises(WorkerStopped):
        worker.submit(Recorder(log, "late"))
    assert worker.stop() == []                                      # idempotent


def test_the_thread_starts_only_with_the_first_job():
    worker = BackgroundWorker("never-used")
    assert not any(t.name == "never-used" for t in threading.enumerate())
    assert worker.stop() == []


# --- rule a/b: the loop keeps serving; durability is recorded only after the fsync -----------

def test_pushes_are_served_while_a_background_fsync_is_blocked_and_nothing_more_is_marked_synced(
        tmp_path, worker, gate):
    queue = new_queue(tmp_path)
    queue.push([b"a", b"b"], T0_MS)
    wal = queue._live_wal()
    durable_before = wal.durable
    queue.interval_sync(worker)
    job = queue.background_job
    assert job is not None and job.sync.next_id == 3
    assert gate.entered.wait(WAIT_S)                 # the worker is inside the fsync, held
    for n in range(50):                              # the loop goes on meanwhile
        assert queue.push([b"m%d" % n], T0_MS) == (3 + n, 3 + n)
    assert [m[2] for m in queue.get("c", 2, 0.0)] == [b"a", b"b"]
    assert not job.done
    assert wal.synced_next_id == 1 and wal.durable == durable_before        # rule b
    gate.release.set()
    assert job.wait(WAIT_S)
    assert wal.synced_next_id == 1                  # done, but applied only by the loop (e)
    finish(queue, worker)
    assert wal.synced_next_id == 3                  # what it captured, not the 50 pushes after
    assert wal.durable.end_id == 3 and wal.durable.offset < wal.segments()[-1].size_bytes
    assert queue.needs_sync
    queue.interval_sync(worker)                      # the next tick covers the rest
    finish(queue, worker)
    assert wal.synced_next_id == 53 and not queue.needs_sync
    queue.close()


def test_through_the_shard_replies_go_out_while_the_timer_fsync_is_blocked(make_rig, gate):
    rig = make_rig(fsync="interval")
    gate.worker_name = rig.server.background.name
    rig.resp("SET", "q", "c")
    assert rig.resp("RPUSH", "q", "first") == b":1\r\n"
    rig.server.peer_seen[IDENTITY] = time.monotonic()
    rig.server._run_timers(rig.server.timers.next_fsync + 0.001)   # submits, does not wait
    assert gate.entered.wait(WAIT_S)
    started = time.perf_counter()
    for n in range(20):
        assert rig.resp("RPUSH", "q", f"m{n}") == b":1\r\n"
    assert time.perf_counter() - started < BLOCKED_S * 10
    queue = rig.catalog.get("q")
    assert queue.background_job is not None and not queue.background_job.done
    gate.release.set()
    rig.settle_background()
    assert queue._live_wal().synced_next_id == 2


def test_the_checkpoint_stores_the_position_its_fsync_made_durable_never_more(tmp_path, worker,
                                                                            gate):
    queue = new_queue(tmp_path)
    queue.push([b"a"], T0_MS)
    got = queue.get("c", 1, 0.0)
    queue.ack("c", [got[0][1]], 0.0)                 # dirty: the maintenance tick stores it
    queue.maintenance(0.0, T0_MS, True, worker)
    job = queue.background_job
    assert job.sync is not None and job.snapshot is not None
    assert gate.entered.wait(WAIT_S)
    queue.push([b"after"], T0_MS)
    before = channels_json(queue)
    gate.release.set()
    finish(queue, worker)
    stored = channels_json(queue)
    assert stored != before and stored["channels"]["c"]["next_id"] == 2
    assert stored["log"] == job.sync.position.to_dict() and stored["log"]["end_id"] == 2
    assert queue._stored_position == job.sync.position == queue._live_wal().durable
    queue.close()


# --- rule c: failures --------------------------------------------------------------------------

@pytest.fixture
def faults(tmp_path: Path):
    layer = FaultyFileIO(tmp_path)
    with fileio.installed(layer):
        yield layer


def test_eio_in_the_background_fsync_fails_pushes_until_a_later_sync_succeeds(tmp_path, worker,
                                                                              faults):
    queue = new_queue(tmp_path)
    queue.push([b"m1"], T0_MS)
    faults.fail("fsync", errno.EIO, times=None, path_contains=".seg")
    queue.interval_sync(worker)
    assert worker.wait_idle(WAIT_S)
    wal = queue._live_wal()
    with pytest.raises(StorageIOError):             # the push applies the failure and probes
        queue.push([b"refused"], T0_MS)
    assert wal.health is WalHealth.FAILED and wal.synced_next_id == 1
    queue.interval_sync(worker)                      # the timer's probe, in the background
    finish(queue, worker)
    assert wal.health is WalHealth.FAILED
    assert [m[2] for m in queue.get("c", 10, 0.0)] == [b"m1"]      # reads keep working
    faults.clear()
    queue.interval_sync(worker)
    finish(queue, worker)
    assert wal.health is WalHealth.OK and wal.synced_next_id == 2
    assert faults.synced_bytes(files.segment_path(queue.directory, 1)).endswith(b"m1")
    assert queue.push([b"m2"], T0_MS) == (2, 2)
    queue.close()


def test_a_failed_background_checkpoint_keeps_the_queue_dirty_and_the_next_tick_writes_it(
        tmp_path, worker, faults, caplog):
    queue = new_queue(tmp_path)
    queue.push([b"a", b"b"], T0_MS)
    got = queue.get("c", 2, 0.0)
    queue.ack("c", [t for _, t, _ in got], 0.0)
    before = channels_json(queue)
    rule = faults.fail("write", errno.ENOSPC, path_contains=files.CHANNELS_FILE)
    with caplog.at_level(logging.ERROR, logger="floki.shard.queue"):
        queue.maintenance(0.0, T0_MS, False, worker)
        finish(queue, worker)
    assert rule.fired == 1 and "checkpoint failed" in caplog.text
    assert channels_json(queue) == before and queue._dirty
    assert not files.tmp_path(files.channels_file(queue.directory)).exists()
    queue.maintenance(0.0, T0_MS, False, worker)     # the next tick retries
    finish(queue, worker)
    assert not queue._dirty
    assert channels_json(queue)["channels"]["c"] == {"next_id": 3, "unacked": []}
    queue.close()


def test_a_checkpoint_still_written_when_the_fsync_fails_keeps_the_old_position(
        tmp_path, worker, faults):
    queue = new_queue(tmp_path)
    queue.push([b"a"], T0_MS)
    queue.interval_sync(worker)
    finish(queue, worker)
    durable = queue._live_wal().durable
    queue.push([b"b"], T0_MS)
    queue.get("c", 5, 0.0)                           # dirty
    faults.fail("fsync", errno.EIO, path_contains=".seg")
    queue.maintenance(0.0, T0_MS, True, worker)
    finish(queue, worker)
    stored = channels_json(queue)
    assert stored["log"] == durable.to_dict()        # not the position that failed to sync
    assert stored["channels"]["c"]["unacked"] == [[1, 2]]
    assert queue._live_wal().health is WalHealth.FAILED
    queue.close()                                    # close probes again: works


# --- rule a: synchronous work waits for the job in flight --------------------------------------

def _roll(queue: Queue) -> None:
    segments = len(queue._live_wal().segments())
    while len(queue._live_wal().segments()) == segments:
        queue.push([b"x" * 500], T0_MS)


OPERATIONS = {
    "close": lambda q: q.close(),
    "delete": lambda q: q.delete(),
    "purge": lambda q: q.purge(),
    "seek": lambda q: q.seek_id("c", 1),
    "create_channel": lambda q: q.create_channel("d"),
    "delete_channel": lambda q: q.delete_channel("c"),
    "set_setting": lambda q: q.set_setting("max_in_flight", "7"),
    "roll": _roll,
    "checkpoint": lambda q: q.checkpoint(),
    "group_commit": lambda q: (q.push([b"y"], T0_MS), q.sync()),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_synchronous_disk_work_waits_for_the_queues_job_in_flight(tmp_path, worker, gate,
                                                                  operation):
    queue = new_queue(tmp_path, segment_size=4096)
    queue.push([b"m"], T0_MS)
    queue.get("c", 1, 0.0)
    queue.maintenance(0.0, T0_MS, True, worker)      # fsync + checkpoint job
    job = queue.background_job
    assert gate.entered.wait(WAIT_S)
    loop = threading.Thread(target=OPERATIONS[operation], args=(queue,), name="loop")
    loop.start()
    try:
        loop.join(BLOCKED_S)
        assert loop.is_alive(), f"{operation} did not wait for the background job"
        # While it waits it has done nothing to the queue's files but appends (a push never
        # waits): no fsync, no rename, no new or removed file, no checkpoint write.
        done = [(op, Path(where).name) for op, where in gate.ops_by("loop")
                if not (op in ("write", "pread") and where.endswith((".seg", ".idx")))]
        assert done == [], done
    finally:
        gate.release.set()
        loop.join(WAIT_S)
    assert not loop.is_alive()
    assert job.applied and queue.background_job is None
    if queue._wal is not None:
        assert queue._live_wal().synced_next_id >= 2
        queue.close()


def test_a_push_never_waits_for_a_running_job(tmp_path, worker, gate):
    queue = new_queue(tmp_path)
    queue.push([b"m"], T0_MS)
    queue.interval_sync(worker)
    assert gate.entered.wait(WAIT_S)
    loop = threading.Thread(target=lambda: [queue.push([b"n"], T0_MS) for _ in range(10)],
                            name="loop")
    loop.start()
    loop.join(WAIT_S)
    assert not loop.is_alive() and not queue.background_job.done
    gate.release.set()
    finish(queue, worker)
    queue.close()


# --- rule d: coalescing ------------------------------------------------------------------------

def test_ticks_while_a_job_runs_are_coalesced_into_one_follow_up(tmp_path, worker, gate):
    queue = new_queue(tmp_path)
    queue.push([b"m"], T0_MS)
    queue.interval_sync(worker)
    first = queue.background_job
    assert gate.entered.wait(WAIT_S)
    for n in range(10):                              # ten ticks while it is stuck
        queue.push([b"n%d" % n], T0_MS)
        queue.interval_sync(worker)
        queue.maintenance(0.0, T0_MS, True, worker)
    assert queue.background_job is first and worker.outstanding == 1      # no backlog
    gate.release.set()
    assert worker.wait_idle(WAIT_S)
    completed = worker.take_completed()
    assert completed == [first]
    queue.resume_background(first, worker)           # applies it, submits ONE follow-up
    follow_up = queue.background_job
    assert follow_up is not None and follow_up is not first and worker.outstanding <= 1
    assert follow_up.sync.next_id == 12
    finish(queue, worker)
    assert not queue.needs_sync and queue.background_job is None
    queue.close()


def test_a_completion_applied_by_a_push_is_not_applied_twice_and_never_waits(tmp_path, worker,
                                                                             gate):
    queue = new_queue(tmp_path)
    queue.push([b"m"], T0_MS)
    queue.interval_sync(worker)
    first = queue.background_job
    gate.release.set()
    assert first.wait(WAIT_S)
    queue.push([b"n"], T0_MS)                        # applies the finished job
    assert first.applied and queue.background_job is None
    gate.release.clear()
    gate.entered.clear()
    queue.interval_sync(worker)                      # a second job, held in its fsync
    second = queue.background_job
    assert gate.entered.wait(WAIT_S)
    started = time.perf_counter()
    queue.resume_background(first, worker)           # the loop's pass sees `first` late
    assert time.perf_counter() - started < BLOCKED_S and queue.background_job is second
    gate.release.set()
    finish(queue, worker)
    assert queue._live_wal().synced_next_id == 3
    queue.close()


# --- rule e: shutdown ------------------------------------------------------------------------

def test_shard_stop_joins_the_worker_and_applies_its_jobs_before_the_clean_close(make_rig, gate):
    rig = make_rig(fsync="interval")
    gate.worker_name = rig.server.background.name
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "m")
    rig.server._run_timers(rig.server.timers.next_fsync + 0.001)
    assert gate.entered.wait(WAIT_S)
    stopper = threading.Thread(target=rig.server.stop_background, name="loop")
    stopper.start()
    stopper.join(BLOCKED_S)
    assert stopper.is_alive()                        # waits for the job
    gate.release.set()
    stopper.join(WAIT_S)
    assert not stopper.is_alive()
    queue = rig.catalog.get("q")
    assert queue.background_job is None and queue._live_wal().synced_next_id == 2
    assert not any(t.name == rig.server.background.name for t in threading.enumerate())
    queue.push([b"late"], T0_MS)
    queue.interval_sync(rig.server.background)       # after the stop: done on the loop
    assert not queue.needs_sync


def test_serve_stops_the_worker_when_it_returns(make_rig):
    rig = make_rig(fsync="interval", fsync_interval=0.001)
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", "m")
    passes = iter(range(3))
    rig.server.serve(lambda: next(passes, None) is None)
    assert not any(t.name == rig.server.background.name for t in threading.enumerate())
    with pytest.raises(WorkerStopped):
        rig.server.background.submit(Recorder([], "late"))


# --- rule f: the fault layer sees the worker's calls ------------------------------------------

def test_a_power_loss_after_a_background_fsync_keeps_everything_it_covered(tmp_path, worker):
    data = tmp_path / "data"
    data.mkdir()
    layer = FaultyFileIO(data, seed=1)
    with fileio.installed(layer):
        queue = new_queue(data, segment_size=4096)
        covered = 0
        for round_ in range(20):
            for n in range(7):
                queue.push([b"%d:%d:" % (round_, n) + b"x" * 90], T0_MS)
            queue.maintenance(0.0, T0_MS, True, worker)
            job = queue.background_job
            queue.push([b"during %d" % round_], T0_MS)   # races the worker: maybe covered
            finish(queue, worker)
            covered = job.sync.next_id - 1
        image = layer.power_loss(tmp_path / "image", unsynced="none", names="synced")
        queue.close()
    with fileio.installed(FaultyFileIO(image)):
        recovered = Queue.open(image, "q", QueueSettings(), "interval")
        ids = [i for i, _ in recovered._live_wal().read(1, 10**6)]
        assert ids[:covered] == list(range(1, covered + 1))
        assert recovered.info(0.0)["corrupt_records"] == 0
        recovered.close()
    assert layer.calls["fsync"] > 20


# --- the last close of a removed segment ------------------------------------------------------

def test_retention_leaves_the_last_close_of_a_removed_segment_to_the_worker(tmp_path, worker,
                                                                            gate):
    # Closing a removed 64 MiB segment frees its page cache: ~45 ms the loop must not spend.
    q = new_queue(tmp_path, segment_size=4096, hard_retention_period=0.0)
    while len(q._wal.segments()) <= 2:
        q.push([b"x" * 100], T0_MS)
    while items := q.get("c", 1000, 0.0):
        q.ack("c", [t for _, t, _ in items], 0.0)
    removed = [s.path for s in q._wal._segments[:-1]]
    q.maintenance(0.0, T0_MS, False, worker)
    assert len(q._wal.segments()) == 1 and not any(p.exists() for p in removed)
    gate.release.set()                          # the tick's checkpoint fsync may go on
    finish(q, worker)
    worker_closes = [where for op, where in gate.ops_by(worker.name) if op == "close"]
    loop_closes = [where for op, where in gate.ops_by("MainThread") if op == "close"]
    for path in removed:
        assert any(path.name in where for where in worker_closes)
        assert not any(path.name in where for where in loop_closes)
    q.push([b"after"], T0_MS)                   # the queue goes on as before
    assert [body for _, _, body in q.get("c", 10, 0.0)] == [b"after"]
    q.close()


def test_release_hands_fds_to_the_worker_or_closes_them_when_there_is_none(tmp_path, worker):
    assert release_to(None) is None
    fds = [os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_RDWR) for i in range(3)]
    release = release_to(worker)
    release(fds[:2])
    assert worker.wait_idle(WAIT_S)
    [job] = worker.take_completed()
    assert isinstance(job, CloseFiles) and job.owner is None
    job.apply()
    worker.stop()
    release(fds[2:])                            # a stopped worker: closed here and now
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_the_shard_applies_a_close_files_job_that_belongs_to_no_queue(make_rig, tmp_path):
    rig = make_rig(fsync="interval")
    fd = os.open(tmp_path / "removed", os.O_CREAT | os.O_RDWR)
    release_to(rig.server.background)([fd])
    assert rig.server.background.wait_idle(WAIT_S)
    rig.server._apply_background()                   # must not take it for a queue's job
    with pytest.raises(OSError):
        os.fstat(fd)
    rig.resp("SET", "q", "c")                        # and the shard goes on
    assert rig.resp("RPUSH", "q", "m") == b":1\r\n"


# --- fsync ahead (server.py rule 6) -------------------------------------------------------------

def test_a_push_that_leaves_enough_unfsynced_starts_the_background_fsync(make_rig, monkeypatch):
    from floki.shard import server as server_module
    monkeypatch.setattr(server_module, "SYNC_AHEAD_BYTES", 64 * 1024)
    rig = make_rig(fsync="interval", fsync_interval=3600)   # the timer never fires here
    rig.resp("SET", "q", "c")
    wal = rig.catalog.get("q")._live_wal()
    rig.resp("RPUSH", "q", b"s" * 1000)                 # below the mark: nothing starts
    assert rig.server.background.outstanding == 0 and wal.synced_next_id == 1
    rig.resp("RPUSH", "q", *[b"b" * 40_000] * 2)         # 80 KB unfsynced: ahead it goes
    assert rig.server.background.wait_idle(WAIT_S)
    rig.server._apply_background()
    assert wal.synced_next_id == 4 and wal.unsynced_bytes == 0
    assert rig.catalog.get("q").unsynced_bytes == 0


def test_fsync_ahead_is_only_for_interval_mode(make_rig, monkeypatch):
    from floki.shard import server as server_module
    monkeypatch.setattr(server_module, "SYNC_AHEAD_BYTES", 1)
    rig = make_rig(fsync="never")
    rig.resp("SET", "q", "c")
    rig.resp("RPUSH", "q", b"b" * 10_000)
    assert rig.server.background.outstanding == 0
    assert rig.catalog.get("q")._live_wal().synced_next_id == 1
