"""Image and text embeddings under a multimodal backend, cached by provenance.

Neither depends on the workspace, so both live in the shared cache
(:class:`neuroviz.store.SharedCache`): image embeddings one vector per image content hash
(image id) and backend, so a subset or a reordering of already-embedded images costs
nothing; text embeddings per (backend id, hash of the exact text list). A probe set's
matrix in its row order is also kept in the workspace (``arrays/image_emb/``) for a fast
read, memory-mapped: at paper scale (1.28M images x 512 floats is 2.6 GB) callers read the
rows they use. Change the backend, a single image or a single concept and the key changes,
so a stale embedding is never served. Long image runs save each chunk as a part as they go,
so an interrupted run resumes where it stopped, and write the workspace matrix chunk by chunk.
The chunks are embedded in this process or, like extraction's shards (neuroviz/engines.py), by
the actors of a Ray cluster, each building the backend once from its registry name; the calling
process writes every chunk either way, so both engines leave the same files.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

from .backends.base import BackendUnavailable, MultimodalBackend
from .concepts import ConceptSet
from .datasets import load_rgb
from .errors import NeurovizError
from .files import atomic_open, atomic_save_npy
from .progress import Progress
from .provenance import provenance_key
from .store import ProbeFiles, Store

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
    engine: str = "inprocess",
    address: str | None = None,
    backend_spec: str | None = None,
) -> np.ndarray:
    """(n_images, D) L2-normalised embeddings in the probe set's idx order (rows of activations),
    memory-mapped from the workspace's ``arrays/image_emb/`` (read rows with column_scan.take_rows).

    When that file is missing, the rows the shared cache holds are copied from it a block at a
    time, then the others are embedded ``IMAGE_CHUNK`` at a time (and added to the shared cache
    chunk by chunk, so an interrupted run resumes); each block is written straight to its rows,
    so no step holds the whole matrix, whatever the size of the probe set.

    ``engine`` embeds the chunks in this process ("inprocess") or on the actors of a Ray cluster
    ("ray", at ``address`` as for extraction): each actor builds the backend once from
    ``backend_spec`` (its registry name, e.g. "conse:mobilenet_v2"; default ``backend.id``) and
    loads its chunks' images itself, so the probe images must be on storage every node sees (one
    actor per CPU: backends built from a name run on the CPU).
    This process still writes every chunk, as it arrives, to the shared cache and the matrix.
    """
    key = image_embeddings_key(backend, probe_set_id)
    cached = store.load_array("image_emb", key, mmap=True)
    if cached is not None:
        if progress:
            progress(len(cached), len(cached), "image embeddings (cached)")
        return cached
    from . import engines  # here, not at the top: engines imports the extraction code (torch)

    engines.check_engine(engine)
    files = store.probe_files(probe_set_id)
    if not len(files):
        raise EmbeddingError(
            f"Probe set '{probe_set_id}' is not in this store. Open it first (e.g. run an extraction on it, "
            "or `python -m neuroviz embed --probe FOLDER ...`), then compute its embeddings."
        )
    ids = list(files.image_ids)
    backend_key = image_backend_key(backend)
    total = len(ids)
    with atomic_open(store.array_path("image_emb", key), "wb") as fh:
        out = _RowWriter(fh, total)
        for positions, emb in store.shared.image_embedding_blocks(backend_key, ids):
            out.write(positions, emb)
        done = int(out.written.sum())
        if progress and done:
            progress(done, total, "image embeddings (cached)")
        chunks = [range(start, min(total, start + IMAGE_CHUNK)) for start in range(0, total, IMAGE_CHUNK)]
        to_embed = [todo for chunk in chunks if (todo := [i for i in chunk if not out.written[i]])]
        message = f"image embeddings ({backend.id})"

        def encoded(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total, message)

        if engine == "ray":
            spec = backend_spec or backend.id
            factory = functools.partial(_backend_from_spec, spec, backend.id)
            try:
                factory()  # a name that builds no backend, or another one, fails here in one line, not in every actor
            except BackendUnavailable as exc:
                raise EmbeddingError(f"Ray actors build the backend from its registry name, and '{spec}' builds none "
                                     f"({exc}). Give the name it was created from (backend_spec, e.g. 'conse').") from None
            source = _on_ray(factory, store.probe_set_dir(probe_set_id) / "images.parquet", total, to_embed, batch_size,
                             address, encoded)
        else:
            source = _in_process(backend, files, to_embed, batch_size, encoded)
        with contextlib.closing(source):
            for chunk, emb in source:
                store.shared.add_image_embeddings(backend_key, [ids[i] for i in chunk], emb)  # survives an interruption
                out.write(np.asarray(chunk, dtype=np.int64), emb)
        out.finish()
    matrix = store.load_array("image_emb", key, mmap=True)
    assert matrix is not None, "the workspace array was just written"
    return matrix


class EmbeddingError(NeurovizError, ValueError):
    """Embeddings that cannot be computed as asked (an unknown probe set, a backend a worker builds differently)."""


def _encode(backend: MultimodalBackend, images: Sequence, batch_size: int, encoded: Callable[[int], None] | None = None) -> np.ndarray:
    """One chunk's images, ``batch_size`` at a time, as float32 rows."""
    parts = []
    for b in range(0, len(images), batch_size):
        parts.append(backend.encode_images(images[b : b + batch_size], batch_size=batch_size))
        if encoded:
            encoded(len(parts[-1]))
    return np.concatenate(parts).astype(np.float32)


def _in_process(backend: MultimodalBackend, files: ProbeFiles, to_embed: Sequence[list[int]], batch_size: int,
                encoded: Callable[[int], None]) -> Generator[tuple[list[int], np.ndarray], None, None]:
    """(chunk, embeddings) for each chunk, embedded here; decoding the next chunk's images overlaps
    with encoding this one (PNG decoding is not free)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_rows, files, to_embed[0]) if to_embed else None
        for c, chunk in enumerate(to_embed):
            assert pending is not None
            images = pending.result()
            if c + 1 < len(to_embed):
                pending = pool.submit(_load_rows, files, to_embed[c + 1])
            yield chunk, _encode(backend, images, batch_size, encoded)


def _on_ray(backend_factory: Callable[[], MultimodalBackend], probe_source: Path, n_images: int,
            to_embed: Sequence[list[int]], batch_size: int, address: str | None,
            encoded: Callable[[int], None]) -> Generator[tuple[list[int], np.ndarray], None, None]:
    """(chunk, embeddings) for each chunk as a Ray actor returns it (in any order): Ray Data
    ``map_batches`` over the chunks with an actor pool, one backend per actor."""
    from . import engines

    if not to_embed:
        return
    with engines.ray_connection(address) as ray:
        # CPU actors: a backend built from its registry name runs on the CPU (create_multimodal takes no device)
        actors, gpus = engines.actor_slots(ray, len(to_embed), use_gpus=False)
        ds = ray.data.from_items([{"chunk": c, "rows": chunk} for c, chunk in enumerate(to_embed)],
                                 override_num_blocks=len(to_embed))
        results = ds.map_batches(_EmbeddingActor, batch_size=1, concurrency=actors, num_gpus=gpus, num_cpus=1,
                                 fn_constructor_kwargs={"backend_factory": backend_factory, "probe_source": probe_source,
                                                        "n_images": n_images, "batch_size": batch_size})
        # Read in this thread (no poller as for extraction's shards: a chunk is short), so that stopping
        # early closes Ray's iterator, and with it the dataset's execution, before the cluster shuts down.
        rows = iter(results.iter_rows())
        with contextlib.closing(rows):
            for row in rows:
                chunk = to_embed[int(row["chunk"])]
                yield chunk, np.asarray(row["embeddings"], dtype=np.float32)
                encoded(len(chunk))  # once the caller has saved it


class _EmbeddingActor:
    """A Ray Data actor: one backend, any number of chunks (one per call), whose images it reads
    from the probe set's own Parquet file."""

    def __init__(self, backend_factory: Callable[[], MultimodalBackend], probe_source: Path, n_images: int,
                 batch_size: int):
        import torch

        torch.set_num_threads(1)  # one CPU per actor (num_cpus=1): more threads fight the other actors for it
        self.backend, self.batch_size = backend_factory(), batch_size
        self.files = ProbeFiles(probe_source, n_images)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        (chunk,), (rows,) = batch["chunk"], batch["rows"]  # batch_size=1: one chunk per call
        emb = _encode(self.backend, _load_rows(self.files, [int(i) for i in rows]), self.batch_size)
        return {"chunk": np.asarray([chunk], dtype=np.int64), "embeddings": emb[None]}


def _backend_from_spec(spec: str, backend_id: str) -> MultimodalBackend:
    """The backend again, in a Ray actor, from its registry name: the same backend or an error."""
    from .backends.multimodal import create_multimodal

    backend = create_multimodal(spec)
    if backend.id != backend_id:
        raise EmbeddingError(f"The registry name '{spec}' builds the backend '{backend.id}', not '{backend_id}': "
                             "give the name it was created from (backend_spec).")
    return backend


class _RowWriter:
    """Rows of a (rows x D) float32 .npy written in any order into an open file (D from the first
    rows written), so cached rows and newly embedded ones go straight to their place."""

    def __init__(self, fh: IO[bytes], rows: int) -> None:
        self.fh, self.rows = fh, rows
        self.written = np.zeros(rows, dtype=bool)
        self.header = b""
        self.row_bytes = 0

    def _header(self, dim: int) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                      "fortran_order": False, "shape": (self.rows, dim)})
        return buffer.getvalue()

    def write(self, positions: np.ndarray, emb: np.ndarray) -> None:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if not self.header:
            self.header, self.row_bytes = self._header(emb.shape[1]), emb.shape[1] * 4
        positions = np.asarray(positions, dtype=np.int64)
        runs = np.flatnonzero(np.diff(positions) != 1) + 1  # contiguous runs of positions: one write each
        for first, last in zip([0, *runs], [*runs, len(positions)]):
            self.fh.seek(len(self.header) + int(positions[first]) * self.row_bytes)
            self.fh.write(emb[first:last].tobytes())
        self.written[positions] = True

    def finish(self) -> None:
        assert self.written.all(), "every row is written before the header"
        self.fh.seek(0)
        self.fh.write(self.header)


def _load_rows(files: ProbeFiles, rows: Sequence[int]) -> list:
    return [load_rgb(row.path) for row in files.rows(rows)]


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
