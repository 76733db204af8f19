"""The demo workspace builder (`python -m neuroviz demo`, the README's first command), end to end
on a small scale: every step runs once, and a second build computes nothing."""

from __future__ import annotations

import pytest

from neuroviz import demo, demo_set
from neuroviz.images import VIEW_NAMESPACE
from neuroviz.store import DEFAULT_CACHE, Store

pytestmark = pytest.mark.slow


@pytest.fixture()
def small_demo(monkeypatch, tmp_path):
    """The real builder with fewer layers, neurons and images: scikit-image photos only, two
    layers, ImageNet concepts, MILAN on 2 neurons and DnD on 1. Gemma's dequantised copy is
    shared with the workspace cache (as the packaged-Gemma test does) instead of redone here."""
    real_build = demo_set.build_demo_set
    monkeypatch.setattr(demo_set, "build_demo_set",
                        lambda dest, progress=None: real_build(dest, sources=("skimage",), max_side=96, progress=progress))
    monkeypatch.setattr(demo, "DEMO_LAYERS", ["features.14", "classifier.1"])
    monkeypatch.setattr(demo, "DEMO_DND_LAYER", "features.14")
    monkeypatch.setattr(demo, "DEMO_MILAN_NEURONS", 2)
    monkeypatch.setattr(demo, "DEMO_CONCEPTS", "imagenet")
    store = Store(tmp_path / "cache")
    (DEFAULT_CACHE / "models").mkdir(parents=True, exist_ok=True)
    (store.root / "models").symlink_to(DEFAULT_CACHE / "models", target_is_directory=True)
    return store


def test_demo_build_runs_every_step_then_reuses_them(small_demo):
    store = small_demo
    report = demo.build_demo_workspace(store, dnd_neurons=1)
    assert report["demo_set"]["by_source"] == {"skimage": report["demo_set"]["images"]} and report["demo_set"]["images"] > 10
    runs = {r.layer: r for r in store.find_runs()}
    assert set(runs) == {"features.14", "classifier.1"} and report["extraction"]["images"] == runs["features.14"].n_images
    assert store.get_record(VIEW_NAMESPACE, runs["features.14"].preprocess_id) == {"image_size": 224, "resize_size": 256}
    assert any((store.root / "thumbs" / "thumb").iterdir())  # the pages' thumbnails are ready

    labelled = {(m, layer): len(store.labels(runs[layer].run_key, method=m, top_only=True))
                for layer in runs for m in ("clip_dissect", "milan", "dnd")}
    assert labelled == {("clip_dissect", "features.14"): 160, ("milan", "features.14"): 2, ("dnd", "features.14"): 1,
                        ("clip_dissect", "classifier.1"): 1000, ("milan", "classifier.1"): 0,  # no maps: no MILAN
                        ("dnd", "classifier.1"): 0}
    n_label_runs = len(store.label_runs())

    def recomputed(*args, **kwargs):
        raise AssertionError("a second demo build labelled again")

    from neuroviz import methods

    with pytest.MonkeyPatch.context() as mp:
        for method in methods.list_methods():
            mp.setattr(type(method), "describe", recomputed)
        again = demo.build_demo_workspace(store, dnd_neurons=1)
    assert len(store.label_runs()) == n_label_runs and again["extraction"]["layers"] == report["extraction"]["layers"]
