"""MILAN-style PMI: the objective, the spatial threshold estimate, and the method end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuroviz.methods.milan import (
    MASK_LEVEL_APPROXIMATE,
    MilanConfig,
    conditional_log_likelihood,
    description_prior,
    log_p_description_given_exemplars,
    pmi_scores,
    select_exemplars,
    spatial_quantile_threshold,
)


def test_threshold_matches_the_dataset_quantile_when_top_cells_are_in_the_top_images():
    rng = np.random.default_rng(0)
    everything = rng.uniform(0, 1, size=(200, 4, 4)).astype(np.float32)  # 200 images, 4x4 maps
    everything[:10] += 5.0  # the stored top-10 images hold all the large cells
    true_q = np.sort(everything.reshape(-1))[::-1][int(np.ceil(0.01 * everything.size)) - 1]
    assert spatial_quantile_threshold(everything[:10], n_images=200, quantile=0.99) == pytest.approx(true_q)


def test_threshold_is_a_lower_bound_when_top_cells_are_elsewhere():
    rng = np.random.default_rng(1)
    everything = rng.uniform(0, 1, size=(500, 3, 3)).astype(np.float32)
    stored = everything[:5]  # not the images with the largest cells
    true_q = np.quantile(everything.reshape(-1), 0.99, method="higher")
    estimate = spatial_quantile_threshold(stored, n_images=500, quantile=0.99)
    assert estimate <= true_q
    # Too few stored cells for the rank: the minimum of what is stored.
    assert estimate == pytest.approx(stored.min())


def test_exemplars_are_reranked_by_spatial_max():
    maps = np.zeros((4, 2, 2), np.float32)
    maps[0] = 1.0  # best by mean, low peak
    maps[1, 0, 0] = 9.0  # sharp peak
    maps[2, 1, 1] = 3.0
    assert list(select_exemplars(maps, k=3)) == [1, 2, 0]
    assert list(select_exemplars(maps, k=3, rank_by="pooled")) == [0, 1, 2]
    assert list(select_exemplars(None, k=3)) == [0, 1, 2]
    with pytest.raises(ValueError, match="spatial_max or pooled"):
        select_exemplars(maps, 2, "median")


def test_planted_exemplars_pick_the_candidate_they_match():
    """p(d|E) strongly prefers one candidate: PMI returns it despite a prior against it."""
    candidates = np.eye(4, dtype=np.float32)
    exemplars = np.tile([0.1, 0.1, 0.98, 0.1], (15, 1)).astype(np.float32)
    exemplars /= np.linalg.norm(exemplars, axis=1, keepdims=True)
    lp_e = log_p_description_given_exemplars(exemplars, candidates, temperature=0.05)
    assert np.exp(lp_e).sum() == pytest.approx(1.0)
    log_prior = np.array([-2.0, -2.0, -6.0, -2.0])  # the matching candidate is the least likely a priori
    scores = pmi_scores(lp_e, log_prior, 0.2)
    assert int(np.argmax(scores)) == 2
    with pytest.raises(ValueError, match="positive"):
        log_p_description_given_exemplars(exemplars, candidates, temperature=0)


def test_lambda_trades_a_frequent_generic_string_for_a_specific_one():
    texts = ["object", "red striped umbrella"]
    # The generic word matches the exemplars slightly better, and is far more probable a priori.
    lp_e = np.log(np.array([0.55, 0.45]))
    total = np.array([-4.0, -27.0])  # total log-likelihood: -4 for one word, -9 per word for three
    prior = description_prior(total, texts, "per_word")
    assert prior == pytest.approx([-4.0, -9.0])
    assert texts[int(np.argmax(pmi_scores(lp_e, prior, 0.0)))] == "object"  # lambda 0: p(d|E) only
    assert texts[int(np.argmax(pmi_scores(lp_e, prior, 0.2)))] == "red striped umbrella"  # MILAN's lambda
    # With the total log-likelihood, the prior's length bonus would decide instead.
    assert description_prior(total, texts, "total") == pytest.approx(total)
    with pytest.raises(ValueError, match="per_word or total"):
        description_prior(total, texts, "per_token")


def test_config_has_the_paper_defaults():
    config = MilanConfig()
    assert (config.k, config.mask_quantile, config.pmi_lambda) == (15, 0.99, 0.2)


# ---------------------------------------------------------------------------------------------
# End to end: a planted run over real photos, ConSE, retrieval captions and a tiny recorded LM
# ---------------------------------------------------------------------------------------------
def make_tiny_lm_dir(folder, words):
    """The shared tiny Llama over ``words``."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(folder, words, max_positions=256)


CONCEPTS = ["tabby cat", "espresso", "rocket", "red square", "blue circle", "horse", "coins", "astronaut", "sky", "grass"]


@pytest.fixture(scope="module")
def planted(tiny_workspace, tmp_path_factory):
    """A run stored by hand over the tiny workspace's images: neuron 0 fires on the cat photo,
    neuron 1 on the coffee photo, each in the centre of its map; everything else is quiet."""
    import shutil

    from neuroviz.backends.captioner import create_captioner
    from neuroviz.backends.language import create_language_model
    from neuroviz.backends.multimodal import create_multimodal
    from neuroviz.concepts import from_texts
    from neuroviz.store import RunInfo, Store

    # a private copy of the shared tiny workspace: a hand-stored run must not leak into other modules' tests
    root_copy = tmp_path_factory.mktemp("milan_planted_cache")
    shutil.copytree(tiny_workspace["store"].root, root_copy, dirs_exist_ok=True)
    store, model, ps = Store(root_copy), tiny_workspace["model"], tiny_workspace["probe_set"]
    n_images, k = len(ps), 10
    rng = np.random.default_rng(0)
    acts = rng.uniform(0, 1, size=(n_images, 2)).astype(np.float32)
    photo = {name: next(i for i, im in enumerate(ps.images) if im.path.endswith(f"{name}.png")) for name in ("chelsea", "coffee")}
    acts[photo["chelsea"], 0] = 10.0
    acts[photo["coffee"], 1] = 10.0
    top_idx = np.argsort(-acts, axis=0)[:k].T  # (neurons, k)
    top_val = np.take_along_axis(acts.T, top_idx, axis=1)
    maps = rng.uniform(0, 1, size=(2, k, 4, 4)).astype(np.float32)
    maps[:, 0] = 5.0
    maps[:, 0, 1:3, 1:3] = 10.0  # the best image of each neuron, strongest in the centre
    info = RunInfo("planted-milan-run", model.spec, model.weights_id, "planted", "mean", ps.id, model.preprocessing.id, k,
                   "test", n_images, 2, (4, 4), "conv")
    store.finish_run(info, acts, top_val, top_idx, [im.image_id for im in ps.images], maps)

    root = tmp_path_factory.mktemp("milan_backends")
    details = root / "details.txt"
    details.write_text("\n".join(["red", "blue", "fur", "stripes", "sky", "metal", "drink", "cup"]))
    multimodal = create_multimodal("conse")
    lm_words = sorted({w for c in CONCEPTS for w in c.split()} | {"cat", "cup", "fur", "drink", "a", "of"})
    language_model = create_language_model(f"transformers:{make_tiny_lm_dir(root / 'lm', lm_words)}", store_root=store.root)
    return {
        "store": store, "run": store.get_run(info.run_key), "model": model,
        "backends": {"multimodal": multimodal, "language_model": language_model, "concepts": from_texts("planted", CONCEPTS),
                     "captioner": create_captioner(f"retrieval:{details}", multimodal=multimodal, store_root=store.root)},
    }


def loglik_calls(store, recording_id: str) -> int:
    return sum(call["kind"] == "loglik" for call in store.llm_calls(recording_id))


class CountScored:
    """Counts the texts a language model really scores (not those read from the cache)."""

    def __init__(self, lm, monkeypatch):
        self.texts: list[str] = []
        score = lm.log_likelihood

        def counting(texts, *args, **kwargs):
            self.texts += list(texts)
            return score(texts, *args, **kwargs)

        monkeypatch.setattr(lm, "log_likelihood", counting)


def test_milan_describes_planted_neurons_and_scores_each_string_once(planted, monkeypatch):
    from neuroviz.methods import MethodContext, run_method

    store, run = planted["store"], planted["run"]
    ctx = MethodContext(store, run, model=planted["model"], **planted["backends"])
    config = MilanConfig(k=1, n_concept_candidates=5)
    key = run_method("milan", ctx, config=config)
    labels = store.labels(run.run_key, method="milan")
    assert list(labels.groupby("neuron").size()) == [5, 5]  # the answer and the next 4 candidates
    top = labels[labels["rank"] == 0].set_index("neuron")
    assert "cat" in top.loc[0, "label"] or "tabby" in top.loc[0, "label"]
    assert "espresso" in top.loc[1, "label"]
    for _, group in labels.groupby("neuron"):
        assert list(group["score"]) == sorted(group["score"], reverse=True)
    extra = json.loads(top.loc[0, "extra_json"])
    assert extra["exemplar_image_idx"] == [int(run_image) for run_image in store.top_indices(run.run_key)[0][:1]]
    assert extra["mask_threshold"] == pytest.approx(5.0)  # 7th largest of the stored cells: ceil(0.01 * 40 * 16)
    assert extra["mask_level_source"] == MASK_LEVEL_APPROXIMATE  # stored by hand, without a map sketch
    assert extra["log_p_d_given_e"] <= 0 and np.isfinite(extra["log_p_d"])
    assert set(extra["backends"]) == {"multimodal", "captioner", "language_model"}
    backends = json.loads(store.label_runs(run.run_key).set_index("label_key").loc[key, "backends_json"])
    assert backends["language_model"] == planted["backends"]["language_model"].id

    # Another lambda is another label run, but every candidate's p(d) comes from the cache
    # (and the recording still gets every score, so the run replays completely).
    lm = planted["backends"]["language_model"]
    recording = lm.recording_id
    calls = loglik_calls(store, recording)
    assert calls > 0
    scored_by_model = CountScored(lm.inner, monkeypatch)
    run_method("milan", ctx, config=MilanConfig(k=1, n_concept_candidates=5, pmi_lambda=1.0))
    assert scored_by_model.texts == [] and loglik_calls(store, recording) == 2 * calls
    scored, context = list(labels["label"][:2]), MilanConfig().prior_context
    values = conditional_log_likelihood(store, lm, scored, context)
    assert scored_by_model.texts == []
    monkeypatch.undo()
    direct = lm.inner.log_likelihood([f"{context} {d}" for d in scored]) - lm.inner.log_likelihood([context])[0]
    assert values == pytest.approx(direct, abs=1e-4)


def test_milan_on_a_vector_layer_uses_whole_images(planted, tiny_workspace):
    from neuroviz.methods import MethodContext, run_method

    store, fc = planted["store"], tiny_workspace["runs"]["fc"]  # the private copy: labels must not leak
    ctx = MethodContext(store, fc, model=tiny_workspace["model"], **planted["backends"])
    run_method("milan", ctx, config=MilanConfig(k=3, n_concept_candidates=4), neurons=[0])
    labels = store.labels(fc.run_key, method="milan")
    assert list(labels["neuron"].unique()) == [0] and len(labels) == 5
    extra = json.loads(labels.loc[0, "extra_json"])
    assert extra["exemplar_region"] == "full" and extra["mask_threshold"] is None
    assert extra["exemplar_image_idx"] == [t["image_idx"] for t in store.top_images(fc.run_key, 0, k=3)]


def test_milan_takes_the_mask_level_from_the_runs_sketch(planted, tiny_workspace):
    """An extracted run carries a sketch of every map cell: MILAN's mask level comes from it."""
    from neuroviz.methods import MethodContext, run_method

    store, run = planted["store"], tiny_workspace["runs"]["layer2"]  # the private copy: labels must not leak
    levels = store.mask_levels(run.run_key, MilanConfig.mask_quantile)
    assert levels is not None and levels.shape == (run.n_neurons,)
    ctx = MethodContext(store, run, model=tiny_workspace["model"], **planted["backends"])
    run_method("milan", ctx, config=MilanConfig(k=2, n_concept_candidates=3), neurons=[3])
    labels = store.labels(run.run_key, method="milan")
    extra = json.loads(labels[labels["rank"] == 0].iloc[0]["extra_json"])
    assert extra["mask_threshold"] == pytest.approx(float(levels[3]))
    assert extra["mask_level_source"] == "sketch"
