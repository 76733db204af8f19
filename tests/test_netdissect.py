"""Network Dissection on a generated segmentation set whose masks we know, with a network
whose channel 0 is literally "redness" and channel 1 "blueness"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from neuroviz import datasets, extract
from neuroviz.methods import MethodContext, run_method
from neuroviz.methods.netdissect import IoUTally, NetDissectConfig, SegmentationSetError, dissect, load_segmentation_set
from neuroviz.models import Preprocessing, ProbedModel
from neuroviz.store import Store

SIZE = 64


class ColourDetector(nn.Module):
    """1x1 conv: channel 0 = R - (G+B)/2, channel 1 = B - (R+G)/2, channel 2 = a fixed random mix;
    then ReLU and 4x4 average pooling, so the maps (16x16) must be upsampled to the masks."""

    def __init__(self):
        super().__init__()
        self.colour = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.colour.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0], [0.3, -0.7, 0.2]])[:, :, None, None])
            self.colour.bias.zero_()
        self.down = nn.AvgPool2d(4)

    def forward(self, x):
        return self.down(torch.relu(self.colour(x)))


def colour_detector() -> nn.Module:
    return ColourDetector()


def make_segmentation_set(root: Path, n: int = 32, seed: int = 0, layout: str = "binary") -> None:
    """Noisy grey images with a red square, a blue circle, both or neither at random places, plus masks.

    Objects are few and small, so the top 0.5% of activations can cover a good part of them."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        objects = {}
        if i % 4 in (0, 2):
            s = int(rng.integers(9, 13))
            x, y = (int(v) for v in rng.integers(0, SIZE - s, 2))
            draw.rectangle((x, y, x + s - 1, y + s - 1), fill=(220, 30, 30))
            objects["red square"] = (x, y, s, "rect")
        if i % 4 in (1, 2):
            r = int(rng.integers(5, 8))
            cx, cy = (int(v) for v in rng.integers(r, SIZE - r, 2))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(30, 60, 220))
            objects["blue circle"] = (cx - r, cy - r, 2 * r + 1, "ellipse")
        arr = np.asarray(img).astype(np.int16) + rng.integers(-25, 26, (SIZE, SIZE, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        # The mask is drawn from the clean shapes: the later object wins where they overlap.
        index = Image.new("L", (SIZE, SIZE), 0)
        index_draw = ImageDraw.Draw(index)
        for _value, (name, (x, y, s, kind)) in enumerate(objects.items(), start=1):
            shape = index_draw.rectangle if kind == "rect" else index_draw.ellipse
            code = {"red square": 1, "blue circle": 2}[name]
            shape((x, y, x + s - 1, y + s - 1), fill=code)
        stem = f"img{i:02d}"
        img.save(root / "images" / f"{stem}.png")
        if layout == "binary":
            (root / "masks" / stem).mkdir()
            idx = np.asarray(index)
            for name, code in (("red square", 1), ("blue circle", 2)):
                if (idx == code).any():
                    Image.fromarray(((idx == code) * 255).astype(np.uint8)).save(root / "masks" / stem / f"{name}.png")
        else:
            index.save(root / "masks" / f"{stem}.png")
    if layout == "index":
        (root / "concepts.csv").write_text("index,name\n0,-\n1,red square\n2,blue circle\n")


def detector_model() -> ProbedModel:
    prep = Preprocessing(image_size=SIZE, resize_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return ProbedModel("custom:tests.test_netdissect:colour_detector", ColourDetector().eval(), prep, None, "colour detector")


@pytest.fixture(scope="module")
def segmentation_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("seg")
    make_segmentation_set(base / "binary", layout="binary")
    make_segmentation_set(base / "index", layout="index")
    return base


def test_loader_reads_both_layouts(segmentation_sets):
    binary = load_segmentation_set(segmentation_sets / "binary")
    index = load_segmentation_set(segmentation_sets / "index")
    assert binary.layout == "binary" and index.layout == "index"
    assert sorted(binary.concepts) == sorted(index.concepts) == ["blue circle", "red square"]
    present_b, masks_b = binary.masks(0, SIZE, SIZE, SIZE)
    present_i, masks_i = index.masks(0, SIZE, SIZE, SIZE)
    by_name_b = {binary.concepts[c]: m for c, m in zip(present_b, masks_b)}
    by_name_i = {index.concepts[c]: m for c, m in zip(present_i, masks_i)}
    assert by_name_b.keys() == by_name_i.keys() == {"red square"}  # image 0 has only a square
    assert np.array_equal(by_name_b["red square"], by_name_i["red square"])
    assert 81 <= by_name_b["red square"].sum() <= 144


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(SegmentationSetError, match="images/"):
        load_segmentation_set(tmp_path)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    with pytest.raises(SegmentationSetError, match="masks/"):
        load_segmentation_set(tmp_path)


@pytest.mark.parametrize("layout", ["binary", "index"])
def test_dissect_finds_the_planted_colour_units(segmentation_sets, layout):
    seg = load_segmentation_set(segmentation_sets / layout)
    result = dissect(detector_model(), "down", seg, NetDissectConfig())
    red, blue = result.concepts.index("red square"), result.concepts.index("blue circle")
    assert result.iou[0, red] > 0.04 and result.iou[0, blue] < 0.01
    assert result.iou[1, blue] > 0.04 and result.iou[1, red] < 0.01
    assert result.iou.argmax(axis=1)[:2].tolist() == [red, blue]


def test_netdissect_method_through_run_method(segmentation_sets, tmp_path):
    store = Store(tmp_path / "cache")
    model = detector_model()
    probe = datasets.from_folder(segmentation_sets / "binary" / "images", cache_dir=store.root)
    (run,) = extract.extract(model, probe, ["down"], store, k=5, batch_size=8, chunk_size=8)
    ctx = MethodContext(store=store, run=run, model=model)
    with pytest.raises(ValueError, match="segmentation set"):
        run_method("netdissect", ctx)
    config = NetDissectConfig(segmentation_set=str(segmentation_sets / "binary"))
    key = run_method("netdissect", ctx, config)
    labels = store.labels(run.run_key, method="netdissect")
    top = labels[labels["rank"] == 0].set_index("neuron")
    assert top.loc[0, "label"] == "red square" and top.loc[1, "label"] == "blue circle"
    assert top.loc[0, "score"] > 0.04
    assert '"interpretable": true' in top.loc[0, "extra_json"]
    # A different segmentation set is a different provenance: it must not reuse these labels.
    other = NetDissectConfig(segmentation_set=str(segmentation_sets / "index"))
    assert run_method("netdissect", ctx, other) != key


def pixels(on: list[int], n: int = 4) -> np.ndarray:
    row = np.zeros(n, np.float32)
    row[on] = 1
    return row


def test_iou_union_counts_only_images_annotated_for_the_concepts_category():
    """Hand example, one unit, 4-pixel images. Image A (annotated): unit {0,1}, concept {1,2};
    image B (annotated): unit {}, concept {0}; image C (not annotated): unit {0,1,2}.
    Intersection 1; union over annotated images 2 + 3 - 1 = 4 -> 0.25 (the reference's rule);
    over every image 5 + 3 - 1 = 7 -> 1/7 (the rule before)."""
    tally = IoUTally(1, np.array([0]), 1)
    tally.add(pixels([0, 1])[None], np.array([0]), pixels([1, 2])[None], annotated=[0])
    tally.add(pixels([])[None], np.array([0]), pixels([0])[None], annotated=[0])
    tally.add(pixels([0, 1, 2])[None], np.array([], np.int64), np.zeros((0, 4)), annotated=[])
    assert tally.iou()[0, 0] == pytest.approx(1 / 4)
    everything = IoUTally(1, np.array([0]), 1)  # the same three images, all annotated: the plain IoU
    everything.add(pixels([0, 1])[None], np.array([0]), pixels([1, 2])[None], annotated=[0])
    everything.add(pixels([])[None], np.array([0]), pixels([0])[None], annotated=[0])
    everything.add(pixels([0, 1, 2])[None], np.array([], np.int64), np.zeros((0, 4)), annotated=[0])
    assert everything.iou()[0, 0] == pytest.approx(1 / 7)


def test_iou_union_is_per_category(tmp_path):
    """Two categories: 'wheel' (part) is annotated on image a only, 'car' (object) on a and b.
    The unit fires on 2 pixels of a (both car, one wheel) and 2 of b: car's union counts b,
    wheel's does not. Read through categories.csv and the loader."""
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    for stem in "ab":
        Image.new("RGB", (2, 2)).save(root / "images" / f"{stem}.png")
        (root / "masks" / stem).mkdir(parents=True)
    Image.fromarray(np.array([[255, 255], [0, 0]], np.uint8)).save(root / "masks" / "a" / "car.png")
    Image.fromarray(np.array([[255, 0], [0, 0]], np.uint8)).save(root / "masks" / "a" / "wheel.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(root / "masks" / "b" / "car.png")
    (root / "categories.csv").write_text("concept,category\ncar,object\nwheel,part\n")
    seg = load_segmentation_set(root)
    assert seg.category_names == ["object", "part"] and seg.category_of_concepts().tolist() == [0, 1]
    assert seg.annotated_categories(0) == [0, 1] and seg.annotated_categories(1) == [0]
    tally = IoUTally(1, seg.category_of_concepts(), 2)
    for i, unit in enumerate([pixels([0, 1]), pixels([2, 3])]):
        present, masks = seg.masks(i, 2, 2, 2)
        tally.add(unit[None], present, masks, seg.annotated_categories(i))
    car, wheel = tally.iou()[0]
    assert car == pytest.approx(2 / 4)  # intersection 2, union 4 + 2 - 2
    assert wheel == pytest.approx(1 / 2)  # intersection 1, union 2 + 1 - 1 (image b not annotated for parts)
