"""``python -m neuroviz extract MODEL``: record layers' activations over a probe set (resumable)."""

from __future__ import annotations

import argparse

from ._common import comma_list, non_negative_int, positive_int, progress_for, report_skipped, store_from

# hooks.POOLINGS and "default" (the layer's own); written out because hooks imports torch, which --help must not.
POOLING_CHOICES = ["default", "mean", "max", "cls", "tokens_mean"]


def cmd_extract(args: argparse.Namespace) -> int:
    """Extract the chosen (or suggested) layers, then warm the thumbnails the pages draw from."""
    from .. import datasets, engines, extract, images, models
    from ..progress import TqdmProgress

    engines.check_engine(args.engine)  # a missing Ray says how to install it before any model loads
    store = store_from(args)
    model = models.create(args.model, image_size=args.image_size)
    layers = comma_list(args.layers) or model.suggested_layers()
    for name in layers:
        model.layer(name)  # unknown names fail here, with suggestions, before any work
    probe_set = datasets.open_probe_set(args.probe, store.root, progress=TqdmProgress("checking images", "file"))
    report_skipped(probe_set)
    runs = extract.extract(model, probe_set, layers, store, pooling=args.pooling, k=args.k, batch_size=args.batch_size,
                           chunk_size=args.chunk_size, progress=progress_for(args, "extracting"), num_workers=args.workers,
                           engine=args.engine, shard_size=args.shard_size, address=args.address)
    if not args.no_thumbnails:  # the pages paste every card and grid from these: build them now, once
        images.warm_thumbnails(store.root, [im.path for im in probe_set.images],
                               geometry=images.ViewGeometry.of(model.preprocessing), progress=progress_for(args, "thumbnails"))
    for run in runs:
        print(f"{run.layer}: {run.n_neurons} neurons x {run.n_images} images, pooling={run.pooling}, run {run.run_key}")
    args._result = {"runs": [run.run_key for run in runs], "skipped": probe_set.n_skipped}
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``extract`` command."""
    p = subparsers.add_parser("extract", help="record activations of layers over a probe set (resumable)")
    p.add_argument("model")
    p.add_argument("--probe", default="demo", help="'demo', an image folder, or a .txt/.csv list")
    p.add_argument("--layers", help="comma-separated module names (default: suggested layers)")
    p.add_argument("--pooling", choices=POOLING_CHOICES, default="default")
    p.add_argument("--k", type=positive_int, default=50, help="top images kept per neuron")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--chunk-size", type=positive_int, default=256, help="images per resumable chunk")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--workers", type=non_negative_int, default=0)
    p.add_argument("--engine", choices=["inprocess", "ray"], default="inprocess",
                   help="who runs the shards: this process, or a Ray cluster (pip install -r requirements-ray.txt)")
    p.add_argument("--address", help="Ray cluster to use: 'auto' (the one started on this machine) or HOST:PORT; "
                   "default: start a local one")
    p.add_argument("--shard-size", type=positive_int,
                   help="images per shard (default: one shard in process, 16 shards on Ray)")
    p.add_argument("--no-thumbnails", action="store_true", help="skip building the thumbnails the pages draw from")
    p.set_defaults(func=cmd_extract)
