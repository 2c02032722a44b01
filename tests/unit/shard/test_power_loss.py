"""Power loss (RELIABILITY test 6): what each fsync mode keeps when unsynced writes are lost.

Each run drives one Queue (pushes, group commits or interval fsyncs, gets, acks, checkpoints,
retention, the odd purge) on a FaultyFileIO, cuts the power at a random file operation (or
between two), builds the tree the disk would hold (faultfs module rules: fsynced bytes only,
plus a random torn prefix of the rest, directory changes since the last directory fsync maybe
lost), sometimes cuts the power again during recovery, then reopens the queue and checks:
  - every mode: recovery succeeds; every body served equals the body pushed with that id (no
    corrupt, mangled or invented body); no id is handed out twice; the channel redelivers
    every recovered message it had not acked (at-least-once); corrupt_records stays 0.
  - "always": every push that got its reply (push + group commit returned) is recovered, and
    so is every message a consumer received.
  - "interval" / "never": what is lost is a suffix of the acknowledged pushes (never one in the
    middle) that starts after the last fsync that completed ("interval": the last interval).
Half the maintenance ticks hand their fsync and checkpoint to the background worker's job
(background.py), run by SteppedWorker at chosen points of the workload (pushes, gets and acks
go on between the capture, the fsync and the applying of its outcome), so the power also goes
out before, during and after background fsyncs; an id counts as synced once the job's fsync
RETURNED, whatever the engine then recorded.
A message may be missing only if the consumer had acked it (retention may remove it) or a purge
had started. The seed of a failing run is in the assertion message; FLOKI_POWER_LOSS_SEED=N
replays the runs from seed N.
"""
from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from faultfs import FaultyFileIO, PowerLost
from floki.config import QueueSettings
from floki.shard import fileio, files
from floki.shard.background import Job
from floki.shard.queue import Queue
from floki.shard.wal import Wal

SETTINGS = QueueSettings(segment_size=4096)       # small segments: rolls happen often
STEPS = 90
CHANNEL = "c"
RUNS = {"always": 50, "interval": 35, "never": 15}
TOTALS: dict[str, int] = {"power_losses": 0, "acked": 0, "acked_lost_always": 0,
                          "lost_interval": 0, "corrupt_served": 0, "recovery_crashes": 0}


@dataclass
class History:
    """What the clients saw before the power went out."""
    mode: str
    sent: dict[int, bytes] = field(default_factory=dict)    # every id a push tried to write
    acked: set[int] = field(default_factory=set)            # the push's reply was sent
    pending: list[int] = field(default_factory=list)        # "always": awaiting group commit
    synced_upto: int = 0        # every acked id <= this was covered by a completed fsync
    delivered: set[int] = field(default_factory=set)
    consumer_acked: set[int] = field(default_factory=set)
    purge_floor: int = 0        # ids below it may be gone (a purge started)
    queue: Queue | None = None  # the queue object that lost its power
    queue_created: bool = False
    channel_created: bool = False
    corrupt_served: int = 0

    def may_be_missing(self, id_: int) -> bool:
        return id_ in self.consumer_acked or id_ < self.purge_floor


class SteppedWorker:
    """BackgroundWorker's place in the workload: a submitted job runs on this thread when the
    workload steps it, or when the queue waits for it (Job.apply), so a run replays exactly
    from its seed. `ran(job)` is called after each run."""

    def __init__(self, ran: Callable[[Job], None]):
        self.queued: list[Job] = []
        self.ran_jobs: list[Job] = []          # ran, maybe not applied yet
        self._ran = ran

    def submit(self, job: Job) -> None:
        self.queued.append(job)
        apply = job.apply

        def run_then_apply() -> None:        # the loop waits for the worker (rule a)
            self.step(job)
            apply()
        job.apply = run_then_apply

    def step(self, job: Job) -> None:
        if job in self.queued:
            self.queued.remove(job)
            job.run()
            self.ran_jobs.append(job)
            self._ran(job)


def run_workload(queue_dir_parent: Path, rng: random.Random, history: History,
                 after_sync: Callable[[], None] | None = None) -> None:
    """Drives one queue until STEPS are done (or PowerLost escapes). `after_sync` is called
    after every fsync the workload asked for (a group commit, an interval fsync, a background
    job's fsync)."""
    mode = history.mode

    def ran(job: Job) -> None:
        if job.error is not None:
            raise job.error                  # the power went out during the job's work
        if job.sync is not None and job.sync_error is None and mode == "interval":
            # every id below what it captured is on disk now (background.py rule b)
            history.synced_upto = max(history.synced_upto, job.sync.next_id - 1)
            if after_sync is not None:
                after_sync()

    worker = SteppedWorker(ran)
    queue = history.queue = Queue.create(queue_dir_parent, "q", SETTINGS, mode)
    history.queue_created = True
    queue.create_channel(CHANNEL)
    history.channel_created = True
    tickets: dict[int, int] = {}                  # ticket -> id, in flight
    now = 1000.0
    seq = 0
    for _ in range(STEPS):
        now += 0.01
        if worker.queued and rng.random() < 0.3:
            worker.step(worker.queued[0])          # the worker's fsync/checkpoint ends
        if worker.ran_jobs and rng.random() < 0.3:
            # the loop's next pass applies it (and submits what ticks coalesced meanwhile)
            queue.resume_background(worker.ran_jobs.pop(0), worker)
        op = rng.random()
        if op < 0.45:
            count = rng.randint(1, 4)
            bodies = []
            for _ in range(count):
                seq += 1
                bodies.append(f"{seq}:".encode() + rng.randbytes(rng.randint(0, 200)))
            first = queue._live_wal().next_id
            for k, body in enumerate(bodies):
                history.sent[first + k] = body
            got_first, got_last = queue.push(bodies, int(now * 1000))
            assert got_first == first
            ids = list(range(got_first, got_last + 1))
            if mode == "always":
                history.pending += ids
            else:
                history.acked.update(ids)
        elif op < 0.60:
            # the end of a loop pass: the group commit, then the replies
            queue.sync()
            if mode == "always":
                history.acked.update(history.pending)
                history.pending.clear()
            elif mode == "interval":
                history.synced_upto = max(history.acked, default=0)
            if after_sync is not None:
                after_sync()
        elif op < 0.75:
            for id_, ticket, body in queue.get(CHANNEL, rng.randint(1, 5), now):
                if history.sent.get(id_) != body:
                    history.corrupt_served += 1
                history.delivered.add(id_)
                tickets[ticket] = id_
        elif op < 0.87:
            for ticket in rng.sample(sorted(tickets), k=min(len(tickets), rng.randint(0, 4))):
                if queue.ack(CHANNEL, [ticket], now) == 1:
                    history.consumer_acked.add(tickets[ticket])
                del tickets[ticket]
        elif op < 0.97:
            fsync_due = rng.random() < 0.5
            if rng.random() < 0.5:
                queue.maintenance(now, int(now * 1000), fsync_due, worker)   # background
            else:
                queue.maintenance(now, int(now * 1000), fsync_due)
                if fsync_due and mode == "interval":
                    history.synced_upto = max(history.acked, default=0)
                    if after_sync is not None:
                        after_sync()
        else:
            history.purge_floor = queue._live_wal().next_id
            queue.purge()
            tickets.clear()


def recover(image: Path, mode: str) -> Queue | None:
    """Opens the queue in a power-loss image as a restarting shard would. Returns None when
    the image holds no queue (the power went out while it was being created)."""
    if "q" not in files.list_queue_names(image):
        return None
    return Queue.open(image, "q", QueueSettings(), mode)


def read_everything(queue: Queue) -> dict[int, bytes]:
    """Returns every retained message, read through a new channel rewound to id 1."""
    queue.create_channel("audit")
    queue.seek_id("audit", 1)
    found: dict[int, bytes] = {}
    while True:
        got = queue.get("audit", 1000, 0.0)
        if not got:
            return found
        for id_, ticket, body in got:
            found[id_] = body
        queue.ack("audit", [t for _, t, _ in got], 0.0)


def drain(queue: Queue) -> set[int]:
    """Returns every id the channel delivers from now on (redeliveries included)."""
    seen: set[int] = set()
    now = 10.0**6                          # far past every restored deadline
    while True:
        got = queue.get(CHANNEL, 1000, now)
        if not got:
            return seen
        seen.update(id_ for id_, _, _ in got)
        queue.ack(CHANNEL, [t for _, t, _ in got], now)


def one_power_loss(tmp_path: Path, mode: str, seed: int) -> None:
    rng = random.Random(seed)
    where = f"mode={mode} seed={seed}"
    data = tmp_path / f"{mode}-{seed}" / "data"
    data.mkdir(parents=True)
    image = data.parent / "image"
    history = History(mode)
    layer = FaultyFileIO(data, seed=seed)
    cut_between_operations = rng.random() < 0.15
    if not cut_between_operations:
        layer.crash_at(rng.randint(1, 320), image)
    with fileio.installed(layer):
        try:
            run_workload(data, rng, history)
        except PowerLost:
            pass
        if not layer.lost:
            layer.power_loss(image)
        layer.close_all()
    if history.queue is not None:
        history.queue._unlock()
    TOTALS["power_losses"] += 1
    assert history.corrupt_served == 0, where

    if rng.random() < 0.3:
        # The power goes out again while the restarted shard recovers.
        second = data.parent / "image2"
        layer2 = FaultyFileIO(image, seed=seed + 1)
        layer2.crash_at(rng.randint(1, 30), second)
        with fileio.installed(layer2):
            try:
                queue = recover(image, mode)
                if queue is not None:
                    queue.close()
            except PowerLost:
                pass
            if not layer2.lost:
                layer2.power_loss(second)
            layer2.close_all()
        TOTALS["power_losses"] += 1
        TOTALS["recovery_crashes"] += 1
        image = second

    # The checks run on a fault layer too: no real fsync, so many runs stay fast on any disk.
    with fileio.installed(FaultyFileIO(image)):
        queue = recover(image, mode)
        if queue is None:
            assert not history.queue_created, f"{where}: a created queue vanished"
            return
        try:
            check_recovered(queue, history, where)
        finally:
            queue.close()


def check_recovered(queue: Queue, history: History, where: str) -> None:
    channel_exists = queue.has_channel(CHANNEL)
    assert channel_exists or not history.channel_created, f"{where}: channel lost"
    unacked_by_consumer = None
    if channel_exists:
        before = read_everything(queue)
        unacked_by_consumer = {i for i in before if i not in history.consumer_acked}
        redelivered = drain(queue)
    else:
        before = read_everything(queue)
    recovered = before

    # No body that was not pushed with that id.
    corrupt = [i for i, body in recovered.items() if history.sent.get(i) != body]
    TOTALS["corrupt_served"] += len(corrupt)
    assert not corrupt, f"{where}: ids {corrupt[:5]} came back with other bodies"
    assert queue.info(0.0)["corrupt_records"] == 0, where

    expected = sorted(i for i in history.acked if not history.may_be_missing(i))
    missing = [i for i in expected if i not in recovered]
    TOTALS["acked"] += len(history.acked)
    if history.mode == "always":
        TOTALS["acked_lost_always"] += len(missing)
        assert not missing, f"{where}: acknowledged ids {missing[:10]} lost"
        lost_delivered = [i for i in sorted(history.delivered)
                          if i not in recovered and not history.may_be_missing(i)]
        assert not lost_delivered, f"{where}: delivered ids {lost_delivered[:10]} lost"
    else:
        TOTALS["lost_interval"] += len(missing)
        if missing:
            # a suffix: once one is missing, every later acknowledged one is too ...
            assert missing == expected[expected.index(missing[0]):], \
                f"{where}: a hole: missing {missing[:10]} but later ids survived"
            # ... and it begins after the last fsync that completed
            assert missing[0] > history.synced_upto, \
                f"{where}: id {missing[0]} lost although synced (upto {history.synced_upto})"

    if unacked_by_consumer is not None:
        never_redelivered = sorted(unacked_by_consumer - redelivered
                                   - {i for i in unacked_by_consumer if i < history.purge_floor})
        assert not never_redelivered, \
            f"{where}: unacked ids {never_redelivered[:10]} never delivered again"

    # Ids are never handed out twice: the next push lands above everything seen before.
    seen = history.acked | history.delivered | set(recovered)
    new_id, _ = queue.push([b"after"], 0)
    assert new_id > max(seen, default=0), f"{where}: id {new_id} handed out again"


@pytest.mark.parametrize("mode", sorted(RUNS))
def test_power_loss_keeps_what_the_fsync_mode_promises(tmp_path, mode):
    base = int(os.environ.get("FLOKI_POWER_LOSS_SEED") or random.randrange(1 << 30))
    for run in range(RUNS[mode]):
        one_power_loss(tmp_path, mode, base + run)


def test_power_loss_totals_are_reported(capsys):
    """Runs last in this module; prints the figures of the runs above (pytest -s shows them)."""
    if TOTALS["power_losses"] == 0:
        pytest.skip("the power-loss runs did not run in this session")
    with capsys.disabled():
        print(f"\npower losses simulated: {TOTALS['power_losses']} "
              f"(during recovery: {TOTALS['recovery_crashes']}); acknowledged pushes: "
              f"{TOTALS['acked']}; lost with fsync=always: {TOTALS['acked_lost_always']}; "
              f"lost with interval/never (allowed suffix): {TOTALS['lost_interval']}; "
              f"corrupt bodies served: {TOTALS['corrupt_served']}")
    assert TOTALS["acked_lost_always"] == 0 and TOTALS["corrupt_served"] == 0


@pytest.mark.parametrize("mode", ["always", "interval"])
def test_only_fsynced_bytes_and_names_survive_yet_every_synced_push_does(tmp_path, mode):
    """The strictest power loss (nothing unsynced survives: no byte, no directory change) taken
    after every group commit / interval fsync of a run: everything acknowledged ("always") or
    covered by that fsync ("interval") is in it. This is what catches a missing fsync of a
    segment, of its header, or of the directory after a roll."""
    for run in range(3):
        seed = random.randrange(1 << 30)
        data = tmp_path / f"{mode}-{run}" / "data"
        data.mkdir(parents=True)
        history = History(mode)
        layer = FaultyFileIO(data, seed=seed)
        images = itertools.count()

        def strict_power_loss() -> None:
            image = layer.power_loss(data.parent / f"image{next(images)}", unsynced="none",
                                     names="synced")
            TOTALS["power_losses"] += 1
            must_survive = sorted(i for i in history.acked if not history.may_be_missing(i)
                                  and (mode == "always" or i <= history.synced_upto))
            with fileio.installed(FaultyFileIO(image)):
                queue = Queue.open(image, "q", QueueSettings(), mode)
                try:
                    found = read_everything(queue)
                    assert queue.info(0.0)["corrupt_records"] == 0
                finally:
                    queue.close()
            lost = [i for i in must_survive if i not in found]
            assert not lost, f"seed={seed}: synced ids {lost[:10]} lost in {image.name}"
            assert all(history.sent[i] == body for i, body in found.items()), f"seed={seed}"

        with fileio.installed(layer):
            run_workload(data, random.Random(seed), history, after_sync=strict_power_loss)
            history.queue.close()


def test_a_hole_in_unsynced_writes_ends_the_log_there_after_an_unclean_stop(tmp_path):
    """Writeback order is not file order: after a power loss the unsynced part of the active
    segment may hold a hole followed by records that did reach the disk. Recovery must end the
    log at the hole (losing a suffix, never a record in the middle), even though the index file
    lists every record and the last one checks out."""
    directory = tmp_path / "q"
    wal = Wal.open(directory, segment_size=1 << 20)
    wal.append([b"synced"], 1)
    wal.sync()
    for n in range(2, 6):
        wal.append([f"unsynced {n}".encode()], n)
    active = wal._segments[-1]
    hole_at, hole_end = active.offsets[2], active.offsets[3]        # the record of id 3
    for segment in wal._segments:
        segment.close()                                            # power off: no close()
    path = files.segment_path(directory, 1)
    data = bytearray(path.read_bytes())
    data[hole_at:hole_end] = bytes(hole_end - hole_at)
    path.write_bytes(bytes(data))
    intact = path.read_bytes()

    trusting = Wal.open(directory, segment_size=1 << 20, clean_stop=True)
    # After a clean stop nothing was unsynced: a bad record there is corruption, skipped.
    assert [i for i, _ in trusting.read(1, 10)] == [1, 2, 4, 5]
    assert trusting.corrupt_records == 1
    for segment in trusting._segments:
        segment.close()
    path.write_bytes(intact)

    recovered = Wal.open(directory, segment_size=1 << 20, min_next_id=6)
    assert recovered.read(1, 10) == [(1, b"synced"), (2, b"unsynced 2")]
    assert recovered.corrupt_records == 0
    assert path.stat().st_size == hole_at
    assert recovered.append([b"next"], 7) == (6, 6)                  # ids never go back
    recovered.close()
