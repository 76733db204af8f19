"""The contract of every registry, entry by entry (as timm's tests loop over ``list_models()``).

Each entry of each registry is created through ``create``/``load`` exactly as the command line
does, as a tiny instance, and its interface is checked. Entries whose argument names
something to download (a hub model, a server, a recording), or whose default is slow to
build, get a tiny stand-in made here:
an open_clip architecture registered from a tiny config, random transformers models saved to
a temporary folder, a local OpenAI-compatible server, a recording of the tiny model. A new
entry with neither an offline ``example`` nor a stand-in below fails
``test_every_entry_can_be_created_offline``.

The ids of the specs users write today are pinned: they enter provenance keys, so a change
would silently orphan every cached label.
"""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from neuroviz import concepts, models
from neuroviz.backends import captioner, language, multimodal
from neuroviz.backends.base import Captioner, LanguageModel, MultimodalBackend
from neuroviz.backends.pool import CREATORS
from neuroviz.methods import METHODS, DescriptionMethod, MethodContext
from neuroviz.registry import Registry, UnknownNameError

REGISTRIES: dict[str, Registry] = {
    "model": models.MODELS,
    "multimodal": multimodal.MULTIMODAL,
    "captioner": captioner.CAPTIONERS,
    "language_model": language.LANGUAGE_MODELS,
    "concepts": concepts.CONCEPT_SETS,
    "method": METHODS,
}
ENTRIES = [(kind, entry.name) for kind, registry in REGISTRIES.items() for entry in registry]
# Entries that load real packaged weights (seconds each; Gemma is dequantised once, then seconds).
HEAVY = {("language_model", language.GEMMA_SPEC), ("multimodal", "conse"), ("model", "offline:mobilenet_v2"),
         ("model", "offline:efficientnet_lite0")}
TINY_CLIP = "nv-test-tiny"  # an open_clip architecture registered from a tiny config (no weights anywhere)
LM_WORDS = "the a cat dog sat on mat red blue square photo of".split()


def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (24, 48), (20, 20, 200))]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Specs for entries whose argument names something to download, and the store they use."""
    import open_clip

    from tests.conftest import FakeOpenAIServer, make_tiny_blip, make_tiny_llama

    root = tmp_path_factory.mktemp("registries")
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    lm_dir = make_tiny_llama(root / "tiny_lm", LM_WORDS, max_positions=64)
    recorder = language.create_language_model(f"transformers:{lm_dir}", store_root=root)
    recorder.generate("the cat", max_new_tokens=3)
    recorder.log_likelihood(["the cat", "a dog"])
    (root / "demo").mkdir()
    (root / "demo" / "metadata.csv").write_text("path,label\na.png,cat\nb.png,red square\nc.png,Cat\n")
    (root / "words.txt").write_text("# a user's vocabulary\ncat\ndog\n\nred square\n")
    server = FakeOpenAIServer()
    yield {
        "root": root,
        "specs": {
            ("model", "open_clip"): f"open_clip:{TINY_CLIP}@random",
            ("multimodal", "open_clip"): f"open_clip:{TINY_CLIP}@random",
            ("captioner", "transformers"): f"transformers:{make_tiny_blip(root / 'tiny_blip')}",
            ("language_model", "transformers"): f"transformers:{lm_dir}",
            ("language_model", "openai"): f"openai:{server.url}/v1#tiny-model",
            ("language_model", "replay"): f"replay:{recorder.recording_id}",
            ("captioner", "retrieval"): f"retrieval:file:{root / 'words.txt'}",  # its default embeds 20,000 words
            ("concepts", "file"): f"file:{root / 'words.txt'}",
        },
    }
    server.close()


def spec_for(kind: str, name: str, specs: dict) -> str | None:
    """The spec the contract creates: a stand-in, else the entry's example, else its bare name."""
    entry = next(e for e in REGISTRIES[kind] if e.name == name)
    if (kind, name) in specs:
        return specs[(kind, name)]
    if entry.example:
        return entry.example
    return name if entry.argument is None or entry.argument_optional else None


def check_model(spec: str, root) -> None:
    model = models.create(spec)
    assert isinstance(model, models.ProbedModel) and model.spec.split(":")[0] == spec.split(":")[0]
    layers = model.layers()
    assert layers and all(layer.n_neurons > 0 for layer in layers)
    assert set(model.suggested_layers()) <= {layer.name for layer in layers}
    with torch.no_grad():
        out = model.module(torch.stack([model.transform(im) for im in images()]))
    assert out.shape[0] == 2 and len(model.weights_id) == 20 and model.description


def check_multimodal(spec: str, root) -> None:
    backend = multimodal.create_multimodal(spec)
    assert isinstance(backend, MultimodalBackend) and backend.id and backend.description
    image_emb, text_emb = backend.encode_images(images()), backend.encode_texts(["a red square", "a blue sky"])
    assert image_emb.shape[0] == text_emb.shape[0] == 2 and image_emb.shape[1] == text_emb.shape[1] > 0
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1, atol=1e-5)
    assert backend.similarity(image_emb, text_emb).shape == (2, 2)


def check_captioner(spec: str, root) -> None:
    # retrieval captions are found in a multimodal space: the tiny open_clip keeps this quick
    space = multimodal.create_multimodal(f"open_clip:{TINY_CLIP}@random")
    made = captioner.create_captioner(spec, multimodal=space, store_root=root)
    assert isinstance(made, Captioner) and made.id and made.description
    captions = made.caption(images())
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)


def check_language_model(spec: str, root) -> None:
    store_root = root if not spec.startswith(language.GEMMA_SPEC) else None  # the packaged LM in the default cache
    lm = language.create_language_model(spec, store_root=store_root)
    assert isinstance(lm, LanguageModel) and lm.id and lm.description
    assert isinstance(lm.generate("the cat", max_new_tokens=3), str)
    try:
        scores = lm.log_likelihood(["the cat", "a dog"])
    except language.LogLikelihoodUnsupported:
        return
    assert scores.shape == (2,) and np.all(np.isfinite(scores)) and np.all(scores <= 0)


def check_concepts(spec: str, root) -> None:
    made = concepts.load_concept_set(spec, root)
    assert isinstance(made, concepts.ConceptSet) and len(made) > 0 and made.name
    assert all(isinstance(c, str) and c.strip() for c in made.concepts)
    assert len({c.casefold() for c in made.concepts}) == len(made)
    assert isinstance(made.id, str) and len(made.id) == 20


def check_method(spec: str, root) -> None:
    method = METHODS.create(spec)
    assert isinstance(method, DescriptionMethod) and method.name == spec and method.title and method.reference
    assert dataclasses.is_dataclass(method.config_class) and dataclasses.asdict(method.default_config()) is not None
    assert set(method.needs) <= set(CREATORS), f"{spec} needs {method.needs}; backend kinds are {list(CREATORS)}"
    assert set(method.needs) <= {f.name for f in dataclasses.fields(MethodContext)}


CHECKS = {"model": check_model, "multimodal": check_multimodal, "captioner": check_captioner,
          "language_model": check_language_model, "concepts": check_concepts, "method": check_method}


def test_every_registry_has_a_contract():
    assert set(CHECKS) == set(REGISTRIES)


def test_every_entry_can_be_created_offline(stand_ins):
    missing = [f"{kind} {name}" for kind, name in ENTRIES if spec_for(kind, name, stand_ins["specs"]) is None]
    assert not missing, f"give these entries an offline `example` or a stand-in in this file: {missing}"


@pytest.mark.parametrize("kind,name", [pytest.param(kind, name, marks=[pytest.mark.slow] if (kind, name) in HEAVY else [])
                                       for kind, name in ENTRIES], ids=[f"{kind}-{name}" for kind, name in ENTRIES])
def test_entry_contract(kind, name, stand_ins):
    spec = spec_for(kind, name, stand_ins["specs"])
    assert spec is not None
    CHECKS[kind](spec, stand_ins["root"])


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_unknown_names_raise_with_close_names(kind):
    registry = REGISTRIES[kind]
    name = next(e.name for e in registry if e.argument is None or e.argument_optional)
    typo = name[:-1] + ("x" if name[-1] != "x" else "y")
    with pytest.raises(UnknownNameError, match=f"Did you mean {name}"):
        registry.create(typo)
    assert registry.names() and all(isinstance(n, str) for n in registry.names())


def test_one_grammar_name_or_prefix_and_argument():
    registry: Registry[str] = Registry("thing")
    registry.add("plain", lambda: "plain")
    registry.add("source:one", lambda: "one")  # a plain name may contain a colon
    registry.add("hub", lambda argument: f"hub {argument}", argument="<model>@<tag>", example="hub:tiny@random")
    registry.add("local", lambda argument: f"local {argument}", argument="<name>[@<n>]", argument_optional=True)
    assert registry.create("plain") == "plain" and registry.create("source:one") == "one"
    assert registry.create("hub:org/model@v1:extra") == "hub org/model@v1:extra"  # the argument is taken whole
    assert registry.create("local") == "local None" and registry.create("local:x@3") == "local x@3"
    assert registry.names() == ["plain", "source:one", "hub:<model>@<tag>", "local[:<name>[@<n>]]"]
    assert registry.specs() == ["plain", "source:one", "local"]
    assert "hub:x" in registry and "plain:x" not in registry and "nothing" not in registry
    for incomplete in ("hub", "hub:"):
        with pytest.raises(UnknownNameError, match="needs an argument: write hub:<model>@<tag>, e.g. hub:tiny@random"):
            registry.create(incomplete)
    with pytest.raises(UnknownNameError, match="Did you mean source:one"):
        registry.create("source:two")


def test_older_concept_spellings_are_kept(stand_ins):
    root = stand_ins["root"]
    path = root / "words.txt"
    assert concepts.load_concept_set(str(path)).id == concepts.load_concept_set(f"file:{path}").id
    assert concepts.load_concept_set("words1k", root).concepts == concepts.load_concept_set("words:1k", root).concepts
    assert concepts.list_concept_sets() == ["imagenet", "words20k", "demo_labels"]
    with pytest.raises(ValueError, match="words1k and words100k"):
        concepts.load_concept_set("words0k", root)


# -- ids: recorded before the registries existed (commit 0f23bae); they must never drift ---------
CONSE_EFFICIENTNET = "conse:efficientnet_lite0+all-MiniLM-L6-v2:T10:v1"
MULTIMODAL_IDS = {
    "conse": CONSE_EFFICIENTNET,
    " conse ": CONSE_EFFICIENTNET,
    "conse:efficientnet_lite0@10": CONSE_EFFICIENTNET,
    "conse:mobilenet_v2": "conse:mobilenet_v2+all-MiniLM-L6-v2:T10:v1",
    "conse:mobilenet_v2@5": "conse:mobilenet_v2+all-MiniLM-L6-v2:T5:v1",
    "conse:mobilenet_v2@20": "conse:mobilenet_v2+all-MiniLM-L6-v2:T20:v1",
    "open_clip:ViT-B-32@random": "open_clip:ViT-B-32@random:seed0",
    "open_clip:ViT-B-32@openai": "open_clip:ViT-B-32@openai",
}
LANGUAGE_MODEL_IDS = {
    "transformers:some/model": "transformers:some/model",
    "openai:http://127.0.0.1:9/v1#tiny": "openai:http://127.0.0.1:9#tiny",
}
LABEL_KEYS = {"clip_dissect": "fab038f8f1f0fac9c26a", "dnd": "5a0c56614a19a50bf08e", "milan": "3e243e9a37be4a6f7cc1"}


def test_backend_ids_of_common_specs_are_unchanged(tmp_path):
    for spec, expected in MULTIMODAL_IDS.items():
        assert multimodal.create_multimodal(spec).id == expected, spec
    for spec, expected in LANGUAGE_MODEL_IDS.items():
        assert language.create_language_model(spec, store_root=tmp_path, record=False).id == expected, spec
    gemma = language.create_language_model("gemma3-270m", store_root=tmp_path, record=False)
    assert gemma.id.startswith("gemma3-270m:q4_k_m-gguf@")
    hub = captioner.create_captioner("transformers:Salesforce/blip-image-captioning-base")
    assert hub.id == "transformers:Salesforce/blip-image-captioning-base:d9d32b69"
    (tmp_path / "c.txt").write_text("cat\ndog\nred square\n")
    retrieval = captioner.create_captioner(f"retrieval:{tmp_path / 'c.txt'}", multimodal=multimodal.create_multimodal("conse"),
                                           store_root=tmp_path)
    assert retrieval.id == f"retrieval[{CONSE_EFFICIENTNET}|objects=c63827f69e|details=ee19211ae7|d7cae6b3]"


def test_concept_set_ids_are_unchanged(tmp_path):
    (tmp_path / "c.txt").write_text("cat\ndog\nred square\n")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "metadata.csv").write_text("path,label\na.png,cat\nb.png,red square\n")
    assert concepts.load_concept_set("imagenet").id == "c63827f69e3bf01e22c9"
    assert concepts.load_concept_set(str(tmp_path / "c.txt")).id == "ee19211ae7063dd92a85"
    assert concepts.load_concept_set("demo_labels", tmp_path).id == "ed218e0857f698113496"
    assert concepts.load_concept_set("demo_labels+imagenet", tmp_path).id == "b0dff20a5744d2d2aac5"


def test_model_specs_and_weights_ids_are_unchanged():
    for spec, weights_id, preprocess_id in [("offline:mobilenet_v2", "35090250741c7bf2c650", "ce068a8d79b2"),
                                            ("offline:efficientnet_lite0", "aae49dd47f24bcb048f9", "c7f5f40cec38")]:
        model = models.create(spec)
        assert (model.spec, model.weights_id, model.preprocessing.id) == (spec, weights_id, preprocess_id)
    assert models.create("torchvision:resnet18@random").preprocessing.id == "ce068a8d79b2"
    assert models.create("torchvision:resnet18@random", image_size=64).spec == "torchvision:resnet18@random"
    assert models.create("timm:resnet18@random", image_size=64).spec == "timm:resnet18@random"
    assert models.create("custom:torchvision.models:resnet18", image_size=64).spec == "custom:torchvision.models:resnet18"


def test_label_keys_of_every_method_are_unchanged():
    ns = types.SimpleNamespace
    backends = dict(multimodal=ns(id=CONSE_EFFICIENTNET), language_model=ns(id="transformers:some/model"),
                    captioner=ns(id=f"retrieval[{CONSE_EFFICIENTNET}|objects=c63827f69e|details=ee19211ae7|d7cae6b3]"),
                    concepts=ns(id="ee19211ae7063dd92a85"))
    for name, expected in LABEL_KEYS.items():
        method = METHODS.create(name)
        ctx = MethodContext(store=None, run=ns(run_key="run0"), **backends)
        assert method.label_key(ctx, method.default_config()) == expected, name
