"""The arithmetic of the benchmark: rates, percentiles, ratios and the issue's targets.

Owns: pure functions from raw figures to what the table and the JSON show. No I/O.
Rules:
  1. Percentiles use the nearest-rank method (the smallest sample with at least p% of the
     samples at or below it), so p100 is the max and every reported value is a real sample.
  2. A ratio is Floki / Redis for every metric; `higher_is_better` says how to read it. A ratio
     whose Redis figure is zero or missing is None (shown as "-"), never a division error.
  3. A target is PASS or MISS from the figures of this one run; SKIP when a workload it needs
     did not run (or failed).
  4. A workload run several times (`--repeat`) is judged by the median of each figure over its
     runs, as the issue's own reference figures were ("median of 3"): one run on a small, noisy
     machine moves by a third. Two exceptions keep it strict: a latency max is the largest of
     every run, and a delivery check holds only if it held in every run.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Sequence

MIB = 1024 * 1024


def rate_per_s(amount: float, elapsed_s: float) -> float:
    """Returns amount / elapsed_s. Raises ValueError for a non-positive duration."""
    if elapsed_s <= 0:
        raise ValueError(f"elapsed time must be positive, got {elapsed_s}")
    return amount / elapsed_s


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Returns the nearest-rank p-th percentile (0 < p <= 100) of ascending `sorted_values`.
    Raises ValueError if there are none or p is out of range."""
    if not sorted_values:
        raise ValueError("no samples")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    # round() first: 99.9/100*1000 is 999.0000000000001 in floating point, which ceil would
    # turn into rank 1000.
    rank = math.ceil(round(p / 100 * len(sorted_values), 9))
    return sorted_values[max(rank, 1) - 1]


def latency_summary_ms(samples_us: Sequence[int]) -> dict[str, float]:
    """Returns {"count", "p50_ms", "p99_ms", "p999_ms", "max_ms"} of microsecond samples.
    Raises ValueError if there are none."""
    ordered = sorted(samples_us)
    return {"count": len(ordered),
            "p50_ms": percentile(ordered, 50) / 1000,
            "p99_ms": percentile(ordered, 99) / 1000,
            "p999_ms": percentile(ordered, 99.9) / 1000,
            "max_ms": ordered[-1] / 1000}


def median_of_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Returns one workload's figures from its repeated runs (rule 4): numbers are the median
    over the runs that have them (keys ending in "max_ms": the largest), booleans hold only if
    they held in every run, anything else (phases, lists) comes from the first run. Raises
    ValueError if there are no runs."""
    if not runs:
        raise ValueError("no runs")
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for run in runs for k in run):
        values = [run[key] for run in runs if key in run]
        if all(isinstance(v, bool) for v in values):
            merged[key] = all(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = max(values) if key.endswith("max_ms") else statistics.median(values)
        else:
            merged[key] = values[0]
    return merged


def ratio(floki: float | None, redis: float | None) -> float | None:
    """Returns floki / redis, or None if either is missing or redis is zero."""
    if floki is None or redis is None or redis == 0:
        return None
    return floki / redis


@dataclass(frozen=True)
class Row:
    """One line of the table: a metric measured on both servers."""
    workload: str
    metric: str
    unit: str
    floki: float | None
    redis: float | None
    higher_is_better: bool

    @property
    def ratio(self) -> float | None:
        return ratio(self.floki, self.redis)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


class Verdict(Enum):
    PASS = "PASS"
    MISS = "MISS"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Target:
    """One target of the issue, judged on this run's figures."""
    name: str
    goal: str            # what must hold, in words
    measured: str        # what was measured, in words
    verdict: Verdict

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "goal": self.goal, "measured": self.measured,
                "verdict": self.verdict.value}


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratio_target(name: str, value: float | None, at_least: float | None = None,
                 at_most: float | None = None, what: str = "Floki/Redis") -> Target:
    """Returns a Target that passes when `value` >= at_least (or <= at_most); SKIP when
    `value` is None."""
    goal = f"{what} >= {at_least:g}x" if at_least is not None else f"{what} <= {at_most:g}x"
    if value is None:
        return Target(name, goal, "not measured", Verdict.SKIP)
    ok = value >= at_least if at_least is not None else value <= at_most
    return Target(name, goal, _fmt_ratio(value), Verdict.PASS if ok else Verdict.MISS)


def limit_target(name: str, value: float | None, limit: float, unit: str,
                 what: str) -> Target:
    """Returns a Target that passes when `value` <= `limit`; SKIP when `value` is None."""
    goal = f"{what} <= {limit:g} {unit}"
    if value is None:
        return Target(name, goal, "not measured", Verdict.SKIP)
    return Target(name, goal, f"{value:.3g} {unit}",
                  Verdict.PASS if value <= limit else Verdict.MISS)


def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    """Returns the issue's targets judged on `results` ({workload: {"floki": {...},
    "redis": {...}}}, as the workloads return them; a missing workload means SKIP)."""
    def get(workload: str, kind: str, key: str) -> float | None:
        value = results.get(workload, {}).get(kind, {})
        return value.get(key) if isinstance(value, dict) else None

    def pair_ratio(workload: str, key: str) -> float | None:
        return ratio(get(workload, "floki", key), get(workload, "redis", key))

    w3_p99 = pair_ratio("w3_latency", "p99_ms")
    w3_max = get("w3_latency", "floki", "max_ms")
    w5 = get("w5_many_queues", "floki", "produce_msgs_per_s")
    w1 = get("w1_produce", "floki", "msgs_per_s")
    w5_share = w5 / w1 if w5 is not None and w1 else None
    rss = get("footprint", "floki", "shard_rss_max_bytes")
    w2 = ratio_target("W2 fanout", pair_ratio("w2_fanout", "msgs_per_s"), 1.0)
    if get("w2_fanout", "floki", "exactly_once") is False:
        w2 = Target(w2.name, w2.goal + ", every id exactly once per channel",
                    w2.measured + ", delivery check FAILED", Verdict.MISS)
    return [
        ratio_target("W1 produce (everysec)", pair_ratio("w1_produce", "msgs_per_s"), 1.0),
        w2,
        ratio_target("W4 large, produce", pair_ratio("w4_large", "produce_mb_per_s"), 1.0),
        ratio_target("W4 large, consume", pair_ratio("w4_large", "consume_mb_per_s"), 1.0),
        ratio_target("W3 latency p99", w3_p99, at_most=2.0),
        limit_target("W3 latency max", w3_max, 50.0, "ms", "Floki's slowest sample"),
        ratio_target("W1 produce (fsync always)",
                     pair_ratio("w1_produce_always", "msgs_per_s"), 1.0),
        ratio_target("W5 many queues", w5_share, 0.8, what="Floki W5 / Floki W1 msgs/s"),
        limit_target("Shard RSS", None if rss is None else rss / MIB, 200.0, "MB",
                     "largest shard RSS with the footprint set stored"),
        limit_target("Restart after kill -9", get("footprint", "floki", "restart_s"), 2.0, "s",
                     "start to first successful HMGET"),
    ]
