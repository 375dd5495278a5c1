"""Uncertainty of test metrics: Wilson score intervals for proportions, spread over seeds.

A test accuracy on N samples is a proportion: one sample moves it by ``1/N``. The Wilson score
interval (Wilson, 1927) at confidence ``1 - a`` with ``z = Phi^-1(1 - a/2)``, ``p = k/N``::

    centre = (p + z^2 / 2N) / (1 + z^2 / N)
    half   = z / (1 + z^2 / N) * sqrt(p (1 - p) / N + z^2 / 4N^2)

stays inside [0, 1] and keeps its coverage near 0 and 1, where the normal (Wald) interval
collapses to a point.
"""
from __future__ import annotations

import math
import statistics

CONFIDENCE = 0.95
METHOD = "wilson"


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of the proportion ``successes / n``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n >= 1 (got {successes}, {n})")
    if not 0 < confidence < 1:
        raise ValueError(f"wilson_interval: confidence must lie in (0, 1), got {confidence}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no 1e-17 rounding
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def proportion_interval(fraction: float, n: int, confidence: float = CONFIDENCE) -> dict[str, float]:
    """``{"low", "high"}``: the Wilson interval of a fraction measured on ``n`` samples."""
    lo, hi = wilson_interval(round(fraction * n), n, confidence)
    return {"low": lo, "high": hi}


def spread(values: list[float]) -> dict[str, float | list[float]]:
    """Mean, sample standard deviation (n - 1; 0 for one value), min, max and the values."""
    if not values:
        raise ValueError("spread: no values")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values),
            "values": list(values)}


def seed_headline(seeds: dict) -> dict[str, float]:
    """``student_<metric>_mean`` and ``_std`` of every metric of ``metrics["student_seeds"]``."""
    return {f"student_{key}_{stat}": value[stat] for key, value in seeds.items()
            if isinstance(value, dict) and "mean" in value for stat in ("mean", "std")}
