"""Overlays: how a method draws a neuron's maps on its top images, through one hook.

The neuron page offers the heatmap and every registered method's overlays; these tests run
the same calls on a planted map (a bright square in one corner).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from neuroviz.methods import get_method, list_methods
from neuroviz.methods.base import HeatmapOverlay, Overlay
from neuroviz.methods.milan import MASK_LEVEL_APPROXIMATE, MASK_LEVEL_SKETCH, MilanConfig, spatial_quantile_threshold
from neuroviz.store import RunInfo

RUN = RunInfo("run", "m", "w", "layer", "mean", "ps", "prep", 3, "1", 40, 8, (8, 8), "conv")


def planted_maps(k: int = 3) -> np.ndarray:
    """k maps of 8 x 8: zero except a bright 2 x 2 square in the top-left corner."""
    maps = np.zeros((k, 8, 8), np.float32)
    maps[:, 1:3, 1:3] = np.arange(1, k + 1, dtype=np.float32)[:, None, None]
    return maps


def every_overlay() -> list[Overlay]:
    return [HeatmapOverlay()] + [o for m in list_methods() for o in m.overlays()]


def test_overlay_keys_are_unique_and_titled():
    keys = [o.key for o in every_overlay()]
    assert len(keys) == len(set(keys)) and "none" not in keys
    assert all(o.title for o in every_overlay())
    assert [o.key for o in get_method("dnd").overlays()] == ["crops"]
    assert [o.key for o in get_method("milan").overlays()] == ["masks"]
    assert get_method("clip_dissect").overlays() == []


@pytest.mark.parametrize("overlay", every_overlay(), ids=lambda o: o.key)
def test_every_overlay_draws_on_the_view(overlay):
    maps = planted_maps()
    settings = overlay.settings(maps, RUN, {})
    assert json.loads(json.dumps(settings)) == settings  # they key the cached pictures
    view = Image.new("RGB", (64, 64), (128, 128, 128))
    drawn = overlay.draw(view, maps[0], settings)
    assert drawn.size == view.size
    pixels = np.asarray(drawn, dtype=np.int16)
    corner, far = pixels[8:24, 8:24], pixels[48:, 48:]
    assert np.abs(corner - 128).sum() != np.abs(far - 128).sum(), "the planted square should look different"
    assert isinstance(overlay.caption(settings), str)


def test_milan_masks_use_the_labels_threshold_else_milans_rule():
    masks = get_method("milan").overlays()[0]
    maps = planted_maps()
    assert masks.settings(maps, RUN, {"mask_threshold": 0.25, "mask_level_source": MASK_LEVEL_SKETCH}) == {"threshold": 0.25}
    # a label from before the sketches names no source: its level was the top-k estimate
    assert masks.settings(maps, RUN, {"mask_threshold": 0.25}) == {"threshold": 0.25, "approximate": True}
    expected = spatial_quantile_threshold(maps, RUN.n_images, MilanConfig.mask_quantile)
    assert masks.settings(maps, RUN, {}) == {"threshold": expected, "approximate": True}  # no sketch: the estimate, said
    assert masks.settings(maps, RUN, {"map_level": 0.75}) == {"threshold": 0.75}  # the run's sketch
    assert masks.settings(maps, RUN, {"mask_threshold": 0.25, "mask_level_source": MASK_LEVEL_SKETCH, "map_level": 0.75}) == \
        {"threshold": 0.25}
    assert masks.settings(maps, RUN, {"mask_threshold": 0.25, "mask_level_source": MASK_LEVEL_APPROXIMATE}) == \
        {"threshold": 0.25, "approximate": True}
    assert "approximate" in masks.caption({"threshold": 0.5, "approximate": True})
    assert "approximate" not in masks.caption({"threshold": 0.5})
    assert "1%" in masks.caption({"threshold": 0.5})
    view = Image.new("RGB", (64, 64), (200, 200, 200))
    drawn = np.asarray(masks.draw(view, maps[0], {"threshold": 0.5}))
    assert drawn[60, 60].max() < 100 and drawn[16, 16].min() == 200  # dimmed outside the mask, kept inside


def test_dnd_crops_box_where_the_neuron_fired():
    crops = get_method("dnd").overlays()[0]
    view = Image.new("RGB", (64, 64), (0, 0, 0))
    drawn = np.asarray(crops.draw(view, planted_maps()[0], {}))
    lit = np.argwhere(drawn.any(axis=2))
    assert len(lit) and lit.max() < 32, "the box should surround the top-left square only"
