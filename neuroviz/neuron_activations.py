"""What the pages show of neurons' activation columns: one neuron's distribution (quantiles,
sample images across it, its lowest images) and two neurons against each other.

A column holds one value per probe image, 100,000 or more at paper scale. The pages need a few
order statistics of it, not its order, so nothing here sorts a whole column:
``np.argpartition`` puts every bin edge at its rank in linear time (a stable sort of 100,000
values costs 7-70 ms, the partition 1-7 ms), and the top images come from the run's stored
top-k table. Bins are by rank, as a sort would cut them (images tied at a bin edge may fall on
either side), so a layer after a ReLU, whose lower half is all zeros, still has images in each
of its lower bins. Samples are drawn from a bin's members in image order with a seeded
generator, so they do not depend on how the partition left them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

QUANTILE_EDGES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
SAMPLES_PER_BIN = 6
LOWEST = 8
SCATTER_POINTS = 5_000  # points of a two-neuron scatter plot (beyond this a browser chart only slows down)


@dataclass(frozen=True)
class QuantileBin:
    """The images whose activation ranks between two quantiles, as a few samples."""

    low: float  # quantile where the bin starts (0..1)
    high: float  # quantile where it ends
    samples: tuple[int, ...]  # image indices, lowest activation first
    values: tuple[float, ...]  # their activations


@dataclass(frozen=True)
class Distribution:
    """One neuron's activations over the probe set, summarised for the neuron page."""

    n_images: int
    quantiles: dict[float, float]  # each of QUANTILE_EDGES -> np.quantile's (linear) value; q0 = min, q1 = max
    bins: tuple[QuantileBin, ...]
    lowest: tuple[int, ...]  # image indices of the lowest activations, lowest first
    lowest_values: tuple[float, ...]


def _by_value(idxs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``idxs`` ordered by their value, ties by index."""
    return idxs[np.lexsort((idxs, values[idxs]))]


def distribution(column: np.ndarray, seed: int = 0, edges: Sequence[float] = QUANTILE_EDGES,
                 per_bin: int = SAMPLES_PER_BIN, lowest: int = LOWEST) -> Distribution:
    """Quantiles of ``column`` (one activation per image), up to ``per_bin`` random images from
    each bin between consecutive ``edges`` (by rank) and the ``lowest`` images, in linear time."""
    values = np.asarray(column, dtype=np.float32)
    n = len(values)
    if n == 0:
        return Distribution(0, {}, (), (), ())
    starts = [int(lo * n) for lo in edges[:-1]]
    stops = [min(n, max(a + 1, int(hi * n))) for a, hi in zip(starts, edges[1:])]
    n_low = min(lowest, n)
    kth = sorted({p for p in [*starts, *(b - 1 for b in stops), n_low - 1] if 0 <= p < n})
    order = np.argpartition(values, kth)  # every position in kth holds the value of that rank
    quantiles = dict(zip(edges, (float(q) for q in np.quantile(values, list(edges)))))
    rng = np.random.default_rng(seed)
    bins = []
    for lo, hi, a, b in zip(edges[:-1], edges[1:], starts, stops):
        members = np.sort(order[a:b])
        if len(members) == 0:
            continue
        pick = _by_value(rng.choice(members, size=min(per_bin, len(members)), replace=False), values)
        bins.append(QuantileBin(float(lo), float(hi), tuple(int(i) for i in pick), tuple(float(values[i]) for i in pick)))
    low = _by_value(order[:n_low], values)
    return Distribution(n, quantiles, tuple(bins), tuple(int(i) for i in low), tuple(float(values[i]) for i in low))


@dataclass(frozen=True)
class Pair:
    """Two neurons over the same probe images: how alike they respond, and points to plot."""

    correlation: float | None  # Pearson r; None when either neuron is constant
    shared_top: int  # images in both neurons' top lists
    points: np.ndarray  # image indices to plot (all of them, or a sample that keeps both top lists)


def compare(a: np.ndarray, b: np.ndarray, top_a: Sequence[int], top_b: Sequence[int],
            max_points: int = SCATTER_POINTS, seed: int = 0) -> Pair:
    """Correlate two activation columns; ``top_a``/``top_b`` are their stored top-k images.

    The scatter keeps every image up to ``max_points``, else a seeded sample of them plus both
    top lists (the corner a reader looks at)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    r = float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else None
    shared = len({int(i) for i in top_a} & {int(i) for i in top_b})
    if len(a) <= max_points:
        points = np.arange(len(a))
    else:
        tops = np.unique(np.asarray([*top_a, *top_b], dtype=np.int64))
        sample = np.random.default_rng(seed).choice(len(a), size=max(0, max_points - len(tops)), replace=False)
        points = np.union1d(sample, tops)
    return Pair(r, shared, points)
