"""The workloads: each one drives a started server (Floki or Redis, the same way) and returns
its raw figures; `rows` turns a workload's figures on both servers into table rows.

Owns: W1 produce, W2 fanout, W3 latency, W4 large, W5 many queues, footprint + restart, the
sizes they use (`Sizes`, with the defaults of the issue and the `--quick` ones), and what each
reports.
Rules:
  1. A workload sets up its queues and channels first (a new channel or group sees only what is
     pushed after it), then runs its timed phases through loadgen.run_jobs; set-up is not timed.
  2. Rates are measured from the moment every job is connected (the go signal) to the end of
     the last job, in the jobs' own monotonic clocks.
  3. Whatever must hold besides speed is checked and reported (every message delivered exactly
     once per channel, every ack counted); a failed check is in the figures, never hidden.
"""
from __future__ import annotations

import contextlib
import time
from array import array
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from bench import loadgen, stats
from bench.loadgen import (ConsumeJob, Connection, LatencyConsumeJob, PacedProduceJob,
                           ProduceJob, encode_command)
from bench.servers import FlokiServer, _Server

KIB = 1024
MIB = 1024 * 1024
CHANNELS = ("ch1", "ch2")
# Creates in flight during set-up. A Floki shard runs a whole pipelined burst of creates (each
# fsyncs its files) in one loop pass without answering heartbeats: 512 at once kept both shards
# silent past shard_timeout (2 s) on a loaded machine and the frontend declared them down.
SETUP_PIPELINE = 16


@dataclass(frozen=True)
class Sizes:
    """Every size and count the workloads use (command-line flags of the same names)."""
    body_size: int = 100
    batch: int = 100
    depth: int = 8                       # batches (or gets) in flight per connection
    w1_messages: int = 1_000_000
    w1_always_messages: int = 1_000_000  # W1 again with fsync always / appendfsync always
    w2_messages: int = 500_000
    w3_rate: float = 5000.0
    w3_seconds: float = 10.0
    w3_warmup_seconds: float = 1.0
    w3_block_ms: int = 1000
    w4_messages: int = 20_000
    w4_body_size: int = 64 * KIB
    w4_batch: int = 10
    w4_depth: int = 4
    w5_queues: int = 1000
    w5_messages_per_queue: int = 200
    footprint_messages: int = 5_000_000
    restart_bytes: int = 1024 * MIB

    @classmethod
    def quick(cls) -> "Sizes":
        """Returns sizes for a ~30 s smoke run of everything (speed is not judged)."""
        return cls(w1_messages=20_000, w1_always_messages=5_000, w2_messages=10_000,
                   w3_seconds=1.0, w3_warmup_seconds=0.2, w3_block_ms=200,
                   w4_messages=300, w5_queues=50, w5_messages_per_queue=100,
                   footprint_messages=50_000, restart_bytes=10 * MIB)

    def with_overrides(self, overrides: dict[str, Any]) -> "Sizes":
        """Returns a copy with the given (not None) fields replaced."""
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items()
                                if k in names and v is not None})


ProgressFactory = Callable[[str, int, str], ContextManager[Callable[[int], None]]]
PhaseHook = Callable[[_Server, str], ContextManager[None]]


@dataclass
class Context:
    """What a workload gets besides its server: sizes, a progress bar maker, a phase hook
    (profiling wraps timed phases through it) and the phase log: per timed phase its seconds
    and the CPU seconds each server process and the load generator used (the runner stores
    it with the workload's figures)."""
    sizes: Sizes
    progress: ProgressFactory
    phase: PhaseHook
    phases: dict[str, Any] = field(default_factory=dict)


def _no_phase(server: _Server, name: str) -> ContextManager[None]:
    return contextlib.nullcontext()


def setup(server: _Server, queues: list[str], channels: tuple[str, ...]) -> None:
    """Creates `queues`, each with `channels` (pipelined). Raises loadgen.ServerError."""
    dialect = loadgen.DIALECTS[server.kind]
    conn = server.connect()
    try:
        cmds = [c for q in queues for c in dialect.create_commands(q, channels)]
        for start in range(0, len(cmds), SETUP_PIPELINE):
            chunk = cmds[start:start + SETUP_PIPELINE]
            conn.send(b"".join(chunk))
            for _ in chunk:
                reply = conn.next_reply()
                if reply != b"OK":
                    raise loadgen.ServerError(f"create answered {reply!r}")
    finally:
        conn.close()


def _run_timed(ctx: Context, server: _Server, phase: str, jobs: list, total: int,
               unit: str = "msg") -> tuple[float, list[dict]]:
    """Runs `jobs` under a progress bar and the phase hook. Returns (elapsed_s, results)."""
    with ctx.phase(server, phase), ctx.progress(f"{server.kind:5} {phase}", total, unit) as bar:
        cpu_before = server.cpu_seconds()
        go_ns, results = loadgen.run_jobs(jobs, progress=bar)
        cpu_after = server.cpu_seconds()
    elapsed = (max(r["end_ns"] for r in results) - go_ns) / 1e9
    ctx.phases[phase] = {
        "seconds": round(elapsed, 3),
        "server_cpu_s": {role: round(cpu_after[role] - cpu_before[role], 2)
                         for role in cpu_after if role in cpu_before},
        "loadgen_cpu_s": round(sum(r["cpu_s"] for r in results), 2)}
    return elapsed, results


def _produce(ctx: Context, server: _Server, phase: str, queues: list[str], per_queue: int,
             body_size: int, batch: int, depth: int) -> dict[str, float]:
    job = ProduceJob(server.host, server.port, server.kind, queues, per_queue, body_size,
                     batch, depth)
    elapsed, (result,) = _run_timed(ctx, server, phase, [job], per_queue * len(queues))
    return {"messages": result["messages"], "seconds": elapsed,
            "msgs_per_s": stats.rate_per_s(result["messages"], elapsed),
            "mb_per_s": stats.rate_per_s(result["bytes"], elapsed) / MIB}


def _consume(ctx: Context, server: _Server, phase: str, queues: list[str], per_queue: int,
             channels: tuple[str, ...], count: int, depth: int) -> dict[str, Any]:
    jobs = [ConsumeJob(server.host, server.port, server.kind, queues, ch, per_queue, count,
                       depth) for ch in channels]
    total = per_queue * len(queues) * len(channels)
    elapsed, results = _run_timed(ctx, server, phase, jobs, total)
    delivered = sum(r["delivered"] for r in results)
    expected = per_queue * len(queues)
    exactly_once = all(r["delivered"] == expected and r["unique"] == expected
                       and r["duplicates"] == 0 and r["short_queues"] == 0 for r in results)
    return {"delivered": delivered, "acked": sum(r["acked"] for r in results),
            "seconds": elapsed, "msgs_per_s": stats.rate_per_s(delivered, elapsed),
            "mb_per_s": stats.rate_per_s(sum(r["bytes"] for r in results), elapsed) / MIB,
            "exactly_once": exactly_once and sum(r["acked"] for r in results) == delivered,
            "per_channel": [{k: r[k] for k in ("delivered", "acked", "unique", "duplicates")}
                            for r in results]}


# --- the workloads ---------------------------------------------------------------------------

def w1_produce(server: _Server, ctx: Context, messages: int | None = None) -> dict[str, Any]:
    """W1: `w1_messages` x body_size into one queue, batches of `batch`. msgs/s, MB/s."""
    s = ctx.sizes
    setup(server, ["w1"], CHANNELS[:1])
    return _produce(ctx, server, "W1 produce", ["w1"], messages or s.w1_messages, s.body_size,
                    s.batch, s.depth)


def w1_produce_always(server: _Server, ctx: Context) -> dict[str, Any]:
    """W1 on a server started with fsync = "always" / appendfsync always."""
    return w1_produce(server, ctx, ctx.sizes.w1_always_messages)


def w2_fanout(server: _Server, ctx: Context) -> dict[str, Any]:
    """W2: `w2_messages` stored, then two channels consume and ack all of it at once.
    Delivered+acked msgs/s over both channels; each channel must get every id exactly once."""
    s = ctx.sizes
    setup(server, ["w2"], CHANNELS)
    produced = _produce(ctx, server, "W2 store", ["w2"], s.w2_messages, s.body_size, s.batch,
                        s.depth)
    consumed = _consume(ctx, server, "W2 fanout", ["w2"], s.w2_messages, CHANNELS, s.batch,
                        s.depth)
    return {**consumed, "produce_msgs_per_s": produced["msgs_per_s"]}


def w3_latency(server: _Server, ctx: Context) -> dict[str, Any]:
    """W3: a producer at a fixed rate (one message per command), a long-polling consumer per
    channel (two); end-to-end latency p50/p99/p99.9/max of the messages sent after warm-up."""
    s = ctx.sizes
    setup(server, ["w3"], CHANNELS)
    seconds = s.w3_warmup_seconds + s.w3_seconds
    jobs: list[Any] = [PacedProduceJob(server.host, server.port, server.kind, "w3", s.w3_rate,
                                       seconds, s.body_size)]
    jobs += [LatencyConsumeJob(server.host, server.port, server.kind, "w3", ch, s.batch,
                               s.w3_block_ms, int(s.w3_warmup_seconds * 1e9), max_wait_s=10.0)
             for ch in CHANNELS]
    total = int(s.w3_rate * seconds) * (1 + len(CHANNELS))
    _elapsed, results = _run_timed(ctx, server, "W3 latency", jobs, total)
    producer, consumers = results[0], results[1:]
    samples = array("q")
    for r in consumers:
        samples.frombytes(r["latencies_us"])
    summary = stats.latency_summary_ms(samples)
    return {**summary, "sent": producer["messages"],
            "producer_behind_max_ms": producer["behind_max_ms"],
            "delivered": [r["delivered"] for r in consumers],
            "all_delivered": all(r["delivered"] == producer["messages"] for r in consumers)}


def w4_large(server: _Server, ctx: Context) -> dict[str, Any]:
    """W4: `w4_messages` x `w4_body_size` produced, then consumed and acked by one channel."""
    s = ctx.sizes
    setup(server, ["w4"], CHANNELS[:1])
    produced = _produce(ctx, server, "W4 produce", ["w4"], s.w4_messages, s.w4_body_size,
                        s.w4_batch, s.w4_depth)
    consumed = _consume(ctx, server, "W4 consume", ["w4"], s.w4_messages, CHANNELS[:1],
                        s.w4_batch, s.w4_depth)
    return {"produce_mb_per_s": produced["mb_per_s"], "produce_seconds": produced["seconds"],
            "consume_mb_per_s": consumed["mb_per_s"], "consume_seconds": consumed["seconds"],
            "exactly_once": consumed["exactly_once"]}


def w5_many_queues(server: _Server, ctx: Context) -> dict[str, Any]:
    """W5: `w5_queues` queues x 2 channels: produce across all (round-robin batches), then both
    channels consume and ack across all. msgs/s of each phase."""
    s = ctx.sizes
    queues = [f"w5.{i:05d}" for i in range(s.w5_queues)]
    setup(server, queues, CHANNELS)
    produced = _produce(ctx, server, "W5 produce", queues, s.w5_messages_per_queue,
                        s.body_size, s.batch, s.depth)
    consumed = _consume(ctx, server, "W5 consume", queues, s.w5_messages_per_queue, CHANNELS,
                        s.batch, s.depth)
    return {"produce_msgs_per_s": produced["msgs_per_s"],
            "consume_msgs_per_s": consumed["msgs_per_s"],
            "exactly_once": consumed["exactly_once"]}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _first_get(server: _Server, timeout_s: float) -> float:
    """Polls until a get on the restart queue returns a message. Returns when it did
    (time.monotonic()). Raises TimeoutError."""
    dialect = loadgen.DIALECTS[server.kind]
    get_cmd = dialect.get_command("restart", CHANNELS[0], 1, None)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            conn = Connection(server.host, server.port, connect_timeout_s=1.0)
        except OSError:
            time.sleep(0.002)
            continue
        try:
            while time.monotonic() < deadline:
                try:
                    if dialect.parse_get(conn.call(get_cmd)):
                        return time.monotonic()
                except loadgen.ServerError:
                    pass               # loading / shard unavailable: not yet
                time.sleep(0.002)
        except OSError:
            pass                       # the server dropped the connection while starting
        finally:
            conn.close()
    raise TimeoutError(f"no successful get within {timeout_s} s")


def footprint(server: _Server, ctx: Context) -> dict[str, Any]:
    """Footprint: RSS with `footprint_messages` x body_size stored in one queue (one channel,
    nothing read); then more until `restart_bytes` are stored, kill -9 of every process, start
    again on the same files and time start -> first successful get."""
    s = ctx.sizes
    setup(server, ["restart"], CHANNELS[:1])
    stored = _produce(ctx, server, "store (RSS)", ["restart"], s.footprint_messages,
                      s.body_size, s.batch, s.depth)
    time.sleep(2.0)    # let a maintenance pass and an fsync interval run before measuring
    rss = server.rss_bytes()
    shard_rss = [v for k, v in rss.items() if k.startswith("shard")]
    out: dict[str, Any] = {"stored_messages": s.footprint_messages, "rss_bytes": rss,
                           "store_msgs_per_s": stored["msgs_per_s"]}
    if shard_rss:
        out["shard_rss_max_bytes"] = max(shard_rss)
    out["server_rss_mb"] = (max(shard_rss) if shard_rss else sum(rss.values())) / MIB
    more = max(0, s.restart_bytes // s.body_size - s.footprint_messages)
    if more:
        _produce(ctx, server, "store (restart)", ["restart"], more, s.body_size, s.batch,
                 s.depth)
    out["restart_stored_bytes"] = (s.footprint_messages + more) * s.body_size
    if isinstance(server, FlokiServer):
        out["disk_bytes"] = _dir_bytes(server.data_dir)
    else:
        out["disk_bytes"] = _dir_bytes(server.dir) - server.log_path.stat().st_size
    server.kill9()
    started = time.monotonic()
    server.launch()
    out["restart_s"] = _first_get(server, timeout_s=120.0) - started
    return out


WORKLOADS: dict[str, Callable[[_Server, Context], dict[str, Any]]] = {
    "w1_produce": w1_produce,
    "w2_fanout": w2_fanout,
    "w3_latency": w3_latency,
    "w4_large": w4_large,
    "w5_many_queues": w5_many_queues,
    "w1_produce_always": w1_produce_always,
    "footprint": footprint,
}
DURABLE_WORKLOADS = frozenset({"w1_produce_always"})   # run with fsync/appendfsync always


def rows(workload: str, floki: dict | None, redis: dict | None) -> list[stats.Row]:
    """Returns the table rows of one workload's figures (None: that server did not run it)."""
    def row(name: str, metric: str, key: str, unit: str, higher: bool = True,
            scale: float = 1.0) -> stats.Row:
        def pick(result: dict | None) -> float | None:
            value = result.get(key) if result else None
            return None if value is None else value * scale
        return stats.Row(name, metric, unit, pick(floki), pick(redis), higher)

    if workload == "w1_produce":
        return [row("W1 produce", "throughput", "msgs_per_s", "msgs/s"),
                row("W1 produce", "throughput", "mb_per_s", "MB/s")]
    if workload == "w1_produce_always":
        return [row("W1 produce, fsync always", "throughput", "msgs_per_s", "msgs/s")]
    if workload == "w2_fanout":
        return [row("W2 fanout, 2 channels", "delivered+acked", "msgs_per_s", "msgs/s")]
    if workload == "w3_latency":
        return [row("W3 latency", p, f"{p}_ms", "ms", higher=False)
                for p in ("p50", "p99", "p999", "max")]
    if workload == "w4_large":
        return [row("W4 large, produce", "throughput", "produce_mb_per_s", "MB/s"),
                row("W4 large, consume", "throughput", "consume_mb_per_s", "MB/s")]
    if workload == "w5_many_queues":
        return [row("W5 many queues, produce", "throughput", "produce_msgs_per_s", "msgs/s"),
                row("W5 many queues, consume", "delivered+acked", "consume_msgs_per_s",
                    "msgs/s")]
    if workload == "footprint":
        return [row("Footprint", "RSS (largest shard)", "server_rss_mb", "MB", higher=False),
                row("Footprint", "on disk", "disk_bytes", "MB", higher=False, scale=1 / MIB),
                row("Restart after kill -9", "to first get", "restart_s", "s", higher=False)]
    raise KeyError(workload)


@contextlib.contextmanager
def quiet_progress(label: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """A progress factory that shows nothing (tests, non-interactive use)."""
    yield lambda n: None
