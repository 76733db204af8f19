"""The pictures a rater sees, rendered once when a study is created and kept in the study.

A rating page must not depend on the workspace's runs, probe images or thumbnails: a job
rewriting the cache, a moved image folder or a deleted run would stall raters or show them
server errors mid-study. So each item's pictures (its top images as one mosaic, and
close-ups of the part of the first ones the unit responds to) are rendered at creation, the
way the dashboard draws them, and stored as JPEG bytes in the studies file beside the item
(tens of kB per item). The rating page then reads nothing but the studies file.

The top images are distinct pictures: a probe set can hold one picture twice (two files, or
one re-encoded or resized), and a rater must never see one image twice as two "top images".
Two images count as the same when their content ids or files match, or when their small
grey-scale views differ nearly nowhere: 95 % of the pixels by less than
``SAME_PICTURE_TOLERANCE`` grey levels (a re-encoding or resize differs by 1-3 everywhere; a
moved object or another photo differs by tens somewhere).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .. import images
from ..store import RunInfo, Store

MOSAIC = "mosaic"
CLOSE_UPS = "closeups"
#: Side of the tiles of the mosaic a rater sees, and of its close-ups.
TILE = images.GRID_SIZE
CLOSE_UP_TILE = 110
#: How many of the first images get a close-up.
N_CLOSE_UPS = 5
#: Grey levels (0-255) within which 95 % of the pixels of two 16x16 views must agree for
#: the two images to be one picture.
SAME_PICTURE_TOLERANCE = 6.0
_FINGERPRINT_SIDE = 16


@dataclass(frozen=True)
class ItemPicture:
    """One frozen picture of an item: its kind, the probe images in it, the JPEG bytes."""

    kind: str
    image_ids: tuple[str, ...]
    jpeg: bytes


def run_view(store: Store, run: RunInfo) -> images.ViewGeometry:
    """How the run's model cropped its inputs (recorded, else derived from the id, else ImageNet's)."""
    return images.recorded_view(store, run.preprocess_id) or images.derived_view(run.preprocess_id) or images.IMAGENET_VIEW


def _fingerprint(thumb_path) -> np.ndarray:
    with Image.open(thumb_path) as im:
        small = im.convert("L").resize((_FINGERPRINT_SIDE, _FINGERPRINT_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32)


def _same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.percentile(np.abs(a - b), 95)) < SAME_PICTURE_TOLERANCE


def distinct_top_images(store: Store, run: RunInfo, neuron: int, n: int,
                        geometry: images.ViewGeometry | None = None) -> list[dict]:
    """The neuron's first ``n`` top images (rank order) that are distinct pictures: rank,
    image_idx, image_id, path and thumb (the cached model view at TILE pixels)."""
    geometry = geometry or run_view(store, run)
    probe = store.probe_files(run.probe_set_id)
    kept: list[dict] = []
    seen_ids: set[str] = set()
    seen_paths: set[str] = set()
    prints: list[np.ndarray] = []
    top = store.top_images(run.run_key, neuron, k=run.k)
    probe.rows([int(r["image_idx"]) for r in top if 0 <= int(r["image_idx"]) < len(probe)])  # one read; then kept
    for row in top:
        idx = int(row["image_idx"])
        if not 0 <= idx < len(probe.paths):
            continue
        image_id, path = row["image_id"] or probe.image_ids[idx], probe.paths[idx]
        if image_id in seen_ids or path in seen_paths:
            continue
        thumb = images.thumbnail(store.root, path, TILE, geometry)
        fingerprint = _fingerprint(thumb)
        if any(_same_picture(fingerprint, p) for p in prints):
            continue
        seen_ids.add(image_id)
        seen_paths.add(path)
        prints.append(fingerprint)
        kept.append({"rank": int(row["rank"]), "image_idx": idx, "image_id": image_id, "path": path, "thumb": thumb})
        if len(kept) == n:
            break
    return kept


def _jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, "JPEG", quality=images.JPEG_QUALITY)
    return buffer.getvalue()


def _close_up(store: Store, run: RunInfo, neuron: int, row: dict, amap: np.ndarray,
              geometry: images.ViewGeometry) -> Image.Image:
    """The part of one top image the unit responds to most (the largest Otsu region)."""
    from ..crops import otsu_crops

    def cut(view: Image.Image) -> Image.Image:
        boxes = otsu_crops(amap, view.size, max_crops=1)
        chosen = view.crop(boxes[0].as_tuple()) if boxes else view
        return chosen.resize((CLOSE_UP_TILE, CLOSE_UP_TILE))

    path = images.annotated_view(store.root, row["path"], 224, geometry, "closeup",
                                 {"run": run.run_key, "neuron": neuron, "rank": row["rank"]}, cut)
    with Image.open(path) as im:
        return im.convert("RGB")


def item_pictures(store: Store, run: RunInfo, neuron: int, n_images: int) -> list[ItemPicture]:
    """The pictures of one item: the mosaic of its distinct top images and, when the run has
    activation maps, close-ups of the first few. Reads the workspace; called at creation only."""
    geometry = run_view(store, run)
    rows = distinct_top_images(store, run, neuron, n_images, geometry)
    if not rows:
        return []
    tiles = []
    for row in rows:
        with Image.open(row["thumb"]) as im:
            tiles.append(im.convert("RGB"))
    cols, _ = images.mosaic_layout(len(tiles))
    out = [ItemPicture(MOSAIC, tuple(r["image_id"] for r in rows),
                       _jpeg(images.build_mosaic(tiles, TILE, cols, geometry=geometry)))]
    maps = store.top_maps(run.run_key, neuron)
    if maps is not None:
        chosen = [r for r in rows[:N_CLOSE_UPS] if r["rank"] < len(maps)]
        views = [_close_up(store, run, neuron, r, np.asarray(maps[r["rank"]], dtype=np.float32), geometry) for r in chosen]
        if views:
            out.append(ItemPicture(CLOSE_UPS, tuple(r["image_id"] for r in chosen),
                                   _jpeg(images.build_mosaic(views, CLOSE_UP_TILE, len(views), geometry=None))))
    return out


def pictures_of_items(store: Store, items: Sequence[tuple[int, RunInfo, int]], n_images: int) -> list[tuple[int, str, list[str], bytes]]:
    """(item id, kind, image ids, JPEG) rows of every item's pictures, for storage."""
    rows: list[tuple[int, str, list[str], bytes]] = []
    for item_id, run, neuron in items:
        for picture in item_pictures(store, run, neuron, n_images):
            rows.append((item_id, picture.kind, list(picture.image_ids), picture.jpeg))
    return rows
