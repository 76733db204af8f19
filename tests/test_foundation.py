"""The foundation: model registry, probe sets, extraction, store, resumption, locks, CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuroviz import datasets, extract, models
from neuroviz.hooks import UnknownLayerError
from neuroviz.store import Store

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuroviz", "--cache", str(cache), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# -- models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,layer,kind", [
    ("torchvision:resnet18@random", "layer3", "conv"),
    ("timm:resnet18@random", "layer3", "conv"),
    ("torchvision:mobilenet_v3_small@random", "features.3", "conv"),
])
def test_registry_creates_random_real_architectures(spec, layer, kind):
    model = models.create(spec, image_size=64)
    info = model.layer(layer)
    assert info.layout.kind == kind and info.n_neurons > 0
    assert len(model.weights_id) == 20
    assert models.create(spec, image_size=64).weights_id == model.weights_id  # seeded random weights


def test_open_clip_tower_tokens_use_cls_pooling():
    model = models.create("open_clip:ViT-B-32@random")
    blocks = [l for l in model.layers() if l.name.startswith("transformer.resblocks.") and l.name.count(".") == 2]
    assert len(blocks) == 12
    info = blocks[-1]
    assert info.layout.kind == "tokens" and info.layout.has_cls and info.default_pooling == "cls"
    assert info.shape == (50, 768)  # 7x7 patches + CLS, batch axis resolved


def test_unknown_model_and_layer_errors_suggest():
    with pytest.raises(models.ModelLoadError, match="Did you mean resnet18"):
        models.create("torchvision:resnet19")
    with pytest.raises(models.ModelLoadError, match="Known: offline:mobilenet_v2, .*torchvision:.*timm:.*open_clip:.*custom:"):
        models.create("nosuch:thing")
    model = models.create("torchvision:resnet18@random", image_size=64)
    with pytest.raises(UnknownLayerError, match="layer4"):
        model.layer("layer5")


def test_custom_model_with_checkpoint(tmp_path):
    from tests.slow_model import build

    net = build()
    with torch.no_grad():
        net.fc.bias.fill_(3.0)
    ckpt = tmp_path / "ck.pt"
    torch.save({"state_dict": net.state_dict()}, ckpt)
    model = models.create("custom:tests.slow_model:build", checkpoint=str(ckpt), image_size=32)
    assert torch.all(model.module.fc.bias == 3.0)
    assert model.weights_id != models.create("custom:tests.slow_model:build", image_size=32).weights_id


@pytest.mark.slow
def test_packaged_mobilenet_v2_sees_a_cat():
    from skimage import data

    model = models.create("offline:mobilenet_v2")
    x = model.transform(Image.fromarray(data.chelsea()))[None]
    with torch.no_grad():
        top = int(model.module(x).argmax())
    assert "cat" in model.class_names[top]  # Egyptian cat / tabby / tiger cat


@pytest.mark.slow
def test_packaged_efficientnet_lite0_sees_a_cat_and_a_coffee():
    from skimage import data

    model = models.create("offline:efficientnet_lite0")
    xs = torch.stack([model.transform(Image.fromarray(data.chelsea())), model.transform(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        top = model.module(xs).argmax(1).tolist()
    assert "cat" in model.class_names[top[0]]
    assert model.class_names[top[1]] in ("espresso", "cup", "coffee mug")


# -- probe sets -------------------------------------------------------------------------------
def test_bad_files_are_skipped_counted_and_extraction_completes(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / "sub" / f"ok{i}.png")
    good = (folder / "sub" / "ok0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    Image.new("L", (8000, 6000)).save(folder / "huge.png")
    (folder / "copy.png").write_bytes(good)  # same content as ok0: one image, not two
    ps = datasets.from_folder(folder, cache_dir=tmp_path / "cache")
    assert len(ps) == 6
    reasons = {k: len(v) for k, v in ps.skipped.items()}
    assert reasons == {"corrupt or truncated image": 2, "not an image": 1, "empty file": 1,
                       "huge image": 1, "duplicate content": 1}
    store = Store(tmp_path / "cache")
    model = models.create("torchvision:resnet18@random", image_size=32)
    (run,) = extract.extract(model, ps, ["layer1"], store, k=3, batch_size=4, chunk_size=4)
    assert run.n_images == 6
    assert store.probe_sets()[0]["n_skipped"] == 6


def test_image_ids_survive_renames(tmp_path, image_folder):
    import shutil

    ps1 = datasets.from_folder(image_folder)
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    for p in list(moved.rglob("*.png"))[:5]:
        p.rename(p.with_name("renamed_" + p.name))
    assert datasets.from_folder(moved).id == ps1.id


def test_list_and_csv_probe_sets(tmp_path, image_folder):
    files = sorted(image_folder.rglob("*.png"))[:5]
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in files) + "\n# comment\n")
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(f"{p},thing{i}" for i, p in enumerate(files)))
    a = datasets.from_list(tmp_path / "list.txt")
    b = datasets.from_list(tmp_path / "list.csv")
    assert a.id == b.id and len(a) == 5
    assert {im.label for im in b.images} == {f"thing{i}" for i in range(5)}
    with pytest.raises(datasets.ProbeSetError, match="neither"):
        datasets.open_probe_set(str(tmp_path / "nope"), tmp_path)


# -- extraction and store ---------------------------------------------------------------------
def test_streaming_topk_matches_brute_force(tiny_workspace):
    store, model, ps = tiny_workspace["store"], tiny_workspace["model"], tiny_workspace["probe_set"]
    run = tiny_workspace["runs"]["layer2"]
    acts = np.asarray(store.activations(run.run_key))
    assert acts.shape == (len(ps), run.n_neurons)
    order = np.argsort(-acts, axis=0, kind="stable")[: run.k].T
    np.testing.assert_array_equal(store.top_indices(run.run_key), order)
    # the stored map of a neuron's best image is that image's real activation map
    neuron = 5
    best = store.top_images(run.run_key, neuron, 1)[0]
    x = model.transform(ps.load(best["image_idx"]))[None]
    from neuroviz.hooks import LayerRecorder

    with torch.no_grad(), LayerRecorder(model.module, ["layer2"]) as rec:
        model.module(x)
    fmap = rec.outputs["layer2"][0, neuron].numpy()
    np.testing.assert_allclose(store.top_maps(run.run_key, neuron)[0], fmap, rtol=1e-2, atol=1e-2)
    assert abs(fmap.mean() - best["activation"]) < 1e-4
    stats = store.neuron_stats(run.run_key)
    np.testing.assert_allclose(stats["q99"], np.quantile(acts, 0.99, axis=0), rtol=1e-5)
    counts, edges = store.histogram(run.run_key, neuron)
    assert counts.sum() == len(ps) and len(edges) == len(counts) + 1


def test_provenance_changes_recompute(tiny_workspace, tmp_path):
    # a private copy: the extra max-pooling run must not leak into the shared workspace other modules copy
    shutil.copytree(tiny_workspace["store"].root, tmp_path / "cache")
    store, model, ps = Store(tmp_path / "cache"), tiny_workspace["model"], tiny_workspace["probe_set"]
    cached = extract.extract(model, ps, ["layer2"], store, k=10)[0]
    assert cached.run_key == tiny_workspace["runs"]["layer2"].run_key
    other_pool = extract.extract(model, ps, ["layer2"], store, k=10, pooling="max")[0]
    assert other_pool.run_key != cached.run_key and other_pool.pooling == "max"
    smaller = datasets.ProbeSet("sub", "sub", ps.images[:-1])
    assert extract.run_key_for(model, "layer2", "mean", smaller, 10) != cached.run_key
    with pytest.raises(extract.ExtractionError, match="does not apply"):
        extract.extract(model, ps, ["layer2"], store, pooling="cls")


def _compare_stores(a: Store, b: Store) -> None:
    runs_a = {r.layer: r for r in a.find_runs()}
    runs_b = {r.layer: r for r in b.find_runs()}
    assert runs_a.keys() == runs_b.keys()
    for layer, ra in runs_a.items():
        rb = runs_b[layer]
        assert ra.run_key == rb.run_key
        np.testing.assert_array_equal(np.asarray(a.activations(ra.run_key)), np.asarray(b.activations(rb.run_key)))
        ta, tb = a.top_k(ra.run_key), b.top_k(rb.run_key)
        assert ta.image_idx.shape == (ra.n_neurons, ra.k)  # no row lost or duplicated
        np.testing.assert_array_equal(ta.image_idx, tb.image_idx)
        np.testing.assert_array_equal(ta.activation, tb.activation)
        assert [a.top_images(ra.run_key, n, ra.k) for n in range(ra.n_neurons)] == \
            [b.top_images(rb.run_key, n, rb.k) for n in range(rb.n_neurons)]
        np.testing.assert_array_equal(np.load(a.run_dir(ra.run_key) / "maps.npy"), np.load(b.run_dir(rb.run_key) / "maps.npy"))


def test_resume_after_stop_equals_uninterrupted(tmp_path, tiny_workspace):
    model, ps = tiny_workspace["model"], tiny_workspace["probe_set"]
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    extract.extract(model, ps, ["layer1", "layer3"], a, k=5, batch_size=8, chunk_size=8)
    assert extract.extract(model, ps, ["layer1", "layer3"], b, k=5, batch_size=8, chunk_size=8, stop_after_chunks=2) == []
    assert b.find_runs() == []  # nothing half-visible
    extract.extract(model, ps, ["layer1", "layer3"], b, k=5, batch_size=8, chunk_size=8)
    _compare_stores(a, b)


def test_kill_9_mid_extraction_then_rerun_resumes(tmp_path, image_folder):
    args = ["extract", "custom:tests.slow_model:build", "--image-size", "32", "--probe", str(image_folder),
            "--layers", "conv1,conv2", "--k", "4", "--batch-size", "4", "--chunk-size", "4"]
    full = run_cli(*args, cache=tmp_path / "full")
    assert full.returncode == 0, full.stderr
    cache = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "neuroviz", "--cache", str(cache), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("runs/*/partial/*/chunk-*.npy"))) < 6:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert Store(cache).find_runs() == []
    partial_chunks = len(list(cache.glob("runs/*/partial/*/chunk-*.npy")))
    assert 0 < partial_chunks < 20  # it was killed in the middle (40 images / 4 per chunk, 2 layers)
    resumed = run_cli(*args, cache=cache)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    _compare_stores(Store(tmp_path / "full"), Store(cache))


def test_old_cache_held_by_another_process_waits_then_reports_clearly(tmp_path):
    """A cache from before the file layout is migrated on first open; while an old process
    holds its database the store waits, then says what to do (no DuckDB traceback)."""
    import duckdb

    from neuroviz.store import LegacyCacheLockedError

    old = tmp_path / "c" / "neuroviz.duckdb"
    old.parent.mkdir()
    duckdb.connect(str(old)).close()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(3)"),
        str(old)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LegacyCacheLockedError, match="another process holds that file"):
        Store(tmp_path / "c", lock_timeout=0.5)
    started = time.time()
    patient = Store(tmp_path / "c", lock_timeout=30)
    assert patient.summary()["runs"] == 0  # waited for the holder to exit, then migrated
    assert time.time() - started > 0.5
    holder.wait()


def test_cli_errors_are_clear_and_cache_lists_runs(tmp_path, image_folder):
    bad_layer = run_cli("extract", "torchvision:resnet18@random", "--image-size", "32", "--probe", str(image_folder),
                        "--layers", "layer9", cache=tmp_path)
    assert bad_layer.returncode == 2 and "Did you mean" in bad_layer.stderr and "Traceback" not in bad_layer.stderr
    bad_path = run_cli("extract", "torchvision:resnet18@random", "--probe", str(tmp_path / "missing"), cache=tmp_path)
    assert bad_path.returncode == 2 and "neither 'demo'" in bad_path.stderr
    ok = run_cli("extract", "torchvision:resnet18@random", "--image-size", "32", "--probe", str(image_folder),
                 "--layers", "layer4", "--k", "3", cache=tmp_path)
    assert ok.returncode == 0, ok.stderr
    listing = run_cli("cache", cache=tmp_path)
    assert "layer4" in listing.stdout and "512 neurons x 40 images" in listing.stdout
    layers = run_cli("layers", "torchvision:resnet18@random", "--image-size", "32", cache=tmp_path)
    assert "layer4" in layers.stdout and "(512, 1, 1)" in layers.stdout


def test_run_records_its_input_size_and_methods_recreate_the_model_at_it(tiny_workspace):
    """The tiny workspace was extracted at 64 px, not the model's default 224: a method that
    re-runs the network must get the 64 px model back from the store, not the default."""
    from neuroviz.images import VIEW_NAMESPACE
    from neuroviz.methods import MethodContext

    store, run = tiny_workspace["store"], tiny_workspace["runs"]["layer4"]
    assert store.get_record(VIEW_NAMESPACE, run.preprocess_id) == {"image_size": 64, "resize_size": 73}
    model = MethodContext(store=store, run=run).probed_model()
    assert model.preprocessing.image_size == 64 and model.preprocessing.id == run.preprocess_id
    assert models.create(run.model_spec).preprocessing.id != run.preprocess_id  # the default would not match


def test_a_moved_image_folder_keeps_its_probe_set_and_gets_the_new_paths(tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    store = Store(tmp_path / "cache")
    ps = datasets.from_folder(folder)
    store.register_probe_set(ps)
    moved = tmp_path / "renamed"
    shutil.move(folder, moved)
    again = datasets.from_folder(moved)
    assert again.id == ps.id  # content hashes: the cache stays valid
    store.register_probe_set(again)
    paths = [row["path"] for row in store.probe_images(ps.id)]
    assert paths == [im.path for im in again.images] and all(str(moved) in p for p in paths)
