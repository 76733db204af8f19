"""Image and text embeddings under a multimodal backend, cached by provenance.

Neither depends on the workspace, so both live in the shared cache
(:class:`neuroviz.store.SharedCache`): image embeddings one vector per image content hash
(image id) and backend, so a subset or a reordering of already-embedded images costs
nothing; text embeddings per (backend id, hash of the exact text list). A probe set's
matrix in its row order is also kept in the workspace (``arrays/image_emb/``) for a fast
read. Change the backend, a single image or a single concept and the key changes, so a stale
embedding is never served. Long image runs save each chunk as a part as they go, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backends.base import MultimodalBackend
from .concepts import ConceptSet
from .datasets import load_rgb
from .files import atomic_save_npy
from .progress import Progress
from .provenance import provenance_key
from .store import Store

EMBEDDINGS_CODE_VERSION = "1"
IMAGE_CHUNK = 256  # images per resumable chunk


def image_embeddings_key(backend: MultimodalBackend, probe_set_id: str) -> str:
    """Provenance key of a probe set's image embeddings under a backend."""
    return provenance_key({"kind": "image_emb", "backend": backend.id, "probe_set": probe_set_id, "code": EMBEDDINGS_CODE_VERSION})


def image_backend_key(backend: MultimodalBackend) -> str:
    """The shared cache's folder for one backend's image embeddings."""
    return provenance_key({"kind": "image_emb", "backend": backend.id, "code": EMBEDDINGS_CODE_VERSION})


def image_embeddings(
    backend: MultimodalBackend,
    store: Store,
    probe_set_id: str,
    progress: Progress | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """(n_images, D) L2-normalised embeddings in the probe set's idx order (rows of activations).

    Read from the workspace's ``arrays/image_emb/`` when there; else every image the shared
    cache already has is read from it and only the others are embedded.
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
    ids = [r["image_id"] for r in rows]
    backend_key = image_backend_key(backend)
    found = store.shared.image_embeddings(backend_key, ids)
    missing = [i for i, image_id in enumerate(ids) if image_id not in found]
    total = len(ids)
    if progress and found:
        progress(total - len(missing), total, "image embeddings (cached)")
    # Decoding the next chunk's images overlaps with encoding this one (PNG decoding is not free).
    chunks = [missing[start : start + IMAGE_CHUNK] for start in range(0, len(missing), IMAGE_CHUNK)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_all, [rows[i]["path"] for i in chunks[0]]) if chunks else None
        for c, chunk in enumerate(chunks):
            images = pending.result() if pending is not None else []
            pending = pool.submit(_load_all, [rows[i]["path"] for i in chunks[c + 1]]) if c + 1 < len(chunks) else None
            parts = []
            for b in range(0, len(images), batch_size):
                parts.append(backend.encode_images(images[b : b + batch_size], batch_size=batch_size))
                if progress:
                    done = total - len(missing) + c * IMAGE_CHUNK + min(b + batch_size, len(images))
                    progress(done, total, f"image embeddings ({backend.id})")
            emb = np.concatenate(parts).astype(np.float32)
            chunk_ids = [ids[i] for i in chunk]
            store.shared.add_image_embeddings(backend_key, chunk_ids, emb)  # a finished chunk survives an interruption
            found.update(zip(chunk_ids, emb))
    matrix = np.stack([found[image_id] for image_id in ids]).astype(np.float32)
    store.save_array("image_emb", key, matrix)
    return matrix


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
    """(n_texts, D) L2-normalised embeddings, one row per text in order; cached in the shared cache."""
    texts = _texts_of(texts_or_concept_set)
    key = text_embeddings_key(backend, texts)
    shared = store.shared
    path = shared.adopt(shared.text_embeddings_path(key), store.array_path("text_emb", key))
    if path.exists():
        return np.load(path)
    parts = []
    for start in range(0, len(texts), batch_size):
        parts.append(backend.encode_texts(texts[start : start + batch_size], batch_size=batch_size))
        if progress:
            progress(min(start + batch_size, len(texts)), len(texts), f"text embeddings ({backend.id})")
    if parts:
        emb = np.concatenate(parts).astype(np.float32)
    else:
        emb = backend.encode_texts([]).astype(np.float32)
    atomic_save_npy(shared.text_embeddings_path(key), emb)
    return emb
