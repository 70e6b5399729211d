"""Summary statistics for timed runs and proportions: percentiles, spread, Wilson intervals.

Pure Python (no numpy) so the report can be rebuilt anywhere. Percentiles use
linear interpolation between order statistics (numpy's default, type 7): with
N = 5 runs p99 sits between the two slowest runs, so the report states N.
"""

from __future__ import annotations

import math
import statistics


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict:
    """n, mean, stdev (sample), cv, min, p50, p90, p99, max of ``values``."""
    xs = [float(v) for v in values]
    if not xs:
        return {"n": 0}
    mean = statistics.fmean(xs)
    stdev = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {
        "n": len(xs), "mean": mean, "stdev": stdev, "cv": stdev / mean if mean else 0.0,
        "min": min(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
        "p99": percentile(xs, 99), "max": max(xs),
    }


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95 % by default); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value for paired outcomes: ``gained`` items only the new system got right,
    ``lost`` items only the baseline got right (a binomial test of the discordant pairs against 1/2)."""
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def reduction(value: float | None, baseline: float | None) -> float | None:
    """Fractional reduction of ``value`` against ``baseline`` (0.647 = 64.7 % less); None when unknown."""
    if value is None or not baseline:
        return None
    return 1.0 - value / baseline
