"""Pictures the dashboard shows, built with PIL once and cached on disk.

A layer-browser page shows 24 neurons x 9 top images; decoding 216 full-size probe images on
every rerun would cost seconds. Each neuron's mosaic (and each thumbnail or overlay) is
therefore rendered once into the cache's ``thumbs/`` folder under a name that hashes everything
it depends on (the run, the neuron, the source files and their modification times, the
geometry and size), so a changed input gets a new file and a stale picture is never shown.
Files are written through a temporary name and renamed, so concurrent sessions and jobs
never read half a file. No Streamlit here: the pages only pass the paths to ``st.image``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .files import atomic_open
from .provenance import provenance_key
from .store import CacheLayout

MOSAIC_BACKGROUND = (245, 245, 245)
JPEG_QUALITY = 85
CARD_TILE = 80  # tile side of the layer browser's card mosaics
GRID_SIZE = 160  # thumbnails in the neuron page's grids and the rating view


@dataclass(frozen=True)
class ViewGeometry:
    """How a probed model crops an image: resize the short side to ``resize_size`` and keep
    the centred ``image_size`` square. Duck-types ``models.Preprocessing`` for
    :func:`neuroviz.crops.view_box` without importing torch (pages must start fast)."""

    image_size: int = 224
    resize_size: int = 256

    @classmethod
    def of(cls, preprocessing) -> ViewGeometry:
        """The geometry of a ``models.Preprocessing`` (or anything with the two sizes)."""
        return cls(int(preprocessing.image_size), int(preprocessing.resize_size))


IMAGENET_VIEW = ViewGeometry()
VIEW_NAMESPACE = "preprocessing"  # store records: preprocess id -> the view geometry's two sizes


def record_view(store, preprocessing) -> ViewGeometry:
    """Remember how inputs of this preprocessing were cropped (extraction does, once per run),
    so pages and methods get the run's geometry without loading its model."""
    view = ViewGeometry.of(preprocessing)
    store.put_record(VIEW_NAMESPACE, preprocessing.id, {"image_size": view.image_size, "resize_size": view.resize_size})
    return view


def recorded_view(store, preprocess_id: str) -> ViewGeometry | None:
    """The geometry :func:`record_view` kept for ``preprocess_id``, or None if none was."""
    record = store.get_record(VIEW_NAMESPACE, preprocess_id)
    return ViewGeometry(int(record["image_size"]), int(record["resize_size"])) if record else None


# The normalisations of the probed models' registries (ImageNet; 0.5 for many timm models and
# the offline EfficientNet-Lite; OpenAI CLIP) and their centre-crop fractions (crop / resize:
# 224/256 = timm's 0.875, 0.9, 0.95, 0.96, none), for runs extracted before views were recorded.
_KNOWN_NORMALISATIONS = (
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
)
_KNOWN_CROP_FRACTIONS = (0.875, 0.9, 0.95, 0.96, 1.0)
_KNOWN_SIZES = range(16, 1025)


def derived_view(preprocess_id: str) -> ViewGeometry | None:
    """The geometry of a preprocessing id that no record names, found without a model: the id
    hashes the preprocessing's sizes and normalisation, so the usual ones are tried in turn
    (at most about 30,000 short hashes, under half a second, once per id). None when none matches."""
    from .provenance import provenance_key

    for mean, std in _KNOWN_NORMALISATIONS:
        for fraction in _KNOWN_CROP_FRACTIONS:
            for size in _KNOWN_SIZES:
                for resize in {round(size / fraction), round(size * (1 / fraction))}:  # how registries and scaled() round
                    fields = {"image_size": size, "resize_size": resize, "mean": mean, "std": std}
                    if provenance_key(fields, length=12) == preprocess_id:
                        return ViewGeometry(size, resize)
    return None


def square_view(img: Image.Image, geometry: ViewGeometry | None, size: int) -> Image.Image:
    """The part of ``img`` the model saw, at ``size`` x ``size`` pixels (RGB).

    With ``geometry`` None the whole image is letterboxed-free squashed into the square;
    activation maps line up only with the model's view, so pass the run's geometry.
    """
    from .crops import view_box

    img = img.convert("RGB")
    box = view_box(img.size, geometry) if geometry is not None else None
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def thumbs_dir(cache_root: Path | str) -> Path:
    return CacheLayout(cache_root).thumbs_dir()


def _file_stamp(path: str | Path) -> tuple[str, int, int]:
    try:
        s = os.stat(path)
        return (str(path), s.st_size, s.st_mtime_ns)
    except OSError:
        return (str(path), -1, -1)


def cached_picture(cache_root: Path | str, kind: str, key: object, build: Callable[[], Image.Image],
                   fmt: str = "JPEG") -> Path:
    """The path of a picture named by ``key`` (any JSON-able object), built on first request.

    ``kind`` is a sub-folder (mosaic, thumb, overlay...) so each can be cleared on its own.
    """
    name = provenance_key({"kind": kind, "key": key, "fmt": fmt}, length=24)
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    path = thumbs_dir(cache_root) / kind / f"{name}{suffix}"
    if path.exists():
        return path
    img = build()
    with atomic_open(path, "wb") as fh:
        if fmt == "JPEG":
            img.convert("RGB").save(fh, "JPEG", quality=JPEG_QUALITY)
        else:
            img.save(fh, fmt)
    return path


def _open(path: str | Path) -> Image.Image:
    """A probe image as RGB as the model sees it (16-bit scaled, transparency on white), or a
    grey placeholder with a cross when the file is gone."""
    from .datasets import to_rgb

    try:
        with Image.open(path) as im:
            im.draft("RGB", (512, 512))  # JPEG: decode at reduced size, much faster for thumbnails
            return to_rgb(im)
    except (OSError, ValueError):
        ph = Image.new("RGB", (64, 64), (200, 200, 200))
        d = ImageDraw.Draw(ph)
        d.line((0, 0, 63, 63), fill=(150, 150, 150), width=2)
        d.line((0, 63, 63, 0), fill=(150, 150, 150), width=2)
        return ph


def thumbnail(cache_root: Path | str, image_path: str | Path, size: int = 160,
              geometry: ViewGeometry | None = IMAGENET_VIEW) -> Path:
    """A square thumbnail of the model's view of one probe image."""
    key = {"src": _file_stamp(image_path), "size": size, "geometry": _geometry_key(geometry)}
    return cached_picture(cache_root, "thumb", key, lambda: square_view(_open(image_path), geometry, size))


def _geometry_key(geometry: ViewGeometry | None):
    return None if geometry is None else [geometry.image_size, geometry.resize_size]


def mosaic_layout(n: int, cols: int | None = None) -> tuple[int, int]:
    """(columns, rows) of a near-square grid for ``n`` tiles with the fewest empty cells:
    9 -> 3x3, 10 -> 5x2, 16 -> 4x4, 6 -> 3x2."""
    if n <= 0:
        return (1, 1)
    if cols is None:
        side = int(np.ceil(np.sqrt(n)))
        cols = min(range(side, side + 3), key=lambda c: ((-(-n // c)) * c - n, c))
    return cols, -(-n // cols)


def build_mosaic(images: Sequence[Image.Image], tile: int = 96, cols: int | None = None, gap: int = 2,
                 geometry: ViewGeometry | None = IMAGENET_VIEW) -> Image.Image:
    """Square tiles of the given images in a grid, left to right, top to bottom."""
    cols, rows = mosaic_layout(len(images), cols)
    out = Image.new("RGB", (cols * tile + (cols - 1) * gap, rows * tile + (rows - 1) * gap), MOSAIC_BACKGROUND)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        tile_img = img if img.size == (tile, tile) else square_view(img, geometry, tile)
        out.paste(tile_img, (c * (tile + gap), r * (tile + gap)))
    return out


def mosaic(cache_root: Path | str, image_paths: Sequence[str | Path], tile: int = 96, cols: int | None = None,
           geometry: ViewGeometry | None = IMAGENET_VIEW, content_ids: Sequence[str] | None = None) -> Path:
    """Probe images (model views) as one picture, cached on disk.

    Tiles come from the per-image thumbnail cache: neurons share many top images, so each
    probe image is decoded once per tile size, not once per neuron. The picture is named by
    ``content_ids`` when given (probe-set image ids are content hashes, so no file needs a
    stat), else by every file's size and modification time.
    """
    sources = list(content_ids) if content_ids is not None else [_file_stamp(p) for p in image_paths]
    key = {"src": sources, "tile": tile, "cols": cols, "geometry": _geometry_key(geometry)}

    def build() -> Image.Image:
        tiles = []
        for p in image_paths:
            with Image.open(thumbnail(cache_root, p, tile, geometry)) as im:
                tiles.append(im.convert("RGB"))
        return build_mosaic(tiles, tile, cols, geometry=geometry)

    return cached_picture(cache_root, "mosaic", key, build)


def neuron_mosaic(cache_root: Path | str, run_key: str, neuron: int, image_paths: Sequence[str | Path],
                  tile: int = 96, cols: int | None = None, geometry: ViewGeometry | None = IMAGENET_VIEW,
                  content_ids: Sequence[str] | None = None) -> Path:
    """A neuron's top images (in rank order) as one picture: the layer browser's card image.

    The run and neuron only name the request; the picture depends on the images alone, so two
    neurons with the same top images share one file.
    """
    del run_key, neuron
    return mosaic(cache_root, image_paths, tile, cols, geometry, content_ids)


def annotated_view(cache_root: Path | str, image_path: str | Path, size: int, geometry: ViewGeometry | None,
                   annotation: str, key: object, draw: Callable[[Image.Image], Image.Image]) -> Path:
    """The model's view of an image with something drawn on it (heatmap, crop boxes, mask),
    cached under ``annotation`` + ``key`` (e.g. the run and neuron the map belongs to)."""
    full_key = {"src": _file_stamp(image_path), "size": size, "geometry": _geometry_key(geometry),
                "annotation": annotation, "key": key}
    return cached_picture(cache_root, annotation, full_key, lambda: draw(square_view(_open(image_path), geometry, size)))


def warm_thumbnails(cache_root: Path | str, image_paths: Sequence[str | Path], sizes: Sequence[int] = (CARD_TILE, GRID_SIZE),
                    geometry: ViewGeometry | None = IMAGENET_VIEW, progress: Callable[[int, int, str], None] | None = None) -> None:
    """Build the thumbnails the pages draw from, ahead of the first visit (existing ones are kept).

    Every card mosaic and image grid is pasted from these, so a workspace built with its
    thumbnails ready shows its first page without decoding a single full-size image.
    """
    for i, path in enumerate(image_paths):
        for size in sizes:
            thumbnail(cache_root, path, size, geometry)
        if progress:
            progress(i + 1, len(image_paths), f"{i + 1}/{len(image_paths)} images")
