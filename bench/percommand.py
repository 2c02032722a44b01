"""`python -m bench.percommand`: the CPU one lone command costs each server, thread by thread.

Owns: sending one command at a time (no pipelining, the next only after the reply) to a fresh
server of each kind, and reading how much CPU every thread of the server used for them, from
/proc (psutil). Unlike `bench.run`'s throughput figures, this isolates the fixed cost of a
command, what W3 (one message per RPUSH, long polls answered one by one) pays most.
Rules:
  1. The same client, commands and servers as `bench.run` (bench/servers.py, loadgen.py).
  2. CPU is read per thread, named as the OS names it (/proc/PID/task/TID/comm), so ZeroMQ's
     I/O threads and Redis's own threads show apart from the main threads.
  3. Probes: PING (Floki's frontend answers it alone), one push of one message, and one get of
     one message followed by its ack (two commands, reported per pair).
  4. Every server started is stopped in a `finally`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.loadgen import DIALECTS, encode_command, make_body
from bench.servers import SERVER_KINDS, FlokiServer, RedisServer, _Server
from bench.workloads import setup

QUEUE = "percommand"
CHANNEL = "c0"
BODY_BYTES = 100
WARMUP = 200


@dataclass
class Probe:
    """One probe's figures on one server: per command (per pair for get+ack)."""
    name: str
    server: str
    count: int
    round_trip_us: float
    client_us: float
    threads_us: dict[str, float] = field(default_factory=dict)   # "role/thread" -> CPU us

    @property
    def server_us(self) -> float:
        return sum(self.threads_us.values())


def thread_cpu(server: _Server) -> dict[str, float]:
    """Returns {"role/thread name": CPU seconds so far} over every thread of the server
    (threads of one name in one process are added up)."""
    out: dict[str, float] = {}
    for role, pid in server.profile_targets().items():
        try:
            threads = psutil.Process(pid).threads()
        except psutil.Error:
            continue
        for thread in threads:
            try:
                name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                continue   # the thread ended
            key = f"{role}/{name}"
            out[key] = out.get(key, 0.0) + thread.user_time + thread.system_time
    return out


def _client_cpu() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def measure(server: _Server, count: int) -> list[Probe]:
    """Runs the three probes (rule 3) `count` times each on a started server."""
    dialect = DIALECTS[server.kind]
    setup(server, [QUEUE], (CHANNEL,))
    push, _ = dialect.push_batch(QUEUE, [make_body(BODY_BYTES)])
    get = dialect.get_command(QUEUE, CHANNEL, 1, None)
    conn = server.connect()
    probes = []
    try:
        def timed(name: str, step, reps: int) -> None:
            for _ in range(min(WARMUP, reps)):
                step()
            cpu0, client0, t0 = thread_cpu(server), _client_cpu(), time.perf_counter()
            for _ in range(reps):
                step()
            elapsed, client1, cpu1 = time.perf_counter() - t0, _client_cpu(), thread_cpu(server)
            threads = {k: (v - cpu0.get(k, 0.0)) / reps * 1e6 for k, v in cpu1.items()}
            probes.append(Probe(name, server.kind, reps, elapsed / reps * 1e6,
                                (client1 - client0) / reps * 1e6,
                                {k: v for k, v in threads.items() if v > 0.0}))

        ping = encode_command("PING")
        timed("PING", lambda: conn.call(ping), count)
        # The pushes also store what the get+ack probe reads (warm-up included).
        timed("push one", lambda: dialect.check_push(conn.call(push), 1), count + WARMUP)

        def get_and_ack() -> None:
            deliveries = dialect.parse_get(conn.call(get))
            if len(deliveries) != 1:
                raise RuntimeError(f"a get of one returned {len(deliveries)} messages")
            conn.call(dialect.ack_command(QUEUE, CHANNEL, [deliveries[0].token]))
        timed("get one + ack", get_and_ack, count)
    finally:
        conn.close()
    return probes


def format_table(probes: list[Probe]) -> str:
    """One line per probe and server, then its threads that used at least 1 us each."""
    lines = [f"{'probe':14} {'server':6} {'round trip':>11} {'server CPU':>11} "
             f"{'client CPU':>11}   (microseconds per command; per pair for get + ack)"]
    for p in probes:
        lines.append(f"{p.name:14} {p.server:6} {p.round_trip_us:11.0f} {p.server_us:11.0f} "
                     f"{p.client_us:11.0f}")
        parts = [f"{k} {v:.0f}" for k, v in sorted(p.threads_us.items()) if v >= 1.0]
        if parts:
            lines.append(" " * 22 + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.percommand", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(SERVER_KINDS), metavar="S,...")
    parser.add_argument("--count", type=int, default=10_000,
                        help="commands per probe (default 10000)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.servers.split(",") if k]
    unknown = set(kinds) - set(SERVER_KINDS)
    if unknown or args.count < 1:
        parser.error(f"unknown server(s) {sorted(unknown)}" if unknown else "--count >= 1")
    probes: list[Probe] = []
    for kind in kinds:
        directory = Path(tempfile.mkdtemp(prefix=f"floki-percommand-{kind}-"))
        server: _Server | None = None
        try:
            server = FlokiServer(directory) if kind == "floki" else RedisServer(directory)
            server.start()
            probes += measure(server, args.count)
        finally:
            if server is not None:
                server.stop()
            shutil.rmtree(directory, ignore_errors=True)
    print(format_table(probes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
