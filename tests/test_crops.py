"""Otsu crops (DnD step 1), MILAN masks and the model-view geometry they rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from neuroviz.crops import (
    NEUTRAL_GREY,
    Box,
    ProbeViews,
    box_iou,
    draw_boxes,
    exemplar_mask,
    heatmap_overlay,
    mask_overlay,
    masked_region,
    model_view,
    otsu_crops,
    region_boxes,
    select_crops,
    upsample_map,
    view_box,
)
from neuroviz.models import Preprocessing


def blob_map(shape=(16, 16), blobs=()) -> np.ndarray:
    """A low background with rectangular blobs (top, left, bottom, right, value) in map cells."""
    m = np.full(shape, 0.1, np.float32)
    for top, left, bottom, right, value in blobs:
        m[top:bottom, left:right] = value
    return m


def centre(box: Box) -> tuple[float, float]:
    return ((box.left + box.right) / 2, (box.top + box.bottom) / 2)


def test_two_blobs_give_two_boxes_in_the_right_places():
    # A big blob top-left and a smaller one bottom-right of a 16x16 map, on a 128x128 image.
    amap = blob_map(blobs=[(1, 1, 6, 6, 5.0), (10, 11, 13, 14, 4.0)])
    boxes = otsu_crops(amap, (128, 128))
    assert len(boxes) == 2
    big, small = boxes
    assert big.area > small.area  # largest first
    # 8 px per map cell: blob centres at (3.5+0.5)*8 = 28 and (12.5+... ) in image pixels.
    assert centre(big) == pytest.approx((28, 28), abs=4)
    assert centre(small) == pytest.approx((100, 92), abs=4)
    assert 32 <= big.width <= 48 and 16 <= small.width <= 32


def test_map_covering_the_whole_image_gives_no_crop():
    # High everywhere except one corner cell: the region's box is (almost) the whole image.
    amap = np.full((8, 8), 3.0, np.float32)
    amap[0, 0] = 0.0
    assert otsu_crops(amap, (64, 64)) == []
    # The same map with only the upper half high is a legitimate crop (IoU 0.5 < 0.8).
    half = np.zeros((8, 8), np.float32)
    half[:4] = 3.0
    (box,) = otsu_crops(half, (64, 64))
    assert box_iou(box, Box(0, 0, 64, 64)) == pytest.approx(0.5, abs=0.1)


def test_flat_map_gives_no_crop():
    assert otsu_crops(np.ones((7, 7), np.float32), (224, 224)) == []


def test_iou_rule_between_candidates():
    image = (100, 100)
    big = Box(0, 0, 60, 60)
    heavy_overlap = Box(10, 10, 60, 60)  # IoU 2500/3600 = 0.69 with big: rejected
    light_overlap = Box(40, 40, 90, 90)  # IoU 400/(3600+2500-400) = 0.07: kept
    whole_ish = Box(0, 0, 95, 95)  # IoU with the image 0.9: rejected first
    assert box_iou(big, heavy_overlap) > 0.5 and box_iou(big, light_overlap) <= 0.5
    kept = select_crops([whole_ish, big, heavy_overlap, light_overlap], image)
    assert kept == [big, light_overlap]
    # The limits are parameters: allowing more overlap keeps the heavy one too.
    assert select_crops([big, heavy_overlap, light_overlap], image, max_mutual_iou=0.7) == [big, heavy_overlap, light_overlap]


def test_never_more_than_four_crops_and_the_largest_are_kept():
    blobs = [(0, 0, 3, 3, 5.0), (0, 6, 2, 8, 5.0), (0, 11, 4, 15, 5.0), (6, 0, 9, 4, 5.0), (6, 6, 11, 11, 5.0), (13, 13, 15, 15, 5.0)]
    amap = blob_map(blobs=blobs)
    boxes = otsu_crops(amap, (160, 160))
    assert len(boxes) == 4
    areas = [b.area for b in boxes]
    assert areas == sorted(areas, reverse=True)
    # The two 2x2-cell blobs (smallest) are the ones left out.
    assert min(areas) > 2.5 * 2.5 * 100
    assert len(otsu_crops(amap, (160, 160), max_crops=2)) == 2


def test_model_view_is_the_model_input_and_crops_line_up_with_it():
    """A map computed on the model view puts its box where the object is in that view."""
    prep = Preprocessing(64, 73)
    img = Image.new("RGB", (300, 200), (128, 128, 128))
    ImageDraw.Draw(img).rectangle((150, 40, 210, 100), fill=(230, 20, 20))  # right of centre
    view = model_view(img, prep)
    expected = prep.transform()(img)
    from torchvision.transforms import functional as TF

    assert torch.allclose(TF.normalize(TF.to_tensor(view), prep.mean, prep.std), expected)
    # Redness of the view, pooled to an 8x8 map like a conv layer would see it.
    arr = np.asarray(view, np.float32)
    redness = arr[..., 0] - arr[..., 1]
    amap = redness.reshape(8, 8, 8, 8).mean(axis=(1, 3))
    (box,) = otsu_crops(amap, (256, 256))
    # Where the square is in view coordinates at 256 px.
    left, top, right, _bottom = view_box(img.size, prep)
    sx = 256 / (right - left)
    want = ((150 - left) * sx, (40 - top) * sx, (210 - left) * sx, (100 - top) * sx)
    assert box.left == pytest.approx(want[0], abs=20) and box.right == pytest.approx(want[2], abs=20)
    assert box.top == pytest.approx(want[1], abs=20) and box.bottom == pytest.approx(want[3], abs=20)
    # A larger view shows the same region.
    big = np.asarray(model_view(img, prep, size=256).resize((64, 64), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(big - arr).mean() < 12


def test_view_box_of_portrait_and_landscape_images():
    prep = Preprocessing(224, 256)
    assert view_box((400, 300), prep) == pytest.approx((68.75, 18.75, 331.25, 281.25))
    assert view_box((300, 400), prep) == pytest.approx((18.75, 68.75, 281.25, 331.25))


def test_exemplar_mask_and_masked_region():
    amap = blob_map((4, 4), blobs=[(0, 0, 2, 2, 10.0)])
    mask = exemplar_mask(amap, threshold=5.0, image_size=(40, 40))
    assert mask.shape == (40, 40)
    assert mask[5, 5] and not mask[35, 35]
    img = Image.new("RGB", (40, 40), (10, 200, 30))
    grey = masked_region(img, mask, "grey")
    assert grey.getpixel((5, 5)) == (10, 200, 30)
    assert grey.getpixel((35, 35)) == NEUTRAL_GREY
    cropped = masked_region(img, mask, "crop")
    assert cropped.size[0] < 40 and cropped.size[1] < 40
    # An empty mask hides nothing rather than blanking the exemplar.
    assert masked_region(img, np.zeros((40, 40), bool), "grey").getpixel((35, 35)) == (10, 200, 30)
    with pytest.raises(ValueError, match="grey, crop or full"):
        masked_region(img, mask, "blur")
    with pytest.raises(ValueError, match="model_view"):
        masked_region(img, np.ones((10, 10), bool), "grey")


def test_drawing_helpers_keep_the_view_size_and_mark_the_right_pixels():
    img = Image.new("RGB", (64, 48), (200, 200, 200))
    amap = blob_map((6, 8), blobs=[(0, 0, 3, 4, 9.0)])
    heat = heatmap_overlay(img, amap, alpha=0.6)
    assert heat.size == img.size
    # Hot corner brighter than the cold one under the same alpha.
    assert sum(heat.getpixel((5, 5))) != sum(heat.getpixel((60, 44)))
    mask = upsample_map(amap, img.size) > 4
    over = mask_overlay(img, mask)
    assert over.getpixel((60, 44))[0] < 100  # outside darkened
    assert over.size == img.size
    boxed = draw_boxes(img, [Box(10, 10, 30, 30)], colour=(0, 255, 255), width=1)
    assert boxed.getpixel((10, 20)) == (0, 255, 255) and boxed.getpixel((20, 20)) == (200, 200, 200)
    assert Box(1, 2, 3, 4).scaled(2, 2) == Box(2, 4, 6, 8)


def test_probe_views_loads_each_image_once(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (80, 60), (1, 2, 3)).save(path)
    views = ProbeViews([str(path)], Preprocessing(32, 36), size=None)
    first = views(0)
    assert first.size == (32, 32)
    assert views(0) is first


def test_a_region_inside_another_regions_hole_gives_no_box():
    """DnD's reference boxes external contours only: a ring with an island is one box."""
    ring = np.zeros((40, 40), bool)
    ring[5:35, 5:35] = True
    ring[10:30, 10:30] = False  # the hole
    with_island = ring.copy()
    with_island[17:23, 17:23] = True  # an island inside the hole, not touching the ring
    apart = ring.copy()
    apart[36:39, 36:39] = True  # a separate region outside the ring
    assert region_boxes(ring) == region_boxes(with_island) == [Box(5, 5, 35, 35)]
    assert region_boxes(apart) == [Box(5, 5, 35, 35), Box(36, 36, 39, 39)]
