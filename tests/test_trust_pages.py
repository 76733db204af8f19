"""The trust badge on browser cards (filter and sort by it) and the neuron page's comparison table."""

from __future__ import annotations

import numpy as np
import pytest

from neuroviz.trust.badges import UnitBadge, save_badges
from neuroviz.trust.compare import save_unit_scores, unit_comparison
from neuroviz.trust.metrics import score_columns
from neuroviz.trust.scoring import LabelSet, ScoredLabelSet
from tests.test_pages import app, assert_clean, build_dashboard_cache, card_neurons, texts

PASSING = {1, 4, 30}


@pytest.fixture(scope="module")
def trusted(tmp_path_factory, image_folder):
    """A labelled dashboard cache whose layer2 was 'evaluated': badges and per-unit scores saved."""
    from tests.conftest import dashboard_env

    root = tmp_path_factory.mktemp("trust_dash")
    info = build_dashboard_cache(root, image_folder)
    store, run = info["store"], info["runs"]["layer2"]
    units = list(range(40))
    badges = [UnitBadge(n, n in PASSING, f"label {n}", "clip_dissect", 0.5 if n in PASSING else 0.01, 0.0,
                        0.001 if n in PASSING else 0.6, 0.01 if n in PASSING else 0.7) for n in units]
    save_badges(store, run.run_key, badges, {"images": "20 held-out images"})
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(30, len(units)))
    method = LabelSet("clip_dissect", "method", {n: f"label {n}" for n in units}, note="clip_dissect [abc]")
    constant = LabelSet("baseline: depiction", "constant", {n: "depiction" for n in units})
    scored = [ScoredLabelSet(method, np.array(units), score_columns(acts, acts + 0.3 * rng.normal(size=acts.shape), n_boot=20)),
              ScoredLabelSet(constant, np.array(units), score_columns(acts, rng.normal(size=acts.shape), n_boot=20))]
    save_unit_scores(store, run.run_key, scored, {"images": "20 held-out images", "backend": "test", "held_out": True})
    env = pytest.MonkeyPatch()
    dashboard_env(env, root)
    yield info
    env.undo()


def test_comparison_rows_put_methods_first_best_first(trusted):
    rows = unit_comparison(trusted["store"], trusted["runs"]["layer2"].run_key, 4)
    assert [r.name for r in rows] == ["clip_dissect", "baseline: depiction"]
    assert rows[0].label == "label 4" and rows[0].metrics["simulation_r"][0] > 0.5
    lo, hi = rows[0].metrics["simulation_r"][1:]
    assert lo <= rows[0].metrics["simulation_r"][0] <= hi
    assert unit_comparison(trusted["store"], trusted["runs"]["layer2"].run_key, 999) == []


def test_browser_cards_show_the_badge_and_filter_and_sort_by_it(trusted):
    at = app(layer="layer2")
    at.run()
    assert_clean(at)
    assert "beats shuffled" in texts(at)
    at.selectbox(key="browser_trust").set_value("beats shuffled").run()
    assert_clean(at)
    assert card_neurons(at) == sorted(PASSING)
    at.selectbox(key="browser_trust").set_value("trusted first").run()
    assert set(card_neurons(at)[:3]) == PASSING


def test_neuron_page_shows_the_comparison_and_offers_to_score_again(trusted):
    at = app(layer="layer2", neuron=4)
    at.run()
    at.switch_page("views/neuron.py").run()
    assert_clean(at)
    page = texts(at)
    assert "How far to trust these labels" in page and "beats shuffled" in page and "20 held-out images" in page
    assert at.dataframe and "python -m neuroviz evaluate" in page
