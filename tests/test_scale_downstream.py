"""Downstream at scale (issue 11.4): CLIP-Dissect, DnD, MILAN, evaluate (scoring, badges, fit
runs), Linear Explanations and image embeddings read a run's arrays in bounded pieces, and the
results do not depend on the size of the pieces.

Memory is checked as the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) above what it held before the step: it counts both allocations and the
file pages a memory map touches, which is what an (images x neurons) matrix read whole costs.
"""

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


# -- memory: peak resident set above the start of a step ----------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    pytest.skip(f"no {field} in /proc/self/status on this system")
    return 0


def peak_growth_mb(step) -> tuple[float, object]:
    """(MB the peak resident set rose above the resident set before ``step()``, its result)."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak resident set on this system")
    before = _status_kb("VmRSS")
    result = step()
    return (_status_kb("VmHWM") - before) / 1024, result


def traced_peak_mb(step) -> tuple[float, object]:
    """(MB of the peak of Python and NumPy allocations during ``step()``, its result): for steps
    whose native libraries (sketches, DuckDB) hold memory of their own that is not a matrix."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = step()
        return tracemalloc.get_traced_memory()[1] / 2**20, result
    finally:
        tracemalloc.stop()


def big_matrix(path: Path, rows: int, cols: int, seed: int) -> np.ndarray:
    """A float32 .npy of ``rows`` x ``cols`` written a block at a time, returned memory-mapped and not resident."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, cols))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 4096):
        out[start:start + 4096] = rng.standard_normal((min(4096, rows - start), cols), dtype=np.float32)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def _mb(matrix: np.ndarray) -> float:
    return matrix.size * matrix.dtype.itemsize / 2**20


# -- DnD ------------------------------------------------------------------------------------------
def test_dnd_best_concept_reads_blocks_and_equals_the_full_matrix_ranking(tmp_path, monkeypatch):
    from neuroviz.methods.dnd import DnDConfig, best_concepts, score_candidates

    emb = big_matrix(tmp_path / "emb.npy", 60_000, 128, 0)  # 29 MB
    acts = big_matrix(tmp_path / "acts.npy", 60_000, 64, 1)  # 15 MB
    rng = np.random.default_rng(2)
    cand = rng.standard_normal((4, 128)).astype(np.float32)
    real = rng.standard_normal((6, 128)).astype(np.float32)
    own = [int(i) for i in np.argsort(-(np.asarray(emb) @ cand[0]))[:3]]  # the best images of candidate 0 are excluded
    config = DnDConfig()
    names = ["a", "b", "c", "d"]
    monkeypatch.setattr(column_scan, "ROW_BLOCK_BYTES", 2**20)
    growth, scored = peak_growth_mb(lambda: best_concepts(names, cand, emb, acts, 7, real, own, config))
    assert growth < 0.25 * (_mb(emb) + _mb(acts)), f"DnD held {growth:.0f} MB of {_mb(emb) + _mb(acts):.0f} MB of arrays"
    whole_emb, column = np.array(emb), np.array(acts[:, 7])  # the reference: every matrix whole, a full sort
    sims = cand @ whole_emb.T
    sims[:, own] = -np.inf
    retrieved = [list(np.argsort(-s, kind="stable")[: config.n_concept_images]) for s in sims]
    expected = score_candidates(names, retrieved, column, lambda idx: float((real @ whole_emb[idx].T).mean()),
                                config.beta, config.top_k_images)
    assert [(s.concept, s.image_idx, s.ranks) for s in scored] == [(s.concept, s.image_idx, s.ranks) for s in expected]
    np.testing.assert_allclose([s.score for s in scored], [s.score for s in expected], rtol=1e-5)
    assert not set(own) & {i for s in scored for i in s.image_idx}


# -- evaluate: scoring and badges -----------------------------------------------------------------
def _scoring_case(tmp_path: Path):
    from neuroviz.trust.baselines import constant_label_set, shuffled_label_set
    from neuroviz.trust.scoring import LabelSet, ScoringImages

    acts = big_matrix(tmp_path / "acts.npy", 16_000, 384, 3)  # 23 MB; half the rows score
    emb = big_matrix(tmp_path / "emb.npy", 16_000, 4, 4)
    rows = np.arange(0, 16_000, 2)
    images = ScoringImages(acts, emb, [str(i) for i in rows], "test", rows=rows)
    words = [f"word {i}" for i in range(150)]
    method = LabelSet("m", "method", {n: words[(7 * n) % len(words)] for n in range(0, 384, 2)})
    weighted = LabelSet("le", "method", {n: f"0.6 {words[n % 150]} + 0.4 {words[(n + 1) % 150]}" for n in range(1, 384, 3)})
    return images, [method, weighted, shuffled_label_set(method), constant_label_set("depiction", range(384))]


@pytest.mark.parametrize("per_unit", [True, False])
def test_scoring_in_blocks_of_units_equals_one_block(tmp_path, monkeypatch, per_unit):
    from neuroviz.trust import badges, scoring

    images, sets = _scoring_case(tmp_path)
    backend = PixelBackend()
    monkeypatch.setattr(scoring, "SCORING_BLOCK_BYTES", 2**40)  # one block: every unit at once
    whole = scoring.score_label_sets(None, images, backend, sets, n_boot=20, per_unit=per_unit)
    whole_badges = badges.unit_badges(None, images, backend, sets[:2])
    monkeypatch.setattr(scoring, "SCORING_BLOCK_BYTES", 6 * 2**20)
    monkeypatch.setattr(column_scan, "ROW_BLOCK_BYTES", 2**20)
    growth, blocked = peak_growth_mb(lambda: scoring.score_label_sets(None, images, backend, sets, n_boot=20, per_unit=per_unit))
    assert growth < 0.5 * _mb(images.acts), f"scoring held {growth:.0f} MB beside a {_mb(images.acts):.0f} MB matrix"
    for a, b in zip(whole, blocked):
        np.testing.assert_array_equal(a.neurons, b.neurons)
        for metric in a.scores.values:
            np.testing.assert_allclose(b.scores.values[metric], a.scores.values[metric], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(b.scores.resampled[metric], a.scores.resampled[metric])
            np.testing.assert_allclose(b.scores.resamples[metric], a.scores.resamples[metric], rtol=1e-5, atol=1e-6)
            assert a.scores.mean_interval(metric) == pytest.approx(b.scores.mean_interval(metric), rel=1e-5, abs=1e-6)
        assert set(a.scores.mean_resamples) == set(b.scores.mean_resamples) and (per_unit or a.scores.mean_resamples)
    assert len(blocked[0].scores.resampled["auprc"]) == 32  # the layer's seeded sample of columns, found across blocks
    growth, blocked_badges = peak_growth_mb(lambda: badges.unit_badges(None, images, backend, sets[:2]))
    assert growth < 0.5 * _mb(images.acts), f"badges held {growth:.0f} MB beside a {_mb(images.acts):.0f} MB matrix"
    assert [(b.neuron, b.best_label, b.passed) for b in blocked_badges] == [(b.neuron, b.best_label, b.passed) for b in whole_badges]
    np.testing.assert_allclose([b.r for b in blocked_badges], [b.r for b in whole_badges], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([b.p for b in blocked_badges], [b.p for b in whole_badges], rtol=1e-4, atol=1e-9)


def test_a_fit_run_streams_its_rows_from_the_parent(tmp_path, monkeypatch):
    from neuroviz.datasets import ProbeImage, ProbeSet
    from neuroviz.store import RunInfo, Store
    from neuroviz.trust.split import HeldOutSplit, fit_run

    n, neurons, k = 20_000, 1024, 40
    store = Store(tmp_path / "cache")
    probe = ProbeSet("synthetic", "test", [ProbeImage(f"{i:08x}", f"/nowhere/{i}.png") for i in range(n)])
    store.register_probe_set(probe)
    acts = big_matrix(tmp_path / "acts.npy", n, neurons, 5)  # 78 MB
    scan = scan_columns(acts, k)
    info = RunInfo("big", "custom:test", "w", "layer", "mean", probe.id, "none", k, "test", n, neurons, None, "vector")
    store.finish_run(info, np.array(acts), scan.values, scan.indices, [im.image_id for im in probe.images], None)
    run = store.get_run("big")
    monkeypatch.setattr(column_scan, "ROW_BLOCK_BYTES", 2**20)
    # the run's sketches (KLL, one per neuron) and the probe rows (DuckDB) cost memory of their own, not a
    # matrix: here the allocations are counted (the fit rows alone would be half the matrix)
    peak, fit = traced_peak_mb(lambda: fit_run(store, run, HeldOutSplit(0)))
    assert peak < 0.4 * _mb(acts), f"the fit run allocated {peak:.0f} MB beside a {_mb(acts):.0f} MB matrix"
    rows = np.flatnonzero(~HeldOutSplit(0).score_mask([im.image_id for im in probe.images]))
    fit_acts = store.activations(fit.run_key)
    assert fit.n_images == len(rows) == len(fit_acts)
    for start in range(0, len(rows), 5000):
        np.testing.assert_array_equal(fit_acts[start:start + 5000], acts[rows[start:start + 5000]])
    assert store.top_k(fit.run_key).image_idx.shape == (neurons, fit.k)


# -- Linear Explanations ----------------------------------------------------------------------------
def test_linear_explanations_from_row_blocks_equal_whole_matrices(tmp_path, monkeypatch):
    from neuroviz.methods import linear_explanations as le

    emb = big_matrix(tmp_path / "emb.npy", 30_000, 16, 6)
    text = np.random.default_rng(7).standard_normal((600, 16)).astype(np.float32)
    rng = np.random.default_rng(8)
    weights = np.maximum(rng.standard_normal((3, 24)), 0).astype(np.float32)
    big_acts = np.lib.format.open_memmap(tmp_path / "acts.npy", mode="w+", dtype=np.float32, shape=(30_000, 24))
    for start in range(0, 30_000, 4000):
        big_acts[start:start + 4000] = np.asarray(emb[start:start + 4000]) @ text[[3, 40, 41]].T @ weights \
            + 0.1 * rng.standard_normal((min(4000, 30_000 - start), 24), dtype=np.float32)
    big_acts.flush()
    del big_acts
    acts = np.load(tmp_path / "acts.npy", mmap_mode="r")

    def blocks():
        for start in range(0, 30_000, 500):
            yield np.array(acts[start:start + 500]), np.array(emb[start:start + 500]) @ text.T

    import scipy.optimize  # noqa: F401  (imported by the fit: not a cost of the step)

    config = le.LinearExplanationConfig(width=16)
    growth, blocked = peak_growth_mb(lambda: le.explain_unit_blocks(blocks, config))
    concept_mb = 30_000 * 600 * 4 / 2**20
    assert growth < 0.3 * concept_mb, f"Linear Explanations held {growth:.0f} MB; the concept matrix is {concept_mb:.0f} MB"
    whole = le.explain_units(np.array(acts), np.array(emb) @ text.T, config)
    monkeypatch.setattr(le, "_FULL_GRAM_CONCEPTS", 10)  # each unit's candidates' Gram matrix, in a third pass
    candidates = le.explain_unit_blocks(blocks, config)
    for w, b, c in zip(whole, blocked, candidates):
        assert w.concepts == b.concepts == c.concepts and w.concepts
        np.testing.assert_allclose(b.weights, w.weights, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(c.weights, w.weights, rtol=1e-3, atol=1e-6)
        assert b.fit_r == pytest.approx(w.fit_r, abs=1e-4)


# -- shared image embeddings ------------------------------------------------------------------------
def test_shared_embeddings_are_read_and_merged_in_row_blocks(tmp_path, monkeypatch):
    from neuroviz import store as store_module
    from neuroviz.store import SharedCache

    shared = SharedCache(tmp_path / "shared")
    rng = np.random.default_rng(9)
    big = rng.standard_normal((60_000, 256), dtype=np.float32)  # 59 MB in one part
    shared.add_image_embeddings("b", [str(i) for i in range(60_000)], big)
    wanted = [str(i) for i in range(0, 60_000, 3)]
    del big

    def read_blocks() -> int:
        rows = 0
        for positions, emb in shared.image_embedding_blocks("b", wanted, block_rows=2048):
            rows += len(positions)
            assert emb.shape == (len(positions), 256)
        return rows

    growth, rows = peak_growth_mb(read_blocks)
    assert rows == len(wanted) and growth < 15, f"reading the part held {growth:.0f} MB"
    monkeypatch.setattr(store_module, "MAX_PARTS", 2)
    monkeypatch.setattr(store_module, "EMBEDDING_BLOCK_ROWS", 100)
    vectors = {i: np.full(256, float(i), np.float32) for i in range(5)}
    shared.add_image_embeddings("b", ["1", "x"], np.stack([vectors[1], vectors[2]]))
    shared.add_image_embeddings("b", ["x", "3"], np.stack([vectors[3], vectors[4]]))  # the newer "x" wins; parts merge
    assert len(list(shared.image_embeddings_dir("b").glob("part-*.npz"))) == 1
    found = shared.image_embeddings("b", ["x", "1", "3", "7", "missing"])
    assert set(found) == {"x", "1", "3", "7"}
    np.testing.assert_array_equal(found["x"], vectors[3])
    np.testing.assert_array_equal(found["1"], vectors[1])
    np.testing.assert_array_equal(found["7"], rng.__class__(np.random.PCG64(9)).standard_normal((8, 256), dtype=np.float32)[7])
