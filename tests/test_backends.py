"""Backends through their production code paths: ConSE with the packaged weights, open_clip
and transformers with tiny random models, the OpenAI-compatible client against a local
server, and record/replay of language-model calls."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from neuroviz import embeddings
from neuroviz.backends import multimodal
from neuroviz.backends.base import BackendUnavailable
from neuroviz.backends.multimodal import ConSEBackend, ConSEConfig, create_multimodal


def skimage_photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


# ---------------------------------------------------------------------------------------
# Multimodal
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conse():
    return create_multimodal("conse")


def test_conse_puts_photos_nearest_their_concept(conse):
    queries = ["cat", "rocket", "coffee cup", "astronaut"]
    images = conse.encode_images([skimage_photo("chelsea"), skimage_photo("rocket")])
    texts = conse.encode_texts(queries)
    assert images.shape == (2, texts.shape[1]) and images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    sim = conse.similarity(images, texts)
    assert queries[int(sim[0].argmax())] == "cat"
    assert queries[int(sim[1].argmax())] == "rocket"


def test_conse_is_a_convex_combination_of_top_t_class_embeddings(conse):
    probs = conse.class_probabilities([skimage_photo("coffee")])
    emb = conse.embed_probabilities(probs)[0]
    top = np.argsort(-probs[0])[: conse.config.top_t]
    weights = probs[0, top] / probs[0, top].sum()
    manual = (weights[:, None] * conse._class_embeddings[top]).sum(0)
    np.testing.assert_allclose(emb, manual / np.linalg.norm(manual), atol=1e-5)


def test_registry_shares_instances_and_names_everything_in_the_id():
    a = create_multimodal("conse")
    assert create_multimodal("conse:efficientnet_lite0@10") is a
    b = create_multimodal("conse:mobilenet_v2@5")
    assert b is not a and b.config.top_t == 5
    for part in ("efficientnet_lite0", "MiniLM", "T10"):
        assert part in a.id
    assert "mobilenet_v2" in b.id and "T5" in b.id
    assert a.offline and "EfficientNet-Lite0" in a.description
    assert multimodal.default_multimodal_for("offline:efficientnet_lite0") == "conse:mobilenet_v2"
    assert multimodal.default_multimodal_for("offline:mobilenet_v2") == "conse"
    assert multimodal.default_multimodal_for("torchvision:resnet18@random") == "conse"
    specs = multimodal.MULTIMODAL.specs()
    assert specs[:2] == ["conse", "conse:mobilenet_v2"] and "open_clip:ViT-B-32@openai" in specs


def test_open_clip_random_backend_through_the_same_class():
    backend = create_multimodal("open_clip:ViT-S-32@random")
    assert isinstance(backend, multimodal.OpenClipBackend) and backend.offline
    images = backend.encode_images([skimage_photo("chelsea"), Image.new("RGB", (50, 70), (200, 10, 10))])
    texts = backend.encode_texts(["cat", "rocket", "a red square"])
    assert images.shape == (2, 384) and texts.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert not np.allclose(texts[0], texts[1])
    # seed 0: a second, separate instance gives the same embeddings
    again = multimodal.OpenClipBackend("ViT-S-32", None).encode_texts(["cat"])
    np.testing.assert_allclose(again[0], texts[0], atol=1e-5)


def test_unloadable_open_clip_models_suggest_conse():
    with pytest.raises(BackendUnavailable, match="conse"):
        create_multimodal("open_clip:NoSuchNet-99@openai")
    backend = create_multimodal("open_clip:ViT-S-32@no-such-tag")
    with pytest.raises(BackendUnavailable, match="conse"):
        backend.encode_texts(["cat"])
    with pytest.raises(BackendUnavailable, match="openai"):
        create_multimodal("open_clip:ViT-B-32")  # no tag: says which tags exist
    with pytest.raises(BackendUnavailable, match="conse"):
        create_multimodal("clip-from-the-moon")
    with pytest.raises(BackendUnavailable, match="mobilenet_v2"):
        create_multimodal("conse:resnet1000")


# ---------------------------------------------------------------------------------------
# Embedding caches
# ---------------------------------------------------------------------------------------
class CountingConSE(ConSEBackend):
    """The real ConSE backend, counting how often it is asked to encode."""

    def __init__(self, top_t: int = 3):
        super().__init__(ConSEConfig(top_t=top_t))
        self.image_calls = 0
        self.text_calls = 0

    def encode_images(self, images, batch_size=32):
        self.image_calls += 1
        return super().encode_images(images, batch_size)

    def encode_texts(self, texts, batch_size=256):
        self.text_calls += 1
        return super().encode_texts(texts, batch_size)


def private_shared(store, tmp_path):
    """The same workspace with a shared cache of its own, so counts do not depend on other tests."""
    from neuroviz.store import SharedCache, Store

    return Store(store.root, shared=SharedCache(tmp_path / "shared"))


def test_image_embeddings_are_cached_in_probe_set_order(tiny_workspace, tmp_path):
    store, ps = private_shared(tiny_workspace["store"], tmp_path), tiny_workspace["probe_set"]
    backend = CountingConSE()
    seen = []
    emb = embeddings.image_embeddings(backend, store, ps.id, progress=lambda d, t, m: seen.append((d, t)), batch_size=16)
    assert emb.shape == (len(ps), 384)
    assert seen[-1] == (len(ps), len(ps))
    assert backend.image_calls == -(-len(ps) // 16)
    key = embeddings.image_embeddings_key(backend, ps.id)
    assert store.array_path("image_emb", key).exists()
    # rows follow the store's idx order
    rows = sorted(store.probe_images(ps.id), key=lambda r: r["idx"])
    from neuroviz.datasets import load_rgb

    single = ConSEBackend(ConSEConfig(top_t=3)).encode_images([load_rgb(rows[5]["path"])])
    np.testing.assert_allclose(emb[5], single[0], atol=1e-5)
    # second call: read from the store, the backend is not asked again
    calls = backend.image_calls
    again = embeddings.image_embeddings(backend, store, ps.id)
    assert backend.image_calls == calls
    np.testing.assert_array_equal(again, emb)


def test_interrupted_image_embeddings_resume_from_saved_chunks(tiny_workspace, monkeypatch, tmp_path):
    store, ps = private_shared(tiny_workspace["store"], tmp_path), tiny_workspace["probe_set"]
    monkeypatch.setattr(embeddings, "IMAGE_CHUNK", 16)

    class InterruptedConSE(CountingConSE):
        def encode_images(self, images, batch_size=32):
            if self.image_calls == 2:
                raise KeyboardInterrupt  # as if the job were cancelled during the third chunk
            return super().encode_images(images, batch_size)

    with pytest.raises(KeyboardInterrupt):
        embeddings.image_embeddings(InterruptedConSE(top_t=4), store, ps.id, batch_size=16)
    resumed = CountingConSE(top_t=4)
    emb = embeddings.image_embeddings(resumed, store, ps.id, batch_size=16)
    assert resumed.image_calls == -(-len(ps) // 16) - 2  # only the chunk that was not saved
    from neuroviz.datasets import load_rgb

    rows = sorted(store.probe_images(ps.id), key=lambda r: r["idx"])
    direct = resumed.encode_images([load_rgb(rows[0]["path"]), load_rgb(rows[-1]["path"])])  # saved chunk, resumed chunk
    np.testing.assert_allclose(emb[[0, -1]], direct, atol=1e-5)
    ids = [r["image_id"] for r in rows]
    assert len(store.shared.image_embeddings(embeddings.image_backend_key(resumed), ids)) == len(ps)  # every chunk kept


def test_text_embeddings_cached_by_backend_and_text_list(tmp_path):
    from neuroviz.concepts import from_texts
    from neuroviz.store import Store

    store = private_shared(Store(tmp_path), tmp_path)
    backend = CountingConSE()
    concept_set = from_texts("few", ["cat", "dog", "rocket"])
    first = embeddings.text_embeddings(backend, store, concept_set)
    assert first.shape == (3, 384) and backend.text_calls == 1
    np.testing.assert_array_equal(embeddings.text_embeddings(backend, store, ["cat", "dog", "rocket"]), first)
    assert backend.text_calls == 1  # same texts, same backend: cached
    embeddings.text_embeddings(backend, store, ["cat", "dog", "rockets"])
    assert backend.text_calls == 2  # one changed text: recomputed
    with pytest.raises(TypeError, match="list"):
        embeddings.text_embeddings(backend, store, "cat")


def test_image_embeddings_of_unknown_probe_set_say_what_to_do(tmp_path):
    from neuroviz.store import Store

    with pytest.raises(ValueError, match="not in this store"):
        embeddings.image_embeddings(create_multimodal("conse"), Store(tmp_path), "nope")


# ---------------------------------------------------------------------------------------
# Captioners
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory):
    from tests.conftest import make_tiny_blip

    return make_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))


def test_transformers_captioner_path_with_tiny_blip(tiny_blip_dir):
    from neuroviz.backends.captioner import TransformersCaptioner, create_captioner

    captioner = create_captioner(f"transformers:{tiny_blip_dir}")
    assert isinstance(captioner, TransformersCaptioner)
    images = [skimage_photo("chelsea"), Image.new("RGB", (40, 30), (0, 0, 200)), skimage_photo("rocket")]
    captions = captioner.caption(images, batch_size=2)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    vocabulary = {"a", "photo", "of", "cat", "dog", "red", "square", "the", "on", "table", "rocket"}
    assert set(" ".join(captions).split()) <= vocabulary  # decoded through the tiny tokenizer
    assert captioner.caption(images, batch_size=2) == captions  # deterministic decoding
    assert str(tiny_blip_dir) in captioner.id


def test_missing_captioner_suggests_retrieval(tmp_path):
    from neuroviz.backends.captioner import create_captioner

    with pytest.raises(BackendUnavailable, match="retrieval"):
        create_captioner(f"transformers:{tmp_path / 'no-model-here'}").caption([Image.new("RGB", (8, 8))])
    with pytest.raises(BackendUnavailable, match="retrieval"):
        create_captioner("gpt-vision-9000")


def test_retrieval_captioner_names_the_cat(conse, tmp_path):
    from neuroviz.backends.captioner import RetrievalCaptioner, create_captioner

    captioner = create_captioner("retrieval:words1k", multimodal=conse, store_root=tmp_path)
    assert isinstance(captioner, RetrievalCaptioner) and conse.id in captioner.id
    cat_caption, rocket_caption = captioner.caption([skimage_photo("chelsea"), skimage_photo("rocket")])
    assert cat_caption.startswith("a photo of a")
    assert any(word in cat_caption for word in ("cat", "tabby", "kitten", "feline"))
    assert any(word in rocket_caption for word in ("rocket", "missile", "space", "shuttle"))
    assert cat_caption.count(",") == 2  # object, then two detail words
    assert captioner.caption([skimage_photo("chelsea")]) == [cat_caption]


# ---------------------------------------------------------------------------------------
# Language models
# ---------------------------------------------------------------------------------------
TINY_WORDS = "the a cat dog sat on mat red blue square circle photo of is and with fur rocket space sky".split()


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama with a word-level tokenizer, saved like a hub model."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_lm"), TINY_WORDS, max_positions=64)


def test_shared_prompt_head_is_cached_and_changes_no_answer(tiny_lm_dir):
    """Few-shot prompts share their examples: the second prompt reuses the first one's head."""
    from neuroviz.backends.language import TransformersLM

    rng = np.random.default_rng(0)
    head = " ".join(rng.choice(TINY_WORDS, 36))
    prompts = [f"{head} the cat sat on", f"{head} a red square", f"{head} rocket in the sky", "dog on mat"]
    cached, plain = TransformersLM(str(tiny_lm_dir)), TransformersLM(str(tiny_lm_dir))
    plain.MIN_SHARED_PREFIX = 10**9  # never caches
    for prompt in prompts:
        for temperature in (0.0, 1.0):
            assert cached.generate(prompt, 6, temperature, seed=3) == plain.generate(prompt, 6, temperature, seed=3)
    assert plain._heads == []
    assert [len(h[0]) for h in cached._heads] == [36, 39]  # the shared words (no BOS here); prompt 1 less its last token


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    from neuroviz.backends.language import TransformersLM, create_language_model

    lm = create_language_model(f"transformers:{tiny_lm_dir}", record=False)
    assert isinstance(lm, TransformersLM)
    return lm


def test_log_likelihood_is_the_sum_of_token_log_probs(tiny_lm):
    import torch

    texts = ["the cat sat on the mat", "red square", "a photo of a dog with fur", "sky"]
    batched = tiny_lm.log_likelihood(texts, batch_size=3)
    assert batched.shape == (4,) and np.all(batched < 0)
    for text, value in zip(texts, batched):
        ids = [1] + [TINY_WORDS.index(w) + 4 for w in text.split()]  # BOS, then the words
        assert tiny_lm.token_ids(text) == ids
        with torch.no_grad():
            logits = tiny_lm.model(torch.tensor([ids])).logits[0]
        manual = torch.log_softmax(logits[:-1].double(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
        assert value == pytest.approx(manual, abs=1e-4)
    np.testing.assert_allclose(tiny_lm.log_likelihood(texts, batch_size=1), batched, atol=1e-4)  # padding changes nothing


def test_generate_is_seeded(tiny_lm):
    import torch

    prompt = "the cat sat on"
    greedy = tiny_lm.generate(prompt, max_new_tokens=6, temperature=0.0, seed=1)
    assert greedy == tiny_lm.generate(prompt, max_new_tokens=6, temperature=0.0, seed=2)
    assert set(greedy.split()) <= set(TINY_WORDS)
    state = torch.random.get_rng_state()
    sampled = [tiny_lm.generate(prompt, max_new_tokens=8, temperature=1.0, seed=s) for s in (0, 1, 2, 0)]
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone
    assert sampled[0] == sampled[3]
    assert len(set(sampled[:3])) > 1


def test_record_then_replay_answers_identically(tiny_lm_dir, tmp_path):
    from neuroviz.backends.language import RecordingLM, ReplayLM, ReplayMiss, create_language_model, list_recordings
    from neuroviz.store import Store

    recorder = create_language_model(f"transformers:{tiny_lm_dir}", store_root=tmp_path)
    assert isinstance(recorder, RecordingLM)
    calls = [("the cat", 5, 0.0, 0), ("a photo of", 6, 0.7, 3), ("a photo of", 6, 0.7, 4)]
    outputs = [recorder.generate(p, max_new_tokens=n, temperature=t, seed=s) for p, n, t, s in calls]
    scores = recorder.log_likelihood(["red square", "blue circle"])
    assert [g.prompt for g in recorder.generations] == [c[0] for c in calls]
    assert recorder.generations[1].seed == 3 and recorder.generations[1].temperature == 0.7

    replay = create_language_model(f"replay:{recorder.recording_id}", store_root=tmp_path)
    assert isinstance(replay, ReplayLM) and replay.id == recorder.id
    assert [replay.generate(p, max_new_tokens=n, temperature=t, seed=s) for p, n, t, s in calls] == outputs
    np.testing.assert_array_equal(replay.log_likelihood(["blue circle", "red square"]), scores[::-1])
    with pytest.raises(ReplayMiss, match="seed=5"):
        replay.generate("a photo of", max_new_tokens=6, temperature=0.7, seed=5)
    with pytest.raises(ReplayMiss, match="rocket"):
        replay.log_likelihood(["rocket"])
    with pytest.raises(BackendUnavailable, match=recorder.recording_id):
        ReplayLM(Store(tmp_path), "never-recorded")
    (recording,) = list_recordings(Store(tmp_path))
    assert recording["recording_id"] == recorder.recording_id and recording["n_calls"] == 5


@pytest.fixture()
def fake_openai():
    from tests.conftest import FakeOpenAIServer

    server = FakeOpenAIServer()
    yield server
    server.close()


def test_openai_compatible_client_against_a_local_server(fake_openai, tmp_path, monkeypatch):
    from neuroviz.backends.language import LogLikelihoodUnsupported, OpenAICompatibleLM, create_language_model

    monkeypatch.setenv("NEUROVIZ_LLM_API_KEY", "sk-test")
    lm = create_language_model(f"openai:{fake_openai.url}/v1#tiny-model", store_root=tmp_path)
    assert lm.id == f"openai:{fake_openai.url}#tiny-model"
    assert lm.generate("hello there", max_new_tokens=7, temperature=0.3, seed=11) == "echo:hello there|seed=11|t=0.3"
    path, headers, body = fake_openai.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "tiny-model" and body["max_tokens"] == 7
    np.testing.assert_allclose(lm.log_likelihood(["red square cat", "a dog"]), [-9.0, -3.0])
    completions = OpenAICompatibleLM(fake_openai.url, "tiny-model", chat=False)
    assert completions.generate("abc") == " continued abc"
    with pytest.raises(LogLikelihoodUnsupported, match="gemma3-270m"):
        OpenAICompatibleLM(fake_openai.url, "chat-only").log_likelihood(["a cat"])
    fake_openai.close()
    with pytest.raises(BackendUnavailable, match="Cannot reach"):
        OpenAICompatibleLM(fake_openai.url, "tiny-model", timeout=5).generate("anyone?")


def test_unknown_language_model_specs_explain_the_forms(tmp_path):
    from neuroviz.backends.language import LANGUAGE_MODELS, create_language_model

    with pytest.raises(BackendUnavailable, match="openai:<base url>#<model>"):
        create_language_model("gpt-17", store_root=tmp_path)
    with pytest.raises(BackendUnavailable, match="gemma3-270m"):
        create_language_model(f"transformers:{tmp_path / 'nothing'}", store_root=tmp_path, record=False).log_likelihood(["x"])
    assert LANGUAGE_MODELS.names()[0] == "gemma3-270m"


@pytest.mark.slow
def test_packaged_gemma_scores_and_generates():
    """The real offline LM. It is dequantised once into the shared cache (as the app does on
    first use), so later runs load the saved copy in seconds."""
    from neuroviz.backends.language import create_language_model, gemma_dir
    from neuroviz.store import DEFAULT_CACHE

    lm = create_language_model("gemma3-270m", store_root=DEFAULT_CACHE, record=False)
    assert lm.id.startswith("gemma3-270m") and "offline" in lm.description
    scores = lm.log_likelihood(["a photo of a cat", "cat of photo a a", "a photo of a dog"])
    assert scores[0] > scores[1] and scores[2] > scores[1]  # word order matters to a real LM
    assert (gemma_dir(DEFAULT_CACHE) / "READY").exists()
    text = lm.generate("The capital of France is", max_new_tokens=6, temperature=0.0)
    assert text.strip() and text == lm.generate("The capital of France is", max_new_tokens=6, temperature=0.0, seed=9)
    # DnD's few-shot prompts: stopping at the end of the answer line keeps the answer
    from neuroviz.methods.dnd import concept_phrase, simplify_prompt

    prompt = simplify_prompt("a brown horse standing in a field of grass")
    full = lm.generate(prompt, max_new_tokens=12, temperature=0.0)
    short = lm.generate(prompt, max_new_tokens=12, temperature=0.0, stop_at_line_end=True)
    assert "\n" in full.strip() and full.startswith(short.rstrip("\n")) and len(short) < len(full)
    assert concept_phrase(short) == concept_phrase(full) != ""


def test_cached_log_likelihood_scores_each_text_once(tiny_lm_dir, tmp_path):
    from neuroviz.backends.language import RecordingLM, TransformersLM, cached_log_likelihood, create_language_model
    from neuroviz.store import Store

    class CountingLM(TransformersLM):
        scored: list[str] = []

        def log_likelihood(self, texts, batch_size=16):
            self.scored += list(texts)
            return super().log_likelihood(texts, batch_size)

    store = Store(tmp_path)
    lm = CountingLM(str(tiny_lm_dir))
    first = cached_log_likelihood(lm, store, ["red square", "blue circle", "red square"], batch_size=1)
    np.testing.assert_allclose(first, lm.log_likelihood(["red square", "blue circle", "red square"]), atol=1e-6)
    lm.scored.clear()
    second = cached_log_likelihood(lm, store, ["blue circle", "cat", "red square"])
    assert lm.scored == ["cat"]
    assert second[0] == first[1] and second[2] == first[0]
    # a recorder that got cached scores still records them, so its run replays completely
    recorder = RecordingLM(lm, store)
    cached_log_likelihood(recorder, store, ["cat", "red square"])
    replay = create_language_model(f"replay:{recorder.recording_id}", store_root=tmp_path)
    np.testing.assert_array_equal(replay.log_likelihood(["red square", "cat"]), [second[2], second[1]])
