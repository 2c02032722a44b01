"""What the runner shows and writes: progress bars, the table, the targets, JSON, the PNG.

Owns: presentation only; every figure comes from the workloads and stats.py.
Rules:
  1. The PNG is optional: without matplotlib the table and the JSON are still written and the
     runner says the chart was skipped. tqdm is optional too (a plain bar replaces it).
  2. Progress goes to stderr and only when stderr is a terminal, so a log or CI keeps just the
     one-line summary of each phase.
  3. Output files are named by the run's start time (UTC) under the results directory.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from bench.stats import Row, Target, Verdict

HEADERS = ("workload", "metric", "unit", "Floki", "Redis Streams", "ratio", "better")


# --- progress --------------------------------------------------------------------------------

class _PlainBar:
    """A one-line bar redrawn with \\r, for when tqdm is not installed."""

    WIDTH = 30

    def __init__(self, label: str, total: int, unit: str):
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.started = time.monotonic()

    def update(self, done: int) -> None:
        share = min(done / self.total, 1.0)
        filled = int(share * self.WIDTH)
        rate = done / max(time.monotonic() - self.started, 1e-9)
        sys.stderr.write(f"\r{self.label:28} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                         f"{share:4.0%} {done:,}/{self.total:,} {self.unit} {rate:,.0f}/s ")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def make_progress(enabled: bool) -> Callable[[str, int, str], Any]:
    """Returns a progress factory: `with factory(label, total, unit) as update: update(done)`.
    Every phase also logs one summary line to stderr when it ends."""
    interactive = enabled and sys.stderr.isatty()
    try:
        import tqdm as tqdm_mod
    except ImportError:
        tqdm_mod = None

    @contextlib.contextmanager
    def factory(label: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        started = time.monotonic()
        last = [0]
        if interactive and tqdm_mod is not None:
            bar = tqdm_mod.tqdm(total=total, desc=label, unit=unit, unit_scale=True,
                                leave=False, file=sys.stderr, dynamic_ncols=True)

            def update(done: int) -> None:
                bar.update(done - last[0])
                last[0] = done
            try:
                yield update
            finally:
                bar.close()
        elif interactive:
            plain = _PlainBar(label, total, unit)

            def update(done: int) -> None:
                last[0] = done
                plain.update(done)
            try:
                yield update
            finally:
                plain.close()
        else:
            def update(done: int) -> None:
                last[0] = done
            yield update
        elapsed = time.monotonic() - started
        print(f"  {label}: {last[0]:,} {unit} in {elapsed:.1f} s", file=sys.stderr, flush=True)

    return factory


# --- table -----------------------------------------------------------------------------------

def format_number(value: float | None) -> str:
    """Returns `value` for the table: thousands separators from 1000, 3 significant digits
    below (0.0123, 1.23, 12.3, 123), "-" for None."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value == 0:
        return "0"
    return f"{value:.3g}"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_lines(rows: Sequence[Row]) -> list[str]:
    """Returns the table as aligned text lines (header, rule, one line per row)."""
    cells = [HEADERS] + [(r.workload, r.metric, r.unit, format_number(r.floki),
                          format_number(r.redis), format_ratio(r.ratio),
                          "higher" if r.higher_is_better else "lower") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    numeric = {3, 4, 5}

    def line(cell: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cell, widths))).rstrip()
    return [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(c) for c in cells[1:]]


def target_lines(targets: Sequence[Target]) -> list[str]:
    """Returns one line per target: verdict, name, goal, measured value."""
    width = max((len(t.name) for t in targets), default=0)
    return [f"{t.verdict.value:4}  {t.name:{width}}  {t.goal}  (measured {t.measured})"
            for t in targets]


# --- files -----------------------------------------------------------------------------------

def write_json(path: Path, document: dict[str, Any]) -> None:
    """Writes `document` as indented JSON (creating the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=False, default=str) + "\n")


def write_chart(path: Path, rows: Sequence[Row], title: str) -> str | None:
    """Draws the table as a PNG: one bar per row, Floki relative to Redis (log scale; right of
    the 1.0 line is better for "higher" rows, left for "lower" ones). Returns None if written,
    else the reason it was skipped (matplotlib missing, nothing to draw)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    drawn = [r for r in rows if r.ratio is not None and r.ratio > 0]
    if not drawn:
        return "no row has both figures"
    labels = [f"{r.workload}: {r.metric} ({r.unit}, {'higher' if r.higher_is_better else 'lower'}"
              f" is better)" for r in drawn]
    ratios = [r.ratio for r in drawn]
    good = [(x >= 1.0) == r.higher_is_better for x, r in zip(ratios, drawn)]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(drawn) + 1.6))
    y = list(range(len(drawn)))[::-1]
    ax.barh(y, ratios, color=["#3a8f4f" if g else "#c0504d" for g in good])
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    for yi, r in zip(y, drawn):
        ax.text(r.ratio, yi, f" {r.ratio:.2f}x  (Floki {format_number(r.floki)} / "
                f"Redis {format_number(r.redis)})", va="center", fontsize=7)
    ax.set_xlabel("Floki / Redis Streams (log scale)")
    ax.set_title(title, fontsize=10)
    lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
    ax.set_xlim(lo / 2, hi * 40)   # room for the value labels
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def verdict_counts(targets: Sequence[Target]) -> dict[str, int]:
    return {v.value: sum(1 for t in targets if t.verdict is v) for v in Verdict}
