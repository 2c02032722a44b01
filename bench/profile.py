"""Profiling Floki's processes during chosen timed phases with py-spy (optional tool).

Owns: starting `py-spy record` on the frontend and every shard for a phase, stopping it when
the phase ends, and summarising the samples (`summarize`: top functions by own and by total
time, per process) into a text file next to the raw data.
Rules:
  1. py-spy is a development tool, not a dependency: `--profile` needs it installed
     (`.venv/bin/pip install py-spy`); without `--profile` nothing here runs.
  2. Only idle-free samples are recorded (py-spy's default), so samples / (rate x seconds) is
     the share of one core the process used; waiting in epoll/zmq_poll does not count.
  3. Only the py-spy processes this module started are signalled (by their pid).
"""
from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from bench.servers import FlokiServer, _Server

SAMPLE_RATE_HZ = 200
TOP_N = 25
_LINE_SUFFIX = re.compile(r":\d+\)$")


def find_py_spy() -> str | None:
    """Returns the py-spy executable (next to this Python first, then on PATH), or None."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """'handle (floki/x.py:12)' -> 'handle (floki/x.py)': one entry per function."""
    return _LINE_SUFFIX.sub(")", frame)


def summarize(raw_lines: list[str], seconds: float, rate_hz: int = SAMPLE_RATE_HZ,
              top_n: int = TOP_N) -> str:
    """Returns a text summary of py-spy raw (collapsed) stacks: samples, core share, and the
    top functions by own samples and by total (inclusive) samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw_lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    core_share = samples / (rate_hz * seconds) if seconds > 0 else 0.0
    out = [f"samples: {samples} over {seconds:.1f} s at {rate_hz} Hz "
           f"(~{core_share:.0%} of one core busy)", "", "own time (function itself):"]
    out += [f"  {n / max(samples, 1):6.1%}  {name}" for name, n in own.most_common(top_n)]
    out += ["", "total time (function and what it calls):"]
    out += [f"  {n / max(samples, 1):6.1%}  {name}" for name, n in total.most_common(top_n)]
    return "\n".join(out) + "\n"


class Profiler:
    """Records Floki's processes during the phases named in `phases` (e.g. "W1 produce")."""

    def __init__(self, out_dir: Path, phases: set[str], rate_hz: int = SAMPLE_RATE_HZ):
        self.py_spy = find_py_spy()
        if self.py_spy is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out_dir = out_dir
        self.phases = phases
        self.rate_hz = rate_hz
        self.summaries: list[Path] = []

    @contextlib.contextmanager
    def during(self, server: _Server, phase: str) -> Iterator[None]:
        """Profiles every process of a Floki `server` while the block runs, if `phase` is one
        of the chosen phases; otherwise does nothing."""
        if phase not in self.phases or not isinstance(server, FlokiServer):
            yield
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = phase.lower().replace(" ", "-")
        spies: list[tuple[str, Path, subprocess.Popen]] = []
        for role, pid in sorted(server.profile_targets().items()):
            raw = self.out_dir / f"{stem}.{role}.raw.txt"
            proc = subprocess.Popen(
                [self.py_spy, "record", "--pid", str(pid), "--rate", str(self.rate_hz),
                 "--format", "raw", "--function", "--nonblocking", "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            spies.append((role, raw, proc))
        time.sleep(0.3)          # py-spy attaches before the phase starts
        started = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - started
            for _role, _raw, proc in spies:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)     # py-spy writes its output on SIGINT
            for role, raw, proc in spies:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if raw.exists():
                    text = summarize(raw.read_text().splitlines(), seconds, self.rate_hz)
                    path = self.out_dir / f"{stem}.{role}.summary.txt"
                    path.write_text(f"{phase}, {role}\n{text}")
                    self.summaries.append(path)
