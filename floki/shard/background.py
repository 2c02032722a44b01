"""Background disk work: the one worker thread per shard that runs PERIODIC fsyncs and checkpoint
writes, so a slow disk no longer stalls the shard's single-threaded loop.

Owns: BackgroundWorker (the thread and its job queue), Job (one piece of work: built on the
loop, `work()` on the worker, `finish()` back on the loop) and the rules below, which every
owner of jobs (queue.py) and the loop (server.py) keep.
Rules:
  a. Only periodic work goes to the worker: the interval fsync, the maintenance checkpoint of
     channels.json, and the last close of a segment retention removed (CloseFiles: that close
     frees the file's page cache, ~45 ms for 64 MiB; the unlink and the directory fsync stay
     on the loop). Everything a reply promises stays synchronous on the loop: the "always"
     group commit, queue.json high-water raises, create/delete channel, seek, purge, close,
     delete, segment roll. Before any synchronous write or fsync touching a queue's files, and
     before closing, deleting, purging or rolling it, the loop waits for that queue's job in
     flight (Job.apply waits), so jobs on one queue's files never overlap or reorder.
  b. What says what is durable (Wal.synced_next_id, Wal.durable, the position stored in
     channels.json) is captured on the loop when a job is built and applied on the loop in
     finish(), only after the fsync that covers it succeeded: never more than was fsynced. A
     checkpoint's snapshot is taken on the loop (channel state only changes there); the worker
     only encodes and writes it.
  c. A failed background fsync has the effect a failed interval fsync on the loop had (the Wal
     becomes FAILED until a probe succeeds); a failed checkpoint is logged and the queue stays
     dirty, so a later tick retries.
  d. At most one job per queue is queued or running; a tick that finds its queue's job still in
     flight is coalesced into the one follow-up submitted when that job is applied, so the
     worker never builds a backlog, and a slow disk is fsynced back to back, as before.
  e. Completions are applied by the loop on its next pass (it wakes at least every 100 ms), or
     at once when the loop must wait for that job (rule a). Shutdown: stop() refuses new jobs,
     lets the queued ones finish, joins the thread and hands back what completed, for the loop
     to apply before the queues' clean close.
  f. Jobs touch the disk only through fileio (and files/checkpoint built on it), so a fault layer
     installed by a test sees the worker's calls too.
  g. A job never uses a file descriptor the loop may close meanwhile: it works on its own
     (a dup, a file it opens itself, or fds the loop handed over for good) and closes it.
A job's work() must not touch loop-owned state; anything it raises is kept and handled by
finish() on the loop (an exception that is not an Exception, such as a test's simulated power
loss, is re-raised there).
"""
from __future__ import annotations

import logging
import queue as queue_module
import threading

from floki.shard import fileio

log = logging.getLogger(__name__)


class WorkerStopped(RuntimeError):
    """submit() after stop(): the shard is shutting down and takes no more background work."""


class Job:
    """One piece of periodic disk work. Subclasses define work() (worker thread) and finish()
    (loop thread); the owner keeps at most one in flight (rule d)."""

    def __init__(self, owner: object) -> None:
        self.owner = owner                          # whose job it is (at most one, rule d)
        self.error: BaseException | None = None    # what work() raised, handled by finish()
        self.fsync_seconds: float | None = None     # time spent in fsync (shard's histogram)
        self._done = threading.Event()
        self._applied = False

    # --- to be defined by the kind of job ---------------------------------------------------

    def work(self) -> None:
        """Worker side: the disk work. Touches only what the job captured (rules b, g)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Loop side: applies the outcome to the owner's state (rules b, c)."""
        raise NotImplementedError

    # --- the life of a job ------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once work() returned or raised (cheap: safe to ask on every push)."""
        return self._done.is_set()

    @property
    def applied(self) -> bool:
        return self._applied

    def run(self) -> None:
        """Runs work() and records its outcome; never raises. Called by the worker thread (or by
        the owner itself, to do a job's work synchronously)."""
        try:
            self.work()
        except BaseException as exc:     # kept for finish() on the loop (module docstring)
            self.error = exc
        finally:
            self._done.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until work() ended. Returns False if `timeout_s` passed first."""
        return self._done.wait(timeout_s)

    def apply(self) -> None:
        """Loop side: waits for the work to end, then runs finish() exactly once (later calls
        do nothing). Raises what finish() raises."""
        if self._applied:
            return
        self._done.wait()
        self._applied = True
        self.finish()


class CloseFiles(Job):
    """Closes fds the loop handed over for good (rule g): the last close of a removed segment,
    which frees its page cache (rule a). It belongs to no queue: nothing waits for it, and a
    close that fails has nothing left to protect (the file is already unlinked)."""

    def __init__(self, fds: list[int]) -> None:
        super().__init__(owner=None)
        self.fds = fds

    def work(self) -> None:
        for fd in self.fds:
            try:
                fileio.close(fd)
            except OSError as exc:
                log.warning("closing a removed segment's file failed: %s", exc)

    def finish(self) -> None:
        if self.error is not None and not isinstance(self.error, Exception):
            raise self.error              # a test's simulated power loss (module docstring)


def release_to(worker: BackgroundWorker | None):
    """Returns a `release` for Segment.unlink that hands fds to `worker` as a CloseFiles job,
    or None (close them on the loop) without a worker. A stopped worker (shutdown) makes the
    loop close them itself."""
    if worker is None:
        return None

    def release(fds: list[int]) -> None:
        try:
            worker.submit(CloseFiles(fds))
        except WorkerStopped:
            CloseFiles(fds).run()
    return release


class BackgroundWorker:
    """One thread that runs submitted jobs in order. Thread-safe; the thread starts with the
    first submit, so a shard that never needs it never starts it."""

    def __init__(self, name: str = "floki-background"):
        self.name = name
        self._jobs: queue_module.SimpleQueue[Job | None] = queue_module.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._completed: list[Job] = []
        self._outstanding = 0           # submitted, not yet completed
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(self, job: Job) -> None:
        """Queues `job` for the worker thread. Raises WorkerStopped after stop()."""
        with self._lock:
            if self._stopping:
                raise WorkerStopped(f"{self.name} is stopped")
            self._outstanding += 1
            if self._thread is None:
                # A daemon: if the loop dies of an unexpected error the process must still be
                # able to exit; a clean stop joins it (rule e).
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.run()
            with self._lock:
                self._completed.append(job)
                self._outstanding -= 1
                self._idle.notify_all()

    @property
    def outstanding(self) -> int:
        """Jobs submitted and not yet completed."""
        return self._outstanding

    def take_completed(self) -> list[Job]:
        """Loop side: returns the jobs completed since the last call, in completion order."""
        if not self._completed:          # the common case, without taking the lock
            return []
        with self._lock:
            completed, self._completed = self._completed, []
        return completed

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Blocks until every submitted job has completed. Returns False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout_s)

    def stop(self) -> list[Job]:
        """Refuses new jobs, lets the queued ones run, joins the thread (rule e). Idempotent.
        Returns the jobs completed and not yet taken, for the loop to apply."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join()
        return self.take_completed()
