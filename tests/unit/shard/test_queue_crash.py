"""kill -9 of a real process using a Queue: nothing acknowledged is lost, nothing is skipped.

The child process pushes (or consumes) in a loop and prints each acknowledgement only after
the call returned, flushing at once; the parent SIGKILLs it at a random moment, then reopens the
queue and checks the acknowledged history against what is on disk.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from floki.config import QueueSettings
from floki.shard.queue import Queue

REPO_ROOT = Path(__file__).resolve().parents[3]

PRODUCER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from floki.config import QueueSettings
    from floki.shard.queue import Queue
    def say(line):      # one write() per line: print() may write a line in pieces
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()
    data_dir, fsync = Path(sys.argv[1]), sys.argv[2]
    q = Queue.create(data_dir, "q", QueueSettings(segment_size=4096), fsync)
    q.create_channel("c")
    i = 0
    now_ms = 1_700_000_000_000
    while True:
        n = 1 + i % 3
        first, last = q.push([b"payload-%d" % (i + k) for k in range(n)], now_ms + i)
        if fsync == "always":
            q.sync()
        say(f"{first} {last} {i}")               # acknowledged: the push returned
        i += n
        if i % 64 < 3:
            q.maintenance(0.0, now_ms + i, True)
""")

CONSUMER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from floki.config import QueueSettings
    from floki.shard.queue import Queue
    def say(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()
    data_dir = Path(sys.argv[1])
    q = Queue.open(data_dir, "q", QueueSettings(), "never")
    now = 0.0
    pending = []        # acks lag one batch, so every checkpoint holds unacked ids
    gets = 0
    while True:
        items = q.get("c", 7, now)
        if not items:
            say("done")
            break
        say(f"delivered {items[0][0]}")
        q.ack("c", pending, now)
        pending = [t for _, t, _ in items]
        gets += 1
        if gets % 3 == 0:
            q.maintenance(now, 1_700_000_000_000, False)
            say(f"checkpointed {items[0][0]}")   # the oldest unacked id in it
""")



def run_and_kill(script: str, args: list[str], kill_after_lines: int) -> list[str]:
    """Runs `script`, SIGKILLs it after it printed `kill_after_lines` lines (or when it ends),
    and returns every complete line it printed, also those still in the pipe (a line cut by
    the kill was never finished, so it acknowledges nothing)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    raw: list[bytes] = []
    try:
        while len(raw) < kill_after_lines:
            line = proc.stdout.readline()
            if not line:
                break
            raw.append(line)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raw += out.splitlines(keepends=True)
    lines = [ln.decode().strip() for ln in raw if ln.endswith(b"\n")]
    assert proc.returncode == -signal.SIGKILL or lines[-1:] == ["done"], err.decode()[-2000:]
    return lines


def read_everything(tmp_path: Path) -> tuple[Queue, list[tuple[int, bytes]]]:
    q = Queue.open(tmp_path, "q", QueueSettings(), "never")
    q.seek_id("c", 0)
    got: list[tuple[int, bytes]] = []
    while True:
        items = q.get("c", 1000, 0.0)
        if not items:
            return q, got
        got += [(i, body) for i, _, body in items]
        q.ack("c", [t for _, t, _ in items], 0.0)


@pytest.mark.parametrize("fsync,seed", [("never", 1), ("always", 2), ("never", 3)])
def test_kill_9_while_pushing_loses_no_acknowledged_message(tmp_path, fsync, seed):
    kill_after = random.Random(seed).randint(150, 450)
    lines = run_and_kill(PRODUCER, [str(tmp_path), fsync], kill_after)
    acked: dict[int, bytes] = {}
    for line in lines:
        first, last, i = map(int, line.split())
        for k, id_ in enumerate(range(first, last + 1)):
            acked[id_] = b"payload-%d" % (i + k)
    assert len(acked) >= kill_after
    q, got = read_everything(tmp_path)
    ids = [i for i, _ in got]
    assert ids == sorted(set(ids)), "ids must be strictly increasing"
    on_disk = dict(got)
    missing = [i for i in acked if i not in on_disk]
    assert not missing, f"acknowledged ids lost: {missing[:10]}"
    assert all(on_disk[i] == body for i, body in acked.items())
    first, _ = q.push([b"after"], 0)
    assert first > max(max(acked), max(ids))               # never reused
    q.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_while_consuming_skips_nothing(tmp_path, seed):
    q = Queue.create(tmp_path, "q", QueueSettings(segment_size=4096), "never")
    q.create_channel("c")
    total = 600
    for start in range(1, total + 1, 50):
        q.push([b"m%d" % i for i in range(start, start + 50)], 1_700_000_000_000)
    q.close()
    lines = run_and_kill(CONSUMER, [str(tmp_path)], random.Random(seed).randint(6, 40))
    checkpointed = [int(ln.split()[1]) for ln in lines if ln.startswith("checkpointed")]
    delivered = [int(ln.split()[1]) for ln in lines if ln.startswith("delivered")]
    assert checkpointed, lines
    q = Queue.open(tmp_path, "q", QueueSettings(), "never")
    again = []
    while True:
        items = q.get("c", 1000, 0.0)
        if not items:
            break
        again += [i for i, _, _ in items]
        q.ack("c", [t for _, t, _ in items], 0.0)
    q.close()
    # Redelivery starts exactly at the oldest id unacked at the last durable checkpoint: the
    # last one reported, or the next one (3 gets of 7 later) if the kill came between its
    # write and its report line. Nothing after it is skipped; the batch delivered last was
    # never acked, so it must come again.
    assert again == list(range(again[0], total + 1))
    assert again[0] in (checkpointed[-1], checkpointed[-1] + 3 * 7)
    assert again[0] <= delivered[-1]
