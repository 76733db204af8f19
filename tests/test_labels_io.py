"""Export and import of labels (CLIP-Dissect CSV, DnD CSV, provenance JSON) and the methods CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest

from neuroviz import embeddings, extract
from neuroviz.backends.multimodal import create_multimodal
from neuroviz.catalog import RunNotFoundError, find_run
from neuroviz.cli import main
from neuroviz.cli._common import parse_neurons
from neuroviz.concepts import from_texts
from neuroviz.labels_io import (
    LabelFileError,
    collect_labels,
    export_labels,
    guess_format,
    import_labels,
)
from neuroviz.methods import MethodContext, run_method
from neuroviz.store import Store

MODEL = "torchvision:resnet18@random"
CONCEPTS = ["cat", "coffee", "rocket", "coins", "horse", "astronaut", "square", "circle", "camera", "flower"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_workspace, image_folder):
    """A private store with fc and layer4 extracted and labelled by CLIP-Dissect (neurons 0..11)."""
    store = Store(tmp_path_factory.mktemp("io_cache"))
    runs = extract.extract(tiny_workspace["model"], tiny_workspace["probe_set"], ["fc", "layer4"], store, k=10,
                           batch_size=20, chunk_size=20)
    backend = create_multimodal("conse")
    share_image_embeddings(tiny_workspace["store"], store, backend, runs[0].probe_set_id)
    concepts = from_texts("io", CONCEPTS)
    for run in runs:
        run_method("clip_dissect", MethodContext(store=store, run=run, multimodal=backend, concepts=concepts), neurons=range(12))
    return {"store": store, "runs": {r.layer: r for r in runs}, "folder": image_folder, "concepts": concepts, "backend": backend}


def share_image_embeddings(src: Store, dst: Store, backend, probe_set_id: str) -> None:
    """Embeddings are keyed by (backend, probe set): compute them once in the session's shared
    workspace and hand the same artefact to this private store, instead of re-encoding."""
    emb = embeddings.image_embeddings(backend, src, probe_set_id)
    dst.save_array("image_emb", embeddings.image_embeddings_key(backend, probe_set_id), emb)


def test_json_round_trip_keeps_everything(labelled, tmp_path):
    store, fc = labelled["store"], labelled["runs"]["fc"]
    original = collect_labels(store, fc, "clip_dissect")
    path = export_labels(store, [fc, labelled["runs"]["layer4"]], "clip_dissect", tmp_path / "labels.json")
    doc = json.loads(path.read_text())
    assert [s["run"]["layer"] for s in doc["label_sets"]] == ["fc", "layer4"]
    first = doc["label_sets"][0]
    assert first["run"]["model_spec"] == MODEL and first["hyperparams"]["similarity"] == "soft_wpmi"
    assert first["concept_set_id"] == labelled["concepts"].id and "multimodal" in first["backends"]

    # Into a fresh cache holding the same extraction (run keys are content hashes: same run).
    other = Store(tmp_path / "other")
    (fc2,) = extract.extract(extract_model(labelled), labelled_probe(labelled), ["fc"], other, k=10, batch_size=20, chunk_size=20)
    assert fc2.run_key == fc.run_key
    keys = import_labels(other, path, fc2)
    assert keys == [original.label_key]  # same run, same provenance: the original key
    imported = collect_labels(other, fc2, "clip_dissect")
    assert [(r.neuron, r.rank, r.label) for r in imported.rows] == [(r.neuron, r.rank, r.label) for r in original.rows]
    for a, b in zip(imported.rows, original.rows):
        assert a.score == pytest.approx(b.score) and a.calibrated == pytest.approx(b.calibrated) and a.extra == b.extra
    # ... so the method finds them cached and computes nothing.
    ctx = MethodContext(store=other, run=fc2, multimodal=labelled["backend"], concepts=labelled["concepts"])
    created = other.label_runs(fc2.run_key)["created_at"].iloc[0]
    assert run_method("clip_dissect", ctx, neurons=range(12)) == original.label_key
    assert other.label_runs(fc2.run_key)["created_at"].iloc[0] == created


def extract_model(labelled):
    from neuroviz import models

    return models.create(MODEL, image_size=64)


def labelled_probe(labelled):
    from neuroviz import datasets

    return datasets.from_folder(labelled["folder"])


def test_descriptions_csv_round_trip(labelled, tmp_path):
    store, runs = labelled["store"], labelled["runs"]
    path = export_labels(store, [runs["fc"], runs["layer4"]], "clip_dissect", tmp_path / "descriptions.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["layer", "unit", "description", "similarity"]
    assert {r["layer"] for r in rows} == {"fc", "layer4"} and len(rows) == 24
    assert guess_format(path) == "clip_dissect"
    (key,) = import_labels(store, path, runs["layer4"])
    imported = store.labels(runs["layer4"].run_key, method="imported:descriptions")
    original = store.labels(runs["layer4"].run_key, method="clip_dissect", top_only=True)
    assert imported["label_key"].unique().tolist() == [key]
    assert imported["label"].tolist() == original["label"].tolist()
    assert imported["score"].tolist() == pytest.approx(original["score"].tolist())
    assert import_labels(store, path, runs["layer4"]) == [key]  # importing again replaces, not duplicates
    assert len(store.labels(runs["layer4"].run_key, method="imported:descriptions")) == 12


def test_dnd_csv_round_trip(labelled, tmp_path):
    store, fc = labelled["store"], labelled["runs"]["fc"]
    path = export_labels(store, [fc], "clip_dissect", tmp_path / "dnd_labels.csv", fmt="dnd")
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["Neuron ID", "Label 1", "Label 2", "Label 3"]
    assert guess_format(path) == "dnd"
    import_labels(store, path, fc, method="dnd_file")
    imported = store.labels(fc.run_key, method="dnd_file")
    original = store.labels(fc.run_key, method="clip_dissect")
    original = original[original["rank"] < 3]
    assert imported[["neuron", "rank", "label"]].values.tolist() == original[["neuron", "rank", "label"]].values.tolist()
    assert all(math.isnan(s) for s in imported["score"])  # the format carries no scores


def test_import_errors_are_clear(labelled, tmp_path):
    store, fc = labelled["store"], labelled["runs"]["fc"]
    wrong_layer = tmp_path / "other_layers.csv"
    wrong_layer.write_text("layer,unit,description,similarity\nlayer1,0,dog,0.5\nlayer2,0,cat,0.4\n")
    with pytest.raises(LabelFileError, match="layer1, layer2"):
        import_labels(store, wrong_layer, fc)
    too_big = tmp_path / "too_big.csv"
    too_big.write_text("layer,unit,description,similarity\nfc,5000,dog,0.5\n")
    with pytest.raises(LabelFileError, match="neuron 5000 does not exist"):
        import_labels(store, too_big, fc)
    with pytest.raises(LabelFileError, match="No labels by 'milan'"):
        collect_labels(store, fc, "milan")


def test_find_run_and_its_errors(labelled):
    store, folder = labelled["store"], str(labelled["folder"])
    assert find_run(store, MODEL, folder, "fc").run_key == labelled["runs"]["fc"].run_key
    assert find_run(store, "torchvision:resnet18", folder, "fc").run_key == labelled["runs"]["fc"].run_key
    with pytest.raises(RunNotFoundError, match="python -m neuroviz extract .* --layers layer2"):
        find_run(store, MODEL, folder, "layer2")
    assert parse_neurons("0-3,7") == [0, 1, 2, 3, 7] and parse_neurons(None) is None


def test_cli_label_labels_export_import(labelled, tmp_path, capsys):
    store, folder = labelled["store"], str(labelled["folder"])
    concepts_file = tmp_path / "concepts.txt"
    concepts_file.write_text("\n".join(CONCEPTS) + "\n")
    base = ["--cache", str(store.root)]
    assert main(base + ["label", MODEL, "--probe", folder, "--layers", "fc", "--concepts", str(concepts_file),
                        "--multimodal", "conse", "--neurons", "0-4", "--similarity", "cos3"]) == 0
    out = capsys.readouterr().out
    assert "fc: CLIP-Dissect labelled 5 neurons" in out
    assert main(base + ["labels", MODEL, "--probe", folder, "--layer", "fc", "--method", "clip_dissect", "--neurons", "0-2"]) == 0
    table = capsys.readouterr().out
    assert "clip_dissect" in table and len([l for l in table.splitlines() if l.strip().startswith(("0 ", "1 ", "2 "))]) >= 3
    out_file = tmp_path / "export.json"
    assert main(base + ["export", MODEL, "--probe", folder, "--layers", "fc", "--method", "clip_dissect", "--out", str(out_file)]) == 0
    assert json.loads(out_file.read_text())["format"] == "neuroviz-labels"
    assert main(base + ["import", str(out_file), MODEL, "--probe", folder, "--layer", "layer4", "--method", "from_fc"]) == 0
    assert "as method 'from_fc' into layer4" in capsys.readouterr().out
    assert main(base + ["label", MODEL, "--probe", folder, "--layers", "layer2"]) == 2  # not extracted: a clear error
    assert "python -m neuroviz extract" in capsys.readouterr().err
    assert main(base + ["label", MODEL, "--probe", folder, "--layers", "fc", "--param", "nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err
