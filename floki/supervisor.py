"""The supervisor (`floki start`): spawn the shards and the frontend, watch them, restart the dead.

Owns: the child processes' lives, the runtime dir `<data_dir>/.run/` (its lock and the
`supervisor.json` process map) and the meaning of exit codes (`ExitCode`).
Rules (gunicorn's arbiter core, small):
  1. Signal handlers only enqueue the signal number. One loop waits up to 1 s for a signal,
     dispatches it to `handle_<name>`, reaps, and restarts what is due. Nothing else runs in a
     handler, so nothing can be interrupted half-way.
  2. Every death is logged with its cause. A dead child is restarted after a backoff delay that
     doubles per quick death (0.1 s .. 1 s) and resets once a child has stayed up 10 s.
  3. A child exiting with ExitCode.BOOT_ERROR cannot be fixed by a restart (bad config): the
     supervisor stops everything and exits with that code instead of restart-looping.
  4. Stop: SIGTERM the frontend first (it stops accepting and finishes its replies while the
     shards still answer), then the shards (they write final checkpoints); SIGKILL whatever is
     left when the grace period ends; reap everything. A second SIGINT skips the waiting.
  5. No orphans: each child asks the kernel for SIGTERM when the supervisor dies (Linux
     PR_SET_PDEATHSIG), and a new supervisor stops any child that a killed one left behind
     (found through supervisor.json, identified by pid *and* start time, never by name).
"""
from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import json
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import psutil

from floki.config import ServerConfig, runtime_dir
from floki.overrides import RUN_ID_ENV

log = logging.getLogger(__name__)


class ExitCode(enum.IntEnum):
    """Process exit codes every Floki process uses."""
    OK = 0
    FATAL = 1          # crashed or failed at run time: restarting is the right answer
    USAGE = 2          # bad command line (argparse's own code)
    BOOT_ERROR = 3     # cannot start and a restart will not help (bad config, data dir in use)


class Role(enum.Enum):
    SHARD = "shard"
    FRONTEND = "frontend"


class ChildState(enum.Enum):
    RUNNING = "running"
    WAITING = "waiting"    # dead, restart scheduled after its backoff delay
    STOPPED = "stopped"    # reaped during stop; never restarted


STATE_FILE_NAME = "supervisor.json"
LOCK_FILE_NAME = "supervisor.lock"

LOOP_WAIT_S = 1.0          # longest the loop sleeps without a signal (rule 1)
STOP_POLL_S = 0.05         # how often a stopping supervisor looks at its children
ORPHAN_GRACE_S = 8.0       # default time an orphan of a killed supervisor gets to stop cleanly
_CREATE_TIME_SLACK_S = 0.05


class HaltServer(BaseException):
    """Stops the loop. A BaseException, like gunicorn's, so no `except Exception` swallows it."""

    def __init__(self, reason: str, exit_code: int = ExitCode.OK):
        super().__init__(reason)
        self.reason, self.exit_code = reason, int(exit_code)


@dataclass(frozen=True)
class ChildSpec:
    """What to run for one child slot: its role, its shard index (None for the frontend), argv."""
    role: Role
    index: int | None
    argv: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.role.value if self.index is None else f"{self.role.value} {self.index}"


def child_specs(shard_count: int, common: Sequence[str],
                client_bind: str | None = None) -> list[ChildSpec]:
    """Returns the specs of a full set: shards 0..shard_count-1, then one frontend.

    `common` is the option list every child gets so it resolves the same configuration
    (`floki.cli.common_args`). `client_bind` (HOST:PORT), if given, is the clients' address:
    the frontend listens there (`--bind`); a shard only reports it (`--client-bind`), since a
    shard's own `--bind` is the ZeroMQ endpoint it binds, left to its config here.
    """
    base = (sys.executable, "-m", "floki")
    shard_extra = ("--client-bind", client_bind) if client_bind is not None else ()
    frontend_extra = ("--bind", client_bind) if client_bind is not None else ()
    specs = [ChildSpec(Role.SHARD, i, (*base, "shard", "--index", str(i), *shard_extra, *common))
             for i in range(shard_count)]
    specs.append(ChildSpec(Role.FRONTEND, None, (*base, "frontend", *frontend_extra, *common)))
    return specs


@dataclass
class Backoff:
    """Restart delay for one child slot: doubles per quick death, resets after a long life.

    Capped at 1 s: a restarted process is back within ~1.5 s even after repeated kills (a
    crash loop then costs one start per second, cheap next to a broker that stays down)."""
    initial_s: float = 0.1
    max_s: float = 1.0
    reset_after_s: float = 10.0
    next_s: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.next_s < 0:
            self.next_s = self.initial_s

    def delay_after_exit(self, up_s: float) -> float:
        """Returns the seconds to wait before restarting a child that ran for `up_s` seconds."""
        if up_s >= self.reset_after_s:
            self.next_s = self.initial_s
        delay_s = self.next_s
        self.next_s = min(self.next_s * 2, self.max_s)
        return delay_s


def describe_exit(returncode: int) -> str:
    """Returns the cause of death for a Popen returncode (negative: killed by that signal)."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode == signal.SIGKILL:
        return f"was killed by {name} (perhaps out of memory?)"
    return f"was killed by {name}"


@dataclass
class Child:
    """One child slot: its spec, the process now running in it (if any) and its restart clock."""
    spec: ChildSpec
    backoff: Backoff
    state: ChildState = ChildState.WAITING
    process: subprocess.Popen | None = None
    create_time: float | None = None   # psutil's start time: with the pid, the process identity
    started_at: float = 0.0            # time.monotonic() at spawn
    restart_at: float = 0.0            # time.monotonic() when a WAITING child is due
    restarts: int = 0


# --- orphan prevention -------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[[int, int], int] | None:
    # Loaded in the parent: resolving symbols between fork and exec is not safe.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """Returns a preexec_fn asking the kernel to SIGTERM the child when the supervisor dies.

    SIGTERM rather than SIGKILL: the child then stops the way it would for an operator, so a
    shard still writes its final checkpoint. A no-op where prctl does not exist.
    """
    def preexec() -> None:
        if _prctl is None:
            return
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The supervisor may have died between fork and prctl; the kernel would then never
        # send the signal, so check by hand.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def _same_process(pid: int, create_time: float | None) -> psutil.Process | None:
    """Returns the live process `pid` if it is the one started at `create_time`, else None."""
    if not pid or create_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > _CREATE_TIME_SLACK_S:
            return None      # the pid was reused by an unrelated process
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def stop_orphans(state_path: Path, grace_s: float = ORPHAN_GRACE_S) -> int:
    """Stops children listed in a dead supervisor's state file. Returns how many were found.

    SIGTERM first (a shard checkpoints and releases its locks), SIGKILL after `grace_s`.
    The caller must hold the run-dir lock, so the supervisor that wrote the file is gone.
    """
    try:
        previous = json.loads(state_path.read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", state_path, exc)
        return 0
    orphans: list[psutil.Process] = []
    for entry in previous.get("children", []):
        proc = _same_process(entry.get("pid"), entry.get("create_time"))
        if proc is None:
            continue
        log.warning("stopping %s (pid %d) left running by supervisor pid %s",
                    _entry_name(entry), proc.pid, previous.get("pid"))
        try:
            proc.terminate()
            orphans.append(proc)
        except psutil.Error:
            pass
    found = len(orphans)
    deadline = time.monotonic() + grace_s
    while orphans and time.monotonic() < deadline:
        orphans = [p for p in orphans if _same_process(p.pid, p.create_time())]
        if orphans:
            time.sleep(STOP_POLL_S)
    for proc in orphans:
        log.warning("orphan pid %d ignored SIGTERM for %.1f s; sending SIGKILL", proc.pid, grace_s)
        try:
            proc.kill()
        except psutil.Error:
            pass
    return found


def _entry_name(entry: dict) -> str:
    index = entry.get("index")
    return str(entry.get("role")) + ("" if index is None else f" {index}")


# --- the supervisor ----------------------------------------------------------------------

class Supervisor:
    """Runs a set of child processes until told to stop (see the module rules)."""

    HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)

    def __init__(self, run_dir: str | os.PathLike, specs: Sequence[ChildSpec], *,
                 stop_timeout_s: float = 8.0, backoff_initial_s: float = 0.1,
                 backoff_max_s: float = 1.0, backoff_reset_after_s: float = 10.0):
        """`run_dir`: where the lock and supervisor.json live (created if missing).
        `specs`: the child slots, started in this order. `stop_timeout_s`: the grace period of a
        graceful stop, from the first SIGTERM to SIGKILL of whatever is left.
        """
        self.run_dir = Path(run_dir).resolve()
        self.stop_timeout_s = stop_timeout_s
        self.children = [Child(spec, Backoff(backoff_initial_s, backoff_max_s,
                                             backoff_reset_after_s)) for spec in specs]
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._previous_handlers: dict[int, object] = {}
        self._lock_fd: int | None = None
        # Names this run for the children (floki/overrides.py rule 2): a child restarted by
        # this supervisor gets back the CONFIG SET values it applied; a new start does not.
        self.run_id = secrets.token_hex(8)

    @classmethod
    def from_config(cls, config: ServerConfig, common: Sequence[str]) -> "Supervisor":
        """Returns a supervisor for `config`'s full set of processes (see child_specs)."""
        return cls(runtime_dir(config), child_specs(config.shard_count, common, config.bind))

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE_NAME

    # -- main loop --

    def run(self) -> int:
        """Runs until SIGTERM/SIGINT or a child's boot error. Returns the exit code.

        Raises only for bugs; even then every child is stopped first.
        """
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock_run_dir()
        except HaltServer as halt:
            log.error("%s", halt.reason)
            return halt.exit_code
        except OSError as exc:
            log.error("cannot use runtime dir %s: %s", self.run_dir, exc)
            return ExitCode.BOOT_ERROR
        exit_code: int = ExitCode.OK
        try:
            self._install_signal_handlers()
            stop_orphans(self.state_path, self.stop_timeout_s)
            log.info("supervisor pid %d starting %d processes", os.getpid(), len(self.children))
            for child in self.children:
                self._spawn(child)
            self._write_state()
            while True:
                self._wait_for_signals(self._next_wait_s())
                self._reap()
                self._restart_due()
        except HaltServer as halt:
            log.info("stopping: %s", halt.reason)
            exit_code = halt.exit_code
        finally:
            # Runs for bugs too (then the exception propagates after the children are stopped).
            self._stop()
            self._restore_signal_handlers()
            self._unlock_run_dir()
        log.info("supervisor exiting with code %d", exit_code)
        return exit_code

    def _next_wait_s(self) -> float:
        now = time.monotonic()
        due = [c.restart_at - now for c in self.children if c.state is ChildState.WAITING]
        return max(0.0, min([LOOP_WAIT_S, *due]))

    def _wait_for_signals(self, timeout_s: float) -> None:
        """Blocks up to `timeout_s` for a signal, then dispatches every queued one."""
        try:
            signum = self._signals.get(timeout=timeout_s) if timeout_s > 0 else \
                self._signals.get_nowait()
        except queue.Empty:
            return
        while True:
            self._dispatch(signum)
            try:
                signum = self._signals.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, signum: int) -> None:
        name = signal.Signals(signum).name[3:].lower()
        getattr(self, f"handle_{name}")()

    def handle_term(self) -> None:
        raise HaltServer("received SIGTERM")

    def handle_int(self) -> None:
        raise HaltServer("received SIGINT")

    def handle_chld(self) -> None:
        """Nothing to do here: the loop reaps right after dispatching."""

    # -- signals --

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.put(signum)  # rule 1: enqueue only, never log or act here

    def _install_signal_handlers(self) -> None:
        for signum in self.HANDLED_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    # -- children --

    def _spawn(self, child: Child) -> None:
        """Starts the child's process; a failure to start counts as a death (backoff, retry)."""
        try:
            child.process = subprocess.Popen(
                child.spec.argv, stdin=subprocess.DEVNULL,
                env={**os.environ, RUN_ID_ENV: self.run_id},
                preexec_fn=_die_with_parent(os.getpid()))
        except OSError as exc:
            log.error("cannot start %s: %s", child.spec.name, exc)
            child.process = None
            self._schedule_restart(child, up_s=0.0)
            return
        child.state = ChildState.RUNNING
        child.started_at = time.monotonic()
        try:
            child.create_time = psutil.Process(child.process.pid).create_time()
        except psutil.Error:
            child.create_time = None   # already gone: the next reap sees it
        log.info("started %s (pid %d)", child.spec.name, child.process.pid)

    def _schedule_restart(self, child: Child, up_s: float) -> None:
        delay_s = child.backoff.delay_after_exit(up_s)
        child.state = ChildState.WAITING
        child.restart_at = time.monotonic() + delay_s
        log.info("restarting %s in %.2f s", child.spec.name, delay_s)

    def _reap(self) -> None:
        """Collects dead children, logs why they died, schedules restarts.

        Raises HaltServer when a child reports a boot error (rule 3).
        """
        changed = False
        for child in self.children:
            if child.process is None or (code := child.process.poll()) is None:
                continue
            up_s = time.monotonic() - child.started_at
            pid = child.process.pid
            child.process, child.create_time = None, None
            changed = True
            if code == ExitCode.BOOT_ERROR:
                log.error("%s (pid %d) could not boot (exit code %d); a restart cannot fix "
                          "that", child.spec.name, pid, code)
                child.state = ChildState.STOPPED
                self._write_state()
                raise HaltServer(f"{child.spec.name} failed to boot", ExitCode.BOOT_ERROR)
            log.warning("%s (pid %d) %s after %.1f s", child.spec.name, pid,
                        describe_exit(code), up_s)
            self._schedule_restart(child, up_s)
        if changed:
            self._write_state()

    def _restart_due(self) -> None:
        now = time.monotonic()
        changed = False
        for child in self.children:
            if child.state is ChildState.WAITING and child.restart_at <= now:
                child.restarts += 1
                self._spawn(child)
                changed = True
        if changed:
            self._write_state()

    # -- stop --

    def _stop(self) -> None:
        """Graceful stop (rule 4). Returns when every child has been reaped."""
        deadline = time.monotonic() + self.stop_timeout_s
        frontends = [c for c in self.children if c.spec.role is Role.FRONTEND]
        others = [c for c in self.children if c.spec.role is not Role.FRONTEND]
        # The frontend gets up to half the grace period while the shards still answer it.
        frontend_deadline = time.monotonic() + self.stop_timeout_s / 2
        forced = self._terminate_and_wait(frontends, frontend_deadline)
        if not forced:
            forced = self._terminate_and_wait(others, deadline)
        for child in self.children:
            if child.process is not None:
                log.warning("%s (pid %d) still running; sending SIGKILL", child.spec.name,
                            child.process.pid)
                self._send(child, signal.SIGKILL)
        for child in self.children:
            if child.process is not None:
                child.process.wait()
                self._mark_stopped(child)
        self._remove_state()

    def _terminate_and_wait(self, children: list[Child], deadline: float) -> bool:
        """SIGTERMs `children` and waits for them until `deadline`. Returns True if forced."""
        for child in children:
            if child.process is not None:
                self._send(child, signal.SIGTERM)
        while any(c.process is not None for c in children) and time.monotonic() < deadline:
            try:
                signum = self._signals.get(timeout=STOP_POLL_S)
                if signum == signal.SIGINT:
                    log.warning("second SIGINT: stopping at once")
                    return True
            except queue.Empty:
                pass
            for child in children:
                if child.process is not None and child.process.poll() is not None:
                    self._mark_stopped(child)
        return False

    def _mark_stopped(self, child: Child) -> None:
        assert child.process is not None
        code = child.process.returncode
        level = logging.INFO if code in (0, -signal.SIGTERM) else logging.WARNING
        log.log(level, "%s (pid %d) %s", child.spec.name, child.process.pid, describe_exit(code))
        child.process, child.create_time, child.state = None, None, ChildState.STOPPED

    @staticmethod
    def _send(child: Child, signum: int) -> None:
        assert child.process is not None
        try:
            child.process.send_signal(signum)
        except ProcessLookupError:
            pass

    # -- runtime dir: lock and state file --

    def _lock_run_dir(self) -> None:
        """Takes the run dir's flock: one supervisor per data dir. Raises HaltServer."""
        fd = os.open(self.run_dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise HaltServer(f"another supervisor is running on {self.run_dir.parent} "
                                 f"(see {self.state_path})", ExitCode.BOOT_ERROR) from None
            raise
        self._lock_fd = fd   # opened non-inheritable, so children never hold it

    def _unlock_run_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def state(self) -> dict:
        """Returns the process map written to supervisor.json."""
        return {
            "pid": os.getpid(),
            "children": [{
                "role": c.spec.role.value,
                "index": c.spec.index,
                "state": c.state.value,
                "pid": c.process.pid if c.process is not None else None,
                "create_time": c.create_time,
                "restarts": c.restarts,
            } for c in self.children],
        }

    def _write_state(self) -> None:
        """Replaces supervisor.json atomically (readers never see a half-written file)."""
        tmp = self.state_path.with_name(STATE_FILE_NAME + ".tmp")
        try:
            tmp.write_text(json.dumps(self.state(), indent=1) + "\n")
            os.replace(tmp, self.state_path)
        except OSError as exc:
            # The map is for operators and tests; losing it must not stop the supervision.
            log.error("cannot write %s: %s", self.state_path, exc)

    def _remove_state(self) -> None:
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove %s: %s", self.state_path, exc)
