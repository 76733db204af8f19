"""Held-out scoring, metrics, baselines and badges (neuroviz.trust), on planted units.

A fake multimodal backend embeds images by a fixed random projection of their pixels and
texts by a hash-seeded random vector, so image-concept similarities of different concepts are
nearly independent: a unit planted as one concept's similarity must score r ~ 1 for that
concept and ~ 0 for the others (the shuffled baseline).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from neuroviz import datasets, embeddings
from neuroviz.backends.base import MultimodalBackend
from neuroviz.concepts import from_texts
from neuroviz.evaluate import evaluate_layer, format_report
from neuroviz.methods import MethodContext, run_method
from neuroviz.store import RunInfo, Store
from neuroviz.trust import badges as badge_lib
from neuroviz.trust.baselines import constant_label_set, shuffled_label_set
from neuroviz.trust.metrics import binarise_top, score_columns
from neuroviz.trust.scoring import LabelSet, label_terms, score_label_sets, scoring_images
from neuroviz.trust.split import HeldOutSplit, SplitError, fit_run, parent_of, score_rows

CONCEPTS = ["dog", "grass", "car", "sky", "tree", "boat", "cat", "road", "house", "water", "bird", "snow"]
OTHER_CONCEPTS = ["lamp", "chair", "cup", "shoe", "door", "clock", "bell", "rope", "kite", "sand", "leaf", "moon"]
N_IMAGES = 240
N_PLANTED = len(CONCEPTS)
N_UNITS = 2 * N_PLANTED  # the second half is noise


class PixelBackend(MultimodalBackend):
    """Images: a fixed random projection of 8x8 RGB pixels; texts: a hash-seeded random vector."""

    id = "test-pixels:v1"
    description = "random pixel projection (test)"
    offline = True
    dim = 64

    def __init__(self):
        self.projection = np.random.default_rng(7).normal(size=(8 * 8 * 3, self.dim)).astype(np.float32)

    def encode_images(self, images, batch_size=32):
        x = np.stack([np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32).reshape(-1) / 255 - 0.5 for im in images])
        e = x @ self.projection
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def encode_texts(self, texts, batch_size=256):
        rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=self.dim) for t in texts]
        e = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def planted_run(store: Store, ps, backend, name: str, acts: np.ndarray, maps: np.ndarray | None = None, k: int | None = None) -> RunInfo:
    k = k or acts.shape[0]
    top = np.argsort(-acts, axis=0)[:k].T
    info = RunInfo(f"planted-{name}", "custom:planted", "planted", name, "mean", ps.id, "none", k, "test",
                   acts.shape[0], acts.shape[1], None if maps is None else tuple(maps.shape[2:]), "vector" if maps is None else "conv")
    store.finish_run(info, acts.astype(np.float32), np.take_along_axis(acts.T, top, axis=1), top,
                     [im.image_id for im in ps.images], maps)
    return store.get_run(info.run_key)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise_images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    store = Store(tmp_path_factory.mktemp("trust_cache"))
    ps = datasets.from_folder(folder, cache_dir=store.root)
    store.register_probe_set(ps)
    backend = PixelBackend()
    sim = embeddings.image_embeddings(backend, store, ps.id) @ embeddings.text_embeddings(backend, store, CONCEPTS).T
    acts = np.concatenate([sim + 0.01 * rng.normal(size=sim.shape), rng.normal(size=sim.shape)], axis=1)
    run = planted_run(store, ps, backend, "units", acts)
    return {"store": store, "ps": ps, "backend": backend, "run": run, "acts": acts, "sim": sim}


# -- metrics -----------------------------------------------------------------------------
def test_each_metric_reproduces_a_hand_computed_value():
    a = np.array([6, 5, 4, 3, 2, 1], dtype=float)[:, None]
    p = np.array([1, 0, 1, 0, 0, 0], dtype=float)[:, None]
    s = score_columns(a, p, presence=p.astype(bool), top_fraction=2 / 6, n_boot=0)
    # Positives at ranks 1 and 3: precisions 1/1 and 2/3 -> AP = 5/6.
    assert s.values["auprc"][0] == pytest.approx(5 / 6)
    # Binarised a = top 2 = ranks 1,2; presence = ranks 1,3: TP 1, FP 1, FN 1.
    assert s.values["f1"][0] == pytest.approx(2 / 4) and s.values["iou"][0] == pytest.approx(1 / 3)
    # Pearson of (1,2,3) and (1,3,2): cov 0.5 / (var 1) = 0.5.
    r = score_columns(np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [3.0], [2.0]]), n_boot=0).values["simulation_r"]
    assert r[0] == pytest.approx(0.5)
    assert binarise_top(np.array([[3.0], [1.0], [2.0], [0.0]]), 0.5)[:, 0].tolist() == [True, False, True, False]


def test_metrics_agree_with_scikit_learn_and_intervals_bracket_them():
    from sklearn.metrics import average_precision_score, f1_score, jaccard_score

    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 6))
    p = a + 2 * rng.normal(size=a.shape)
    s = score_columns(a, p, n_boot=300, seed=3)
    y, b = binarise_top(p), binarise_top(a)
    for j in range(6):
        assert s.values["simulation_r"][j] == pytest.approx(np.corrcoef(a[:, j], p[:, j])[0, 1], abs=1e-5)
        assert s.values["auprc"][j] == pytest.approx(average_precision_score(y[:, j], a[:, j]), abs=1e-5)
        assert s.values["f1"][j] == pytest.approx(f1_score(y[:, j], b[:, j]))
        assert s.values["iou"][j] == pytest.approx(jaccard_score(y[:, j], b[:, j]))
    for metric in ("simulation_r", "auprc", "f1", "iou"):
        lo, hi = s.interval(metric)
        assert (lo <= s.values[metric] + 1e-9).all() and (s.values[metric] <= hi + 1e-9).all() and (hi > lo).all()
        mean, mlo, mhi = s.mean_interval(metric)
        assert mlo <= mean <= mhi
    # more images, narrower interval
    big = score_columns(np.tile(a, (4, 1)), np.tile(p, (4, 1)), n_boot=300, seed=3)
    assert np.mean(np.subtract(*big.interval("simulation_r")[::-1])) < np.mean(np.subtract(*s.interval("simulation_r")[::-1]))


def test_auprc_intervals_of_a_wide_layer_come_from_a_sample_of_columns():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(100, 20))
    s = score_columns(a, a + rng.normal(size=a.shape), n_boot=50, max_auprc_resampled=5)
    assert len(s.resampled["auprc"]) == 5 and np.isnan(s.interval("auprc")[0]).sum() == 15
    mean, lo, hi = s.mean_interval("auprc")
    assert lo < mean < hi and mean == pytest.approx(s.values["auprc"].mean())


def test_weighted_labels_are_parsed():
    assert label_terms("0.6 dog + 0.3 tall grass") == [(0.6, "dog"), (0.3, "tall grass")]
    assert label_terms("salt + pepper") == [(1.0, "salt + pepper")]
    assert label_terms("dog") == [(1.0, "dog")]


# -- the split -------------------------------------------------------------------------------
def test_split_is_seeded_stable_and_by_content():
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    mask = HeldOutSplit(0).score_mask(ids)
    assert 900 < mask.sum() < 1100
    assert (HeldOutSplit(0).score_mask(ids[:500]) == mask[:500]).all()  # adding images moves none
    assert (HeldOutSplit(0).score_mask(ids[::-1]) == mask[::-1]).all()  # order does not matter
    assert (HeldOutSplit(1).score_mask(ids) != mask).any()
    assert 250 < HeldOutSplit(0, 0.15).score_mask(ids).sum() < 350
    with pytest.raises(SplitError):
        HeldOutSplit(0, 1.0)


def test_fit_run_holds_every_scoring_image_out(planted):
    store, run, backend = planted["store"], planted["run"], planted["backend"]
    split = HeldOutSplit(0)
    fit = fit_run(store, run, split)
    assert fit_run(store, run, split).run_key == fit.run_key  # made once
    assert parent_of(store, fit)[0].run_key == run.run_key and parent_of(store, run) is None
    parent_ids = [im["image_id"] for im in store.probe_images(run.probe_set_id)]
    fit_ids = [im["image_id"] for im in store.probe_images(fit.probe_set_id)]
    scored = scoring_images(store, run, backend, split)
    assert set(fit_ids).isdisjoint(scored.image_ids) and set(fit_ids) | set(scored.image_ids) == set(parent_ids)
    assert len(score_rows(store, run, split)) == len(scored.image_ids)
    fit_rows = [parent_ids.index(i) for i in fit_ids]
    np.testing.assert_allclose(store.activations(fit.run_key), planted["acts"][fit_rows], rtol=1e-6)
    top = store.top_k(fit.run_key)
    brute = np.argsort(-planted["acts"][fit_rows].T, axis=1)[:, : fit.k]
    assert (top.image_idx == brute).all()
    # scoring a fit run's labels uses its parent's held-out images
    assert scoring_images(store, fit, backend, split).image_ids == scored.image_ids


def test_methods_asked_to_fit_never_see_a_scoring_image(planted, monkeypatch):
    """Every image id any store read hands a method is logged: none is a scoring image."""
    store, run, backend = planted["store"], planted["run"], planted["backend"]
    split = HeldOutSplit(0)
    fit = fit_run(store, run, split)
    scoring = set(scoring_images(store, run, backend, split).image_ids)
    seen: set[str] = set()
    ids_of = {r.run_key: [im["image_id"] for im in store.probe_images(r.probe_set_id)] for r in (run, fit)}
    real_probe_images, real_activations, real_embeddings = Store.probe_images, Store.activations, embeddings.image_embeddings

    def probe_images(self, probe_set_id):
        rows = real_probe_images(self, probe_set_id)
        seen.update(r["image_id"] for r in rows)
        return rows

    def activations(self, run_key, mmap=True):
        seen.update(ids_of[run_key])
        return real_activations(self, run_key, mmap)

    def image_embeddings(backend_, store_, probe_set_id, *args, **kwargs):
        seen.update(r["image_id"] for r in real_probe_images(store_, probe_set_id))
        return real_embeddings(backend_, store_, probe_set_id, *args, **kwargs)

    monkeypatch.setattr(Store, "probe_images", probe_images)
    monkeypatch.setattr(Store, "activations", activations)
    monkeypatch.setattr(embeddings, "image_embeddings", image_embeddings)
    ctx = MethodContext(store=store, run=fit, multimodal=backend, concepts=from_texts("c", CONCEPTS))
    for method in ("clip_dissect", "linear_explanations"):
        run_method(method, ctx)
    assert seen and seen.isdisjoint(scoring)
    assert seen <= set(ids_of[fit.run_key])


# -- scoring, baselines, badges -------------------------------------------------------------------
def test_planted_units_score_near_one_and_their_shuffled_labels_near_zero(planted):
    store, run, backend = planted["store"], planted["run"], planted["backend"]
    images = scoring_images(store, run, backend, HeldOutSplit(0))
    truth = LabelSet("truth", "method", {u: CONCEPTS[u] for u in range(N_PLANTED)})
    scored = {s.label_set.name: s for s in score_label_sets(
        store, images, backend, [truth, shuffled_label_set(truth, seed=1), constant_label_set("depiction", range(N_PLANTED))], n_boot=100)}
    r_true = scored["truth"].scores.values["simulation_r"]
    assert (r_true > 0.98).all()
    assert abs(scored["shuffled: truth"].scores.values["simulation_r"].mean()) < 0.2
    assert scored["truth"].scores.values["auprc"].mean() > 0.8 > scored["shuffled: truth"].scores.values["auprc"].mean() + 0.4
    mean, lo, hi = scored["truth"].scores.mean_interval("simulation_r")
    assert lo <= mean <= hi and hi < 1.0001


def test_badges_pass_planted_units_and_fail_noise(planted):
    store, run, backend = planted["store"], planted["run"], planted["backend"]
    images = scoring_images(store, run, backend, HeldOutSplit(0))
    # every unit labelled: planted units with their concept, noise units with other concepts
    labels = LabelSet("m", "method", {u: (CONCEPTS + OTHER_CONCEPTS)[u] for u in range(N_UNITS)})
    badges = {b.neuron: b for b in badge_lib.unit_badges(store, images, backend, [labels])}
    assert all(badges[u].passed for u in range(N_PLANTED))
    noise = [badges[u] for u in range(N_PLANTED, N_UNITS)]
    # FDR bounds the expected share of false passes, not each sample's: a noise unit whose label
    # correlates at 2 sd by chance may pass; most must not, and their p-values look uniform.
    assert sum(b.passed for b in noise) <= 2 and np.median([b.p for b in noise]) > 0.2
    assert all(0 <= b.q <= 1 and b.p <= b.q + 1e-12 for b in badges.values())
    badge_lib.save_badges(store, run.run_key, list(badges.values()), {"images": images.description})
    loaded = badge_lib.load_badges(store, run.run_key)
    assert loaded[0].passed and badge_lib.badge_about(store, run.run_key)["images"] == images.description
    order = sorted(range(N_UNITS + 2), key=lambda n: badge_lib.badge_sort_key(loaded.get(n)))
    assert set(order[:N_PLANTED]) == set(range(N_PLANTED)) and order[-2:] == [N_UNITS, N_UNITS + 1]
    assert badge_lib.filter_by_badge(range(N_UNITS + 2), loaded, "beats shuffled") == [
        n for n in range(N_UNITS) if loaded[n].passed]
    assert badge_lib.filter_by_badge(range(N_UNITS + 2), loaded, "not scored") == [N_UNITS, N_UNITS + 1]
    assert badge_lib.badge_text(loaded[0]).startswith("✓") and "not scored" in badge_lib.badge_text(None)


def test_evaluate_scores_held_out_labels_with_every_baseline(planted):
    store, run, backend = planted["store"], planted["run"], planted["backend"]
    fit = fit_run(store, run, HeldOutSplit(0))
    run_method("clip_dissect", MethodContext(store=store, run=fit, multimodal=backend, concepts=from_texts("c", CONCEPTS)))
    ev = evaluate_layer(store, run, backend, n_boot=50, neurons=range(N_PLANTED))
    rows = {r.name: r for r in ev.rows}
    assert {"clip_dissect", "shuffled: clip_dissect", "baseline: depiction"} <= set(rows)
    method = rows["clip_dissect"]
    assert method.held_out and "clip_dissect [" in method.note and "UTC" in method.note
    assert method.n_neurons == N_PLANTED and ev.neurons == list(range(N_PLANTED))
    assert method.metrics["simulation_r"][0] > rows["shuffled: clip_dissect"].metrics["simulation_r"][0] + 0.3
    assert method.metrics["simulation_r"][0] > rows["baseline: depiction"].metrics["simulation_r"][0] + 0.3
    assert ev.diversity["clip_dissect"]["units"] == N_PLANTED and ev.hubs and ev.badges
    report = format_report(ev)
    assert "Neurons used (12): 0-11" in report and "Label diversity" in report and "Hub images" in report
    assert badge_lib.load_badges(store, run.run_key)  # evaluate saves the badges the pages show


def test_labels_that_name_image_classes_use_ground_truth_presence(planted):
    """A label naming the images' class: presence is the class, not the label's own top predictions."""
    from neuroviz.trust.scoring import ScoringImages

    rng = np.random.default_rng(5)
    n = 200
    classes = ["dog" if i % 4 == 0 else "cat" for i in range(n)]
    acts = np.array([[1.0 if c == "dog" else 0.0] for c in classes]) + 0.01 * rng.normal(size=(n, 1))
    images = ScoringImages(acts, rng.normal(size=(n, 8)).astype(np.float32), [str(i) for i in range(n)], "test", classes)

    class Blind(PixelBackend):  # predictions that know nothing of dogs (random image embeddings)
        def similarity(self, image_emb, text_emb):
            return image_emb[:, : text_emb.shape[0]]

    (truth,) = score_label_sets(planted["store"], images, Blind(), [LabelSet("m", "method", {0: "Dog"})], n_boot=0)
    # presence = the dog images; the unit fires exactly on them: AUPRC 1 whatever the prediction
    assert truth.scores.values["auprc"][0] == pytest.approx(1.0)


def test_linearised_layer_mean_interval_matches_the_exact_bootstrap():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(3000, 40))
    p = 0.3 * a + rng.normal(size=a.shape)
    exact = score_columns(a, p, n_boot=400, seed=2)
    fast = score_columns(a, p, n_boot=400, seed=2, per_unit=False)
    for metric in ("simulation_r", "f1", "iou"):
        mean, lo, hi = exact.mean_interval(metric)
        f_mean, f_lo, f_hi = fast.mean_interval(metric)
        assert f_mean == mean and np.isnan(fast.interval(metric)[0]).all()
        assert f_lo == pytest.approx(lo, abs=0.1 * (hi - lo)) and f_hi == pytest.approx(hi, abs=0.1 * (hi - lo))


def test_evaluate_names_linear_explanation_variants_by_source(planted):
    store, run, backend = planted["store"], planted["run"], planted["backend"]
    fit = fit_run(store, run, HeldOutSplit(0))
    run_method("linear_explanations", MethodContext(store=store, run=fit, multimodal=backend, concepts=from_texts("c", CONCEPTS)),
               neurons=range(N_PLANTED))
    rows = {r.name: r for r in evaluate_layer(store, run, backend, n_boot=0, neurons=range(N_PLANTED), save=False).rows}
    assert "linear_explanations (multimodal)" in rows and "shuffled: linear_explanations (multimodal)" in rows
    le = rows["linear_explanations (multimodal)"]
    assert le.held_out and le.metrics["simulation_r"][0] > 0.9


def test_humans_against_metrics_rank_methods_alike(planted):
    """Three methods on the planted units: raters prefer 'truth' (the planted concept), then 'half'
    (right on every other unit), then 'noise'; the held-out r orders them the same way."""
    from neuroviz import study as st
    from neuroviz.store import LabelRow
    from neuroviz.trust.humans import format_humans_vs_metrics, humans_vs_metrics

    store, run, backend = planted["store"], planted["run"], planted["backend"]
    units = range(N_PLANTED)
    answers = {"truth": lambda n: CONCEPTS[n], "half": lambda n: CONCEPTS[n] if n % 2 else OTHER_CONCEPTS[n],
               "noise": lambda n: OTHER_CONCEPTS[(n + 1) % N_PLANTED]}
    for method, label in answers.items():
        store.save_labels(f"{method}-humans", run.run_key, method, {}, {}, None, [LabelRow(n, 0, label(n), 1.0) for n in units], "test")
    study = st.create_study(store, "humans", [(run.run_key, n) for n in units], list(answers), raters_per_item=2, gold_items=0)
    owner = {row.item_id: row for row in st.study_items(store, study.study_id).itertuples()}
    for r, preference in enumerate((["truth", "half", "noise"], ["truth", "half", "noise"], ["half", "truth", "noise"])):
        rater = st.register_rater(store, study.study_id, f"rater {r}")
        while (task := st.next_item(store, study.study_id, rater.rater_id)) is not None:
            labels = owner[task.item_id].labels
            wanted = labels[preference[0]] if task.item_id % 3 else labels[preference[1]]
            st.submit_vote(store, study.study_id, rater.rater_id, task.item_id,
                           next(o.letter for o in task.options if o.label == wanted))
    result = humans_vs_metrics(store, study.study_id, backend, n_boot=50)
    rows = {r.method: r for r in result.rows}
    assert rows["truth"].win_rate > rows["half"].win_rate > rows["noise"].win_rate
    assert rows["truth"].automatic > rows["half"].automatic > rows["noise"].automatic
    assert rows["truth"].units == N_PLANTED and rows["truth"].automatic_low <= rows["truth"].automatic <= rows["truth"].automatic_high
    assert result.spearman == pytest.approx(1.0)
    table = format_humans_vs_metrics(result)
    assert "| truth |" in table and "Spearman rank correlation" in table

    # what `evaluate --study` saves is what the Study results page shows (no backend loaded there)
    from neuroviz.trust.humans import save_humans_vs_metrics, stored_humans_vs_metrics
    from tests.conftest import dashboard_env, open_page

    assert stored_humans_vs_metrics(store, study.study_id) is None
    save_humans_vs_metrics(store, study.study_id, result)
    assert stored_humans_vs_metrics(store, study.study_id) == result
    with pytest.MonkeyPatch.context() as env:
        dashboard_env(env, store.root)
        at = open_page("views/study_results.py", sid=study.study_id)
    assert not at.exception, at.exception
    shown = [df.value for df in at.dataframe if "held-out simulation_r" in df.value.columns]
    assert shown and len(shown[0]) == 3
    assert list(shown[0]["votes"]) == [r.votes for r in result.rows]
    assert any("Spearman rank correlation between the human win rate" in c.value for c in at.caption)
