"""The offline demo: fills a workspace (a cache folder) with everything the pages show.

`python -m neuroviz demo` (neuroviz/cli/demo.py) builds, from packaged weights and images
only (no network): the demo probe set, the activations of the packaged ImageNet MobileNetV2
on a few layers, the thumbnails the pages draw from, and labels from every method that can
run offline (CLIP-Dissect on every neuron, MILAN-style PMI on the first neurons of each
layer, DnD on a few neurons of the last conv layer). Each step is cached, so a second run
takes seconds.
"""

from __future__ import annotations

import sys
import time

DEMO_MODEL = "offline:mobilenet_v2"  # the packaged ImageNet MobileNetV2 (neuroviz.offline_weights)
DEMO_PROBE = "demo"
DEMO_LAYERS = ["features.4", "features.9", "features.14", "features.18", "classifier.1"]
DEMO_CONCEPTS = "words20k"
DEMO_DND_LAYER = "features.18"
DEMO_DND_NEURONS = 24  # the layer browser's first page: every card carries all three methods
# MILAN scores each candidate with Gemma on the CPU (~2 s a neuron): the demo labels the first
# neurons of each layer; label the rest from the Workspace page or `python -m neuroviz label`.
DEMO_MILAN_NEURONS = 32


def say(message: str) -> None:
    """One progress line of the demo build, on stderr (stdout stays free for results)."""
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def build_demo_workspace(store, labels: bool = True, dnd_neurons: int = DEMO_DND_NEURONS, progress_factory=None) -> dict:
    """Build (or reuse) the demo workspace in ``store``; returns what it did, step by step."""
    from . import datasets, extract, models
    from .demo_set import build_demo_set
    from .progress import TqdmProgress

    bar = progress_factory or (lambda desc, unit="it": TqdmProgress(desc, unit))
    report: dict = {}
    t0 = time.time()
    demo = build_demo_set(store.demo_dir(), progress=bar("demo images", "img"))
    for warning in demo.warnings:
        say("warning: " + warning)
    report["demo_set"] = {"images": demo.n_images, "by_source": demo.by_source, "seconds": round(time.time() - t0, 1)}

    t0 = time.time()
    model = models.create(DEMO_MODEL)
    probe = datasets.open_probe_set(DEMO_PROBE, store.root)
    runs = extract.extract(model, probe, DEMO_LAYERS, store, k=50, progress=bar("extracting MobileNetV2", "img"))
    report["extraction"] = {"layers": [r.layer for r in runs], "images": len(probe), "seconds": round(time.time() - t0, 1)}

    from . import images

    t0 = time.time()
    images.warm_thumbnails(store.root, [im.path for im in probe.images], geometry=images.ViewGeometry.of(model.preprocessing),
                           progress=bar("thumbnails", "img"))
    report["thumbnails"] = {"images": len(probe), "seconds": round(time.time() - t0, 1)}
    if not labels:
        return report

    from . import methods
    from .backends.pool import BackendChoice, BackendPool, build_context

    available = {m.name for m in methods.list_methods()}
    pool = BackendPool(store, BackendChoice(concepts=DEMO_CONCEPTS))
    for run in runs:
        for name in ("clip_dissect", "milan"):
            if name == "milan" and run.map_shape is None:
                continue  # MILAN masks need spatial maps; vector layers have none
            t0 = time.time()
            method = methods.get_method(name)
            ctx = build_context(store, run, method.needs, pool, bar(f"{name} {run.layer}", "step"))
            ctx.model = model
            subset = list(range(min(DEMO_MILAN_NEURONS, run.n_neurons))) if name == "milan" else None
            methods.run_method(name, ctx, neurons=subset)
            report[f"{name}:{run.layer}"] = round(time.time() - t0, 1)
    if "dnd" in available and dnd_neurons > 0:
        run = next(r for r in runs if r.layer == DEMO_DND_LAYER)
        t0 = time.time()
        ctx = build_context(store, run, methods.get_method("dnd").needs, pool, bar(f"dnd {run.layer}", "step"))
        ctx.model = model
        methods.run_method("dnd", ctx, neurons=list(range(dnd_neurons)))
        report[f"dnd:{run.layer}"] = round(time.time() - t0, 1)
    return report
