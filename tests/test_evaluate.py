"""Automatic evaluation of labels: final-layer accuracy, simulation correlation, constant baseline."""

from __future__ import annotations

import numpy as np
import pytest

from neuroviz import embeddings, extract
from neuroviz.backends.multimodal import create_multimodal
from neuroviz.cli import main
from neuroviz.concepts import from_texts
from neuroviz.evaluate import evaluate_run, evaluation_split, format_markdown, normalise_label, pearson_columns
from neuroviz.methods import MethodContext, run_method
from neuroviz.methods.clip_dissect import ClipDissectConfig
from neuroviz.store import RunInfo, Store

CLASSES = ["rocket", "coffee", "cat", "horse", "astronaut"]
CONCEPTS = CLASSES + ["square", "circle", "camera", "flower", "coins"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_workspace, image_folder):
    store = Store(tmp_path_factory.mktemp("eval_cache"))
    (fc,) = extract.extract(tiny_workspace["model"], tiny_workspace["probe_set"], ["fc"], store, k=10, batch_size=20, chunk_size=20)
    backend = create_multimodal("conse")
    share_image_embeddings(tiny_workspace["store"], store, backend, fc.probe_set_id)
    return {"store": store, "fc": fc, "backend": backend, "folder": image_folder}


def share_image_embeddings(src: Store, dst: Store, backend, probe_set_id: str) -> None:
    """Embeddings are keyed by (backend, probe set): compute them once in the session's shared
    workspace and hand the same artefact to this private store, instead of re-encoding."""
    emb = embeddings.image_embeddings(backend, src, probe_set_id)
    dst.save_array("image_emb", embeddings.image_embeddings_key(backend, probe_set_id), emb)


def test_helpers():
    assert normalise_label(" Great_White  shark") == normalise_label("great white shark")
    ids = [f"img{i}" for i in range(400)]
    split = evaluation_split(ids, seed=0)
    assert 150 < split.sum() < 250 and (evaluation_split(ids, seed=0) == split).all()
    assert (evaluation_split(ids[:200], seed=0) == split[:200]).all()  # stable when images are added
    x = np.arange(10, dtype=float)
    r = pearson_columns(np.stack([x, x, np.ones(10)], 1), np.stack([2 * x + 1, -x, x], 1))
    np.testing.assert_allclose(r, [1.0, -1.0, 0.0])


def test_evaluate_real_layer_has_a_constant_baseline_row(workspace):
    store, fc, backend = workspace["store"], workspace["fc"], workspace["backend"]
    run_method("clip_dissect", MethodContext(store=store, run=fc, multimodal=backend, concepts=from_texts("c", CONCEPTS)),
               neurons=range(50))
    rows = evaluate_run(store, fc, backend)
    # labels made from the whole probe set saw the scoring images: the row says so
    assert [r.name for r in rows] == ["clip_dissect (in-sample)", "shuffled: clip_dissect (in-sample)", "baseline: depiction"]
    method, shuffled, baseline = rows
    assert not method.held_out and shuffled.kind == "shuffled" and shuffled.n_neurons == 50
    assert method.n_neurons == 50 and baseline.n_neurons == fc.n_neurons
    assert -1 <= baseline.simulation_correlation <= 1 and -1 <= method.simulation_correlation <= 1
    assert method.final_layer_accuracy is None  # no class names given: no final-layer metric
    table = format_markdown(rows)
    assert "| baseline: depiction |" in table and "simulation r" in table
    # --common: every row on the neurons all methods labelled (here the 50 CLIP-Dissect did)
    common = {r.name: r for r in evaluate_run(store, fc, backend, common_neurons=True)}
    assert common["baseline: depiction"].n_neurons == 50 == common["clip_dissect (in-sample)"].n_neurons
    assert common["clip_dissect (in-sample)"].simulation_correlation == pytest.approx(method.simulation_correlation)
    assert common["baseline: depiction"].simulation_correlation != pytest.approx(baseline.simulation_correlation)


def test_planted_final_layer_scores_high_and_beats_the_baseline(workspace):
    """Output neuron n fires exactly with the image's similarity to class n: labels must name the class."""
    store, fc, backend = workspace["store"], workspace["fc"], workspace["backend"]
    p = embeddings.image_embeddings(backend, store, fc.probe_set_id) @ embeddings.text_embeddings(backend, store, CLASSES).T
    acts = p.astype(np.float32)
    k = 10
    top = np.argsort(-acts, axis=0)[:k].T
    info = RunInfo("planted-final", "custom:planted", "planted", "logits", "mean", fc.probe_set_id, fc.preprocess_id, k, "test",
                   acts.shape[0], acts.shape[1], None, "vector")
    ids = [im["image_id"] for im in store.probe_images(fc.probe_set_id)]
    store.finish_run(info, acts, np.take_along_axis(acts.T, top, axis=1), top, ids, None)
    run = store.get_run(info.run_key)
    ctx = MethodContext(store=store, run=run, multimodal=backend, concepts=from_texts("c", CONCEPTS))
    run_method("clip_dissect", ctx, ClipDissectConfig(similarity="cos3"))
    rows = {r.name: r for r in evaluate_run(store, run, backend, class_names=CLASSES)}
    assert set(rows) == {"clip_dissect (in-sample)", "shuffled: clip_dissect (in-sample)", "baseline: depiction", "oracle: class names"}
    method = rows["clip_dissect (in-sample)"]
    assert method.final_layer_accuracy >= 0.8
    assert rows["baseline: depiction"].final_layer_accuracy == 0.0
    assert method.final_layer_cosine > rows["baseline: depiction"].final_layer_cosine
    assert rows["oracle: class names"].simulation_correlation == pytest.approx(1.0, abs=1e-5)
    assert method.simulation_correlation > rows["baseline: depiction"].simulation_correlation
    assert method.simulation_correlation > rows["shuffled: clip_dissect (in-sample)"].simulation_correlation


def test_evaluate_cli(workspace, capsys):
    store, folder = workspace["store"], str(workspace["folder"])
    code = main(["--cache", str(store.root), "evaluate", "torchvision:resnet18@random", "--probe", folder, "--layer", "fc",
                 "--baseline", "depiction,object"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| baseline: depiction |" in out and "| baseline: object |" in out


@pytest.fixture(scope="module")
def held_out_workspace(tmp_path_factory, tiny_workspace, image_folder):
    """layer4 (spatial maps) with k = every image, so the fit run keeps maps; and a second probe set."""
    from neuroviz import datasets
    from tests.conftest import make_shape_images

    store = Store(tmp_path_factory.mktemp("held_out_cache"))
    (layer4,) = extract.extract(tiny_workspace["model"], tiny_workspace["probe_set"], ["layer4"], store, k=40, batch_size=20, chunk_size=20)
    other = tmp_path_factory.mktemp("other_probe")
    make_shape_images(other, per_combo=3, seed=5)
    extract.extract(tiny_workspace["model"], datasets.from_folder(other, cache_dir=store.root), ["layer4"], store, k=10,
                    batch_size=24, chunk_size=24)
    return {"store": store, "run": layer4, "folder": image_folder, "other": other}


def test_fit_run_of_a_spatial_layer_keeps_the_real_maps(held_out_workspace):
    from neuroviz.trust.split import HeldOutSplit, fit_run

    store, run = held_out_workspace["store"], held_out_workspace["run"]
    fit = fit_run(store, run, HeldOutSplit(0))
    parent_ids = [im["image_id"] for im in store.probe_images(run.probe_set_id)]
    fit_ids = [im["image_id"] for im in store.probe_images(fit.probe_set_id)]
    assert fit.map_shape == run.map_shape and fit.k == len(fit_ids) < len(parent_ids)
    for neuron in (0, 7):
        parent = {t["image_id"]: i for i, t in enumerate(store.top_images(run.run_key, neuron, k=run.k))}
        mine = store.top_images(fit.run_key, neuron, k=fit.k)
        assert [t["image_id"] for t in mine] == [t["image_id"] for t in store.top_images(run.run_key, neuron, k=run.k)
                                                 if t["image_id"] in set(fit_ids)]
        np.testing.assert_array_equal(store.top_maps(fit.run_key, neuron), store.top_maps(run.run_key, neuron)[[parent[t["image_id"]] for t in mine]])


def test_evaluate_cli_fits_on_one_part_and_scores_on_the_other(held_out_workspace, capsys):
    store, folder, other = held_out_workspace["store"], str(held_out_workspace["folder"]), str(held_out_workspace["other"])
    base = ["--cache", str(store.root), "evaluate", "torchvision:resnet18@random", "--probe", folder, "--layer", "layer4",
            "--bootstrap", "20"]
    concept_file = store.root / "concepts.txt"
    concept_file.write_text("\n".join(CONCEPTS))
    assert main(base + ["--fit", "clip_dissect", "--concepts", str(concept_file), "--neurons", "0-9"]) == 0
    out = capsys.readouterr().out
    assert "CLIP-Dissect labelled the fit part" in out and "| clip_dissect | held out | 10 |" in out
    assert "| shuffled: clip_dissect |" in out and "| baseline: depiction |" in out and "Neurons used (10): 0-9" in out
    assert "Label runs:\n- clip_dissect: clip_dissect [" in out and "Hub images" in out and "Label diversity" in out
    # --common: the neurons every chosen run labelled, printed
    assert main(base + ["--common"]) == 0
    assert "Neurons used (10): 0-9" in capsys.readouterr().out
    # a second probe set scores instead of the held-out part
    assert main(base + ["--score-probe", other]) == 0
    out = capsys.readouterr().out
    assert "images of probe set" in out and "(not in the fit part)" in out
    # a label-run prefix that matches nothing is one clear line
    assert main(base + ["--label-runs", "zzzz"]) == 2
    assert "No label run of layer layer4 starts with zzzz" in capsys.readouterr().err
