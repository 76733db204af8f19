"""What the pages compute from activation columns, without sorting them: the same quantiles,
rank bins and lowest images as a full sort gives, and two neurons' correlation."""

from __future__ import annotations

import numpy as np

from neuroviz.neuron_activations import QUANTILE_EDGES, compare, distribution


def _ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def test_distribution_matches_a_full_sort():
    values = np.random.default_rng(1).normal(size=10_001).astype(np.float32)  # no ties
    got = distribution(values, seed=4)
    ranks, n = _ranks(values), len(values)
    assert got.n_images == n
    np.testing.assert_allclose(list(got.quantiles.values()), np.quantile(values, QUANTILE_EDGES))
    assert [(b.low, b.high) for b in got.bins] == list(zip(QUANTILE_EDGES[:-1], QUANTILE_EDGES[1:]))
    for b in got.bins:  # each sample lies in its bin by rank, lowest first, and the values are its own
        assert len(b.samples) == 6 and len(set(b.samples)) == 6
        assert all(int(b.low * n) <= ranks[i] < max(int(b.low * n) + 1, int(b.high * n)) for i in b.samples)
        assert list(b.values) == sorted(b.values) == [float(values[i]) for i in b.samples]
    assert list(got.lowest) == np.argsort(values, kind="stable")[:8].tolist()
    assert distribution(values, seed=4) == got  # deterministic
    assert distribution(values, seed=5).bins != got.bins


def test_distribution_of_a_relu_column_still_fills_its_lower_bins():
    values = np.maximum(np.random.default_rng(2).normal(size=4000), 0).astype(np.float32)  # about half are 0
    got = distribution(values)
    lower = [b for b in got.bins if b.high <= 0.25]
    assert lower and all(len(b.samples) == 6 and set(b.values) == {0.0} for b in lower)
    assert set(got.lowest_values) == {0.0} and len(got.lowest) == 8
    assert got.bins[-1].values[-1] <= float(values.max())


def test_distribution_of_tiny_and_empty_columns():
    got = distribution(np.array([3.0, 1.0, 2.0], dtype=np.float32))
    assert got.lowest == (1, 2, 0) and all(b.samples for b in got.bins)
    assert distribution(np.zeros(0, dtype=np.float32)).bins == ()


def test_compare_two_columns():
    rng = np.random.default_rng(3)
    a = rng.normal(size=20_000).astype(np.float32)
    b = (a + rng.normal(size=a.shape)).astype(np.float32)
    top_a, top_b = np.argsort(-a)[:50], np.argsort(-b)[:50]
    pair = compare(a, b, top_a, top_b, max_points=1000)
    assert abs(pair.correlation - float(np.corrcoef(a, b)[0, 1])) < 1e-6
    assert pair.shared_top == len(set(top_a.tolist()) & set(top_b.tolist()))
    assert set(top_a.tolist()) | set(top_b.tolist()) <= set(pair.points.tolist())  # the plot keeps both top lists
    assert len(pair.points) <= 1000 and len(np.unique(pair.points)) == len(pair.points)
    small = compare(a[:300], b[:300], top_a[:0], top_b[:0], max_points=1000)
    assert small.points.tolist() == list(range(300))
    assert compare(np.ones(10), b[:10], [], []).correlation is None  # a constant neuron has no correlation
