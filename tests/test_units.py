"""Units beyond neurons (neuroviz.units): a planted direction is recovered by an SAE as a
latent and labelled with its concept; user directions are units whose pooled activations
are projections; ablating a latent removes exactly its decoded contribution; the pages show
a latent like a neuron, and the URL names it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroviz import embeddings, extract
from neuroviz.backends.multimodal import create_multimodal
from neuroviz.concepts import from_texts
from neuroviz.editing import EditError, evaluate_unit_ablation, units_ablated
from neuroviz.hooks import LayerRecorder
from neuroviz.methods import MethodContext, run_method
from neuroviz.sae import SaeConfig, train_sae
from neuroviz.store import RunInfo, Store
from neuroviz.units import (
    NEURONS,
    Dictionary,
    UnitsError,
    directions_dictionary,
    load_dictionary,
    per_position,
    read_vectors,
    save_dictionary,
    short_units,
)
from tests.conftest import APP_PATH
from tests.test_clip_dissect import SHAPE_CONCEPTS, share_image_embeddings

PLANTED = "rocket"  # ConSE (through an ImageNet classifier) tells the photos apart, not the plain shapes
POSITIONS = 16


# -- a planted direction ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_workspace):
    """Per-position activations of a made-up 24-neuron layer over the tiny probe set: at every
    position, the image's similarity to 'rocket' along a planted direction v, plus two of 20
    random atoms (image-independent) and noise."""
    store = Store(tmp_path_factory.mktemp("units_cache"))
    base = tiny_workspace["runs"]["fc"]
    store.register_probe_set(tiny_workspace["probe_set"])
    backend = create_multimodal("conse")
    share_image_embeddings(tiny_workspace["store"], store, backend, base.probe_set_id)
    concepts = from_texts("shapes", SHAPE_CONCEPTS)
    p = embeddings.image_embeddings(backend, store, base.probe_set_id) @ embeddings.text_embeddings(backend, store, concepts).T
    s = p[:, SHAPE_CONCEPTS.index(PLANTED)]
    s01 = (s - s.min()) / (s.max() - s.min())
    rng = np.random.default_rng(3)
    dim, n_images = 24, len(s)
    atoms = rng.normal(size=(21, dim))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    v, others = atoms[0], atoms[1:]
    x = np.zeros((n_images, POSITIONS, dim))
    for i in range(n_images):
        for j in range(POSITIONS):
            x[i, j] = 2.0 * s01[i] * v + others[rng.choice(20, 2, replace=False)].T @ rng.uniform(0.5, 1.5, 2)
    x += 0.05 * rng.normal(size=x.shape)
    return {"store": store, "base": base, "backend": backend, "concepts": concepts, "x": x.astype(np.float32), "v": v}


def label_units(planted: dict, dictionary: Dictionary) -> tuple[RunInfo, dict[int, str]]:
    """Pool each unit's codes over positions (as the extract hook does), store the unit run and
    label it with CLIP-Dissect through run_method; returns the run and each unit's label."""
    store, base, x = planted["store"], planted["base"], planted["x"]
    codes = dictionary.encode(torch.from_numpy(x.reshape(-1, x.shape[-1]))).numpy()
    acts = codes.reshape(x.shape[0], POSITIONS, -1).mean(axis=1)
    k = 10
    top_idx = np.argsort(-acts, axis=0, kind="stable")[:k].T
    info = RunInfo(f"units-{dictionary.key[:8]}", "custom:planted", "planted", "planted", "mean", base.probe_set_id,
                   base.preprocess_id, k, "test", acts.shape[0], acts.shape[1], None, "vector", units=dictionary.units_id)
    ids = [im["image_id"] for im in store.probe_images(base.probe_set_id)]
    store.finish_run(info, acts, np.take_along_axis(acts.T, top_idx, axis=1), top_idx, ids, None)
    run = store.get_run(info.run_key)
    run_method("clip_dissect", MethodContext(store=store, run=run, multimodal=planted["backend"], concepts=planted["concepts"]))
    top = store.labels(run.run_key, method="clip_dissect", top_only=True)
    return run, dict(zip(top["neuron"].astype(int), top["label"]))


def test_sae_recovers_a_planted_direction_and_labels_it(planted):
    x, v = planted["x"], planted["v"]
    arrays, _, _ = train_sae(x.reshape(-1, x.shape[-1]), SaeConfig(expansion=2, k=3, epochs=40, batch_size=64, lr=3e-3))
    dictionary = Dictionary("sae", "planted-sae-0001", arrays["encoder"], arrays["encoder_bias"], arrays["decoder"],
                            arrays["center"], arrays["scale"], arrays["sparsity"], arrays["k"], arrays["threshold"],
                            meta={"layer": "planted"})
    cosines = arrays["decoder"] @ v
    latent = int(np.argmax(cosines))
    assert cosines[latent] > 0.9, f"no latent along the planted direction (best cosine {cosines[latent]:.2f})"
    run, labels = label_units(planted, dictionary)
    assert run.units == "sae:planted-sae-0001"
    assert labels[latent] == PLANTED


def test_a_planted_direction_given_by_the_user_gets_its_concept(planted, tmp_path):
    rng = np.random.default_rng(0)
    vectors = np.stack([planted["v"] * 3.0, *rng.normal(size=(30, 24))])  # any length: directions are normalised
    np.save(tmp_path / "cav.npy", vectors)
    dictionary = directions_dictionary(read_vectors(tmp_path / "cav.npy"), "custom:planted", "w", "planted",
                                       names=["planted"] + [f"random {i}" for i in range(30)], source="cav.npy")
    save_dictionary(planted["store"], dictionary)
    again = load_dictionary(planted["store"], dictionary.key[:10])
    assert again.units_id == dictionary.units_id and again.unit_name(0) == "planted" and again.title == "directions: cav.npy (31)"
    _, labels = label_units(planted, again)
    assert labels[0] == PLANTED


def test_directions_files_are_checked(tmp_path):
    torch.save(torch.ones(2, 5), tmp_path / "d.pt")
    assert read_vectors(tmp_path / "d.pt").shape == (2, 5)
    np.save(tmp_path / "zero.npy", np.zeros((2, 5)))
    with pytest.raises(UnitsError, match="all-zero"):
        read_vectors(tmp_path / "zero.npy")
    with pytest.raises(UnitsError, match="one name per line"):
        directions_dictionary(np.ones((2, 5)), "m", "w", "l", names=["only one"])
    with pytest.raises(UnitsError, match="No directions file"):
        read_vectors(tmp_path / "missing.npy")


def test_units_add_makes_projections_of_the_neurons(tmp_path, tiny_workspace):
    """Mean pooling commutes with a projection: a direction's pooled activation is exactly the
    projection of the neurons' pooled activations."""
    from neuroviz.cli import main

    store = Store(tmp_path / "cache")
    model, ps = tiny_workspace["model"], tiny_workspace["probe_set"]
    (neurons,) = extract.extract(model, ps, ["layer4"], store, k=10, batch_size=20, chunk_size=40)
    vectors = np.random.default_rng(1).normal(size=(3, 512)).astype(np.float32)
    np.save(tmp_path / "dirs.npy", vectors)
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    argv = ["--cache", str(store.root), "units", "add", model.spec, "--probe", ps.id, "--layer", "layer4", "--image-size", "64",
            "--directions", str(tmp_path / "dirs.npy"), "--names", str(tmp_path / "names.txt"), "--top-k", "10"]
    assert main(argv) == 0
    (run,) = [r for r in store.find_runs() if r.units != NEURONS]
    assert run.units.startswith("directions:") and run.n_neurons == 3
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(store.activations(run.run_key), store.activations(neurons.run_key) @ unit.T, rtol=1e-4, atol=1e-4)
    np.save(tmp_path / "wrong.npy", vectors[:, :10])
    assert main(argv[:-6] + ["--directions", str(tmp_path / "wrong.npy")]) == 2  # one line: wrong size


# -- editing ---------------------------------------------------------------------------------------
def random_sae(dim: int, units: int, k: int, layer: str, seed: int = 0) -> Dictionary:
    rng = np.random.default_rng(seed)
    dec = rng.normal(size=(units, dim)).astype(np.float32)
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    return Dictionary("sae", f"random-{seed}", rng.normal(size=(units, dim)).astype(np.float32),
                      np.full(units, 0.1, np.float32), dec, rng.normal(size=dim).astype(np.float32) * 0.1, 2.0, "topk", k,
                      meta={"layer": layer})


def test_ablating_a_latent_removes_exactly_its_contribution(tiny_workspace):
    model, ps = tiny_workspace["model"], tiny_workspace["probe_set"]
    info = model.layer("layer2")
    d = random_sae(info.n_neurons, 256, 8, "layer2")
    batch = next(iter(extract.image_loader(ps, model.transform, batch_size=6)))
    module = model.module.eval()

    def layer_output() -> torch.Tensor:
        with torch.inference_mode(), LayerRecorder(module, ["layer2"]) as rec:  # entered last: sees the edited output
            module(batch)
            return rec.outputs["layer2"].clone()

    original = layer_output()
    rows, fold = per_position(original, info.layout)
    codes = d.encode(rows)
    latent = int(torch.argmax((codes > 0).sum(0)))  # the latent active at most positions
    with units_ablated(model, d, [latent]):
        edited = layer_output()
    expected_change = fold(d.contribution(codes, [latent]))
    assert float(expected_change.abs().max()) > 0.1
    torch.testing.assert_close(original - edited, expected_change, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer_output(), original)  # the hook is gone: reversible
    with pytest.raises(EditError, match="0..255"):
        with units_ablated(model, d, [999]):
            pass
    cmp = evaluate_unit_ablation(model, d, [latent], ps, max_images=8)
    assert cmp.n_images == 8 and 0.0 <= cmp.agreement <= 1.0


# -- requests and pages ------------------------------------------------------------------------------
def test_sae_train_request_round_trips():
    from neuroviz.cli import build_parser
    from neuroviz.requests import LabelRequest, SaeTrainRequest

    args = build_parser().parse_args(SaeTrainRequest("offline:mobilenet_v2", "demo", "features.18", 8, 16, "batchtopk", 3).argv())
    assert (args.model, args.probe, args.layer, args.expansion, args.k, args.variant, args.epochs) == \
        ("offline:mobilenet_v2", "demo", "features.18", 8, 16, "batchtopk", 3)
    args = build_parser().parse_args(LabelRequest("m", "demo", ("l",), ("dnd",), "3", units="sae:abcd1234").argv())
    assert args.units == "sae:abcd1234"
    assert build_parser().parse_args(LabelRequest("m", "demo", ("l",), ("dnd",)).argv()).units is None


@pytest.fixture(scope="module")
def unit_dash(tmp_path_factory, image_folder):
    """The dashboard test cache plus an SAE on layer2 whose latents carry probe labels."""
    from neuroviz import models
    from neuroviz.catalog import probe_set_from_store
    from neuroviz.sae import train_and_extract
    from tests.conftest import dashboard_env
    from tests.test_pages import add_probe_labels, build_dashboard_cache

    root = tmp_path_factory.mktemp("units_dash")
    info = build_dashboard_cache(root, image_folder)
    store = info["store"]
    model = models.create(info["model_spec"], image_size=64)
    d, run = train_and_extract(store, model, probe_set_from_store(store, info["probe_set_id"]), "layer2",
                               SaeConfig(expansion=1, k=8, epochs=1, batch_size=256), k=10)
    add_probe_labels(store, run)
    env = pytest.MonkeyPatch()
    dashboard_env(env, root)
    yield {**info, "unit_run": run, "dictionary": d}
    env.undo()


def test_every_page_renders_for_a_latent_and_the_url_names_it(unit_dash):
    from tests.test_pages import app, assert_clean, texts

    short = short_units(unit_dash["dictionary"].units_id)
    at = app(layer="layer2", units=short)
    at.run()
    assert_clean(at)
    for page in sorted(p.name for p in (APP_PATH.parent / "views").glob("*.py")):
        if page != "rate.py":  # the rater's view is reached through a study link, not the selection
            at.switch_page(f"views/{page}").run()
            assert_clean(at)
    at = app(layer="layer2", units=short)
    at.switch_page("views/browser.py").run()
    assert_clean(at)
    cards = [link.proto.label for link in at.get("page_link") if link.proto.label.startswith("**Latent ")]
    assert len(cards) == 24 and "latents of SAE 1x k=8" in texts(at)
    picker = at.selectbox(key="_w_units")
    assert picker.value == unit_dash["dictionary"].units_id and NEURONS in picker.options
    at = app(layer="layer2", units=short, neuron=5)
    at.switch_page("views/neuron.py").run()
    assert_clean(at)
    assert at.title[0].value == "Latent 5" and at.query_params["units"] == short
    assert len(at.get("image")) >= 1
    # back to the neurons with the picker: the layer's neuron run again
    at.selectbox(key="_w_units").set_value(NEURONS).run()
    assert_clean(at)
    assert at.title[0].value.startswith("Neuron") and "units" not in at.query_params
