"""Sparse autoencoders (neuroviz.sae): a tiny SAE reconstructs a small generated set; the
``sae train`` command makes a unit run whose activations are the latents' pooled codes; old
runs, neuron run keys and the catalogue's answers for neurons stay as they were."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuroviz import catalog, extract
from neuroviz.sae import SaeConfig, SaeError, collect_positions, train_sae
from neuroviz.store import Store
from neuroviz.units import NEURONS, load_dictionary, units_match

R2_THRESHOLD = 0.8  # 4 active atoms of 64 in 32 dimensions with 5 % noise: a TopK SAE with k=8 explains 85 %


def sparse_set(n: int = 6000, dim: int = 32, atoms: int = 64, active: int = 4, seed: int = 0) -> np.ndarray:
    """Rows that are sums of ``active`` of ``atoms`` unit vectors with positive weights, plus noise."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(atoms, dim))
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    codes = np.zeros((n, atoms))
    for i in range(n):
        codes[i, rng.choice(atoms, active, replace=False)] = rng.uniform(0.5, 2.0, active)
    return (codes @ basis + 0.05 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_tiny_sae_reconstructs_a_generated_set(variant):
    x = sparse_set()
    config = SaeConfig(expansion=4, k=8, epochs=20, batch_size=256, lr=2e-3, variant=variant)
    arrays, metrics, history = train_sae(x, config)
    assert metrics.r2 > R2_THRESHOLD, metrics
    assert metrics.l0 <= 8 + 1e-6 if variant == "topk" else 2 <= metrics.l0 <= 16
    assert metrics.n_latents == 128 and metrics.n_heldout == 600 and 0 <= metrics.dead < 128
    assert history[-1] < history[0] / 4  # the loss fell
    assert arrays["decoder"].shape == (128, 32) and np.allclose(np.linalg.norm(arrays["decoder"], axis=1), 1, atol=1e-4)


def test_sae_settings_are_checked():
    with pytest.raises(SaeError, match="between 1 and the number of latents"):
        SaeConfig(expansion=1, k=100).check(32)
    with pytest.raises(SaeError, match="Unknown SAE variant"):
        SaeConfig(variant="relu").check(32)


@pytest.fixture(scope="module")
def sae_workspace(tmp_path_factory, tiny_workspace):
    """A private copy of the tiny workspace's layer2 neuron run, plus an SAE on layer2 made by the CLI."""
    from neuroviz.cli import main

    store = Store(tmp_path_factory.mktemp("sae_cache"))
    model, ps = tiny_workspace["model"], tiny_workspace["probe_set"]
    (neurons,) = extract.extract(model, ps, ["layer2"], store, k=10, batch_size=20, chunk_size=40)
    argv = ["--cache", str(store.root), "sae", "train", model.spec, "--probe", ps.id, "--layer", "layer2",
            "--image-size", "64", "--expansion", "2", "--k", "8", "--epochs", "3", "--batch-size", "256", "--top-k", "10"]
    assert main(argv) == 0
    return {"store": store, "model": model, "probe_set": ps, "neurons": neurons, "argv": argv}


def test_sae_train_makes_a_unit_run_of_the_latents(sae_workspace, capsys):
    store, neurons = sae_workspace["store"], sae_workspace["neurons"]
    (unit_run,) = [r for r in store.find_runs() if r.units != NEURONS]
    d = load_dictionary(store, unit_run.units)
    assert unit_run.units == d.units_id and unit_run.units.startswith("sae:")
    assert unit_run.layer == "layer2" and unit_run.n_neurons == 2 * 128 == d.n_units
    assert unit_run.map_shape == neurons.map_shape and unit_run.n_images == neurons.n_images
    m = d.meta["metrics"]
    assert m["n_latents"] == 256 and m["n_positions"] + m["n_heldout"] == 40 * 8 * 8 and np.isfinite(m["r2"])
    # the catalogue still answers "layer2" with its neurons; --units names the latents
    assert catalog.find_run(store, neurons.model_spec, neurons.probe_set_id, "layer2").run_key == neurons.run_key
    short = unit_run.units.split(":")[0] + ":" + unit_run.units.split(":")[1][:8]
    assert catalog.find_run(store, neurons.model_spec, neurons.probe_set_id, "layer2", units=short).run_key == unit_run.run_key
    # the same command again trains nothing and extracts nothing
    from neuroviz.cli import main

    before = sorted(p.name for p in store.dictionaries_dir().iterdir())
    capsys.readouterr()
    assert main(sae_workspace["argv"]) == 0
    assert sorted(p.name for p in store.dictionaries_dir().iterdir()) == before
    assert "held-out R^2" in capsys.readouterr().out


def test_unit_activations_are_the_pooled_codes_of_each_position(sae_workspace):
    """The extract hook: a latent's activation on an image is the mean over positions of its
    code, and its stored map is the code at each position."""
    store, model, ps = sae_workspace["store"], sae_workspace["model"], sae_workspace["probe_set"]
    (unit_run,) = [r for r in store.find_runs() if r.units != NEURONS]
    d = load_dictionary(store, unit_run.units)
    import torch

    positions, total = collect_positions(model, ps, "layer2", max_positions=10**6, seed=0)
    assert total == len(positions) == 40 * 64
    codes = d.encode(torch.from_numpy(positions)).numpy().reshape(40, 8, 8, -1)
    acts = store.activations(unit_run.run_key)
    np.testing.assert_allclose(acts, codes.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    unit = int(np.argmax(acts.max(axis=0)))
    top = store.top_images(unit_run.run_key, unit, k=1)[0]
    np.testing.assert_allclose(store.top_maps(unit_run.run_key, unit)[0], codes[top["image_idx"], :, :, unit],
                               rtol=2e-3, atol=2e-3)  # maps are stored as float16


def test_old_run_files_load_as_neuron_runs_and_keys_do_not_change(sae_workspace, tiny_workspace):
    store, neurons = sae_workspace["store"], sae_workspace["neurons"]
    path = store.run_dir(neurons.run_key) / "run.json"
    row = json.loads(path.read_text())
    row.pop("units")
    path.write_text(json.dumps(row))  # a run.json written before units existed
    assert store.get_run(neurons.run_key).units == NEURONS
    model, ps = tiny_workspace["model"], tiny_workspace["probe_set"]
    assert neurons.run_key == extract.run_key_for(model, "layer2", "mean", ps, 10)
    assert units_match(NEURONS, None) and not units_match("sae:abcdef0123", None)
    assert units_match("sae:abcdef0123", "sae:abcd") and not units_match("sae:abcdef0123", "directions:abcd")
    assert not units_match("sae:abcdef0123", "sae:ab")  # too short to name one dictionary
