"""Image and text embeddings under a multimodal backend, cached in the store by provenance.

Image embeddings of a probe set are named by (backend id, probe set id); text embeddings by
(backend id, hash of the exact text list). Change the backend, a single image or a single
concept and the key changes, so a stale embedding is never served. Long image runs save
chunks as they go and resume from them after an interruption.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backends.base import MultimodalBackend
from .concepts import ConceptSet
from .datasets import load_rgb
from .progress import Progress
from .provenance import provenance_key
from .store import Store

EMBEDDINGS_CODE_VERSION = "1"
IMAGE_CHUNK = 256  # images per resumable chunk


def image_embeddings_key(backend: MultimodalBackend, probe_set_id: str) -> str:
    """Provenance key of a probe set's image embeddings under a backend."""
    return provenance_key({"kind": "image_emb", "backend": backend.id, "probe_set": probe_set_id, "code": EMBEDDINGS_CODE_VERSION})


def image_embeddings(
    backend: MultimodalBackend,
    store: Store,
    probe_set_id: str,
    progress: Progress | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """(n_images, D) L2-normalised embeddings in the probe set's idx order (rows of activations).

    Computed once per (backend, probe set) and then read from ``arrays/image_emb/``.
    """
    key = image_embeddings_key(backend, probe_set_id)
    cached = store.load_array("image_emb", key)
    if cached is not None:
        if progress:
            progress(len(cached), len(cached), "image embeddings (cached)")
        return cached
    rows = sorted(store.probe_images(probe_set_id), key=lambda r: r["idx"])
    if not rows:
        raise ValueError(
            f"Probe set '{probe_set_id}' is not in this store. Open it first (e.g. run an extraction on it, "
            "or `python -m neuroviz extract ...`), then compute its embeddings."
        )
    paths = [r["path"] for r in rows]
    partial_kind = f"image_emb_partial/{key}"
    chunks: list[np.ndarray] = []
    total = len(paths)
    # Decoding the next chunk's images overlaps with encoding this one (PNG decoding is not free).
    with ThreadPoolExecutor(max_workers=1) as pool:
        starts = list(range(0, total, IMAGE_CHUNK))
        pending, pending_start = None, -1
        for start in starts:
            chunk_id = f"{start:08d}"
            done = store.load_array(partial_kind, chunk_id)
            if done is not None:
                chunks.append(done)
                if progress:
                    progress(min(start + IMAGE_CHUNK, total), total, "image embeddings (resumed)")
                continue
            if pending is not None and pending_start == start:
                images = pending.result()
            else:
                images = _load_all(paths[start : start + IMAGE_CHUNK])
            pending = None
            next_start = start + IMAGE_CHUNK
            if next_start < total:
                pending_start = next_start
                pending = pool.submit(_load_all, paths[next_start : next_start + IMAGE_CHUNK])
            parts = []
            for b in range(0, len(images), batch_size):
                parts.append(backend.encode_images(images[b : b + batch_size], batch_size=batch_size))
                if progress:
                    progress(min(start + b + batch_size, total), total, f"image embeddings ({backend.id})")
            chunk = np.concatenate(parts).astype(np.float32)
            store.save_array(partial_kind, chunk_id, chunk)
            chunks.append(chunk)
    emb = np.concatenate(chunks).astype(np.float32)
    if emb.shape[0] != total:
        raise RuntimeError(f"Embedded {emb.shape[0]} images for a probe set of {total}.")
    store.save_array("image_emb", key, emb)
    shutil.rmtree(store.array_path(partial_kind, "x").parent, ignore_errors=True)
    return emb


def _load_all(paths: Sequence[str]):
    return [load_rgb(p) for p in paths]


def _texts_of(texts_or_concept_set: Sequence[str] | ConceptSet) -> list[str]:
    if isinstance(texts_or_concept_set, ConceptSet):
        return list(texts_or_concept_set.concepts)
    if isinstance(texts_or_concept_set, str):
        raise TypeError("text_embeddings takes a list of texts or a ConceptSet, not one string (wrap it in a list).")
    return [str(t) for t in texts_or_concept_set]


def text_embeddings_key(backend: MultimodalBackend, texts: Sequence[str]) -> str:
    """Provenance key of a text list's embeddings under a backend (order matters: rows follow it)."""
    return provenance_key({"kind": "text_emb", "backend": backend.id, "texts": provenance_key(list(texts), 32), "code": EMBEDDINGS_CODE_VERSION})


def text_embeddings(
    backend: MultimodalBackend,
    store: Store,
    texts_or_concept_set: Sequence[str] | ConceptSet,
    progress: Progress | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """(n_texts, D) L2-normalised embeddings, one row per text in order; cached in ``arrays/text_emb/``."""
    texts = _texts_of(texts_or_concept_set)
    key = text_embeddings_key(backend, texts)
    cached = store.load_array("text_emb", key)
    if cached is not None:
        return cached
    parts = []
    for start in range(0, len(texts), batch_size):
        parts.append(backend.encode_texts(texts[start : start + batch_size], batch_size=batch_size))
        if progress:
            progress(min(start + batch_size, len(texts)), len(texts), f"text embeddings ({backend.id})")
    if parts:
        emb = np.concatenate(parts).astype(np.float32)
    else:
        emb = backend.encode_texts([]).astype(np.float32)
    store.save_array("text_emb", key, emb)
    return emb
