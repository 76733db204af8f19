"""``python -m neuroviz embed --probe PROBE_SET --backend NAME``: a probe set's image embeddings
under a multimodal backend, in this process or on a Ray cluster (resumable); the labelling
methods then find them cached."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import positive_int, progress_for, report_skipped, store_from


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed the probe set's images not embedded yet (into the shared cache and the workspace)."""
    from .. import embeddings, engines
    from ..backends.multimodal import create_multimodal
    from ..catalog import probe_set_for, resolve_probe_set_id

    engines.check_engine(args.engine)  # a missing Ray says how to install it before any backend loads
    store = store_from(args)
    backend = create_multimodal(args.backend)  # an unknown name fails here, with suggestions
    stored = any(p["probe_set_id"] == args.probe for p in store.probe_sets())
    if not stored and (args.probe == "demo" or Path(args.probe).expanduser().exists()):
        probe_set = probe_set_for(store, args.probe)  # scanned and registered
        report_skipped(probe_set)
        probe_set_id = probe_set.id
    else:
        probe_set_id = resolve_probe_set_id(store, args.probe)  # a stored set: its rows are read as the chunks need them
    emb = embeddings.image_embeddings(backend, store, probe_set_id, progress=progress_for(args, "embedding"),
                                      batch_size=args.batch_size, engine=args.engine, address=args.address,
                                      backend_spec=args.backend)
    print(f"{len(emb)} images x {emb.shape[1]} dimensions under {backend.id}, probe set {probe_set_id}")
    args._result = {"probe_set": probe_set_id, "backend": backend.id, "images": len(emb)}
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``embed`` command."""
    p = subparsers.add_parser("embed", help="compute a probe set's image embeddings under a multimodal backend (resumable)")
    p.add_argument("--probe", default="demo", help="'demo', an image folder, an image list or a probe-set id")
    p.add_argument("--backend", "--multimodal", dest="backend", default="conse",
                   help="multimodal backend, e.g. conse, conse:mobilenet_v2, open_clip:ViT-B-32@openai (default: conse)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--engine", choices=["inprocess", "ray"], default="inprocess",
                   help="who embeds the chunks: this process, or a Ray cluster (pip install -r requirements-ray.txt)")
    p.add_argument("--address", help="Ray cluster to use: 'auto' (the one started on this machine) or HOST:PORT; "
                   "default: start a local one")
    p.set_defaults(func=cmd_embed)
