"""Percentile summaries used by the benchmark tool, against numpy's definition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from text_generation_benchmark.stats import Summary, percentile

values = st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=50)


@given(values, st.sampled_from([0, 1, 50, 90, 99, 100]))
def test_percentile_matches_numpy_linear_interpolation(xs, q):
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9, abs=1e-6)


def test_summary_of_nothing_is_none_and_of_values_is_ordered():
    assert Summary.of([]) is None
    s = Summary.of([4.0, 1.0, 3.0, 2.0])
    assert (s.n, s.min, s.max, s.mean) == (4, 1.0, 4.0, 2.5)
    assert s.p50 == 2.5 and s.min <= s.p50 <= s.p90 <= s.p99 <= s.max


def test_percentile_rejects_out_of_range_q():
    with pytest.raises(ValueError, match="0-100"):
        percentile([1.0], 101)
