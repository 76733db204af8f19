"""Sparse autoencoders (neuroviz.sae): a tiny SAE reconstructs a small generated set; the
``sae train`` command makes a unit run whose activations are the latents' pooled codes; old
runs, neuron run keys and the catalogue's answers for neurons stay as they were."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from neuroviz import catalog, extract
from neuroviz.provenance import provenance_key
from neuroviz.sae import CODE_VERSION, SaeConfig, SaeError, collect_positions, dictionary_key, train_sae
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


def test_data_start_leaves_fewer_dead_latents_than_plain_topk():
    """A planted structure where plain TopK starves latents: 64 atoms in 32 dimensions and 256
    latents, of which k=4 fire per row. From overcomplete's random start most latents never win
    the top-k and stop learning; started on training positions (``init="data"``) every latent
    wins somewhere from step one."""
    x = sparse_set(n=3000, dim=32, atoms=64, active=4, seed=1)
    common = dict(expansion=8, k=4, epochs=6, batch_size=256, lr=2e-3, aux_penalty=0.0)
    plain_arrays, plain, _ = train_sae(x, SaeConfig(**common))
    data_arrays, data, _ = train_sae(x, SaeConfig(**common, init="data"))
    assert plain.dead >= 256 // 4, plain  # the setting is one where plain TopK leaves many dead
    assert data.dead <= plain.dead // 4, (data, plain)
    assert data.r2 > plain.r2, (data, plain)  # the latents it keeps alive are used
    assert len(data_arrays["dead_per_epoch"]) == 6 and data_arrays["dead_per_epoch"][-1] <= plain_arrays["dead_per_epoch"][-1]


def test_training_reports_dead_latents_in_the_live_message():
    messages = []
    train_sae(sparse_set(n=1200), SaeConfig(expansion=2, k=4, epochs=2, batch_size=256),
              progress=lambda done, total, msg: messages.append(msg))
    assert "dead" not in messages[0]  # nothing to count before one whole epoch
    assert re.fullmatch(r"epoch 2/2 loss \S+ R\^2 -?\d\.\d{3} dead \d+/64 last epoch", messages[-1]), messages[-1]


def test_options_at_their_defaults_keep_old_dictionary_keys(tiny_workspace):
    """Dictionaries trained before init/schedule/reanimate existed keep their provenance keys;
    setting one of them names a different dictionary."""
    model, ps = tiny_workspace["model"], tiny_workspace["probe_set"]
    before = {"expansion": 4, "k": 32, "variant": "topk", "epochs": 10, "batch_size": 1024, "lr": 5e-4,
              "aux_penalty": 1 / 32, "max_positions": 200_000, "seed": 0}  # SaeConfig's fields in session 4
    old_key = provenance_key({"kind": "sae", "model": model.spec, "weights": model.weights_id, "layer": "layer2",
                              "probe_set": ps.id, "preprocess": model.preprocessing.id, "config": before,
                              "code": CODE_VERSION})
    assert dictionary_key(model, "layer2", ps, SaeConfig()) == old_key
    changed = {dictionary_key(model, "layer2", ps, SaeConfig(**option))
               for option in ({"init": "data"}, {"schedule": "cosine"}, {"reanimate": 0.1})}
    assert len(changed) == 3 and old_key not in changed


def test_sae_settings_are_checked():
    with pytest.raises(SaeError, match="between 1 and the number of latents"):
        SaeConfig(expansion=1, k=100).check(32)
    with pytest.raises(SaeError, match="Unknown SAE variant"):
        SaeConfig(variant="relu").check(32)
    with pytest.raises(SaeError, match="Unknown SAE initialisation"):
        SaeConfig(init="zeros").check(32)
    with pytest.raises(SaeError, match="Unknown learning-rate schedule"):
        SaeConfig(schedule="step").check(32)
    with pytest.raises(SaeError, match="0 or more"):
        SaeConfig(reanimate=-1.0).check(32)


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


def test_the_workspace_job_passes_the_new_options_to_the_command():
    from neuroviz.cli import build_parser
    from neuroviz.requests import SaeTrainRequest

    request = SaeTrainRequest("offline:mobilenet_v2", "demo", "features.18", 4, 32, "topk", 12, init="data",
                              schedule="cosine", lr=2e-3, reanimate=0.1, batch_size=256, aux_penalty=0.0)
    args = build_parser().parse_args(request.argv())
    assert (args.init, args.schedule, args.lr, args.reanimate, args.epochs, args.batch_size, args.aux_penalty) == \
        ("data", "cosine", 2e-3, 0.1, 12, 256, 0.0)
    defaults = build_parser().parse_args(SaeTrainRequest("offline:mobilenet_v2", "demo", "features.18").argv())
    assert (defaults.init, defaults.schedule, defaults.lr, defaults.reanimate, defaults.batch_size, defaults.aux_penalty) == \
        ("random", "constant", 5e-4, 0.0, 1024, 1 / 32)


def test_the_workspace_sae_tab_puts_the_recipe_in_the_job_command(tmp_path_factory, image_folder):
    """The SAE tab's command (shown under its button, run as the job) carries the start, schedule,
    learning rate and reanimation fields; the tab proposes the data start."""
    from tests.conftest import dashboard_env
    from tests.test_pages import app, assert_clean, build_dashboard_cache

    root = tmp_path_factory.mktemp("sae_tab")
    build_dashboard_cache(root, image_folder)
    env = pytest.MonkeyPatch()
    dashboard_env(env, root)
    try:
        at = app(layer="layer2")
        at.switch_page("views/workspace.py").run()
        assert_clean(at)

        def sae_command() -> str:
            (line,) = [c.value for c in at.caption if "sae train" in c.value]
            return line

        assert "--init data --schedule constant --lr 0.001 --reanimate 0.0 --batch-size 256 --aux-penalty 0.0" in sae_command()
        at.selectbox(key="sae_init").set_value("random").run()
        at.selectbox(key="sae_schedule").set_value("cosine").run()
        assert_clean(at)
        assert "--init random --schedule cosine" in sae_command()
    finally:
        env.undo()
