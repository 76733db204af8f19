"""Drawing blocks shared by the pages: neuron cards, label lines, image grids, geometry.

Everything here reads through ui.data (cached) and neuroviz.images (pictures cached on
disk), so a page made of these blocks renders from a warm cache without decoding images
or opening the database more than once.
"""

from __future__ import annotations

import html
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import streamlit as st

from neuroviz import images
from neuroviz.store import ProbeRow, RunInfo, Store
from ui import data

MOSAIC_IMAGES = 9
MOSAIC_TILE = images.CARD_TILE
_prerender_lock = threading.Lock()  # guards the set of started prerender threads


# -- the model's view of the probe images --------------------------------------------------------
UNKNOWN_GEOMETRY_NOTE = ("Maps are aligned assuming the usual ImageNet crop (224 of 256): this run was extracted "
                         "before neuroviz recorded each model's crop, and its preprocessing is not a usual one. "
                         "Extract the layer again to align them exactly.")


def run_geometry(store: Store, run: RunInfo) -> images.ViewGeometry:
    """How the run's model cropped its inputs, so pictures show what the model saw.

    Extraction records it (``images.record_view``); for older runs it is derived from the
    preprocessing id without a model (``images.derived_view``); else the ImageNet default.
    """
    return _view(str(store.root), data.db_version(store), run.preprocess_id) or images.IMAGENET_VIEW


@st.cache_resource(show_spinner=False, max_entries=32)
def _view(root: str, version: tuple, preprocess_id: str) -> images.ViewGeometry | None:
    return images.recorded_view(data.get_store(root), preprocess_id) or _derived_view(preprocess_id)


@st.cache_resource(show_spinner=False, max_entries=32)
def _derived_view(preprocess_id: str) -> images.ViewGeometry | None:
    return images.derived_view(preprocess_id)  # a pure function of the id: computed once per process


def geometry_known(store: Store, run: RunInfo) -> bool:
    """Whether :func:`run_geometry` is the run's own crop rather than the ImageNet guess."""
    return _view(str(store.root), data.db_version(store), run.preprocess_id) is not None


# -- labels -------------------------------------------------------------------------------------
def format_score(score: float | None) -> str:
    if score is None or (isinstance(score, float) and not math.isfinite(score)):
        return "–"
    return f"{score:.3g}" if abs(score) < 1000 else f"{score:.0f}"


# What each method's raw score measures (hover text); the calibrated score is the comparable one.
SCORE_SCALES = {
    "clip_dissect": "CLIP-Dissect raw score: the concept's similarity to the neuron's top images (soft-WPMI by "
                    "default), higher is better; its scale depends on the layer, concept set and backend.",
    "milan": "MILAN raw score: pointwise mutual information, log p(label | top image regions) minus lambda x "
             "log p(label), in nats per word; higher is better, about -5 to 5.",
    "dnd": "Describe-and-Dissect raw score: the candidate's rank among the neuron's candidates times its image "
           "similarity weight (-1 to 1); higher is better, at most the number of candidates.",
    "netdissect": "Network Dissection raw score: IoU of the neuron's thresholded maps with the concept's masks, 0 to 1.",
}
CALIBRATED_HELP = ("Comparable across methods and layers: the share of chance scores (the same method with the "
                   "images shuffled) that this label beats. 100 % = no shuffle scored as high.")


def score_scale(method: str) -> str:
    """Hover text for a method's raw score."""
    return SCORE_SCALES.get(method, f"{data.method_title(method)} raw score: higher is better, on the method's own scale.")


def calibrated_text(calibrated: float | None) -> str:
    """The calibrated percentile in words ("beats 73 % of chance"), or "" without one."""
    if calibrated is None or (isinstance(calibrated, float) and not math.isfinite(calibrated)):
        return ""
    return f"beats {100 * calibrated:.0f} % of chance"


def score_text(method: str, score: float | None, calibrated: float | None) -> str:
    """The comparable score first, then the raw one with its method's name: plain text."""
    raw = f"{data.method_title(method)} score {format_score(score)}"
    comparable = calibrated_text(calibrated)
    return f"{comparable} · {raw}" if comparable else raw


def label_line_html(method: str, entry: dict | None) -> str:
    """One method's answer as a small HTML line: title, label, score (comparable first, each
    explained on hover); the backend only on hover (long strings clutter the cards)."""
    title = html.escape(data.method_title(method))
    if entry is None:
        return f"<div class='nv-label nv-missing'><span class='nv-method'>{title}</span> <i>not labelled</i></div>"
    backend = html.escape(entry.get("backend") or "", quote=True)
    score = format_score(entry.get("score"))
    comparable = calibrated_text(entry.get("calibrated"))
    parts = []
    if comparable:
        parts.append(f"<span class='nv-calibrated' title='{html.escape(CALIBRATED_HELP, quote=True)}'>{comparable}</span>")
    parts.append(f"<span class='nv-score' title='{html.escape(score_scale(method), quote=True)}'>"
                 f"{'raw ' if comparable else 'score '}{score}</span>")
    label = html.escape(entry["label"])
    return (f"<div class='nv-label' title='{title} via {backend}'><span class='nv-method'>{title}</span> "
            f"<b>{label}</b> {' · '.join(parts)}</div>")


CARD_CSS = """
<style>
.nv-label {font-size: 0.82rem; line-height: 1.25; margin: 0.1rem 0; overflow-wrap: anywhere;}
.nv-method {color: #6b7280; font-size: 0.74rem; text-transform: uppercase; letter-spacing: 0.02em; margin-right: 0.25rem;}
.nv-score {color: #6b7280; font-variant-numeric: tabular-nums; margin-left: 0.2rem; cursor: help;}
.nv-calibrated {color: #2563eb; font-variant-numeric: tabular-nums; margin-left: 0.2rem; cursor: help;}
.nv-match {color: #7c3aed; font-size: 0.74rem;}
.nv-missing {color: #9ca3af;}
.nv-agree {color: #059669; font-size: 0.75rem;}
.nv-disagree {color: #d97706; font-size: 0.75rem;}
</style>
"""


def inject_css() -> None:
    st.html(CARD_CSS)


# -- pictures -------------------------------------------------------------------------------------
def mosaic_for(store: Store, run: RunInfo, neuron: int, n: int = MOSAIC_IMAGES, tile: int = MOSAIC_TILE,
               geometry: images.ViewGeometry | None = None, top: data.TopK | None = None,
               files: data.ProbeFiles | None = None) -> Path | None:
    """The cached mosaic of a neuron's top ``n`` images (None when it has none).

    Pass ``top``/``files``/``geometry`` when drawing many cards: each is one cache lookup.
    """
    top = top or data.top_k(store, run.run_key)
    files = files or data.run_files(store, run.run_key)
    rows = top_probe_rows(top, files, [neuron], n)
    return _mosaic(store, run, neuron, rows[neuron], tile, geometry or run_geometry(store, run))


def top_probe_rows(top: data.TopK, files: data.ProbeFiles, neurons: Sequence[int],
                   n: int = MOSAIC_IMAGES) -> dict[int, list[ProbeRow]]:
    """neuron -> the probe rows of its top ``n`` images, all read in one query."""
    idxs = {neuron: [int(i) for i in top.image_idx[neuron][:n] if 0 <= i < len(files)] if 0 <= neuron < len(top.image_idx)
            else [] for neuron in neurons}
    wanted = sorted({i for row in idxs.values() for i in row})
    found = dict(zip(wanted, files.rows(wanted)))
    return {neuron: [found[i] for i in row] for neuron, row in idxs.items()}


def _mosaic(store: Store, run: RunInfo, neuron: int, rows: Sequence[ProbeRow], tile: int,
            geometry: images.ViewGeometry) -> Path | None:
    """Pure PIL and disk work (safe in any thread): the mosaic of these probe rows' pictures."""
    if not rows:
        return None
    return images.neuron_mosaic(store.root, run.run_key, neuron, [r.path for r in rows], tile=tile, geometry=geometry,
                                content_ids=[r.image_id for r in rows])


T = TypeVar("T")


def in_threads(builders: Sequence[Callable[[], T]], workers: int = 4) -> list[T]:
    """Each builder's result, in order, made in a few threads: building a picture is decoding,
    resizing and a synced write, which release the GIL, so a cold page's pictures are made on
    every core and their disk waits overlap. Builders must not call Streamlit."""
    if len(builders) <= 1:
        return [build() for build in builders]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="picture") as pool:
        return list(pool.map(lambda build: build(), builders))


def mosaics_for(store: Store, run: RunInfo, neurons: Sequence[int], geometry: images.ViewGeometry,
                top: data.TopK, files: data.ProbeFiles, ahead: Sequence[int] = (), workers: int = 4) -> dict[int, Path | None]:
    """The card mosaics of ``neurons``, built in a few threads when not yet on disk
    (:func:`in_threads`). Their probe rows are read in one query, with those of ``ahead`` (the
    neurons a :func:`prerender_mosaics` call after drawing the page will need) while their
    mosaics have not been started, so that call reads nothing."""
    neurons = list(neurons)
    with _prerender_lock:
        started = (str(store.root), run.run_key, geometry) in _prerendering
    rows = top_probe_rows(top, files, neurons + ([] if started else list(ahead)))
    return dict(zip(neurons, in_threads([lambda n=n: _mosaic(store, run, n, rows[n], MOSAIC_TILE, geometry)
                                         for n in neurons], workers)))


_prerendering: set[tuple] = set()  # (cache, run, geometry) whose mosaics a background thread has made


def prerender_mosaics(store: Store, run: RunInfo, neurons: Sequence[int], geometry: images.ViewGeometry,
                      top: data.TopK, files: data.ProbeFiles) -> bool:
    """Build the card mosaics of ``neurons`` in a background thread, once per run and geometry.

    The first visit of a layer pays for decoding its probe images; doing the following pages'
    pictures while the user looks at the first makes paging instant. Call it after drawing the
    page (the thread competes for the interpreter). The probe rows are read here, in this
    thread (kept already when :func:`mosaics_for` had them as ``ahead``); the background thread
    does only PIL and disk work: no Streamlit call and no DuckDB query (a daemon thread inside
    one when the interpreter exits aborts the process). Files are written atomically, so a page
    racing it is safe. Returns whether a thread was started.
    """
    key = (str(store.root), run.run_key, geometry)
    with _prerender_lock:
        if key in _prerendering:
            return False
        _prerendering.add(key)
    rows = top_probe_rows(top, files, neurons)

    def work() -> None:
        for neuron in list(neurons):
            try:
                _mosaic(store, run, neuron, rows[neuron], MOSAIC_TILE, geometry)
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
    inside = [int(i) for i in image_idxs if 0 <= i < len(files)]
    paths = dict(zip(inside, (r.path for r in files.rows(inside))))
    return in_threads([(lambda src=paths[int(i)]: images.thumbnail(store.root, src, size, geometry)) if int(i) in paths
                       else (lambda: None) for i in image_idxs])


def image_grid(paths: Sequence[Path | str | None], captions: Sequence[str], cols: int = 6) -> None:
    """Images in rows of ``cols`` columns with captions (missing files are skipped)."""
    for start in range(0, len(paths), cols):
        columns = st.columns(cols, gap="small")
        for col, path, caption in zip(columns, paths[start:start + cols], captions[start:start + cols]):
            show_image(path, col, caption=caption, width="stretch")


def activation_column(store: Store, run_key: str, neuron: int) -> np.ndarray:
    """One neuron's activation over every probe image: a copy read through the memory-mapped
    array (the whole file is paged through, ~50 ms at 100,000 x 512: cache what is made of it)."""
    return np.array(store.activations(run_key)[:, neuron], dtype=np.float32)
