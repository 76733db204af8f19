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
    specs = multimodal.list_multimodal()
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
    with pytest.raises(BackendUnavailable, match="conse"):
        create_multimodal("clip-from-the-moon")
    with pytest.raises(BackendUnavailable, match="mobilenet_v2"):
        create_multimodal("conse:resnet1000")


# ---------------------------------------------------------------------------------------
# Embedding caches
# ---------------------------------------------------------------------------------------
class CountingConSE(ConSEBackend):
    """The real ConSE backend, counting how often it is asked to encode."""

    def __init__(self):
        super().__init__(ConSEConfig(top_t=3))
        self.image_calls = 0
        self.text_calls = 0

    def encode_images(self, images, batch_size=32):
        self.image_calls += 1
        return super().encode_images(images, batch_size)

    def encode_texts(self, texts, batch_size=256):
        self.text_calls += 1
        return super().encode_texts(texts, batch_size)


def test_image_embeddings_are_cached_in_probe_set_order(tiny_workspace):
    store, ps = tiny_workspace["store"], tiny_workspace["probe_set"]
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


def test_text_embeddings_cached_by_backend_and_text_list(tmp_path):
    from neuroviz.concepts import from_texts
    from neuroviz.store import Store

    store = Store(tmp_path)
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
