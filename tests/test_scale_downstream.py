"""Downstream at scale (issue 11.4): CLIP-Dissect and image embeddings read a run's arrays in
bounded pieces, and the results do not depend on the size of the pieces."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from neuroviz import column_scan, embeddings
from neuroviz.backends.base import MultimodalBackend
from neuroviz.column_scan import column_block, scan_columns, take_rows
from neuroviz.methods import clip_dissect as cd
from neuroviz.methods.clip_dissect import SIMILARITY_FUNCTIONS, ClipDissectConfig, ImageConceptSimilarity, label_neurons
from neuroviz.synthetic_probe import draw_image, image_label, image_path, write_probe_set


def reference_top(a: np.ndarray, k: int) -> np.ndarray:
    """(columns, k) rows of each column's k largest values, ties to the lower row: by a full sort."""
    return np.stack([np.lexsort((np.arange(len(a)), -a[:, j]))[:k] for j in range(a.shape[1])])


def saved(tmp_path: Path, a: np.ndarray, name: str = "a.npy") -> np.ndarray:
    np.save(tmp_path / name, a)
    return np.load(tmp_path / name, mmap_mode="r")


@pytest.mark.parametrize("block_bytes", [1, 4 * 7 * 13, None])
def test_streaming_top_k_matches_a_full_sort_with_ties(tmp_path, block_bytes):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, (500, 7)).astype(np.float32)  # many ties: the tie rule decides
    a[:, 3] = 0.0  # a constant column
    m = saved(tmp_path, a)
    scan = scan_columns(m, 40, block_bytes=block_bytes)
    np.testing.assert_array_equal(scan.indices, reference_top(a, 40))
    np.testing.assert_array_equal(scan.values, np.take_along_axis(a.T, reference_top(a, 40), axis=1))
    np.testing.assert_array_equal(scan.minimum, a.min(0))
    np.testing.assert_array_equal(scan.constant, np.arange(7) == 3)
    cols = [5, 0]
    np.testing.assert_array_equal(scan_columns(m, 40, cols, block_bytes).indices, reference_top(a, 40)[cols])
    assert scan_columns(a, 900).indices.shape == (7, 500)  # k beyond the rows: every row, sorted


def test_rows_and_columns_read_from_a_memmap_equal_the_array(tmp_path):
    a = np.random.default_rng(1).normal(size=(300, 11)).astype(np.float32)
    m = saved(tmp_path, a)
    index = np.array([299, 4, 4, 150, 0])
    np.testing.assert_array_equal(take_rows(m, index), a[index])
    np.testing.assert_array_equal(take_rows(m, np.arange(20, 60)), a[20:60])
    np.testing.assert_array_equal(column_block(m, [9, 2], block_bytes=100), a[:, [9, 2]])


def _resident_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status RssFile on this system")
    return 0.0


def test_a_scan_leaves_no_file_pages_resident(tmp_path):
    """The whole point of reading in row blocks: after a pass over a 96 MB acts.npy the process
    does not hold it (pages read through one long-lived map would all stay resident)."""
    a = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(48_000, 512))
    a[:] = np.arange(512, dtype=np.float32)
    a.flush()
    del a
    m = np.load(tmp_path / "big.npy", mmap_mode="r")
    before = _resident_file_mb()
    scan = scan_columns(m, 10, block_bytes=4 * 2**20)
    column_block(m, [1, 2], block_bytes=4 * 2**20)
    take_rows(m, np.arange(0, 48_000, 7))
    assert _resident_file_mb() - before < 40, "the scan kept the file's pages resident"
    assert scan.indices[0].tolist() == list(range(10))  # all ties: the lowest rows
    touched = np.asarray(m[:, 0]).copy()  # the control: a column read through the long-lived map
    assert len(touched) == 48_000 and _resident_file_mb() - before > 60


@pytest.mark.parametrize("similarity", SIMILARITY_FUNCTIONS)
def test_clip_dissect_on_a_memmap_in_small_pieces_equals_one_piece(tmp_path, monkeypatch, similarity):
    rng = np.random.default_rng(3)
    img = rng.normal(size=(240, 16)).astype(np.float32)
    txt = rng.normal(size=(30, 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    p = img @ txt.T
    acts = np.concatenate([p[:, [4, 17]] + 0.01 * rng.normal(size=(240, 2)), np.maximum(rng.normal(size=(240, 20)), 0)],
                          axis=1).astype(np.float32)
    acts[:, 21] = 1.0  # a constant neuron
    config = ClipDissectConfig(similarity=similarity, null_shuffles=5, shared_null_draws=30)
    whole = label_neurons(acts, ImageConceptSimilarity(img, txt), config)
    acts_map, img_map = saved(tmp_path, acts, "acts.npy"), saved(tmp_path, img, "img.npy")
    monkeypatch.setattr(column_scan, "ROW_BLOCK_BYTES", 4 * 22 * 9)  # 9-image row blocks
    monkeypatch.setattr(cd, "_BLOCK_BYTES", 7 * 30 * 4)  # 7-image blocks of P
    monkeypatch.setattr(cd, "_PROBABILITY_BYTES", 4 * 30 * 25)  # p(c|x) of 25 images at a time: refilled often
    monkeypatch.setattr(cd, "_COLUMN_BYTES", 4 * 240 * 3)  # 3 neurons' columns at a time
    pieces = label_neurons(acts_map, ImageConceptSimilarity(img_map, txt), config)
    np.testing.assert_array_equal(pieces.concept_index, whole.concept_index)
    np.testing.assert_allclose(pieces.scores, whole.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pieces.calibrated, whole.calibrated)
    np.testing.assert_array_equal(pieces.constant, np.arange(22) == 21)
    assert whole.concept_index[0, 0] == 4 and whole.concept_index[1, 0] == 17
    subset = label_neurons(acts_map, ImageConceptSimilarity(img_map, txt), config, neurons=[17, 1, 0])
    np.testing.assert_array_equal(subset.concept_index, whole.concept_index[[17, 1, 0]])


def test_probabilities_within_a_budget_agree_with_unbounded_ones():
    rng = np.random.default_rng(4)
    sim = ImageConceptSimilarity.from_matrix(rng.normal(size=(100, 12)).astype(np.float32))
    sets = np.stack([rng.permutation(100)[:8] for _ in range(40)])
    weights = cd.membership_weights(ClipDissectConfig(), 8)
    roomy = cd.ConceptProbabilities(sim, 10.0).log_likelihood(sets, weights)
    tight = cd.ConceptProbabilities(sim, 10.0, budget_bytes=4 * 12 * 10)  # 10 rows: the sets need concept blocks
    assert tight.capacity == 10
    np.testing.assert_allclose(tight.log_likelihood(sets, weights), roomy, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tight.log_likelihood(sets[5:20], weights), roomy[5:20], rtol=1e-6, atol=1e-6)  # kept normalisers
    shared = cd.ConceptProbabilities(sim, 10.0, budget_bytes=4 * 12 * 40)  # whole rows of 40 images, kept between calls
    for part in (sets[:4], sets[2:6], sets[30:34]):  # held rows reused, then dropped and refilled
        assert len(np.unique(part)) <= shared.capacity
        np.testing.assert_allclose(shared.log_likelihood(part, weights), cd.ConceptProbabilities(sim, 10.0).log_likelihood(part, weights),
                                   rtol=1e-6, atol=1e-6)


class PixelBackend(MultimodalBackend):
    """A cheap deterministic stand-in: the mean colour of the image, normalised, plus a constant."""

    id = "test-pixel-mean"
    description = "test stand-in"
    offline = True

    def __init__(self):
        self.images_encoded = 0

    def encode_images(self, images, batch_size: int = 32) -> np.ndarray:
        self.images_encoded += len(images)
        x = np.array([[*np.asarray(im.convert("RGB"), dtype=np.float32).mean(axis=(0, 1)) / 255.0, 0.5] for im in images],
                     dtype=np.float32).reshape(len(images), 4)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def encode_texts(self, texts, batch_size: int = 256) -> np.ndarray:
        x = np.array([np.random.default_rng(zlib.crc32(t.encode())).normal(size=4) for t in texts], dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_image_embeddings_are_written_in_chunks_and_served_mapped(tmp_path, monkeypatch):
    from neuroviz import datasets
    from neuroviz.store import SharedCache, Store

    folder = write_probe_set(tmp_path / "images", 45, size=24)
    store = Store(tmp_path / "cache", shared=SharedCache(tmp_path / "shared"))
    whole = datasets.from_folder(folder, cache_dir=store.root)
    store.register_probe_set(whole)
    part = datasets.from_list(_list_file(tmp_path, [im.path for im in whole.images[::3]]), cache_dir=store.root)
    store.register_probe_set(part)
    monkeypatch.setattr(embeddings, "IMAGE_CHUNK", 4)
    backend = PixelBackend()
    first = embeddings.image_embeddings(backend, store, part.id)
    assert backend.images_encoded == 15
    emb = embeddings.image_embeddings(backend, store, whole.id)  # a third of the rows come from the shared cache
    assert backend.images_encoded == 45 and isinstance(emb, np.memmap) and emb.shape == (45, 4)
    rows = sorted(store.probe_images(whole.id), key=lambda r: r["idx"])
    expected = PixelBackend().encode_images([datasets.load_rgb(r["path"]) for r in rows])
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    np.testing.assert_allclose(first, expected[::3], atol=1e-6)
    assert embeddings.image_embeddings(backend, store, whole.id) is not None and backend.images_encoded == 45


def _list_file(tmp_path: Path, paths) -> Path:
    path = tmp_path / "subset.txt"
    path.write_text("".join(f"{p}\n" for p in paths))
    return path


def test_synthetic_probe_sets_are_deterministic_and_grow_in_place(tmp_path):
    small = write_probe_set(tmp_path / "a", 30, size=24)
    big = write_probe_set(tmp_path / "b", 60, size=24, workers=2)
    for i in (0, 17, 29):
        assert image_path(small, i).read_bytes() == image_path(big, i).read_bytes()
        assert image_path(small, i).parent.name == image_label(i)
    files = sorted(p for p in big.rglob("*.png"))
    assert len(files) == 60 and len({p.read_bytes() for p in files}) == 60  # distinct images, so distinct ids
    assert np.asarray(draw_image(5, 24)).shape == (24, 24, 3)
    assert len({image_label(i) for i in range(60)}) > 6  # labels spread over the 18 colour-shape classes
    assert np.asarray(draw_image(5, 24, seed=1)).tobytes() != np.asarray(draw_image(5, 24)).tobytes()
