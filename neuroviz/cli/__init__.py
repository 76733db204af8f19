"""The command line: ``python -m neuroviz SUBCOMMAND ...``.

Core subcommands live here (models, layers, demo-set, extract, cache, jobs). Other
modules add theirs through a ``register(subparsers)`` function listed in PLUGINS, so a new
feature does not edit this file's core.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from pathlib import Path

from .. import store as store_mod
from ..progress import TqdmProgress, chain
from ._common import progress_for, store_from

PLUGINS = [
    "neuroviz.workspace",
    "neuroviz.methods.cli",
    "neuroviz.evaluate",
    "neuroviz.synthesis",
    "neuroviz.analysis",
    "neuroviz.study",
]


_store = store_from  # the old private name, still imported by modules not yet moved into this package


# -- core subcommands ---------------------------------------------------------------------
def cmd_models(args) -> int:
    from .. import models

    names = models.list_models(args.source, args.filter)
    for name in names[: args.limit]:
        extra = f"  - {models.OFFLINE_MODELS[name.split(':', 1)[1]]}" if name.startswith("offline:") else ""
        print(name + extra)
    if len(names) > args.limit:
        print(f"... and {len(names) - args.limit} more (use --filter or --limit)")
    return 0


def cmd_layers(args) -> int:
    from .. import models

    model = models.create(args.model, image_size=args.image_size)
    print(f"# {model.description}; input {model.preprocessing.image_size}px; weights {model.weights_id}")
    suggested = set(model.suggested_layers())
    for layer in model.layers():
        if not args.all and layer.layout.kind == "vector" and layer.name.count(".") > 1:
            continue
        mark = "*" if layer.name in suggested else " "
        print(f"{mark} {layer.name:40s} {layer.module_type:22s} {str(layer.shape):20s} neurons={layer.n_neurons} pooling={layer.default_pooling}")
    print("(* = suggested default layers)")
    return 0


def cmd_demo_set(args) -> int:
    from ..demo_set import build_demo_set

    st = _store(args)
    bar = progress_for(args, "demo set", "img")
    report = build_demo_set(st.demo_dir(), force=args.force, progress=bar)
    print(f"demo set: {report.n_images} images in {report.root} by source {report.by_source}; skipped {report.skipped}")
    for w in report.warnings:
        print("warning:", w)
    return 0


def cmd_extract(args) -> int:
    from .. import datasets, extract, models

    st = _store(args)
    model = models.create(args.model, image_size=args.image_size)
    layers = [l for l in args.layers.split(",") if l] if args.layers else model.suggested_layers()
    for name in layers:
        model.layer(name)  # unknown names fail here, with suggestions, before any work
    ps = datasets.open_probe_set(args.probe, st.root, progress=TqdmProgress("checking images", "file"))
    if ps.skipped:
        print(f"skipped {ps.n_skipped} files: {ps.skipped_summary()}", file=sys.stderr)
    runs = extract.extract(model, ps, layers, st, pooling=args.pooling, k=args.k, batch_size=args.batch_size,
                           chunk_size=args.chunk_size, progress=progress_for(args, "extracting"), num_workers=args.workers)
    if not args.no_thumbnails:  # the pages paste every card and grid from these: build them now, once
        from .. import images

        images.warm_thumbnails(st.root, [im.path for im in ps.images], geometry=images.ViewGeometry.of(model.preprocessing),
                               progress=progress_for(args, "thumbnails"))
    for r in runs:
        print(f"{r.layer}: {r.n_neurons} neurons x {r.n_images} images, pooling={r.pooling}, run {r.run_key}")
    args._result = {"runs": [r.run_key for r in runs], "skipped": ps.n_skipped}
    return 0


def cmd_cache(args) -> int:
    st = _store(args)
    print(f"cache: {st.root}")
    for table, n in st.summary().items():
        print(f"  {table:14s} {n}")
    for ps in st.probe_sets():
        print(f"probe set {ps['probe_set_id']} '{ps['name']}': {ps['n_images']} images, {ps['n_skipped']} skipped")
    for r in st.find_runs():
        print(f"run {r.run_key}  {r.model_spec}  {r.layer}  pooling={r.pooling}  {r.n_neurons} neurons x {r.n_images} images")
    labels = st.label_runs()
    for _, row in labels.iterrows():
        print(f"labels {row['label_key']}  {row['method']}  run {row['run_key']}  {row['n_neurons']} neurons")
    return 0


def cmd_jobs(args) -> int:
    from .. import jobs

    st = _store(args)
    if args.cancel:
        job = jobs.cancel_job(st, args.cancel)
        print(f"{args.cancel}: {job.status if job else 'no such job'}")
        return 0
    for job in jobs.list_jobs(st):
        print(f"{job.job_id}  {job.kind:10s} {job.status:11s} {job.done}/{job.total}  {job.message or job.error}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m neuroviz", description="Explore and describe the neurons of vision networks.")
    parser.add_argument("--cache", help="cache folder (default: ./cache or $NEUROVIZ_CACHE)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", help="list probed models the registry knows")
    p.add_argument("--source", choices=["offline", "torchvision", "timm", "open_clip"])
    p.add_argument("--filter", help="substring to match")
    p.add_argument("--limit", type=int, default=200)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("layers", help="list a model's hookable layers with output shapes")
    p.add_argument("model", help="model spec, e.g. offline:mobilenet_v2 or torchvision:resnet50@random")
    p.add_argument("--image-size", type=int)
    p.add_argument("--all", action="store_true", help="also list small vector layers deep inside blocks")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("demo-set", help="build the demo probe set from images that ship in packages")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_demo_set)

    p = sub.add_parser("extract", help="record activations of layers over a probe set (resumable)")
    p.add_argument("model")
    p.add_argument("--probe", default="demo", help="'demo', an image folder, or a .txt/.csv list")
    p.add_argument("--layers", help="comma-separated module names (default: suggested layers)")
    p.add_argument("--pooling", choices=["default", "mean", "max", "cls", "tokens_mean"], default="default")
    p.add_argument("--k", type=int, default=50, help="top images kept per neuron")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=256, help="images per resumable chunk")
    p.add_argument("--image-size", type=int)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-thumbnails", action="store_true", help="skip building the thumbnails the pages draw from")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("cache", help="show what the cache holds")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("jobs", help="list background jobs, or cancel one")
    p.add_argument("--cancel", metavar="JOB_ID")
    p.set_defaults(func=cmd_jobs)

    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that feature is not installed in this checkout
            raise
        if hasattr(module, "register_cli"):
            module.register_cli(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from ..backends.base import BackendUnavailable
    from ..datasets import ProbeSetError
    from ..db import DatabaseLockedError
    from ..extract import ExtractionError
    from ..hooks import UnknownLayerError
    from ..models import ModelLoadError
    from ..offline_weights import OfflineAssetMissing

    return (BackendUnavailable, ProbeSetError, DatabaseLockedError, ExtractionError, UnknownLayerError,
            ModelLoadError, OfflineAssetMissing, FileNotFoundError, ValueError, KeyError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reporter = None
    if args.job:
        from ..jobs import JobReporter

        reporter = JobReporter(_store(args), args.job)
        args._job_reporter = reporter
    try:
        code = args.func(args) or 0
    except KeyboardInterrupt:
        if reporter:
            reporter.finish("cancelled", "interrupted by the user")
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _known_errors() as exc:
        message = str(exc).strip("'\"")
        if reporter:
            reporter.finish("failed", message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: keep the traceback for the log, and a clear summary
        if reporter:
            reporter.finish("failed", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if reporter:
        reporter.finish("done" if code == 0 else "failed", result=getattr(args, "_result", None))
    return code
