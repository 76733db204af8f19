"""Describe-and-Dissect: prompt post-processing, step-3 scoring, and the method end to end with replay."""

from __future__ import annotations

import numpy as np
import pytest

from neuroviz.methods.dnd import (
    DnDConfig,
    concept_phrase,
    score_candidates,
    simplify_prompt,
    summary_prompt,
    topk_squared_rank,
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


# ---------------------------------------------------------------------------------------------
# End to end on the tiny workspace, with a recorded tiny language model, then replayed
# ---------------------------------------------------------------------------------------------
TINY_WORDS = ("the a of and with on in cat dog red blue green yellow square circle shape fur stripes sky "
              "photo object objects colour colours round").split()


def make_tiny_lm_dir(folder):
    """The shared tiny Llama over this file's words, with room for DnD's long few-shot prompts."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(folder, TINY_WORDS, max_positions=1024)


@pytest.fixture(scope="module")
def dnd_backends(tiny_workspace, tmp_path_factory):
    """ConSE, the retrieval captioner (small detail vocabulary) and a recorded tiny LM."""
    from neuroviz.backends.captioner import create_captioner
    from neuroviz.backends.language import create_language_model
    from neuroviz.backends.multimodal import create_multimodal

    root = tmp_path_factory.mktemp("dnd_backends")
    details = root / "details.txt"
    details.write_text("\n".join(["red", "blue", "green", "yellow", "square", "circle", "fur", "stripes", "sky", "metal"]))
    store = tiny_workspace["store"]
    multimodal = create_multimodal("conse")
    captioner = create_captioner(f"retrieval:{details}", multimodal=multimodal, store_root=store.root)
    lm_dir = make_tiny_lm_dir(root / "tiny_lm")
    language_model = create_language_model(f"transformers:{lm_dir}", store_root=store.root)
    return {"multimodal": multimodal, "captioner": captioner, "language_model": language_model}


SMALL = DnDConfig(n_top_images=6, n_candidates=3, max_new_tokens=6)


def test_dnd_labels_a_neuron_and_a_recording_replays_it_exactly(tiny_workspace, dnd_backends):
    import json

    from neuroviz.backends.language import ReplayLM
    from neuroviz.methods import MethodContext, get_method, run_method

    store, run = tiny_workspace["store"], tiny_workspace["runs"]["layer2"]
    ctx = MethodContext(store, run, model=tiny_workspace["model"], **dnd_backends)
    key = run_method("dnd", ctx, config=SMALL, neurons=[3])
    labels = store.labels(run.run_key, neuron=3, method="dnd")
    assert list(labels["rank"]) == list(range(len(labels))) and 1 <= len(labels) <= 3
    assert labels["label"].str.len().gt(0).all() and labels["score"].notna().all()
    extra = json.loads(labels.loc[0, "extra_json"])
    assert len(extra["captions"]) == SMALL.n_top_images and len(extra["simplified_captions"]) == SMALL.n_top_images
    assert 1 <= len(extra["candidates"]) <= SMALL.n_candidates
    assert len(extra["llm_calls"]) == SMALL.n_top_images + SMALL.n_candidates
    assert set(labels["label"]) <= set(extra["candidates"])
    acts = [t["activation"] for t in extra["top_images"]]
    assert acts == sorted(acts, reverse=True)
    # The run records which backends made it.
    run_row = store.label_runs(run.run_key).set_index("label_key").loc[key]
    backends = json.loads(run_row["backends_json"])
    assert backends == {"multimodal": dnd_backends["multimodal"].id, "captioner": dnd_backends["captioner"].id,
                        "language_model": dnd_backends["language_model"].id}
    assert extra["llm_recording_id"] == dnd_backends["language_model"].recording_id

    # Replay: no model, the recorded answers; the labels and scores come out identical.
    replay = ReplayLM(store, dnd_backends["language_model"].recording_id)
    replay_ctx = MethodContext(store, run, model=tiny_workspace["model"], multimodal=dnd_backends["multimodal"],
                               captioner=dnd_backends["captioner"], language_model=replay)
    rows = get_method("dnd").describe(replay_ctx, SMALL, [3])
    assert [r.label for r in rows] == list(labels["label"])
    assert [r.score for r in rows] == pytest.approx(list(labels["score"]))
    assert [c["response"] for c in rows[0].extra["llm_calls"]] == [c["response"] for c in extra["llm_calls"]]


def test_step_one_crops_conv_layers_and_reproduces_the_runs_activations(tiny_workspace):
    from neuroviz.methods import MethodContext
    from neuroviz.methods.dnd import TopImageViews, augmented_top_images, neuron_activations

    store, model = tiny_workspace["store"], tiny_workspace["model"]
    run = tiny_workspace["runs"]["layer2"]
    ctx = MethodContext(store, run, model=model)
    views = TopImageViews.for_run(ctx, 128)
    config = DnDConfig(view_size=128)
    # f on the exact model views gives back the activations the run stored: crops and maps line up.
    tops = store.top_images(run.run_key, 3, k=10)
    again = neuron_activations(model, run.layer, run.pooling, 3, [views.exact(t["image_idx"]) for t in tops])
    assert again == pytest.approx([t["activation"] for t in tops], rel=1e-4, abs=1e-5)

    crops_seen = 0
    for neuron in range(4):
        exemplars = augmented_top_images(ctx, neuron, config, views)
        assert len(exemplars) == 10
        acts = [e.activation for e in exemplars]
        assert acts == sorted(acts, reverse=True)
        assert acts[0] >= store.top_images(run.run_key, neuron, k=1)[0]["activation"] - 1e-5  # originals compete too
        for e in exemplars:
            assert e.image.size == (128, 128)
            if e.box is not None:
                crops_seen += 1
                assert 0 <= e.box.left < e.box.right <= 128 and 0 <= e.box.top < e.box.bottom <= 128
    assert crops_seen > 0  # random conv features are patchy: some crops beat whole images

    fc = tiny_workspace["runs"]["fc"]
    fc_exemplars = augmented_top_images(MethodContext(store, fc, model=model), 0, config)
    assert all(e.box is None for e in fc_exemplars)
    assert [e.activation for e in fc_exemplars] == pytest.approx([t["activation"] for t in store.top_images(fc.run_key, 0, k=10)])


def test_progress_moves_at_every_language_model_call(tiny_workspace, dnd_backends):
    """The bar advances before each of a neuron's language-model calls, not only between the
    three steps (a stalled '1/3 captions and candidates' is what users saw)."""
    from neuroviz.methods import MethodContext, get_method
    from neuroviz.methods.dnd import progress_steps

    updates = []
    store, run = tiny_workspace["store"], tiny_workspace["runs"]["layer2"]
    ctx = MethodContext(store, run, model=tiny_workspace["model"], **dnd_backends,
                        progress=lambda done, total, message: updates.append((done, total, message)))
    get_method("dnd").describe(ctx, SMALL, [3, 5])
    ours = [u for u in updates if u[2].startswith("neuron ") or u[2] == "done"]
    total = 2 * progress_steps(SMALL)
    assert {u[1] for u in ours} == {total} and ours[-1][0] == total
    assert [u[0] for u in ours] == sorted(u[0] for u in ours)  # never goes back
    calls = [u for u in ours if "simplifying caption" in u[2] or "candidate concept" in u[2]]
    assert len(calls) == 2 * (SMALL.n_top_images + SMALL.n_candidates)
    assert len({u[0] for u in ours}) == total + 1  # every step is reported once: 0 .. total
    assert "loads the language model first" in calls[0][2] and "loads" not in calls[-1][2]
    assert any(u[2] == f"neuron 5: candidate concept {SMALL.n_candidates}/{SMALL.n_candidates}" for u in calls)
