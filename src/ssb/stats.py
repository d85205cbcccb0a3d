"""Confidence intervals and paired tests for benchmark scores (pure numpy/scipy, no I/O).

Conventions:

* Greedy pass@1 is a proportion: use :func:`wilson_interval` (well behaved at 0/n and n/n, where
  the normal approximation collapses to a zero-width interval).
* avg@k gives each problem a value in [0, 1] (its fraction of k samples that are correct); the
  problems are the unit of resampling, so :func:`bootstrap_mean_interval` resamples problems.
* Comparing two models on the same problems is a paired design: :func:`mcnemar_exact` tests the
  discordant pairs (greedy), :func:`paired_bootstrap_diff` resamples problems jointly, keeping
  each problem's two scores together.

Every resampling function takes a ``seed`` and is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _sps

# Resamples are drawn in blocks of this many, so memory stays O(block * n) for large n.
_BLOCK = 256


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    ``z = 1.96`` gives a 95% interval. For ``n == 0`` there is no information: (0.0, 1.0).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low, high = centre - half, centre + half
    # Exact ends at 0/n and n/n (the formula gives them up to rounding).
    if successes == 0:
        low = 0.0
    if successes == n:
        high = 1.0
    return max(0.0, low), min(1.0, high)


def _as_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _bootstrap_means(values: np.ndarray, n_resamples: int, seed: int | None) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement) of ``values``."""
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be > 0, got {n_resamples}")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, _BLOCK):
        stop = min(start + _BLOCK, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def _percentile_interval(means: np.ndarray, alpha: float) -> tuple[float, float]:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_mean_interval(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = 2000,
    seed: int | None = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` interval for the mean of ``values``.

    For avg@k pass one value per problem (its fraction correct over its k samples): the problems
    are resampled, which is the right unit (samples of one problem are not independent).
    """
    arr = _as_array(values, "values")
    return _percentile_interval(_bootstrap_means(arr, n_resamples, seed), alpha)


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs of a paired binary comparison.

    ``wins``: problems model A got right and B wrong; ``losses``: the reverse. Under the null each
    discordant pair is a fair coin, so this is the two-sided binomial test of ``wins`` out of
    ``wins + losses`` at p = 1/2 (the same number as ``scipy.stats.binomtest``). With no
    discordant pairs there is no evidence either way: p = 1.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be >= 0, got {wins}, {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    # Symmetric null: P(X <= k) + P(X >= n - k) = 2 * P(X <= k), capped at 1 (k == n / 2).
    return float(min(1.0, 2.0 * _sps.binom.cdf(k, n, 0.5)))


def paired_bootstrap_diff(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 2000,
    seed: int | None = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its percentile bootstrap ``1 - alpha`` interval.

    ``a[i]`` and ``b[i]`` are two models' scores on the same problem ``i`` (0/1 for greedy, the
    fraction correct for avg@k); problems are resampled jointly, so the pairing is kept.
    Returns ``(mean_diff, low, high)``.
    """
    arr_a = _as_array(a, "a")
    arr_b = _as_array(b, "b")
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"a and b must have the same length, got {arr_a.size} and {arr_b.size}")
    diff = arr_a - arr_b
    low, high = _percentile_interval(_bootstrap_means(diff, n_resamples, seed), alpha)
    return float(diff.mean()), low, high
