"""Wilson intervals against published values and the quadratic they solve; spread over seeds."""
from __future__ import annotations

import math
import statistics

import pytest

from kdflow.metrics.intervals import proportion_interval, spread, wilson_interval

Z95 = 1.959963984540054


def quadratic_roots(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson bounds are the proportions pi with |k/n - pi| = z sqrt(pi (1 - pi) / n):
    the roots of (1 + z^2/n) pi^2 - (2p + z^2/n) pi + p^2 = 0."""
    p = k / n
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


def test_published_values() -> None:
    # 5 of 10 and 0 of 10 at 95%: the textbook Wilson intervals (0.2366, 0.7634) and (0, 0.2775)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)


@pytest.mark.parametrize("k,n", [(1, 7), (81, 263), (350, 360), (359, 360), (180, 360), (3, 1000)])
def test_matches_the_quadratic_it_solves(k: int, n: int) -> None:
    lo, hi = wilson_interval(k, n)
    assert (lo, hi) == pytest.approx(quadratic_roots(k, n), abs=1e-12)
    assert lo < k / n < hi  # not the normal interval: asymmetric near 1
    assert hi - k / n != pytest.approx(k / n - lo, abs=1e-6) or k * 2 == n


def test_confidence_and_size_move_the_width() -> None:
    w = {c: wilson_interval(30, 40, c) for c in (0.8, 0.95, 0.99)}
    assert w[0.8][1] - w[0.8][0] < w[0.95][1] - w[0.95][0] < w[0.99][1] - w[0.99][0]
    small, big = wilson_interval(9, 10), wilson_interval(900, 1000)
    assert big[1] - big[0] < small[1] - small[0]


def test_proportion_interval_recovers_the_count_from_a_float_accuracy() -> None:
    acc = 331 / 360
    assert proportion_interval(acc, 360) == dict(zip(("low", "high"), wilson_interval(331, 360)))


def test_bad_counts_are_refused() -> None:
    for k, n in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)


def test_spread_is_the_sample_statistics() -> None:
    values = [0.91, 0.95, 0.93, 0.90]
    out = spread(values)
    assert out["mean"] == pytest.approx(statistics.fmean(values))
    assert out["std"] == pytest.approx(math.sqrt(sum((v - 0.9225) ** 2 for v in values) / 3))  # n - 1
    assert (out["min"], out["max"], out["values"]) == (0.90, 0.95, values)
    assert spread([0.5])["std"] == 0.0
