"""Geometry of activation maps on images: the model's view, Otsu crops, masks and overlays.

Stored activation maps (``store.top_maps``) describe the image *as the model saw it*: resized
on the short side and centre-cropped (see ``models.Preprocessing``). Everything here works in
the coordinates of that view, so boxes, masks and heatmaps drawn by the dashboard line up with
what a neuron responded to. Use :func:`model_view` to get that view as a PIL image.

- :func:`otsu_crops` is step 1 of Describe-and-Dissect (Bai et al. 2024): threshold the
  upsampled map with Otsu's method, box each outer contour (a region inside another's hole
  is dropped, as in the reference), keep at most 4 boxes that overlap each other
  (IoU <= 0.5) and the whole image (IoU < 0.8) little enough.
- :func:`exemplar_mask` is MILAN's exemplar region (Hernandez et al. 2022): the upsampled map
  above a per-neuron threshold.
- :func:`heatmap_overlay`, :func:`mask_overlay`, :func:`draw_boxes` draw them (PIL only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Filled into the part of an image outside an exemplar mask: the ImageNet mean colour, which
# normalises to zero for ImageNet-trained encoders, so the hidden part carries no signal.
NEUTRAL_GREY = (124, 116, 104)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels of an image: left/top inclusive, right/bottom exclusive."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return max(0, self.right - self.left)

    @property
    def height(self) -> int:
        return max(0, self.bottom - self.top)

    @property
    def area(self) -> int:
        return self.width * self.height

    def as_tuple(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), the form ``PIL.Image.crop`` takes."""
        return (self.left, self.top, self.right, self.bottom)

    def scaled(self, sx: float, sy: float) -> Box:
        """The same region in an image resized by (sx, sy), e.g. to draw on a larger view."""
        return Box(int(round(self.left * sx)), int(round(self.top * sy)), int(round(self.right * sx)), int(round(self.bottom * sy)))


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    inter = Box(max(a.left, b.left), max(a.top, b.top), min(a.right, b.right), min(a.bottom, b.bottom)).area
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


# -- the model's view of an image --------------------------------------------------------------

def view_box(original_size: tuple[int, int], preprocessing) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of an original image that the model sees.

    Resizing the short side to ``resize_size`` and centre-cropping ``image_size`` keeps the
    centred square of side ``short * image_size / resize_size`` (clipped to the image).
    """
    w, h = original_size
    short = min(w, h)
    side = short * preprocessing.image_size / preprocessing.resize_size
    side_w, side_h = min(side, w), min(side, h)
    left, top = (w - side_w) / 2.0, (h - side_h) / 2.0
    return (left, top, left + side_w, top + side_h)


def model_view(img: Image.Image, preprocessing, size: int | None = None) -> Image.Image:
    """The image as the model saw it (resize + centre crop), as an RGB PIL image.

    With ``size`` None the pixels are exactly the model's input before normalisation; with a
    larger ``size`` the same region is cut from the original at a higher resolution, which is
    what the dashboard shows and what captioners get (a 64 px view is too small to caption).
    """
    img = img.convert("RGB")
    if size is None or size == preprocessing.image_size:
        from torchvision import transforms as T

        resize = T.Resize(preprocessing.resize_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        return T.CenterCrop(preprocessing.image_size)(resize(img))
    return img.resize((size, size), Image.Resampling.BILINEAR, box=view_box(img.size, preprocessing))


# -- maps --------------------------------------------------------------------------------------

def upsample_map(activation_map: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to an image of size (W, H); returns (H, W) float32."""
    amap = np.asarray(activation_map, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"An activation map is 2-D (h, w); got shape {amap.shape}.")
    w, h = image_size
    return np.asarray(Image.fromarray(np.ascontiguousarray(amap)).resize((int(w), int(h)), Image.Resampling.BILINEAR), dtype=np.float32)


def region_boxes(mask: np.ndarray) -> list[Box]:
    """Bounding boxes of the outer contours of a boolean mask's 8-connected regions, largest first.

    As the DnD reference (OpenCV ``findContours`` with external contours only), a region
    that lies inside another region's hole (an island in a ring) has no external contour of
    its own and gives no box: holes are filled before the regions are labelled. The box of
    an outer contour equals the box of its filled region, so this needs no OpenCV.
    """
    from scipy.ndimage import binary_fill_holes
    from skimage.measure import label, regionprops

    # Background is 4-connected when foreground is 8-connected (OpenCV's convention), which is
    # binary_fill_holes' default structure.
    labelled = label(binary_fill_holes(np.asarray(mask, dtype=bool)), connectivity=2)
    boxes = [Box(int(r.bbox[1]), int(r.bbox[0]), int(r.bbox[3]), int(r.bbox[2])) for r in regionprops(labelled)]
    # Ties broken by position so the order never depends on the labelling.
    return sorted(boxes, key=lambda b: (-b.area, b.top, b.left))


def select_crops(boxes: Sequence[Box], image_size: tuple[int, int], max_crops: int = 4,
                 max_mutual_iou: float = 0.5, max_full_iou: float = 0.8) -> list[Box]:
    """Greedy DnD selection: in the given order, keep a box if it is not (almost) the whole
    image (IoU with it < ``max_full_iou``) and overlaps no kept box by more than ``max_mutual_iou``."""
    whole = Box(0, 0, int(image_size[0]), int(image_size[1]))
    kept: list[Box] = []
    for box in boxes:
        if len(kept) >= max_crops:
            break
        if box.area == 0 or box_iou(box, whole) >= max_full_iou:
            continue
        if all(box_iou(box, other) <= max_mutual_iou for other in kept):
            kept.append(box)
    return kept


def otsu_crops(activation_map: np.ndarray, image_size: tuple[int, int], max_crops: int = 4,
               max_mutual_iou: float = 0.5, max_full_iou: float = 0.8) -> list[Box]:
    """DnD step 1: crop boxes around where a neuron fired, largest first (at most ``max_crops``).

    The map is upsampled to the image (W, H), thresholded at Otsu's threshold, and each
    connected region above it gives a box; see :func:`select_crops` for the IoU rules.
    A flat map has no regions and gives no crops.
    """
    from skimage.filters import threshold_otsu

    up = upsample_map(activation_map, image_size)
    if not np.isfinite(up).all() or float(up.max() - up.min()) <= 1e-8 * max(1.0, float(np.abs(up).max())):
        return []
    mask = up > threshold_otsu(up)
    return select_crops(region_boxes(mask), image_size, max_crops, max_mutual_iou, max_full_iou)


def exemplar_mask(activation_map: np.ndarray, threshold: float, image_size: tuple[int, int]) -> np.ndarray:
    """MILAN's exemplar region: (H, W) bool, True where the upsampled map exceeds ``threshold``."""
    return upsample_map(activation_map, image_size) > threshold


def masked_region(img: Image.Image, mask: np.ndarray, mode: str = "grey") -> Image.Image:
    """What an encoder sees of an exemplar: ``"grey"`` keeps the masked pixels and fills the
    rest with a neutral grey; ``"crop"`` cuts the mask's bounding box; ``"full"`` ignores the mask.

    An empty mask returns the image unchanged, so no exemplar becomes a blank picture.
    """
    mask = np.asarray(mask, dtype=bool)
    if mode == "full" or not mask.any():
        return img.convert("RGB")
    if mask.shape != (img.height, img.width):
        raise ValueError(f"Mask shape {mask.shape} does not match the image ({img.height}, {img.width}); "
                         "build the mask for the same view (see model_view).")
    if mode == "crop":
        ys, xs = np.nonzero(mask)
        return img.convert("RGB").crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    if mode != "grey":
        raise ValueError(f"Unknown exemplar region mode '{mode}'; choose grey, crop or full.")
    arr = np.array(img.convert("RGB"))
    arr[~mask] = NEUTRAL_GREY
    return Image.fromarray(arr)


# -- drawing ------------------------------------------------------------------------------------

# Anchor colours of a perceptually ordered dark-to-bright colormap (similar to "inferno").
_COLORMAP_ANCHORS = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164],
], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a dark-to-bright colormap (no matplotlib needed)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * (len(_COLORMAP_ANCHORS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_COLORMAP_ANCHORS) - 1)
    frac = (v - lo)[..., None]
    return (_COLORMAP_ANCHORS[lo] * (1 - frac) + _COLORMAP_ANCHORS[hi] * frac).astype(np.uint8)


def heatmap_overlay(img: Image.Image, activation_map: np.ndarray, alpha: float = 0.5,
                    value_range: tuple[float, float] | None = None) -> Image.Image:
    """The image with the neuron's map blended on top (``img`` should be the model view).

    ``value_range`` fixes the colour scale (e.g. 0 to the neuron's max over its top images) so
    that maps of different images are comparable; by default each map uses its own range.
    """
    img = img.convert("RGB")
    up = upsample_map(activation_map, img.size)
    lo, hi = value_range if value_range is not None else (float(up.min()), float(up.max()))
    scaled = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    heat = Image.fromarray(colorize(scaled))
    return Image.blend(img, heat, float(alpha))


def mask_overlay(img: Image.Image, mask: np.ndarray, dim: float = 0.3,
                 outline: tuple[int, int, int] = (255, 215, 0)) -> Image.Image:
    """The image with everything outside ``mask`` darkened to ``dim`` and the mask's edge outlined."""
    img = img.convert("RGB")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (img.height, img.width):
        raise ValueError(f"Mask shape {mask.shape} does not match the image ({img.height}, {img.width}).")
    arr = np.array(img, dtype=np.float32)
    arr[~mask] *= dim
    edge = mask & ~_eroded(mask)
    arr[edge] = outline
    return Image.fromarray(arr.astype(np.uint8))


def _eroded(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def draw_boxes(img: Image.Image, boxes: Sequence[Box], colour: tuple[int, int, int] = (0, 255, 255),
               width: int | None = None, numbered: bool = True) -> Image.Image:
    """A copy of ``img`` with ``boxes`` drawn (numbered in order, largest first for Otsu crops)."""
    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = width or max(1, round(min(out.size) / 100))
    for i, box in enumerate(boxes, start=1):
        draw.rectangle((box.left, box.top, box.right - 1, box.bottom - 1), outline=colour, width=width)
        if numbered:
            draw.text((box.left + width + 1, box.top + width), str(i), fill=colour)
    return out


class ProbeViews:
    """Model views of probe images by index, each loaded once.

    The top images of many neurons overlap, so methods that walk over neurons keep the
    most recent ``capacity`` views instead of reopening files.
    """

    def __init__(self, paths: Sequence[str], preprocessing, size: int | None = None, capacity: int = 256):
        from collections import OrderedDict

        self.paths = list(paths)
        self.preprocessing = preprocessing
        self.size = size
        self.capacity = capacity
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()

    def __call__(self, image_idx: int) -> Image.Image:
        from .datasets import load_rgb

        idx = int(image_idx)
        if idx in self._cache:
            self._cache.move_to_end(idx)
            return self._cache[idx]
        view = model_view(load_rgb(self.paths[idx]), self.preprocessing, self.size)
        self._cache[idx] = view
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return view
