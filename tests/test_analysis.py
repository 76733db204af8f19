"""Analysis: category shares add up per layer, and group ablation measures what it should."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from test_editing import channel_model, colour_probe  # noqa: F401  (fixture re-used)

from neuroviz import analysis, extract
from neuroviz.lexicon import CATEGORY_ORDER, default_lexicon
from neuroviz.provenance import hash_state_dict
from neuroviz.store import LabelRow, Store

LAYER2_CYCLE = ["red", "striped", "wood", "zzqx"]  # colour, texture, material, no match
LAYER4_CYCLE = ["dog", "kitchen", "dog on a sofa"]  # object, scene, relation


def _save(store: Store, run, method: str, labels: dict[int, str], calibrated: dict[int, float] | None = None) -> None:
    rows = [LabelRow(n, 0, text, 1.0, (calibrated or {}).get(n)) for n, text in labels.items()]
    store.save_labels(f"test-{method}-{run.run_key}", run.run_key, method, {}, {}, None, rows, "test labels")


@pytest.fixture(scope="module")
def labelled(tiny_workspace, tmp_path_factory):
    """A private copy of tiny_workspace's cache with labels whose categories we know.

    layer2 (128 neurons), clip_dissect: neurons 0..99 cycle colour/texture/material/no-match,
    neuron 0 has a calibrated score of 0.1, neurons 100..127 are unlabelled.
    layer4 (512), clip_dissect: object/scene/relation in turn; milan: "red car" on 0..9 only.
    """
    root = tmp_path_factory.mktemp("analysis-cache")
    shutil.copytree(tiny_workspace["store"].root, root, dirs_exist_ok=True)
    store = Store(root)
    runs = tiny_workspace["runs"]
    _save(store, runs["layer2"], "clip_dissect", {n: LAYER2_CYCLE[n % 4] for n in range(100)}, {0: 0.1, 1: 0.9})
    _save(store, runs["layer4"], "clip_dissect", {n: LAYER4_CYCLE[n % 3] for n in range(512)})
    _save(store, runs["layer4"], "milan", {n: "red car" for n in range(10)})
    return {**tiny_workspace, "store": store}


def _shares(ws, **config):
    order = [name for name, _ in ws["model"].module.named_modules()]
    return analysis.category_shares(ws["store"], ws["model"].spec, ws["probe_set"].id, analysis.AnalysisConfig(**config),
                                    layer_order=order)


def test_shares_add_up_to_one_per_layer_and_method(labelled):
    for counting in ("head", "fractional"):
        for unlabelled in ("uninterpretable", "exclude"):
            shares = _shares(labelled, counting=counting, unlabelled=unlabelled)
            sums = shares.groupby(["layer", "method"])["share"].sum()
            assert sums.to_numpy() == pytest.approx(1.0)
            assert set(shares["category"]) == set(CATEGORY_ORDER)
    shares = _shares(labelled, unlabelled="uninterpretable")  # the MILAN reading; the default leaves them out
    assert list(dict.fromkeys(shares["layer"])) == ["layer2", "layer4"]  # network order; fc has no labels
    counts = shares.set_index(["layer", "method", "category"])["count"]
    assert counts["layer2", "clip_dissect", "colour"] == 24  # neuron 0's low calibrated score
    assert counts["layer2", "clip_dissect", "texture"] == 25 and counts["layer2", "clip_dissect", "material"] == 25
    assert counts["layer2", "clip_dissect", "uninterpretable"] == 25 + 1 + 28
    assert [counts["layer4", "clip_dissect", c] for c in ("object", "scene", "relation")] == [171, 171, 170]
    assert counts["layer4", "milan", "object"] == 10 and counts["layer4", "milan", "uninterpretable"] == 502


def test_counting_modes_and_exclusion(labelled):
    frac = _shares(labelled, counting="fractional", unlabelled="uninterpretable").set_index(["layer", "method", "category"])["count"]
    assert frac["layer4", "clip_dissect", "relation"] == pytest.approx(85.0)  # "dog on a sofa": half relation
    assert frac["layer4", "clip_dissect", "object"] == pytest.approx(171 + 85.0)
    assert frac["layer4", "milan", "colour"] == pytest.approx(5.0)
    excl = _shares(labelled).set_index(["layer", "method", "category"])["share"]  # default: unlabelled left out
    assert excl["layer4", "milan", "object"] == 1.0
    assert excl["layer2", "clip_dissect", "uninterpretable"] == pytest.approx(26 / 100)


def test_embedding_fallback_sorts_unlisted_words():
    labels = pd.DataFrame({"neuron": [0, 1, 2, 3], "method": "m", "label": ["automobile", "timber", "zzqx", "uninterpretable"],
                           "calibrated": [None] * 4})
    plain = analysis.categorize_labels(labels, analysis.AnalysisConfig())
    assert list(plain["category"]) == ["uninterpretable"] * 4
    fallback = analysis.categorize_labels(labels, analysis.AnalysisConfig(embedding_fallback=True))
    assert list(fallback["category"]) == ["object", "material", "uninterpretable", "uninterpretable"]
    assert list(fallback["match_kind"]) == ["embedding", "embedding", "no match", "declared"]


def test_lexicon_heads():
    lex = default_lexicon()
    assert [lex.match(t).head for t in ("red", "wooden table", "dog on a sofa", "blue sky", "seashore", "zzqx")] == [
        "colour", "object", "relation", "scene", "scene", None]
    assert lex.match("golden retrievers").terms[0].term == "golden retrievers"


def test_group_importance_measures_the_accuracy_each_group_carries(labelled, colour_probe):  # noqa: F811
    """Channel j of the tiny model alone drives class j, so ablating any one-channel group
    costs exactly the 8 shapes of that colour out of 32 labelled images."""
    store = labelled["store"]
    model = channel_model()
    state = hash_state_dict(model.module.state_dict())
    (run,) = extract.extract(model, colour_probe, ["relu"], store, k=5, batch_size=20, chunk_size=20)
    _save(store, run, "clip_dissect", {0: "red", 1: "grass", 2: "sky", 3: "banana"})
    table = analysis.group_importance(model, store, colour_probe, "clip_dissect",
                                      importance=analysis.ImportanceConfig(max_images=None))
    table = table.set_index("category")
    assert set(table.index) == {"colour", "material", "scene", "object"}
    assert (table["metric"] == "accuracy_drop").all() and (table["n_neurons"] == 1).all()
    assert table["importance"].to_numpy() == pytest.approx(8 / 32)
    assert table["n_labelled"].eq(32).all() and table["random_importance"].between(0, 1).all()
    assert hash_state_dict(model.module.state_dict()) == state


def test_importance_on_a_resnet_without_class_names(labelled):
    ws = labelled
    seen = []
    table = analysis.group_importance(ws["model"], ws["store"], ws["probe_set"], "clip_dissect", layers=["layer4"],
                                      importance=analysis.ImportanceConfig(max_images=12, random_baseline=False),
                                      progress=lambda d, t, m: seen.append((d, t)))
    assert list(table["category"]) == ["object", "scene", "relation"]
    assert list(table["n_neurons"]) == [171, 171, 170]
    assert (table["metric"] == "flip_rate").all() and table["importance"].between(0, 1).all()
    assert seen[-1][0] == seen[-1][1] == 4 * 12


def test_no_labels_is_a_clear_error(tmp_path):
    store = Store(tmp_path / "empty")
    with pytest.raises(analysis.AnalysisError, match="extract some layers"):
        analysis.category_shares(store, "torchvision:resnet18@random", "nothing")


def test_analysis_page_draws_shares_and_a_stored_importance_table(labelled, monkeypatch):
    from tests.conftest import dashboard_env, open_page

    ws = labelled
    imp = analysis.ImportanceConfig(max_images=12, random_baseline=False)
    analysis.group_importance(ws["model"], ws["store"], ws["probe_set"], "clip_dissect", layers=["layer4"], importance=imp)
    dashboard_env(monkeypatch, ws["store"].root)
    at = open_page("views/analysis.py", model=ws["model"].spec, probe=ws["probe_set"].id)
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert len(at.get("plotly_chart")) == 1  # shares; no importance table for the default settings yet
    at.number_input(key="analysis_imp_images").set_value(12)
    at.toggle(key="analysis_imp_random").set_value(False)
    at.multiselect(key="analysis_imp_layers").set_value(["layer4"]).run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 2  # the stored table is found by its provenance key and drawn
