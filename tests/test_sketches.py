"""Mergeable statistics: moments exact, KLL quantiles within their stated rank error, and
MILAN's mask level from the sketch on 20,000 generated images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from neuroviz.sketches import POOLED_K, SPATIAL_K, NeuronStats, rank_error


def _split_update(values: np.ndarray, maps: np.ndarray | None, pieces: int) -> NeuronStats:
    parts = []
    for rows in np.array_split(np.arange(len(values)), pieces):
        part = NeuronStats(values.shape[1], spatial=maps is not None)
        for batch in np.array_split(rows, 3):
            part.update(values[batch], None if maps is None else maps[batch])
        parts.append(NeuronStats.from_arrays(part.to_arrays()))  # through serialisation, as shards are
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    return merged


def test_merged_moments_and_small_quantiles_are_exact():
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 3.0, size=(400, 5)).astype(np.float32)
    maps = rng.normal(size=(400, 5, 2, 2)).astype(np.float32)
    stats = _split_update(values, maps, 4)
    assert stats.count == 400 and stats.cells == 400 * 4
    np.testing.assert_allclose(stats.mean, values.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, values.astype(np.float64).std(0), rtol=1e-10)
    np.testing.assert_array_equal(stats.lo, values.min(0))
    np.testing.assert_array_equal(stats.hi, values.max(0))
    # fewer values than k: the sketch holds them all, so quantiles are np.quantile's exactly
    np.testing.assert_allclose(stats.quantiles([0.99, 0.995]), np.quantile(values, [0.99, 0.995], axis=0), rtol=1e-6)
    cells = np.sort(maps.transpose(1, 0, 2, 3).reshape(5, -1), axis=1)[:, ::-1]
    m = math.ceil(0.01 * cells.shape[1])
    np.testing.assert_array_equal(stats.spatial_level(0.99), cells[:, m - 1])


def test_merging_spatial_into_plain_statistics_is_refused():
    a, b = NeuronStats(2, spatial=True), NeuronStats(2, spatial=False)
    a.update(np.ones((3, 2), np.float32), np.ones((3, 2, 2, 2), np.float32))
    b.update(np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="spatial"):
        a.merge(b)


@pytest.mark.parametrize("k", [POOLED_K, SPATIAL_K])
def test_kll_rank_error_is_within_its_bound_after_merging(k):
    """2,000,000 values per neuron in 8 merged parts: the rank of the sketch's q99 and q995 in
    the true data is off by less than KLL's stated normalised rank error."""
    rng = np.random.default_rng(1)
    values = np.maximum(rng.normal(size=(2_000_000, 3)), 0).astype(np.float32) * np.array([1, 5, 0.1], np.float32)
    values[:, 2] += rng.exponential(size=2_000_000).astype(np.float32)
    parts = []
    for rows in np.array_split(values, 8):
        part = NeuronStats(3, spatial=False, pooled_k=k)
        part.update(rows)
        parts.append(part)
    for part in parts[1:]:
        parts[0].merge(part)
    estimate = parts[0].quantiles([0.99, 0.995])
    sorted_values = np.sort(values, axis=0)
    worst = 0.0
    for qi, q in enumerate((0.99, 0.995)):
        for n in range(3):
            lo = np.searchsorted(sorted_values[:, n], estimate[qi, n], side="left") / len(values)
            hi = np.searchsorted(sorted_values[:, n], estimate[qi, n], side="right") / len(values)
            worst = max(worst, 0.0 if lo <= q <= hi else min(abs(lo - q), abs(hi - q)))
    assert worst <= rank_error(k)
    print(f"k={k}: measured rank error {worst:.5f}, KLL bound {rank_error(k):.5f}")


class _TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.slow
def test_mask_level_from_the_sketch_on_20000_images(tmp_path):
    """MILAN's mask level at 20,000 images: within 2 % of the exact level over all maps (the
    top-k estimate of before collapses), and exemplar masks cover what the exact level gives."""
    from PIL import Image

    from neuroviz import extract
    from neuroviz.datasets import ProbeImage, ProbeSet
    from neuroviz.hooks import LayerRecorder
    from neuroviz.methods.milan import spatial_quantile_threshold
    from neuroviz.models import Preprocessing, ProbedModel
    from neuroviz.shards import path_loader
    from neuroviz.store import Store

    n_images, side = 20_000, 12
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    images = []
    for i in range(n_images):
        pixels = (rng.uniform(0, 1, (side, side, 3)) ** rng.uniform(0.3, 3.0) * 255).astype(np.uint8)
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels).save(path)
        images.append(ProbeImage(f"gen{i:05d}", str(path)))
    ps = ProbeSet("generated-20k", str(folder), images)
    model = ProbedModel("custom:test-tiny-conv", _TinyConv().eval(), Preprocessing(image_size=side, resize_size=side))
    store = Store(tmp_path / "cache")
    (run,) = extract.extract(model, ps, ["conv"], store, k=20, batch_size=500, chunk_size=5000, shard_size=5000)

    maps = []
    with torch.inference_mode(), LayerRecorder(model.module, ["conv"]) as rec:
        for batch in path_loader([im.path for im in images], model.transform, batch_size=1000):
            model.module(batch)
            maps.append(rec.outputs["conv"].numpy().copy())
    cells = np.concatenate(maps).transpose(1, 0, 2, 3).reshape(4, -1)
    m = math.ceil(0.01 * cells.shape[1])
    exact = -np.partition(-cells, m - 1, axis=1)[:, m - 1]
    levels = store.mask_levels(run.run_key, 0.99)
    assert levels is not None
    relative = np.abs(levels - exact) / np.abs(exact)
    print(f"mask levels: sketch {levels}, exact {exact}, relative error {relative}")
    assert (relative < 0.02).all()
    for n in range(4):
        top = store.top_maps(run.run_key, n)
        old = spatial_quantile_threshold(top, run.n_images, 0.99)
        assert old < 0.95 * exact[n]  # the estimate from the top-k maps alone is far too low at this scale
        covered_sketch = (top > levels[n]).mean()
        covered_exact = (top > exact[n]).mean()
        assert abs(covered_sketch - covered_exact) < 0.05
        assert covered_exact < 0.95  # a mask, not the whole exemplar


def test_sampled_cells_do_not_depend_on_batching_and_cover_every_cell():
    from neuroviz.sketches import CELLS_PER_IMAGE, sampled_cells

    rng = np.random.default_rng(2)
    maps = rng.normal(size=(48, 3, 16, 16)).astype(np.float32)
    whole = sampled_cells(maps, 100)
    parts = np.concatenate([sampled_cells(maps[:20], 100), sampled_cells(maps[20:], 120)])
    np.testing.assert_array_equal(whole, parts)
    assert whole.shape == (48 * CELLS_PER_IMAGE, 3)
    ids = np.arange(16 * 16, dtype=np.float32).reshape(1, 1, 16, 16).repeat(16, axis=0)
    counts = np.bincount(sampled_cells(ids, 0)[:, 0].astype(int), minlength=256)
    assert (counts == 16 * CELLS_PER_IMAGE // 256).all()  # each cell equally often


def test_memory_mapped_batches_are_taken(tmp_path):
    """A run's activations are memory-mapped: statistics over them equal those of the same array in memory."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=(200, 4)).astype(np.float32)  # under k values: both sketches are exact
    maps = rng.normal(size=(200, 4, 3, 3)).astype(np.float32)
    np.save(tmp_path / "acts.npy", values)
    np.save(tmp_path / "maps.npy", maps)
    mapped = NeuronStats(4, spatial=True)
    mapped.update(np.load(tmp_path / "acts.npy", mmap_mode="r"), np.load(tmp_path / "maps.npy", mmap_mode="r"))
    plain = NeuronStats(4, spatial=True)
    plain.update(values, maps)
    np.testing.assert_array_equal(mapped.quantiles([0.5, 0.99]), plain.quantiles([0.5, 0.99]))
    np.testing.assert_array_equal(mapped.spatial_level(0.99), plain.spatial_level(0.99))
