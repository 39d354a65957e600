"""The one percentile the benchmarks report (``statistics.quantiles``, inclusive method: linear interpolation
between the closest ranks, numpy's default)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0 <= q <= 100) of `values`; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    data = sorted(values)
    if not data:
        return float("nan")
    if len(data) == 1 or q == 0:
        return data[0]
    if q == 100:
        return data[-1]
    cuts = statistics.quantiles(data, n=1000, method="inclusive")
    return cuts[round(q * 10) - 1]
