"""CLIP-Dissect: planted neurons whose activation is a known image-text similarity must get
the planted concept, calibrated scores must separate them from random neurons, and labels
must be cached per neuron through run_method."""

from __future__ import annotations

import time

import numpy as np
import pytest

from neuroviz import embeddings, extract
from neuroviz.backends.multimodal import create_multimodal
from neuroviz.concepts import from_texts
from neuroviz.methods import MethodContext, run_method
from neuroviz.methods import clip_dissect as cd
from neuroviz.methods.clip_dissect import (
    SIMILARITY_FUNCTIONS,
    ClipDissectConfig,
    ImageConceptSimilarity,
    concept_scores,
    label_neurons,
)
from neuroviz.store import RunInfo, Store

SHAPE_CONCEPTS = ["red square", "red circle", "green square", "green circle", "blue square", "blue circle",
                  "yellow square", "yellow circle", "cat", "coffee", "rocket", "coins", "horse", "astronaut"]


def random_embeddings(n_images: int = 400, n_concepts: int = 60, dim: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n_images, dim)).astype(np.float32)
    txt = rng.normal(size=(n_concepts, dim)).astype(np.float32)
    return img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True)


def planted_activations(p: np.ndarray, planted: dict[int, int], n_random: int, seed: int = 1) -> np.ndarray:
    """Columns: planted neurons (similarity to a concept, through different monotone maps), then noise."""
    rng = np.random.default_rng(seed)
    cols = []
    for j, c in planted.items():
        s = p[:, c]
        cols.append([s, np.maximum(s, 0.0) * 3.0, np.exp(4 * s) + 0.02 * rng.normal(size=len(s))][j % 3])
    cols += [rng.normal(size=p.shape[0]) for _ in range(n_random)]
    return np.stack(cols, axis=1).astype(np.float32)


PLANTED = {0: 7, 1: 13, 2: 42}


@pytest.mark.parametrize("similarity", SIMILARITY_FUNCTIONS)
def test_planted_neurons_get_their_concept(similarity):
    img, txt = random_embeddings()
    sim = ImageConceptSimilarity(img, txt)
    # The paper's PMI prior averages over the layer's neurons: give it a layer, not a handful.
    acts = planted_activations(img @ txt.T, PLANTED, n_random=60)
    result = label_neurons(acts, sim, ClipDissectConfig(similarity=similarity))
    assert result.concept_index[:3, 0].tolist() == list(PLANTED.values())
    assert result.concept_index.shape == (63, 5) and (np.diff(result.scores, axis=1) <= 1e-6).all()
    # The chunked, calibrated path and the plain full matrix agree on the best concept.
    assert (concept_scores(acts, sim, ClipDissectConfig(similarity=similarity)).argmax(axis=1) == result.concept_index[:, 0]).all()


@pytest.mark.parametrize("similarity", SIMILARITY_FUNCTIONS)
def test_calibrated_score_separates_planted_from_random(similarity):
    img, txt = random_embeddings(seed=3)
    acts = planted_activations(img @ txt.T, PLANTED, n_random=100, seed=4)
    result = label_neurons(acts, ImageConceptSimilarity(img, txt), ClipDissectConfig(similarity=similarity, seed=2))
    planted, random = result.calibrated[:3, 0], result.calibrated[3:, 0]
    assert (planted >= 0.95).all()
    assert random.mean() < 0.75  # a calibrated null: random neurons spread over [0, 1], not piled at the top
    assert (random < 0.9).mean() > 0.5
    assert np.nanmin(result.z[:3, 0]) > np.nanmax(result.z[3:, 0]) - 1.0
    assert ((result.calibrated >= 0) & (result.calibrated <= 1)).all()


def test_constant_neuron_is_not_calibrated_as_meaningful():
    img, txt = random_embeddings(n_images=100)
    acts = np.zeros((100, 1), dtype=np.float32)
    result = label_neurons(acts, ImageConceptSimilarity(img, txt), ClipDissectConfig())
    assert result.constant[0] and result.calibrated[0, 0] == 0.0


def small_case():
    img, txt = random_embeddings(n_images=50, n_concepts=6, dim=4, seed=5)
    p = img @ txt.T
    acts = np.stack([p[:, 2], p[:, 4], -p[:, 0]], axis=1) + 0.01
    probs = np.exp(10 * p) / np.exp(10 * p).sum(axis=1, keepdims=True)
    w = 0.998 - np.arange(5) / 5 * (0.998 - 0.97)
    tops = [np.argsort(-acts[:, j])[:5] for j in range(3)]
    return p, acts, probs, w, tops


def test_soft_wpmi_is_the_papers_formula():
    """log p(c|E_n) = sum_i log(1 - w_i + w_i p(c|x_i) + 1e-7); score = that - log mean_n p(c|E_n), by hand."""
    p, acts, probs, w, tops = small_case()
    log_lik = np.stack([np.log(1 - w[:, None] + w[:, None] * probs[top] + 1e-7).sum(axis=0) for top in tops])
    expected = log_lik - np.log(np.exp(log_lik).mean(axis=0))
    config = ClipDissectConfig(top_k=5, max_top_fraction=1.0)
    np.testing.assert_allclose(concept_scores(acts, ImageConceptSimilarity.from_matrix(p), config), expected, rtol=1e-4, atol=1e-4)


def test_mean_lift_is_the_methods_md_formula():
    """score(c) = log(sum_i w_i p(c|x_i) / sum_i w_i) - lambda log(mean_x p(c|x)), by hand."""
    p, acts, probs, w, tops = small_case()
    expected = np.stack([np.log((w[:, None] * probs[top]).sum(0) / w.sum()) - np.log(probs.mean(0)) for top in tops])
    config = ClipDissectConfig(top_k=5, max_top_fraction=1.0, formulation="mean_lift")
    np.testing.assert_allclose(concept_scores(acts, ImageConceptSimilarity.from_matrix(p), config), expected, rtol=1e-4, atol=1e-5)


def test_results_do_not_depend_on_chunking_or_neuron_subsets(monkeypatch):
    img, txt = random_embeddings(n_images=300, n_concepts=60, seed=6)
    acts = planted_activations(img @ txt.T, PLANTED, n_random=30, seed=7)
    subset = [4, 1, 6]
    for config in (ClipDissectConfig(), ClipDissectConfig(formulation="mean_lift"), ClipDissectConfig(similarity="cos3")):
        full = label_neurons(acts, ImageConceptSimilarity(img, txt), config)
        monkeypatch.setattr(cd, "_BLOCK_BYTES", 7 * 60 * 4)  # 7-image blocks of P
        monkeypatch.setattr(cd, "_ACCUMULATOR_BYTES", 2 * 60 * 4 * 21)  # 2-neuron chunks
        monkeypatch.setattr(cd, "_GATHER_ROWS", 2)
        part = label_neurons(acts, ImageConceptSimilarity.from_matrix(img @ txt.T), config, neurons=subset)
        if config.uses_layer_prior:  # with the layer's prior given, only the subset's columns are needed
            again = label_neurons(acts[:, subset], ImageConceptSimilarity(img, txt), config, layer_prior=full.layer_prior,
                                  layer_size=acts.shape[1])
            np.testing.assert_array_equal(again.concept_index, full.concept_index[subset])
            np.testing.assert_allclose(again.calibrated, full.calibrated[subset])
        monkeypatch.undo()
        np.testing.assert_array_equal(part.concept_index, full.concept_index[subset])
        np.testing.assert_allclose(part.scores, full.scores[subset], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(part.calibrated, full.calibrated[subset])


def test_config_takes_each_functions_paper_defaults():
    assert (ClipDissectConfig().top_k, ClipDissectConfig().alpha, ClipDissectConfig().lam) == (100, 10.0, 1.0)
    wpmi = ClipDissectConfig(similarity="wpmi")
    assert (wpmi.top_k, wpmi.alpha, wpmi.lam) == (28, 2.0, 0.6)
    with pytest.raises(ValueError, match="soft_wpmi"):
        ClipDissectConfig(similarity="cosine")


# -- through the store, the real offline backend and run_method --------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_workspace):
    """A private store (labels written here do not leak into other tests) with the tiny model's fc."""
    store = Store(tmp_path_factory.mktemp("cd_cache"))
    (fc,) = extract.extract(tiny_workspace["model"], tiny_workspace["probe_set"], ["fc"], store, k=10, batch_size=20, chunk_size=20)
    backend = create_multimodal("conse")
    share_image_embeddings(tiny_workspace["store"], store, backend, fc.probe_set_id)
    return {"store": store, "fc": fc, "probe_set": tiny_workspace["probe_set"], "backend": backend}


def share_image_embeddings(src: Store, dst: Store, backend, probe_set_id: str) -> None:
    """Embeddings are keyed by (backend, probe set): compute them once in the session's shared
    workspace and hand the same artefact to this private store, instead of re-encoding."""
    emb = embeddings.image_embeddings(backend, src, probe_set_id)
    dst.save_array("image_emb", embeddings.image_embeddings_key(backend, probe_set_id), emb)


def plant_run(store: Store, base: RunInfo, acts: np.ndarray, name: str) -> RunInfo:
    """A run whose activations we choose, stored through the same API an extraction uses."""
    k = min(10, acts.shape[0])
    top_idx = np.argsort(-acts, axis=0, kind="stable")[:k].T
    info = RunInfo(f"planted-{name}", "custom:planted", "planted", "planted", "mean", base.probe_set_id, base.preprocess_id,
                   k, "test", acts.shape[0], acts.shape[1], None, "vector")
    ids = [im["image_id"] for im in store.probe_images(base.probe_set_id)]
    store.finish_run(info, acts, np.take_along_axis(acts.T, top_idx, axis=1), top_idx, ids, None)
    return store.get_run(info.run_key)


def test_describe_finds_planted_concepts_with_the_offline_backend(workspace):
    store, backend = workspace["store"], workspace["backend"]
    concepts = from_texts("shapes", SHAPE_CONCEPTS)
    p = embeddings.image_embeddings(backend, store, workspace["fc"].probe_set_id) @ embeddings.text_embeddings(backend, store, concepts).T
    # ConSE sees through an ImageNet classifier: colours of plain shapes look alike to it, photos do not.
    wanted = {0: SHAPE_CONCEPTS.index("rocket"), 1: SHAPE_CONCEPTS.index("coffee"), 2: SHAPE_CONCEPTS.index("cat")}
    acts = planted_activations(p, {j: c for j, c in wanted.items()}, n_random=60, seed=8)
    run = plant_run(store, workspace["fc"], acts, "shapes")
    ctx = MethodContext(store=store, run=run, multimodal=backend, concepts=concepts)
    run_method("clip_dissect", ctx)
    top = store.labels(run.run_key, method="clip_dissect", top_only=True).set_index("neuron")
    for neuron, c in wanted.items():
        assert top.loc[neuron, "label"] == SHAPE_CONCEPTS[c]
        assert top.loc[neuron, "calibrated"] >= 0.8  # 40 images, 4 exemplars: a coarse null
    labels = store.labels(run.run_key, neuron=0, method="clip_dissect")
    assert labels["rank"].tolist() == [0, 1, 2, 3, 4] and labels["label"].nunique() == 5
    assert labels["backend"].iloc[0].startswith("multimodal: ConSE")


def test_run_method_computes_each_neuron_once(workspace):
    store, backend, run = workspace["store"], workspace["backend"], workspace["fc"]
    ctx = MethodContext(store=store, run=run, multimodal=backend, concepts=from_texts("shapes", SHAPE_CONCEPTS))
    key = run_method("clip_dissect", ctx, neurons=range(0, 20))
    assert sorted(store.labelled_neurons(key)) == list(range(20))
    first = store.label_runs(run.run_key).set_index("label_key").loc[key, "created_at"]
    before = store.labels(run.run_key, method="clip_dissect")
    time.sleep(0.01)
    assert run_method("clip_dissect", ctx, neurons=range(5, 15)) == key  # all cached: nothing is written
    assert store.label_runs(run.run_key).set_index("label_key").loc[key, "created_at"] == first
    key_all = run_method("clip_dissect", ctx)  # only neurons 20.. are new
    assert key_all == key and sorted(store.labelled_neurons(key)) == list(range(run.n_neurons))
    after = store.labels(run.run_key, method="clip_dissect")
    kept = after[after["neuron"] < 20].reset_index(drop=True)
    assert kept[["neuron", "rank", "label"]].equals(before[["neuron", "rank", "label"]].reset_index(drop=True))
    # Another similarity function is another provenance: a new key, computed afresh.
    assert run_method("clip_dissect", ctx, ClipDissectConfig(similarity="cos"), neurons=[0]) != key
