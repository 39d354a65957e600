"""The benchmarks' one percentile: linear interpolation between the closest ranks (numpy's default)."""

from __future__ import annotations

import math

import pytest

from benchmarks.stats import percentile


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 10, 100], 90) == pytest.approx(82.0)  # 10 + 0.8 * 90
    assert percentile([1, 2, 3, 4, 5], 0) == 1 and percentile([1, 2, 3, 4, 5], 100) == 5
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1, 2], 101)
