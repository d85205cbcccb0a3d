import math

import numpy as np
import pytest
from scipy.stats import binomtest

from ssb.stats import (
    bootstrap_mean_interval,
    mcnemar_exact,
    paired_bootstrap_diff,
    wilson_interval,
)


def test_wilson_zero_of_ten():
    # p = 0: centre = (z^2/2n) / (1 + z^2/n), half = (z/(1+z^2/n)) * sqrt(z^2/4n^2)
    #        = (z^2/2n) / (1 + z^2/n), so low = 0 and high = (z^2/n) / (1 + z^2/n).
    z2 = 1.96**2
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx((z2 / 10) / (1 + z2 / 10), abs=1e-12)
    assert high == pytest.approx(0.27754, abs=1e-5)


def test_wilson_five_of_ten_is_symmetric_around_one_half():
    # p = 1/2: centre = 1/2; half = (z/(1+z^2/n)) * sqrt(1/(4n) + z^2/(4n^2)).
    z, n = 1.96, 10
    half = (z / (1 + z * z / n)) * math.sqrt(0.25 / n + z * z / (4 * n * n))
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.5 - half, abs=1e-12)
    assert high == pytest.approx(0.5 + half, abs=1e-12)
    assert (low, high) == pytest.approx((0.23659, 0.76341), abs=1e-5)


def test_wilson_ten_of_ten_mirrors_zero_of_ten():
    low0, high0 = wilson_interval(0, 10)
    low, high = wilson_interval(10, 10)
    assert high == 1.0
    assert low == pytest.approx(1 - high0, abs=1e-12)


def test_wilson_degenerate_and_bad_inputs():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(-1, 2)


@pytest.mark.parametrize("wins,losses", [(0, 1), (1, 0), (3, 7), (7, 3), (5, 5), (0, 12), (2, 9)])
def test_mcnemar_matches_scipy_binomtest(wins, losses):
    expected = binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(wins, losses) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_known_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(4, 4) == 1.0
    # 0 of 5 discordant pairs: 2 * (1/2)^5
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_bootstrap_mean_interval_contains_mean_and_is_reproducible():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 17, size=80) / 16  # avg@16 fractions
    low, high = bootstrap_mean_interval(values, seed=3)
    assert low <= values.mean() <= high
    assert (low, high) == bootstrap_mean_interval(values, seed=3)
    other = bootstrap_mean_interval(values, n_resamples=500, seed=4)
    assert other != (low, high)
    assert other == pytest.approx((low, high), abs=0.03)
    # Roughly mean +- 1.96 standard errors.
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_bootstrap_of_a_constant_is_a_point():
    assert bootstrap_mean_interval([0.5] * 10) == (0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_mean_interval([])


def test_paired_bootstrap_diff_contains_true_difference():
    # Model a is right on problems 0..59, b on problems 0..39 plus noise-free ties elsewhere:
    # the true mean difference on these 100 problems is 0.2.
    a = np.array([1.0] * 60 + [0.0] * 40)
    b = np.array([1.0] * 40 + [0.0] * 60)
    diff, low, high = paired_bootstrap_diff(a, b, seed=0)
    assert diff == pytest.approx(0.2)
    assert low < 0.2 < high
    assert low > 0  # 20 wins, 0 losses: clearly positive
    assert (diff, low, high) == paired_bootstrap_diff(a, b, seed=0)


def test_paired_bootstrap_keeps_pairs_together():
    # Identical scores: every resampled difference is exactly 0, however unequal the problems.
    a = np.linspace(0, 1, 50)
    assert paired_bootstrap_diff(a, a.copy()) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1, 0], [1])
