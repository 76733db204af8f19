"""Cached pictures: thumbnails warmed ahead of time are what mosaics are pasted from."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from neuroviz import images


def test_warmed_thumbnails_serve_mosaics_without_decoding_originals(tmp_path, monkeypatch):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (300, 200), colour).save(path)
        paths.append(path)
    geometry = images.ViewGeometry(64, 73)
    seen = []
    images.warm_thumbnails(tmp_path / "cache", paths, sizes=(images.CARD_TILE,), geometry=geometry,
                           progress=lambda done, total, msg: seen.append((done, total)))
    assert seen[-1] == (3, 3)

    def no_decoding(path):
        raise AssertionError(f"decoded the original {path}: the warmed thumbnail was not used")

    monkeypatch.setattr(images, "_open", no_decoding)
    out = images.mosaic(tmp_path / "cache", paths, tile=images.CARD_TILE, geometry=geometry)
    with Image.open(out) as im:
        arr = np.asarray(im.convert("RGB"), dtype=int)
    cols, rows = images.mosaic_layout(3)
    assert arr.shape == (rows * images.CARD_TILE + (rows - 1) * 2, cols * images.CARD_TILE + (cols - 1) * 2, 3)
    centre = images.CARD_TILE // 2
    assert arr[centre, centre].tolist() == pytest.approx([255, 0, 0], abs=8)  # tiles in the given order
    # a thumbnail of another size was not warmed: building it needs the original
    with pytest.raises(AssertionError, match="decoded the original"):
        images.thumbnail(tmp_path / "cache", paths[0], images.GRID_SIZE, geometry)
