"""floki/histogram.py: fixed buckets, Prometheus' `le` semantics, the JSON form shards send."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floki.histogram import Histogram

BOUNDS = (0.001, 0.01, 0.1, 1.0)


def test_a_value_equal_to_a_bound_counts_in_that_bucket_and_above_the_last_in_inf():
    histogram = Histogram(BOUNDS)
    for value in (0.0, 0.001, 0.0011, 0.1, 1.0, 1.5, 1e9):
        histogram.observe(value)
    assert histogram.counts == [2, 1, 1, 1, 2]
    assert histogram.cumulative() == [(0.001, 2), (0.01, 3), (0.1, 4), (1.0, 5), (math.inf, 7)]
    assert histogram.count == 7
    assert histogram.sum == pytest.approx(0.0011 + 0.001 + 0.1 + 1.0 + 1.5 + 1e9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=50))
def test_cumulative_counts_are_the_values_at_or_below_each_bound(values):
    histogram = Histogram(BOUNDS)
    for value in values:
        histogram.observe(value)
    for bound, count in histogram.cumulative():
        assert count == sum(1 for v in values if v <= bound)
    assert histogram.sum == pytest.approx(sum(values))


def test_round_trips_through_its_dict_and_rejects_what_is_not_one():
    histogram = Histogram(BOUNDS)
    histogram.observe(0.05)
    again = Histogram.from_dict(histogram.to_dict())
    assert (again.bounds, again.counts, again.sum) == (BOUNDS, [0, 0, 1, 0, 0], 0.05)
    for bad in (None, [], {"bounds": BOUNDS}, {"bounds": BOUNDS, "counts": [1], "sum": 0},
                {"bounds": BOUNDS, "counts": [0, 0, -1, 0, 0], "sum": 0},
                {"bounds": [1.0, 0.5], "counts": [0, 0, 0], "sum": 0},
                {"bounds": BOUNDS, "counts": [0, 0, "x", 0, 0], "sum": 0}):
        with pytest.raises(ValueError):
            Histogram.from_dict(bad)


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0), (1.0, math.inf)])
def test_bounds_must_be_finite_and_ascending(bounds):
    with pytest.raises(ValueError):
        Histogram(bounds)
