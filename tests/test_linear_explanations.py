"""Linear Explanations recovers a planted two-concept combination, from both concept sources."""

from __future__ import annotations

import numpy as np
import pytest

from neuroviz.concepts import from_texts
from neuroviz.methods import MethodContext, run_method
from neuroviz.methods.base import MethodError
from neuroviz.methods.linear_explanations import LinearExplanationConfig, explain_units, format_explanation
from neuroviz.trust.scoring import LabelSet, label_terms, score_label_sets, scoring_images
from neuroviz.trust.split import HeldOutSplit, fit_run
from tests.test_trust import CONCEPTS, N_IMAGES, planted, planted_run  # noqa: F401  (planted is a fixture)


def test_recovers_a_planted_combination_of_one_hot_labels():
    """LE(label)-style input: one-hot classes; the unit fires 0.6 on class 1 and 0.3 on class 3."""
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 6, 3000)
    onehot = np.eye(6, dtype=np.float32)[classes]
    unit = 0.6 * onehot[:, 1] + 0.3 * onehot[:, 3] + 0.02 * rng.normal(size=3000)
    (le,) = explain_units(unit[:, None], onehot)
    label, terms = format_explanation([f"class{i}" for i in range(6)], le)
    assert [t for t, _ in terms] == ["class1", "class3"]
    assert terms[0][1] == pytest.approx(2 / 3, abs=0.02) and terms[1][1] == pytest.approx(1 / 3, abs=0.02)
    assert label == f"{terms[0][1]:.2f} class1 + {terms[1][1]:.2f} class3" and le.fit_r > 0.99


def test_weights_are_non_negative_and_the_length_is_bounded():
    rng = np.random.default_rng(1)
    concepts = rng.normal(size=(2000, 30)).astype(np.float32)
    unit = concepts[:, 0] - concepts[:, 1] + 0.5 * concepts[:, 2]  # a negative part cannot be used
    (le,) = explain_units(unit[:, None], concepts, LinearExplanationConfig(max_terms=3))
    assert set(le.concepts) == {0, 2} and all(w > 0 for w in le.weights) and 0 < le.fit_r < 0.9
    (short,) = explain_units(unit[:, None], concepts, LinearExplanationConfig(max_terms=1))
    assert short.concepts == [0]
    with pytest.raises(MethodError):
        LinearExplanationConfig(source="siglip")


def test_the_method_explains_a_planted_unit_and_its_label_scores_on_held_out_images(planted):  # noqa: F811
    """LE(multimodal): unit = 0.6 sim(dog) + 0.3 sim(grass); fitted on the fit part, scored on the rest."""
    store, ps, backend = planted["store"], planted["ps"], planted["backend"]
    sim = planted["sim"]
    rng = np.random.default_rng(3)
    acts = np.stack([0.6 * sim[:, 0] + 0.3 * sim[:, 1] + 0.002 * rng.normal(size=N_IMAGES), sim[:, 2]], axis=1)
    run = planted_run(store, ps, backend, "le", acts)
    split = HeldOutSplit(0)
    fit = fit_run(store, run, split)
    ctx = MethodContext(store=store, run=fit, multimodal=backend, concepts=from_texts("c", CONCEPTS))
    key = run_method("linear_explanations", ctx)
    labels = store.labels(fit.run_key, method="linear_explanations")
    labels = labels[labels["label_key"] == key]
    top = labels[labels["rank"] == 0].set_index("neuron")
    terms = label_terms(top.loc[0, "label"])
    assert [t for _, t in terms] == ["dog", "grass"]
    assert terms[0][0] == pytest.approx(2 / 3, abs=0.05) and terms[1][0] == pytest.approx(1 / 3, abs=0.05)
    assert label_terms(top.loc[1, "label"])[0][1] == "car"
    assert labels[(labels["neuron"] == 0) & (labels["rank"] > 0)]["label"].tolist() == ["dog", "grass"]
    images = scoring_images(store, run, backend, split)
    (scored,) = score_label_sets(store, images, backend, [LabelSet("le", "method", dict(top["label"]))], n_boot=0)
    assert (scored.scores.values["simulation_r"] > 0.98).all()


def test_label_source_needs_a_labelled_probe_set(planted):  # noqa: F811
    store, backend = planted["store"], planted["backend"]
    ctx = MethodContext(store=store, run=planted["run"], multimodal=backend, concepts=from_texts("c", CONCEPTS))
    with pytest.raises(MethodError, match="labels"):
        run_method("linear_explanations", ctx, LinearExplanationConfig(source="label"), neurons=[0])
