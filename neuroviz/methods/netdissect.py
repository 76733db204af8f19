"""Network Dissection (Bau, Zhou, Khosla, Oliva & Torralba, CVPR 2017) on a user's segmentation set.

For each neuron: threshold T_n at the top 0.5% of its spatial activations over the whole
segmentation set; upsample each activation map (bilinear) to the mask resolution; the
neuron's mask is ``upsampled > T_n``; IoU with concept c is
``sum_x |M_n(x) & L_c(x)| / sum_x |M_n(x) | L_c(x)|`` over the images annotated for c's
category. Label = argmax IoU; the unit counts as "interpretable" when that IoU >= 0.04.

Partly annotated sets (Broden: an image may have object masks but no part masks): as in the
reference code, the union for concept c counts the unit's active pixels only on images
annotated for c's category, so an image nobody labelled for parts does not count as a miss
for every part. :class:`IoUTally` keeps one unit-area tally per category. Categories come
from an optional ``categories.csv`` (columns ``concept,category``); without it every concept
is in one category. An image is annotated for a category when it has a mask file of one of
its concepts (binary layout) or an index mask (index layout, which annotates every category).
On a fully annotated set this is the plain dataset-wide IoU.

The store keeps spatial maps only for each neuron's top-k images, so this method makes its
own two passes over the segmentation set with :class:`~neuroviz.hooks.LayerRecorder`: the
first writes the maps (float16, at layer resolution) to a temporary file and computes exact
per-neuron quantiles; the second thresholds and intersects them with the masks.

Segmentation set format (a folder), one of:

- binary masks::

      images/<stem>.<ext>            the images (any format PIL reads)
      masks/<stem>/<concept>.png     one binary mask per concept present (nonzero = concept)

- index masks::

      images/<stem>.<ext>
      masks/<stem>.png               one single-channel PNG; pixel value v > 0 = concept v
      concepts.csv                   columns ``index,name`` (index 0 is "no concept")

Masks may have any size; they are put through the same resize and centre crop as the image
(nearest neighbour), so they stay aligned with the activation maps. An image without masks
takes part in the thresholds (it is part of the dataset) but not in any IoU.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NeurovizError
from ..provenance import provenance_key
from ..store import LabelRow
from .base import DescriptionMethod, MethodContext, MethodError, register_method

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
MAX_MAP_BYTES = 8 * 2**30  # the temporary map file; beyond this, ask for a smaller set
_BATCH = 16


class SegmentationSetError(NeurovizError, ValueError):
    """A segmentation set that cannot be read; the message says what the layout must be."""


@dataclass
class SegmentationItem:
    """One image and where its masks are."""

    image_path: Path
    mask_paths: dict[str, Path] = field(default_factory=dict)  # binary format: concept -> mask file
    index_path: Path | None = None  # index format: the single index PNG


@dataclass
class SegmentationSet:
    """Images with per-pixel concept masks (see the module docstring for the on-disk layout)."""

    root: Path
    concepts: list[str]
    items: list[SegmentationItem]
    layout: str  # "binary" or "index"
    index_to_concept: dict[int, int] = field(default_factory=dict)  # index format: pixel value -> concept row
    concept_category: dict[str, str] = field(default_factory=dict)  # categories.csv; empty: one category

    @property
    def category_names(self) -> list[str]:
        """The categories, in first-seen order (one unnamed category without categories.csv)."""
        return list(dict.fromkeys(self.concept_category.get(c, "") for c in self.concepts))

    def category_of_concepts(self) -> np.ndarray:
        """Category row of every concept row."""
        names = self.category_names
        return np.array([names.index(self.concept_category.get(c, "")) for c in self.concepts], dtype=np.int64)

    def annotated_categories(self, i: int) -> list[int]:
        """Category rows image i is annotated for (see the module docstring)."""
        item = self.items[i]
        if self.layout == "index":
            return list(range(len(self.category_names))) if item.index_path is not None else []
        names = self.category_names
        return sorted({names.index(self.concept_category.get(c, "")) for c in item.mask_paths if c in self.concepts})

    def __len__(self) -> int:
        return len(self.items)

    @property
    def id(self) -> str:
        """Hash of every file's name, size and modification time: changes when the set changes."""
        entries = []
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            st = path.stat()
            entries.append((str(path.relative_to(self.root)), st.st_size, st.st_mtime_ns))
        return provenance_key({"layout": self.layout, "concepts": self.concepts, "files": entries})

    def masks(self, i: int, image_size: int, resize_size: int, mask_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(concept rows present, bool masks (m, mask_size, mask_size)) of image i, aligned with the model input."""
        from PIL import Image

        item = self.items[i]

        def geometry(img: Image.Image) -> np.ndarray:
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms import functional as TF

            img = TF.resize(img, resize_size, interpolation=InterpolationMode.NEAREST)
            img = TF.center_crop(img, [image_size, image_size])
            return np.asarray(img.resize((mask_size, mask_size), Image.Resampling.NEAREST))

        present, masks = [], []
        if self.layout == "binary":
            for concept, path in item.mask_paths.items():
                with Image.open(path) as m:
                    arr = geometry(m.convert("L")) > 0
                if arr.any():
                    present.append(self.concepts.index(concept))
                    masks.append(arr)
        elif item.index_path is not None:
            with Image.open(item.index_path) as m:
                index_image = m if m.mode in ("L", "P", "I", "I;16") else m.convert("L")
                arr = geometry(index_image).astype(np.int64)
            for value in np.unique(arr):
                if value > 0 and int(value) in self.index_to_concept:
                    present.append(self.index_to_concept[int(value)])
                    masks.append(arr == value)
        if not present:
            return np.zeros(0, dtype=np.int64), np.zeros((0, mask_size, mask_size), dtype=bool)
        return np.asarray(present, dtype=np.int64), np.stack(masks)


def load_segmentation_set(root: str | Path) -> SegmentationSet:
    """Read a segmentation set folder (binary-mask or index-mask layout) and check it."""
    root = Path(root).expanduser()
    layout_help = ("Expected images/<stem>.<ext> plus masks/<stem>/<concept>.png (binary masks), "
                   "or masks/<stem>.png index masks with a concepts.csv (columns index,name).")
    if not (root / "images").is_dir():
        raise SegmentationSetError(f"Segmentation set {root} has no images/ folder. {layout_help}")
    images = sorted(p for p in (root / "images").iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise SegmentationSetError(f"No images in {root / 'images'}. {layout_help}")
    masks_dir = root / "masks"
    if not masks_dir.is_dir():
        raise SegmentationSetError(f"Segmentation set {root} has no masks/ folder. {layout_help}")
    items: list[SegmentationItem] = []
    categories = read_categories(root / "categories.csv")
    concepts_csv = root / "concepts.csv"
    if concepts_csv.exists():
        with open(concepts_csv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"index", "name"} <= set(reader.fieldnames):
                raise SegmentationSetError(f"{concepts_csv} needs columns 'index' and 'name'.")
            table = [(int(r["index"]), r["name"].strip()) for r in reader if r["name"].strip()]
        concepts = list(dict.fromkeys(name for index, name in table if index > 0))
        index_to_concept = {index: concepts.index(name) for index, name in table if index > 0}
        for img in images:
            mask = masks_dir / f"{img.stem}.png"
            items.append(SegmentationItem(img, index_path=mask if mask.exists() else None))
        if not any(it.index_path for it in items):
            raise SegmentationSetError(f"No index masks masks/<stem>.png match the images in {root}. {layout_help}")
        return SegmentationSet(root, concepts, items, "index", index_to_concept, categories)
    names: set[str] = set()
    for img in images:
        folder = masks_dir / img.stem
        paths = {p.stem: p for p in sorted(folder.glob("*.png"))} if folder.is_dir() else {}
        names.update(paths)
        items.append(SegmentationItem(img, mask_paths=paths))
    if not names:
        raise SegmentationSetError(f"No masks/<stem>/<concept>.png files match the images in {root}. {layout_help}")
    return SegmentationSet(root, sorted(names), items, "binary", concept_category=categories)


def read_categories(path: Path) -> dict[str, str]:
    """concept -> category from ``categories.csv`` (columns concept,category); {} when absent."""
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"concept", "category"} <= set(reader.fieldnames):
            raise SegmentationSetError(f"{path} needs columns 'concept' and 'category'.")
        return {r["concept"].strip(): r["category"].strip() for r in reader if r["concept"].strip()}


class IoUTally:
    """Running intersection and union counts of unit masks with concept masks, image by image.

    The unit's active pixels are tallied per category, over only the images annotated for
    it, and each concept's union uses its own category's tally (the reference's rule for
    partly annotated sets). Counts are plain sums, so tallies of disjoint image sets add up.
    """

    def __init__(self, n_neurons: int, concept_category: np.ndarray, n_categories: int):
        self.concept_category = np.asarray(concept_category, dtype=np.int64)
        self.intersection = np.zeros((n_neurons, len(self.concept_category)), dtype=np.float64)
        self.unit_area = np.zeros((n_neurons, n_categories), dtype=np.float64)
        self.concept_area = np.zeros(len(self.concept_category), dtype=np.float64)

    def add(self, unit_masks: np.ndarray, present: np.ndarray, concept_masks: np.ndarray, annotated: Sequence[int]) -> None:
        """One image: ``unit_masks`` (neurons, pixels) 0/1, ``concept_masks`` (len(present), pixels) 0/1 of the
        concepts present, ``annotated`` the category rows the image is annotated for."""
        if not len(annotated):
            return
        units = np.asarray(unit_masks, dtype=np.float32)
        self.unit_area[:, list(annotated)] += units.sum(axis=1, dtype=np.float64)[:, None]
        if len(present):
            masks = np.asarray(concept_masks, dtype=np.float32).reshape(len(present), -1)  # (m, h, w) or (m, pixels)
            self.intersection[:, present] += units @ masks.T
            self.concept_area[present] += masks.sum(axis=1, dtype=np.float64)

    def iou(self) -> np.ndarray:
        """(neurons, concepts) IoU; 0 where the union is empty."""
        union = self.unit_area[:, self.concept_category] + self.concept_area[None, :] - self.intersection
        return np.where(union > 0, self.intersection / np.maximum(union, 1e-12), 0.0)


@dataclass
class NetDissectConfig:
    """Network Dissection hyperparameters (Bau et al., CVPR 2017, and its public code)."""

    top_quantile: float = 0.005  # threshold at the top 0.5% of each neuron's activations
    iou_threshold: float = 0.04  # "interpretable" unit
    mask_size: int = 112  # Broden's segmentation resolution (capped at the model's input size)
    n_candidates: int = 5
    segmentation_set: str = ""  # folder; or give ctx.extra["segmentation_set"]


@dataclass
class DissectionResult:
    """IoU of every neuron with every concept, and the thresholds used."""

    concepts: list[str]
    iou: np.ndarray  # (neurons, concepts)
    thresholds: np.ndarray  # (neurons,)


def dissect(model, layer: str, segmentation: SegmentationSet, config: NetDissectConfig | None = None,
            neurons: Sequence[int] | None = None, progress=None, scratch_dir: Path | None = None) -> DissectionResult:
    """IoU between thresholded activation maps of ``layer`` and every concept's masks."""
    import torch
    import torch.nn.functional as F

    from ..datasets import load_rgb
    from ..hooks import LayerRecorder, spatial_map, to_batch_first

    config = config or NetDissectConfig()
    info = model.layer(layer)
    if info.layout.kind == "vector":
        raise MethodError(f"Network Dissection needs spatial activation maps; layer {layer} is a vector layer. "
                         "Choose a convolutional or token layer.")
    prep = model.preprocessing
    transform = model.transform
    module = model.module.eval()
    n = len(segmentation)
    total_steps = 2 * n

    def batches():
        for start in range(0, n, _BATCH):
            idx = list(range(start, min(n, start + _BATCH)))
            yield idx, torch.stack([transform(load_rgb(segmentation.items[i].image_path)) for i in idx])

    maps_file = None
    with tempfile.TemporaryDirectory(dir=scratch_dir) as tmp:
        with torch.inference_mode(), LayerRecorder(module, [layer]) as rec:
            for idx, x in batches():
                module(x)
                smap = spatial_map(to_batch_first(rec.outputs[layer], info.layout), info.layout)
                if smap is None:
                    raise MethodError(f"Layer {layer} has no square spatial map; Network Dissection cannot use it.")
                if neurons is not None:
                    smap = smap[:, list(neurons)]
                if maps_file is None:
                    shape = (n, *smap.shape[1:])
                    if np.prod(shape) * 2 > MAX_MAP_BYTES:
                        raise MethodError(f"The activation maps of {n} images would take {np.prod(shape) * 2 / 2**30:.1f} GB; "
                                         "use a smaller segmentation set or fewer neurons.")
                    maps_file = np.lib.format.open_memmap(Path(tmp) / "maps.npy", mode="w+", dtype=np.float16, shape=shape)
                maps_file[idx[0]: idx[-1] + 1] = smap.float().numpy().astype(np.float16)
                if progress:
                    progress(idx[-1] + 1, total_steps, "recording activation maps")
        assert maps_file is not None
        n_neurons = maps_file.shape[1]
        thresholds = np.zeros(n_neurons, dtype=np.float32)
        chunk = max(1, (256 * 2**20) // max(1, 4 * n * maps_file.shape[2] * maps_file.shape[3]))
        for start in range(0, n_neurons, chunk):
            values = np.asarray(maps_file[:, start: start + chunk], dtype=np.float32)
            values = values.transpose(1, 0, 2, 3).reshape(values.shape[1], -1)
            thresholds[start: start + chunk] = np.quantile(values, 1.0 - config.top_quantile, axis=1)

        size = min(config.mask_size, prep.image_size)
        categories = segmentation.category_of_concepts()
        tally = IoUTally(n_neurons, categories, len(segmentation.category_names))
        t = torch.from_numpy(thresholds)[None, :, None, None]
        for start in range(0, n, _BATCH):
            stop = min(n, start + _BATCH)
            maps = torch.from_numpy(np.asarray(maps_file[start:stop], dtype=np.float32))
            up = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
            unit_masks = (up > t).reshape(stop - start, n_neurons, -1).float().numpy()
            for b, i in enumerate(range(start, stop)):
                present, masks = segmentation.masks(i, prep.image_size, prep.resize_size, size)
                tally.add(unit_masks[b], present, masks, segmentation.annotated_categories(i))
            if progress:
                progress(n + stop, total_steps, "intersecting with concept masks")
        del maps_file
    iou = tally.iou()
    return DissectionResult(list(segmentation.concepts), iou, thresholds)


@register_method
class NetDissect(DescriptionMethod):
    """Network Dissection against a segmentation set given by the user."""

    name = "netdissect"
    title = "Network Dissection"
    reference = "Bau et al., Network Dissection: Quantifying Interpretability of Deep Visual Representations, CVPR 2017"
    needs = ()
    config_class = NetDissectConfig
    per_neuron = False
    code_version = "2"  # 2: union over images annotated for the concept's category

    @staticmethod
    def segmentation_path(ctx: MethodContext, config: NetDissectConfig) -> Path:
        path = config.segmentation_set or ctx.extra.get("segmentation_set") or ""
        if not path:
            raise SegmentationSetError("Network Dissection needs a segmentation set with per-pixel concept masks: pass "
                             "--segmentation-set FOLDER (or ctx.extra['segmentation_set']). Layout: images/<stem>.png "
                             "and masks/<stem>/<concept>.png; see neuroviz.methods.netdissect.")
        path = Path(path).expanduser()
        if not path.is_dir():
            raise SegmentationSetError(f"Segmentation set folder not found: {path}")
        return path

    def label_key(self, ctx: MethodContext, config: NetDissectConfig) -> str:
        """The base key plus the segmentation set's content, which the config may only name by path."""
        seg = load_segmentation_set(self.segmentation_path(ctx, config))
        return provenance_key({"base": super().label_key(ctx, config), "segmentation_set": seg.id})

    def describe(self, ctx: MethodContext, config: NetDissectConfig, neurons: Sequence[int]) -> list[LabelRow]:
        """Top-IoU concepts of ``neurons``; rank 0 carries whether the unit is interpretable."""
        seg = load_segmentation_set(self.segmentation_path(ctx, config))
        model = ctx.probed_model()
        neurons = [int(n) for n in neurons]
        scratch = ctx.store.scratch_dir()
        result = dissect(model, ctx.run.layer, seg, config, neurons, ctx.progress, scratch)
        m = min(config.n_candidates, len(result.concepts))
        rows: list[LabelRow] = []
        for j, neuron in enumerate(neurons):
            order = np.argsort(-result.iou[j], kind="stable")[:m]
            for rank, c in enumerate(order):
                iou = float(result.iou[j, c])
                extra: dict[str, object] = {"iou": round(iou, 5)}
                if rank == 0:
                    extra.update(interpretable=iou >= config.iou_threshold, threshold=float(result.thresholds[j]),
                                 segmentation_set=str(seg.root), preprocess=model.preprocessing.id)
                rows.append(LabelRow(neuron, rank, result.concepts[int(c)], iou, None, extra))
        return rows
