"""Confidence intervals and agreement: the statistics of studies and of automatic evaluation.

Study results use Wilson intervals for win rates, Student-t intervals for mean ratings and
Fleiss' kappa for agreement; :mod:`neuroviz.evaluate` uses the same mean and standard error
for scores averaged over neurons.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np


def _z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion: unlike p +- z*se it stays inside [0, 1] and
    behaves for small n and proportions near 0 or 1 (Wilson 1927; Newcombe 1998)."""
    if n <= 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_sem(values: Sequence[float] | np.ndarray) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample sd / sqrt n); None where undefined
    (no values; one value for the standard error)."""
    data = np.asarray(values)
    if not len(data):
        return None, None
    sem = float(data.std(ddof=1) / math.sqrt(len(data))) if len(data) > 1 else None
    return float(data.mean()), sem


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """Mean with a Student-t confidence interval; (None, None, None) without data."""
    mean, sem = mean_sem(values)
    if mean is None or sem is None:
        return mean, None, None
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * sem
    return mean, mean - half, mean + half


def fleiss_kappa(counts: np.ndarray | Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa of a subjects x categories matrix of rater counts.

    Rows may have different numbers of raters (each row's agreement uses its own n_i; rows
    with fewer than 2 raters are ignored); with equal n it is Fleiss (1971) exactly.
    Returns NaN when chance agreement is 1 (everyone always used one category).
    """
    table = np.asarray(counts, dtype=float)
    if table.ndim != 2:
        raise ValueError("fleiss_kappa needs a 2-D subjects x categories table of counts.")
    n_i = table.sum(axis=1)
    table, n_i = table[n_i >= 2], n_i[n_i >= 2]
    if len(table) == 0:
        return float("nan")
    agreement = ((table * table).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_bar = float(agreement.mean())
    p_j = table.sum(axis=0) / n_i.sum()
    p_e = float((p_j * p_j).sum())
    if p_e >= 1.0 - 1e-12:
        return float("nan")
    return (p_bar - p_e) / (1 - p_e)
