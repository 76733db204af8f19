"""MILAN-style PMI: the objective, the spatial threshold estimate, and the method end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuroviz.methods.milan import (
    MilanConfig, cached_log_likelihood, description_prior, log_p_description_given_exemplars, pmi_scores,
    select_exemplars, spatial_quantile_threshold,
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
