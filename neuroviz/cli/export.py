"""``python -m neuroviz export MODEL --out FILE``: labels as CLIP-Dissect CSV, DnD CSV or provenance JSON.

    python -m neuroviz export offline:mobilenet_v2 --probe demo --layers classifier.1 \\
        --method clip_dissect --out descriptions.csv
"""

from __future__ import annotations

import argparse

from ..labels_io import FORMATS
from ._common import CommandLineError, add_run_arguments, comma_list, output_file, output_path, store_from


def cmd_export(args: argparse.Namespace) -> int:
    """Write one method's labels of the chosen layers (default: every layer it labelled)."""
    from ..catalog import runs_for
    from ..labels_io import export_labels

    store = store_from(args)
    layers = comma_list(args.layers)
    runs = runs_for(store, args.model, args.probe, layers, args.pooling, units=args.units)
    if not layers:  # every layer that has labels by this method
        runs = [r for r in runs if (store.label_runs(r.run_key)["method"] == args.method).any()]
        if not runs:
            raise CommandLineError(f"No layer of {args.model} has labels by '{args.method}' yet.")
    with output_file(args.out) as out:
        path = export_labels(store, runs, args.method, out, args.format, args.label_key)
    print(f"wrote {path} ({', '.join(r.layer for r in runs)})")
    args._result = {"path": str(path)}
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` command."""
    p = subparsers.add_parser("export", help="write labels as CLIP-Dissect CSV, DnD CSV or provenance JSON")
    add_run_arguments(p)
    p.add_argument("--method", default="clip_dissect")
    p.add_argument("--format", choices=FORMATS, help="default: from the file name (.json -> json, else clip_dissect)")
    p.add_argument("--out", required=True, type=output_path, help="output file")
    p.add_argument("--label-key", help="a specific label run (default: the newest of the method)")
    p.set_defaults(func=cmd_export)
