"""`python -m bench.run` (`make bench ARGS=...`): Floki against Redis Streams, one table.

Owns: the command line, the order of runs (each workload on a fresh server of each kind, in a
temp dir of its own), stopping every server whatever happens, and the outputs: the table and
the targets on stdout, raw figures as JSON and the chart as PNG under bench/results/.
Rules:
  1. Every server started is stopped in a `finally`, so failures, Ctrl-C (SIGINT) and SIGTERM
     or SIGHUP (turned into KeyboardInterrupt here) all leave nothing running.
  2. A workload that fails on one server is reported with its error; the others still run.
     Exit code: 0 when every workload ran and every delivery check held (speed never decides:
     `--quick` is a smoke run CI may execute), 1 otherwise, 130 on interruption.
  3. Temp dirs are removed after each workload (`--keep` keeps them for a post-mortem).
  4. `--repeat N` (default 3; 1 with --quick) runs each workload N times per server, the
     servers taking turns (Floki, Redis, Floki, ...) so that drift on the machine hits both; the
     table shows the median of each figure (stats.py rule 4) and the JSON keeps every run.
     The footprint workload runs once: each run stores 1 GiB per server (minutes), and its
     figures do not swing like the throughput ones do.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from bench import report, stats
from bench.servers import SERVER_KINDS, ensure_redis_server, make_server, redis_version
from bench.workloads import DURABLE_WORKLOADS, WORKLOADS, Context, Sizes, _no_phase, rows

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHECK_KEYS = ("exactly_once", "all_delivered")   # a False here is a failed run
SINGLE_RUN_WORKLOADS = frozenset({"footprint"})  # rule 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark Floki against Redis Streams (AOF) on this machine.")
    parser.add_argument("--quick", action="store_true",
                        help="~30 s smoke run of every workload with small sizes")
    parser.add_argument("--only", metavar="W,...",
                        help=f"workloads to run (default all): {','.join(WORKLOADS)}")
    parser.add_argument("--servers", default=",".join(SERVER_KINDS), metavar="S,...",
                        help="floki,redis (default both)")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="runs of each workload per server, median reported "
                             "(default 3, quick 1; footprint always runs once)")
    parser.add_argument("--shards", type=int, default=0,
                        help="Floki shard processes (default 0: one per CPU)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where the JSON and PNG go (default bench/results)")
    parser.add_argument("--tmp-dir", type=Path, default=None,
                        help="parent of the servers' temp dirs (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the servers' temp dirs")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--note", default="", help="free text stored in the JSON and chart")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record Floki's processes with py-spy during --profile-phases")
    parser.add_argument("--profile-phases", default="W1 produce,W2 fanout", metavar="P,...",
                        help='phases to profile (default "W1 produce,W2 fanout")')
    sizes = parser.add_argument_group("sizes (defaults: the issue's; --quick: small)")
    for f in fields(Sizes):
        sizes.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name,
                           type=float if f.type in ("float", float) else int, default=None,
                           help=f"default {getattr(Sizes(), f.name):,}, "
                                f"quick {getattr(Sizes.quick(), f.name):,}")
    return parser


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _split(text: str | None, allowed: Any, what: str) -> list[str]:
    if not text:
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(allowed)})")
    return items


def run_one(name: str, kind: str, ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """Runs workload `name` on a fresh server of `kind`. Returns its figures. The server is
    stopped and its temp dir removed (unless --keep) whatever happens."""
    directory = Path(tempfile.mkdtemp(prefix=f"floki-bench-{name}-{kind}-", dir=args.tmp_dir))
    server = make_server(kind, directory, durable=name in DURABLE_WORKLOADS, shards=args.shards)
    ctx.phases = {}
    try:
        server.start()
        result = WORKLOADS[name](server, ctx)
        result["phases"] = ctx.phases
        return result
    except BaseException:
        print(f"--- {server.label} log tail ---\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
        if args.keep:
            print(f"  kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = (Sizes.quick() if args.quick else Sizes()).with_overrides(vars(args))
    names = _split(args.only, WORKLOADS, "workload")
    kinds = _split(args.servers, SERVER_KINDS, "server")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    phase_hook = _no_phase
    profiler = None
    if args.profile:
        from bench.profile import Profiler
        phases = {p.strip() for p in args.profile_phases.split(",") if p.strip()}
        profiler = Profiler(args.profile, phases)
        phase_hook = profiler.during
    ctx = Context(sizes, report.make_progress(not args.no_progress), phase_hook)

    started = dt.datetime.now(dt.timezone.utc)
    document: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "note": args.note,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "loadavg_at_start": list(os.getloadavg())},
        "sizes": asdict(sizes), "shards": args.shards or os.cpu_count(), "repeat": repeat,
        "results": {}, "runs": {}, "errors": {},
    }
    if "redis" in kinds:
        document["machine"]["redis"] = redis_version(ensure_redis_server())
    results: dict[str, dict[str, Any]] = document["results"]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = document["runs"]
    errors: dict[str, dict[str, str]] = document["errors"]
    interrupted = False
    t0 = time.monotonic()
    try:
        for name in names:
            times = 1 if name in SINGLE_RUN_WORKLOADS else repeat
            for turn in range(times):
                for kind in kinds:             # servers take turns (rule 4)
                    print(f"{name} on {kind}" + (f" ({turn + 1} of {times})" if times > 1
                                                 else ""), file=sys.stderr, flush=True)
                    try:
                        run = run_one(name, kind, ctx, args)
                    except Exception as exc:   # noqa: BLE001 - reported; the other runs go on
                        traceback.print_exc()
                        errors.setdefault(name, {})[kind] = f"{type(exc).__name__}: {exc}"
                        continue
                    runs.setdefault(name, {}).setdefault(kind, []).append(run)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: every server was stopped; partial results follow",
              file=sys.stderr)
    for name, by_kind in runs.items():
        for kind, done in by_kind.items():
            if kind not in errors.get(name, {}):     # a failed run spoils its workload
                results.setdefault(name, {})[kind] = stats.median_of_runs(done)
    document["seconds"] = round(time.monotonic() - t0, 1)
    document["interrupted"] = interrupted

    table = [row for name in names if name in results
             for row in rows(name, results[name].get("floki"), results[name].get("redis"))]
    targets = stats.evaluate_targets(results)
    failed_checks = [f"{name}/{kind}: {key} is false"
                     for name, by_kind in results.items() for kind, r in by_kind.items()
                     for key in CHECK_KEYS if r.get(key) is False]
    document["rows"] = [r.to_json() for r in table]
    document["targets"] = [t.to_json() for t in targets]
    document["failed_checks"] = failed_checks

    stamp = started.strftime("%Y%m%d-%H%M%S")
    json_path = args.results_dir / f"{stamp}{'-quick' if args.quick else ''}.json"
    png_path = json_path.with_suffix(".png")
    title = (f"Floki vs Redis Streams {document['machine'].get('redis', '')} "
             f"({document['mode']} run, {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs)"
             + (f"\n{args.note}" if args.note else ""))
    chart_skipped = "--no-chart" if args.no_chart else report.write_chart(png_path, table, title)
    document["chart"] = None if chart_skipped else png_path.name
    report.write_json(json_path, document)

    print()
    print("\n".join(report.table_lines(table)))
    print()
    print("ratio = Floki / Redis Streams; Redis: appendonly yes, appendfsync everysec "
          "(always for the fsync-always row); Floki: fsync interval (always for that row)")
    if repeat > 1:
        print(f"each figure: the median of {repeat} runs per server, servers taking turns "
              f"(a latency max: the largest of them; footprint: one run)")
    print()
    print("Targets:")
    print("\n".join(report.target_lines(targets)))
    for name, by_kind in errors.items():
        for kind, message in by_kind.items():
            print(f"ERROR {name} on {kind}: {message}")
    for check in failed_checks:
        print(f"CHECK FAILED {check}")
    print()
    print(f"raw figures: {json_path}")
    print(f"chart: {png_path}" if not chart_skipped else f"chart skipped: {chart_skipped}")
    if profiler is not None:
        for path in profiler.summaries:
            print(f"profile: {path}")
    if interrupted:
        return 130
    return 1 if errors or failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
