"""The real Supervisor, run in its own process, supervising tiny real children.

The children are short Python programs (sleep, record SIGTERM, ignore SIGTERM, crash, fail to
boot), so these tests exercise signals, reaping, restarts and orphan handling for real without
needing the shard or frontend. Pure parts (Backoff, describe_exit, child_specs) are tested
directly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from floki.supervisor import (Backoff, ChildSpec, ExitCode, Role, child_specs, describe_exit,
                              stop_orphans)
from helpers import REPO_ROOT, process_alive, wait_until

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG exists only on Linux")

# --- the children ----------------------------------------------------------------------------
# Each writes a "ready" marker once its signal disposition is set, so a test never signals a
# child that is still starting up. argv: [name, marker_dir]

_READY = ("import os, sys, pathlib\n"
          "def ready():\n"
          "    pathlib.Path(sys.argv[2], f'ready-{sys.argv[1]}-{os.getpid()}').touch()\n")

SLEEPER = _READY + "import time\nready()\ntime.sleep(60)\n"

# On SIGTERM: wait `delay` s (argv[3]), append its name to <marker_dir>/order, exit 0.
RECORDER = _READY + (
    "import signal, time\n"
    "def bye(signum, frame):\n"
    "    time.sleep(float(sys.argv[3]))\n"
    "    with open(os.path.join(sys.argv[2], 'order'), 'a') as f:\n"
    "        f.write(sys.argv[1] + '\\n')\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "ready()\n"
    "while True:\n"
    "    time.sleep(1)\n")

IGNORER = _READY + (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "ready()\n"
    "time.sleep(60)\n")

# Appends the run id the supervisor gave it to <marker_dir>/run-<name>, then sleeps.
RUN_ID_WRITER = _READY + (
    "import time\n"
    "with open(os.path.join(sys.argv[2], 'run-' + sys.argv[1]), 'a') as f:\n"
    "    f.write(os.environ.get('FLOKI_RUN_ID', '-') + '\\n')\n"
    "ready()\n"
    "time.sleep(60)\n")
CRASHER = "import sys\nsys.exit(1)\n"
BOOT_FAILURE = "import sys\nsys.exit(3)\n"

# Runs floki.supervisor.Supervisor with the specs and settings given as JSON in argv[1].
RUNNER = """
import json, sys
from floki import logs
from floki.supervisor import ChildSpec, Role, Supervisor
cfg = json.loads(sys.argv[1])
logs.setup("supervisor", "debug")
specs = [ChildSpec(Role(c["role"]), c["index"], tuple(c["argv"])) for c in cfg["children"]]
sys.exit(Supervisor(cfg["run_dir"], specs, **cfg["options"]).run())
"""


class SupervisorProcess:
    """A Supervisor in a child process (own session, so cleanup can kill the whole group)."""

    def __init__(self, tmp_path: Path, children: list[tuple[Role, int | None, list[str]]],
                 **options):
        self.tmp = tmp_path
        self.markers = tmp_path / "markers"
        self.markers.mkdir(exist_ok=True)
        self.run_dir = tmp_path / "run"
        self.log_path = tmp_path / f"supervisor-{len(list(tmp_path.glob('supervisor-*')))}.log"
        self.expected_children = len(children)
        cfg = {"run_dir": str(self.run_dir), "options": options, "children": [
            {"role": role.value, "index": index, "argv": argv} for role, index, argv in children]}
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(cfg)],
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.known_pids: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> dict:
        state = json.loads((self.run_dir / "supervisor.json").read_text())
        self.known_pids.update(c["pid"] for c in state["children"] if c["pid"])
        return state

    def child(self, role: Role, index: int | None = None) -> dict:
        return next(c for c in self.state()["children"]
                    if c["role"] == role.value and c["index"] == index)

    def wait_running(self, timeout: float = 10.0) -> dict:
        """Waits until every child runs and has written its ready marker. Returns the state."""
        def all_ready():
            assert self.proc.poll() is None, self.log()
            state = self.state()
            if state["pid"] != self.proc.pid:
                return None   # a previous supervisor's file
            pids = [c["pid"] for c in state["children"]]
            ready = {int(p.name.rsplit("-", 1)[1]) for p in self.markers.glob("ready-*")}
            return state if all(pids) and set(pids) <= ready else None
        return wait_until(all_ready, timeout, message="all children ready")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout} s\n{self.log()}")

    def cleanup(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for pid in self.known_pids:   # children outlive the group kill if they were orphaned
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def supervise(tmp_path):
    started: list[SupervisorProcess] = []

    def start(children, **options) -> SupervisorProcess:
        options.setdefault("stop_timeout_s", 5.0)
        sup = SupervisorProcess(tmp_path, children, **options)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.cleanup()


def py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def full_set(tmp_path: Path, code: str, shards: int = 2, *extra: str):
    """Children like a real server's: `shards` shards then a frontend, all running `code`."""
    markers = str(tmp_path / "markers")
    children = [(Role.SHARD, i, py(code, f"shard{i}", markers, *extra)) for i in range(shards)]
    children.append((Role.FRONTEND, None, py(code, "frontend", markers, *extra)))
    return children


# --- pure parts ------------------------------------------------------------------------------

def test_backoff_doubles_up_to_the_cap():
    backoff = Backoff(initial_s=0.1, max_s=0.5, reset_after_s=10.0)
    assert [backoff.delay_after_exit(up_s=0.0) for _ in range(5)] == \
        pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_backoff_resets_after_a_child_stayed_up_long_enough():
    backoff = Backoff(initial_s=0.1, max_s=5.0, reset_after_s=10.0)
    for _ in range(4):
        backoff.delay_after_exit(up_s=1.0)
    assert backoff.delay_after_exit(up_s=9.9) == pytest.approx(1.6)
    assert backoff.delay_after_exit(up_s=10.0) == pytest.approx(0.1)
    assert backoff.delay_after_exit(up_s=0.5) == pytest.approx(0.2)


@pytest.mark.parametrize("code,text", [
    (0, "exited with code 0"),
    (1, "exited with code 1"),
    (-signal.SIGTERM, "was killed by SIGTERM"),
    (-signal.SIGKILL, "was killed by SIGKILL (perhaps out of memory?)"),
    (-signal.SIGSEGV, "was killed by SIGSEGV"),
])
def test_describe_exit_names_code_or_signal(code, text):
    assert describe_exit(code) == text


def test_child_specs_start_shards_then_one_frontend_with_the_common_options():
    specs = child_specs(3, ["-c", "/etc/floki.toml"])
    assert [(s.role, s.index) for s in specs] == [
        (Role.SHARD, 0), (Role.SHARD, 1), (Role.SHARD, 2), (Role.FRONTEND, None)]
    assert specs[1].argv == (sys.executable, "-m", "floki", "shard", "--index", "1",
                             "-c", "/etc/floki.toml")
    assert specs[3].argv == (sys.executable, "-m", "floki", "frontend", "-c", "/etc/floki.toml")
    assert [s.name for s in specs] == ["shard 0", "shard 1", "shard 2", "frontend"]


def test_child_specs_pass_the_client_address_as_frontend_bind_and_shard_client_bind():
    # A shard's own --bind is the ZeroMQ endpoint it binds: never the client address.
    specs = child_specs(2, ["-c", "/etc/floki.toml"], client_bind="0.0.0.0:7000")
    assert specs[0].argv[3:] == ("shard", "--index", "0", "--client-bind", "0.0.0.0:7000",
                                 "-c", "/etc/floki.toml")
    assert specs[2].argv[3:] == ("frontend", "--bind", "0.0.0.0:7000", "-c", "/etc/floki.toml")


def test_stop_orphans_leaves_a_reused_pid_alone(tmp_path):
    # A pid in a stale supervisor.json may now belong to someone else: only the pid together
    # with its start time identifies the process that supervisor started.
    bystander = subprocess.Popen(py("import time; time.sleep(60)"))
    try:
        started = psutil.Process(bystander.pid).create_time()
        state = tmp_path / "supervisor.json"
        state.write_text(json.dumps({"pid": 1, "children": [
            {"role": "shard", "index": 0, "pid": bystander.pid, "create_time": started - 100}]}))
        assert stop_orphans(state, grace_s=0.5) == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_orphans_terminates_a_listed_child(tmp_path):
    orphan = subprocess.Popen(py("import time; time.sleep(60)"))
    try:
        state = tmp_path / "supervisor.json"
        state.write_text(json.dumps({"pid": 1, "children": [
            {"role": "shard", "index": 0, "pid": orphan.pid,
             "create_time": psutil.Process(orphan.pid).create_time()},
            {"role": "frontend", "index": None, "pid": None, "create_time": None}]}))
        assert stop_orphans(state, grace_s=5.0) == 1
        assert orphan.wait(5) == -signal.SIGTERM
    finally:
        orphan.kill()
        orphan.wait()


# --- the real supervisor ---------------------------------------------------------------------

def test_state_file_lists_the_supervisor_and_every_child(supervise, tmp_path):
    sup = supervise(full_set(tmp_path, SLEEPER))
    state = sup.wait_running()
    assert state["pid"] == sup.proc.pid
    assert [(c["role"], c["index"], c["state"]) for c in state["children"]] == [
        ("shard", 0, "running"), ("shard", 1, "running"), ("frontend", None, "running")]
    for child in state["children"]:
        proc = psutil.Process(child["pid"])
        assert proc.ppid() == sup.proc.pid
        assert proc.create_time() == pytest.approx(child["create_time"], abs=0.05)
    assert not (sup.run_dir / "supervisor.json.tmp").exists()


def test_sigterm_stops_the_frontend_before_the_shards_and_exits_0(supervise, tmp_path):
    # The frontend takes 0.3 s to exit; were the shards signalled at the same time, they
    # would finish first.
    markers = str(tmp_path / "markers")
    children = [(Role.SHARD, i, py(RECORDER, f"shard{i}", markers, "0")) for i in range(2)]
    children.append((Role.FRONTEND, None, py(RECORDER, "frontend", markers, "0.3")))
    sup = supervise(children)
    pids = [c["pid"] for c in sup.wait_running()["children"]]
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == ExitCode.OK
    order = (tmp_path / "markers" / "order").read_text().split()
    assert order[0] == "frontend" and sorted(order[1:]) == ["shard0", "shard1"]
    assert not any(process_alive(pid) for pid in pids)
    assert not (sup.run_dir / "supervisor.json").exists()
    assert "received SIGTERM" in sup.log()


def test_children_ignoring_sigterm_are_killed_after_the_grace_period(supervise, tmp_path):
    sup = supervise(full_set(tmp_path, IGNORER, 1), stop_timeout_s=1.0)
    pids = [c["pid"] for c in sup.wait_running()["children"]]
    started = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == ExitCode.OK
    assert 0.9 <= time.monotonic() - started < 5.0
    assert not any(process_alive(pid) for pid in pids)
    assert "still running; sending SIGKILL" in sup.log()


def test_a_second_sigint_forces_the_stop(supervise, tmp_path):
    sup = supervise(full_set(tmp_path, IGNORER, 1), stop_timeout_s=30.0)
    pids = [c["pid"] for c in sup.wait_running()["children"]]
    sup.signal(signal.SIGINT)
    wait_until(lambda: "stopping: received SIGINT" in sup.log(), 5)
    started = time.monotonic()
    sup.signal(signal.SIGINT)
    assert sup.wait(5) == ExitCode.OK
    assert time.monotonic() - started < 3.0
    assert "second SIGINT" in sup.log()
    assert not any(process_alive(pid) for pid in pids)


@pytest.mark.parametrize("role,index", [(Role.SHARD, 1), (Role.FRONTEND, None)])
def test_a_killed_child_is_restarted_with_a_new_pid(supervise, tmp_path, role, index):
    sup = supervise(full_set(tmp_path, SLEEPER))
    sup.wait_running()
    old = sup.child(role, index)["pid"]
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (c := sup.child(role, index))["pid"] not in (None, old)
                     and c, 5, message="restart")
    assert new["restarts"] == 1 and new["state"] == "running"
    assert process_alive(new["pid"]) and not process_alive(old)
    name = role.value if index is None else f"shard {index}"
    assert f"{name} (pid {old}) was killed by SIGKILL (perhaps out of memory?)" in sup.log()
    assert f"restarting {name} in 0.10 s" in sup.log()
    others = [c for c in sup.state()["children"] if (c["role"], c["index"]) != (role.value, index)]
    assert all(c["restarts"] == 0 for c in others)


def test_children_share_a_run_id_that_a_restart_keeps_and_a_new_start_changes(supervise,
                                                                               tmp_path):
    """floki/overrides.py rule 2: the id scopes the CONFIG SET values a restart re-applies."""
    markers = tmp_path / "markers"
    sup = supervise(full_set(tmp_path, RUN_ID_WRITER, shards=1))
    sup.wait_running()
    old = sup.child(Role.SHARD, 0)["pid"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: len((markers / "run-shard0").read_text().split()) == 2, 5,
               message="the shard restarted")
    shard_runs = (markers / "run-shard0").read_text().split()
    frontend_runs = (markers / "run-frontend").read_text().split()
    assert len(set(shard_runs)) == 1 and frontend_runs == shard_runs[:1]
    assert len(shard_runs[0]) == 16 and shard_runs[0] != "-"
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == 0
    again = supervise(full_set(tmp_path, RUN_ID_WRITER, shards=1))
    again.wait_running()
    wait_until(lambda: len((markers / "run-frontend").read_text().split()) == 2, 5)
    assert (markers / "run-frontend").read_text().split()[1] != shard_runs[0]


def test_a_crashing_child_is_restarted_with_doubling_delays(supervise, tmp_path):
    markers = str(tmp_path / "markers")
    sup = supervise([(Role.SHARD, 0, py(CRASHER)),
                     (Role.FRONTEND, None, py(SLEEPER, "frontend", markers))],
                    backoff_initial_s=0.05, backoff_max_s=0.2)
    wait_until(lambda: sup.child(Role.SHARD, 0)["restarts"] >= 4, 10, message="4 restarts")
    delays = [line.rsplit(" in ", 1)[1] for line in sup.log().splitlines()
              if "restarting shard 0 in" in line]
    assert delays[:4] == ["0.05 s", "0.10 s", "0.20 s", "0.20 s"]
    assert "shard 0 (pid" in sup.log() and "exited with code 1" in sup.log()
    assert sup.proc.poll() is None


def test_a_boot_error_halts_the_supervisor_with_exit_code_3(supervise, tmp_path):
    markers = str(tmp_path / "markers")
    sup = supervise([(Role.FRONTEND, None, py(SLEEPER, "frontend", markers)),
                     (Role.SHARD, 0, py(BOOT_FAILURE))])
    assert sup.wait(10) == ExitCode.BOOT_ERROR
    assert "shard 0 (pid" in sup.log() and "could not boot (exit code 3)" in sup.log()
    assert "restarting shard 0" not in sup.log()
    frontend_pids = {int(p.name.rsplit("-", 1)[1]) for p in (tmp_path / "markers").glob("ready-*")}
    assert not any(process_alive(pid) for pid in frontend_pids)


def test_a_second_supervisor_on_the_same_run_dir_exits_3(supervise, tmp_path):
    first = supervise(full_set(tmp_path, SLEEPER, 1))
    first.wait_running()
    second = supervise([(Role.SHARD, 0, py(SLEEPER, "intruder", str(tmp_path / "markers")))])
    assert second.wait(10) == ExitCode.BOOT_ERROR
    assert "another supervisor is running" in second.log()
    assert first.proc.poll() is None
    assert not list((tmp_path / "markers").glob("ready-intruder-*"))


@linux_only
def test_kill_9_of_the_supervisor_leaves_no_child_alive(supervise, tmp_path):
    sup = supervise(full_set(tmp_path, SLEEPER))
    pids = [c["pid"] for c in sup.wait_running()["children"]]
    sup.signal(signal.SIGKILL)
    sup.wait(5)
    wait_until(lambda: not any(process_alive(pid) for pid in pids), 5,
               message="children gone after the supervisor was killed")


@linux_only
def test_a_new_supervisor_stops_children_a_killed_one_left_behind(supervise, tmp_path):
    # Children that ignore the death signal survive their supervisor; the next supervisor
    # on the same data dir must stop them before starting its own set.
    old = supervise(full_set(tmp_path, IGNORER, 1))
    old_pids = [c["pid"] for c in old.wait_running()["children"]]
    old.signal(signal.SIGKILL)
    old.wait(5)
    assert all(process_alive(pid) for pid in old_pids)
    new = supervise(full_set(tmp_path, SLEEPER, 1), stop_timeout_s=0.5)
    state = new.wait_running()
    assert not any(process_alive(pid) for pid in old_pids)
    assert not set(old_pids) & {c["pid"] for c in state["children"]}
    for pid in old_pids:
        assert f"(pid {pid}) left running by supervisor pid {old.proc.pid}" in new.log()
