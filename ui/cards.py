"""Drawing blocks shared by the pages: neuron cards, label lines, image grids, geometry.

Everything here reads through ui.data (cached) and neuroviz.images (pictures cached on
disk), so a page made of these blocks renders from a warm cache without decoding images
or opening the database more than once.
"""

from __future__ import annotations

import html
import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from neuroviz import images
from neuroviz.store import RunInfo, Store
from ui import data

MOSAIC_IMAGES = 9
MOSAIC_TILE = images.CARD_TILE
_prerender_lock = threading.Lock()  # guards the sets of started background threads


# -- the model's view of the probe images --------------------------------------------------------
def run_geometry(store: Store, run: RunInfo) -> images.ViewGeometry:
    """How the run's model cropped its inputs; the ImageNet default (224 of 256) until known.

    The geometry is learnt once per preprocessing id (see :func:`learn_geometry`) and kept as
    a small record, so pages never load a model just to draw a picture.
    """
    return _recorded_view(str(store.root), data.db_version(store), run.preprocess_id) or images.IMAGENET_VIEW


@st.cache_resource(show_spinner=False, max_entries=32)
def _recorded_view(root: str, version: tuple, preprocess_id: str) -> images.ViewGeometry | None:
    return images.recorded_view(data._store_for(root), preprocess_id)


def geometry_known(store: Store, run: RunInfo) -> bool:
    return _recorded_view(str(store.root), data.db_version(store), run.preprocess_id) is not None


def learn_geometry(store: Store, run: RunInfo, model=None) -> images.ViewGeometry | None:
    """Load the run's model once to find its exact crop (image and resize sizes) and record it:
    for caches extracted before extraction recorded it (see ``images.record_view``).

    Runs extracted at a custom image size are matched by trying the usual sizes: the stored
    preprocess id is a hash, so the only way back is to recompute it.
    """
    if model is None:
        from neuroviz.models import create

        model = create(run.model_spec)
    base = model.preprocessing
    candidates = [base] + [base.scaled(s) for s in (32, 48, 64, 96, 112, 128, 160, 192, 224, 240, 256, 288, 299, 320, 336, 384, 448, 512)]
    for prep in candidates:
        if prep.id == run.preprocess_id:
            return images.record_view(store, prep)
    return None


_learning: set[str] = set()


def learn_geometry_in_background(store: Store, run: RunInfo) -> bool:
    """Start :func:`learn_geometry` in a thread (once per preprocessing), so a page never
    waits seconds for a model load; pictures use the ImageNet crop until it is known, which
    is exact for ImageNet-style models and close for most others. Returns whether started."""
    with _prerender_lock:
        if run.preprocess_id in _learning:
            return False
        _learning.add(run.preprocess_id)

    def work() -> None:
        try:
            learn_geometry(store, run)
        except Exception:  # a model that cannot load here: keep the default crop
            logging.getLogger("neuroviz.ui").info("could not learn the crop of %s", run.model_spec, exc_info=True)

    threading.Thread(target=work, name=f"geometry-{run.preprocess_id}", daemon=True).start()
    return True


# -- labels -------------------------------------------------------------------------------------
def top_labels(labels: pd.DataFrame, methods: Sequence[str]) -> dict[int, dict[str, dict]]:
    """neuron -> method -> {label, score, calibrated, backend} of each method's answer (rank 0)."""
    if labels.empty:
        return {}
    top = labels[(labels["rank"] == 0) & labels["method"].isin(list(methods))]
    out: dict[int, dict[str, dict]] = {}
    for row in top.itertuples(index=False):
        out.setdefault(int(row.neuron), {})[row.method] = {
            "label": str(row.label), "score": float(row.score),
            "calibrated": None if row.calibrated is None or (isinstance(row.calibrated, float) and math.isnan(row.calibrated)) else float(row.calibrated),
            "backend": str(row.backend or ""),
        }
    return out


def format_score(score: float | None) -> str:
    if score is None or (isinstance(score, float) and not math.isfinite(score)):
        return "–"
    return f"{score:.3g}" if abs(score) < 1000 else f"{score:.0f}"


def label_line_html(method: str, entry: dict | None, compact: bool = False) -> str:
    """One method's answer as a small HTML line: title, label, score, backend (hover)."""
    title = html.escape(data.method_title(method))
    if entry is None:
        return f"<div class='nv-label nv-missing'><span class='nv-method'>{title}</span> <i>not labelled</i></div>"
    backend = html.escape(entry.get("backend") or "")
    score = format_score(entry.get("score"))
    cal = entry.get("calibrated")
    cal_txt = f" · p={cal:.2f}" if cal is not None else ""
    label = html.escape(entry["label"])
    extra = "" if compact else f" <span class='nv-backend'>{backend}</span>"
    return (f"<div class='nv-label' title='{title} via {backend}'><span class='nv-method'>{title}</span> "
            f"<b>{label}</b> <span class='nv-score'>{score}{cal_txt}</span>{extra}</div>")


CARD_CSS = """
<style>
.nv-label {font-size: 0.82rem; line-height: 1.25; margin: 0.1rem 0; overflow-wrap: anywhere;}
.nv-method {color: #6b7280; font-size: 0.74rem; text-transform: uppercase; letter-spacing: 0.02em; margin-right: 0.25rem;}
.nv-score {color: #2563eb; font-variant-numeric: tabular-nums; margin-left: 0.2rem;}
.nv-backend {color: #9ca3af; font-size: 0.7rem; margin-left: 0.2rem;}
.nv-missing {color: #9ca3af;}
.nv-agree {color: #059669; font-size: 0.75rem;}
.nv-disagree {color: #d97706; font-size: 0.75rem;}
</style>
"""


def inject_css() -> None:
    st.html(CARD_CSS)


def normalised(text: str) -> str:
    return " ".join(str(text).lower().replace("_", " ").split())


def agreement(entries: dict[str, dict], methods: Sequence[str], similar: dict[tuple[str, str], float] | None = None,
              threshold: float = 0.8) -> bool | None:
    """Whether the methods gave the same answer: equal text, or (with ``similar``, a cosine
    per pair of normalised labels) every pair above ``threshold``. None with < 2 labels."""
    labels = [normalised(entries[m]["label"]) for m in methods if m in entries]
    if len(labels) < 2:
        return None
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b = labels[i], labels[j]
            if a == b:
                continue
            if similar is None or similar.get((a, b), similar.get((b, a), 0.0)) < threshold:
                return False
    return True


# -- pictures -------------------------------------------------------------------------------------
def mosaic_for(store: Store, run: RunInfo, neuron: int, n: int = MOSAIC_IMAGES, tile: int = MOSAIC_TILE,
               geometry: images.ViewGeometry | None = None, top: data.TopK | None = None,
               files: data.ProbeFiles | None = None) -> Path | None:
    """The cached mosaic of a neuron's top ``n`` images (None when it has none).

    Pass ``top``/``files``/``geometry`` when drawing many cards: each is one cache lookup.
    """
    top = top or data.top_k(store, run.run_key)
    files = files or data.run_files(store, run.run_key)
    if not 0 <= neuron < len(top.image_idx):
        return None
    idxs = [int(i) for i in top.image_idx[neuron][:n] if 0 <= i < len(files)]
    if not idxs:
        return None
    return images.neuron_mosaic(store.root, run.run_key, neuron, [files.paths[i] for i in idxs], tile=tile,
                                geometry=geometry or run_geometry(store, run),
                                content_ids=[files.image_ids[i] for i in idxs])


def mosaics_for(store: Store, run: RunInfo, neurons: Sequence[int], geometry: images.ViewGeometry,
                top: data.TopK, files: data.ProbeFiles, workers: int = 4) -> dict[int, Path | None]:
    """The card mosaics of ``neurons``, built in a few threads when not yet on disk.

    Decoding and resizing JPEGs releases the GIL, so on the first visit of a page (24 mosaics
    of 9 images) the threads decode on every core instead of one.
    """
    def one(neuron: int) -> Path | None:
        return mosaic_for(store, run, neuron, geometry=geometry, top=top, files=files)

    neurons = list(neurons)
    if len(neurons) <= 1:
        return {n: one(n) for n in neurons}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mosaic") as pool:
        return dict(zip(neurons, pool.map(one, neurons)))


_prerendering: set[tuple] = set()


def prerender_mosaics(store: Store, run: RunInfo, neurons: Sequence[int], geometry: images.ViewGeometry,
                      top: data.TopK, files: data.ProbeFiles) -> bool:
    """Build the card mosaics of ``neurons`` in a background thread, once per run and geometry.

    The first visit of a layer pays for decoding its probe images; doing the following pages'
    pictures while the user looks at the first makes paging instant. Pure PIL/disk work, no
    Streamlit calls in the thread; files are written atomically, so a page racing it is safe.
    Returns whether a thread was started.
    """
    key = (str(store.root), run.run_key, geometry)
    with _prerender_lock:
        if key in _prerendering:
            return False
        _prerendering.add(key)

    def work() -> None:
        for neuron in list(neurons):
            try:
                mosaic_for(store, run, neuron, geometry=geometry, top=top, files=files)
            except OSError:  # cache folder gone or full: the page builds what it shows
                return

    threading.Thread(target=work, name=f"prerender-{run.run_key}", daemon=True).start()
    return True


def show_image(path: Path | str | None, where=None, **kwargs) -> None:
    """st.image of a cached picture, passed as bytes: Streamlit's handling of path strings
    costs a getcwd per image, which adds up over a grid."""
    if path is None:
        return
    (where or st).image(Path(path).read_bytes(), **kwargs)


def thumb_paths(store: Store, run: RunInfo, image_idxs: Sequence[int], size: int = images.GRID_SIZE,
                geometry: images.ViewGeometry | None = None) -> list[Path | None]:
    """Cached square thumbnails (model view) of probe images by index."""
    files = data.run_files(store, run.run_key)
    geometry = geometry or run_geometry(store, run)
    return [images.thumbnail(store.root, files.paths[int(i)], size, geometry) if 0 <= i < len(files) else None
            for i in image_idxs]


def image_grid(paths: Sequence[Path | str | None], captions: Sequence[str], cols: int = 6) -> None:
    """Images in rows of ``cols`` columns with captions (missing files are skipped)."""
    for start in range(0, len(paths), cols):
        columns = st.columns(cols, gap="small")
        for col, path, caption in zip(columns, paths[start:start + cols], captions[start:start + cols]):
            show_image(path, col, caption=caption, width="stretch")


def activation_column(store: Store, run_key: str, neuron: int) -> np.ndarray:
    """One neuron's activation over every probe image (read from the memory-mapped array)."""
    return np.asarray(store.activations(run_key)[:, neuron], dtype=np.float32)
