"""Deterministic synthetic probe sets of any size, for scale tests and benchmarks.

Paper-scale figures (ImageNet val: 50,000 images; Broden: 63,000) cannot wait on a download,
and a fixed folder of 100,000 files cannot live in the repository. :func:`write_probe_set`
draws image ``i`` from its own seeded generator (``(seed, i)``), so any size, any prefix and
any rerun give the same bytes, a folder can be grown from 10,000 to 100,000 images without
rewriting the first ones, and every image is distinct (probe image ids are content hashes).

Each image is a coloured shape (square, circle or triangle in one of six colours) over a
low-frequency noise background, saved as PNG under ``<folder>/<colour> <shape>/``: the
folder name is the image's label (:func:`neuroviz.datasets.from_folder` reads it), so
methods have a known concept to find.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190), "orange": (240, 140, 30)}
SHAPES = ("square", "circle", "triangle")
DEFAULT_SIZE = 64


def image_label(index: int, seed: int = 0) -> str:
    """The label of image ``index`` ("red circle"): its folder name."""
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return f"{colour} {SHAPES[int(rng.integers(len(SHAPES)))]}"


def draw_image(index: int, size: int = DEFAULT_SIZE, seed: int = 0):
    """Image ``index`` of the set as a PIL image (the same pixels on every call)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]  # drawn in image_label's order: the label matches
    coarse = max(2, size // 8)
    noise = rng.integers(40, 216, (coarse, coarse, 3), dtype=np.uint8)
    img = Image.fromarray(noise).resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(max(2, size // 6), max(3, size // 3)))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
    if shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def image_path(folder: Path, index: int, seed: int = 0) -> Path:
    """Where :func:`write_probe_set` puts image ``index``."""
    return Path(folder) / image_label(index, seed) / f"{index:07d}.png"


def _write_range(folder: str, start: int, stop: int, size: int, seed: int) -> int:
    written = 0
    for i in range(start, stop):
        path = image_path(Path(folder), i, seed)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        draw_image(i, size, seed).save(tmp, format="PNG")
        tmp.replace(path)  # a killed writer leaves no half image that a later scan would read
        written += 1
    return written


def _ranges(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(n, start + step)


def write_probe_set(folder: str | Path, n_images: int, size: int = DEFAULT_SIZE, seed: int = 0, workers: int = 1) -> Path:
    """Write images 0..n_images-1 under ``folder`` (existing ones are kept); returns ``folder``.

    ``workers`` > 1 draws in that many processes. Only the first ``n_images`` exist afterwards
    if the folder was empty; a larger folder keeps its extra images (pass a folder per size).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        _write_range(str(folder), 0, n_images, size, seed)
        return folder
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_range, str(folder), a, b, size, seed) for a, b in _ranges(n_images, 2_000)]
        for future in futures:
            future.result()
    return folder
