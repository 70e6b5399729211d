"""Summary statistics for timed runs and proportions: percentiles, spread, Wilson intervals, paired accuracy.

Pure Python (no numpy) so the report can be rebuilt anywhere. Percentiles use
linear interpolation between order statistics (numpy's default, type 7): with
N = 5 runs p99 sits between the two slowest runs, so the report states N.

Paired accuracy (two systems on the same items; ``paired``): the 2x2 table of right/wrong pairs, the exact
McNemar test, a 95 % interval of the difference by Newcombe's hybrid score method (method 10 of Newcombe 1998,
"Improved confidence intervals for the difference between binomial proportions based on paired data", Stat Med
17:2635), and the smallest difference the sample can detect (Connor 1987's sample-size formula for McNemar's
test, solved for the difference at the measured discordance).
"""

from __future__ import annotations

import math
import statistics

Z95 = statistics.NormalDist().inv_cdf(0.975)  # 1.959963984540054


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


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
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


def paired_difference_ci(both: int, gained: int, lost: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """95 % interval (by default) of the paired difference (gained - lost) / n, Newcombe's method 10.

    The table: ``both`` items right for both systems, ``gained`` right only for the new one, ``lost`` right only
    for the baseline, ``neither`` right for neither. The new system's accuracy p1 = (both + gained) / n and the
    baseline's p2 = (both + lost) / n each get a Wilson interval [l1, u1], [l2, u2]; their distances to the
    estimates are combined with the correlation phi of the paired outcomes (phi = (A - n/2) / sqrt(product of the
    margins) when A = both * neither - gained * lost exceeds n/2, 0 when 0 <= A <= n/2, A / sqrt(...) when A < 0;
    0 when a margin is empty):
    lower = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2),
    upper = d + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2).
    Unlike the Wald interval it does not collapse to a point when no pair is discordant."""
    n = both + gained + lost + neither
    if n <= 0:
        return -1.0, 1.0
    p1, p2 = (both + gained) / n, (both + lost) / n
    l1, u1 = wilson(both + gained, n, z)
    l2, u2 = wilson(both + lost, n, z)
    margins = (both + gained) * (lost + neither) * (both + lost) * (gained + neither)
    a = both * neither - gained * lost
    phi = 0.0 if margins == 0 else ((a - n / 2) if a > n / 2 else (a if a < 0 else 0.0)) / math.sqrt(margins)
    d = p1 - p2
    lower = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = d + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def mcnemar_mdd(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest paired difference |p_gained - p_lost| that ``n`` pairs detect with ``power`` at two-sided
    ``alpha`` by McNemar's test, when a share ``discordance`` of the pairs is discordant.

    Connor (1987), "Sample size for testing differences in proportions for the paired-sample design", Biometrics
    43:207: n = (z_a sqrt(psi) + z_b sqrt(psi - delta^2))^2 / delta^2 with psi the discordance, z_a the
    1 - alpha/2 and z_b the ``power`` quantile of the normal; solved here for delta by bisection. None when no
    difference up to psi (all discordant pairs one way) is detectable, or when nothing is discordant."""
    if n <= 0 or discordance <= 0:
        return None
    za, zb = statistics.NormalDist().inv_cdf(1 - alpha / 2), statistics.NormalDist().inv_cdf(power)
    psi = min(float(discordance), 1.0)

    def gap(delta: float) -> float:  # increasing in delta; its root is the answer
        return delta * math.sqrt(n) - za * math.sqrt(psi) - zb * math.sqrt(max(psi - delta * delta, 0.0))

    if gap(psi) < 0:
        return None
    lo, hi = 0.0, psi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return hi


def paired(both: int, gained: int, lost: int, neither: int, resolve: float = 0.01) -> dict:
    """Every paired figure of the report from the 2x2 table (see ``paired_difference_ci`` for its cells):
    n, gained, lost, diff = (gained - lost) / n with its 95 % interval (``diff_ci``, Newcombe), the exact McNemar
    p, ``discordance`` = (gained + lost) / n, ``mdd`` (``mcnemar_mdd`` at that discordance, 80 % power, alpha 0.05)
    and ``resolves`` (whether a difference of ``resolve``, 1 point, is at least the mdd)."""
    n = both + gained + lost + neither
    disc = (gained + lost) / n if n else None
    mdd = mcnemar_mdd(n, disc) if disc else None
    return {"n": n, "gained": gained, "lost": lost, "both_right": both, "both_wrong": neither,
            "diff": (gained - lost) / n if n else None,
            "diff_ci": list(paired_difference_ci(both, gained, lost, neither)) if n else None,
            "diff_ci_method": "Newcombe hybrid score (method 10)", "mcnemar_p": mcnemar(gained, lost),
            "discordance": disc, "mdd": mdd, "resolves": None if mdd is None else mdd <= resolve + 1e-12}


def reduction(value: float | None, baseline: float | None) -> float | None:
    """Fractional reduction of ``value`` against ``baseline`` (0.647 = 64.7 % less); None when unknown."""
    if value is None or not baseline:
        return None
    return 1.0 - value / baseline
