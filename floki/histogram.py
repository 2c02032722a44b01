"""Histogram: fixed-bucket counts of durations, shared by both sides of the wire.

Owns: counting observations into fixed buckets and the JSON form a shard sends them in (STATS).
The shard times its fsyncs with one, the frontend its commands; the frontend renders both in
Prometheus' text format (floki/frontend/metrics.py).
Rules:
  1. observe() is the hot path: one bisect, one list increment, one float add. Nothing is
     allocated and nothing is cumulative there; Prometheus' cumulative `le` buckets are made
     when the histogram is read.
  2. A bucket counts values <= its upper bound (Prometheus' `le`); the last bucket (+Inf)
     counts the rest, so every observation lands in exactly one bucket.
  3. Counts only grow during the life of the process that holds the histogram.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any, Sequence


class Histogram:
    """Counts of observed values per bucket, plus their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(b >= c for b, c in zip(bounds, bounds[1:])) or not all(
                math.isfinite(b) for b in bounds):
            raise ValueError(f"histogram bounds must be finite and ascending: {bounds!r}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)      # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """Returns [(upper bound, observations <= it), ...] ending with (inf, count)."""
        total = 0
        out = []
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            total += count
            out.append((bound, total))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_dict(cls, data: Any) -> "Histogram":
        """Returns the histogram `to_dict` described. Raises ValueError if `data` is not one."""
        try:
            histogram = cls(data["bounds"])
            counts = [int(c) for c in data["counts"]]
            total = float(data["sum"])
        except (TypeError, KeyError) as exc:
            raise ValueError(f"not a histogram: {exc!r}") from None
        if len(counts) != len(histogram.counts) or min(counts) < 0:
            raise ValueError("histogram counts do not match its bounds")
        histogram.counts = counts
        histogram.sum = total
        return histogram
