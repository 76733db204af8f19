"""Describe-and-Dissect: prompt post-processing, step-3 scoring, and the method end to end with replay."""

from __future__ import annotations

import numpy as np
import pytest

from neuroviz.methods.dnd import (
    DnDConfig, concept_phrase, score_candidates, simplify_prompt, summary_prompt, topk_squared_rank,
)


@pytest.mark.parametrize("response, expected", [
    (" red striped umbrella\nLabel: dog", "red striped umbrella"),
    ("Concept: Dogs and puppies.", "dogs and puppies"),
    ("\n\n  \"zebra stripes\"; tiger fur", "zebra stripes"),
    (" a very long answer that goes on and on and on", "a very long answer that"),
    (" 123 ### ...", ""),
    ("", ""),
])
def test_concept_phrase_cuts_a_completion_to_a_short_phrase(response, expected):
    assert concept_phrase(response) == expected


def test_prompts_end_where_the_model_should_continue():
    prompt = simplify_prompt("a  cat sitting on a mat")
    assert prompt.endswith("Description: a cat sitting on a mat\nLabel:")
    assert prompt.count("Label:") >= 3  # few-shot examples before the query
    summary = summary_prompt(["cat", "kitten on a sofa"])
    assert summary.endswith("Labels: cat; kitten on a sofa\nConcept:")


def test_topk_squared_rank_uses_the_best_beta_ranks():
    assert topk_squared_rank([0, 1, 2, 30, 40], beta=3) == pytest.approx((0 + 1 + 4) / 3)
    assert topk_squared_rank([], beta=5) == float("inf")


def test_scoring_prefers_the_candidate_whose_images_fire_the_neuron_and_look_alike():
    activations = np.array([9.0, 8.0, 7.0, 6.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    candidates = ["stripes", "sky", "dogs"]
    retrieved = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    similar = {0: 0.9, 1: 0.8, 2: 0.85, 3: 0.3, 4: 0.2, 5: 0.1, 6: 0.5, 7: 0.5, 8: 0.5}

    def similarity_of(idx):
        return float(np.mean([similar[i] for i in idx]))

    scored = score_candidates(candidates, retrieved, activations, similarity_of, beta=2, top_k=4)
    assert [s.concept for s in scored] == ["stripes", "sky", "dogs"]
    best, middle, last = scored
    assert best.ranks == [0, 1, 2] and best.concept_rank == 3
    assert best.similarity == pytest.approx(0.85) and best.score == pytest.approx(3 * 0.85)
    assert middle.similarity == pytest.approx(0.3)  # only image 3 is in the top 4
    assert last.similarity == -1.0  # none of its images in the top 4: the authors' code weighs it -1
    # Similarity can overturn the activation ranking: the product decides.
    similar.update({0: 0.1, 1: 0.1, 2: 0.1, 3: 0.95})
    scored = score_candidates(candidates, retrieved, activations, similarity_of, beta=2, top_k=4)
    assert scored[0].concept == "sky"


def test_config_has_the_paper_defaults():
    config = DnDConfig()
    assert (config.n_top_images, config.max_crops_per_image, config.max_mutual_iou, config.max_full_iou) == (10, 4, 0.5, 0.8)
    assert (config.n_candidates, config.summary_temperature, config.n_concept_images, config.beta, config.n_labels) == (5, 0.3, 10, 5, 3)
