"""``python -m neuroviz import FILE MODEL --layer L``: store labels made elsewhere.

Reads a CLIP-Dissect or DnD CSV, or a neuroviz JSON export. (The module is ``import_``
because ``import`` is a Python keyword; the command is ``import``.)
"""

from __future__ import annotations

import argparse

from ..labels_io import FORMATS
from ._common import add_run_arguments, store_from


def cmd_import(args: argparse.Namespace) -> int:
    """Store the file's labels against the run of --layer and print what each label run holds."""
    from ..catalog import find_run
    from ..labels_io import import_labels

    store = store_from(args)
    run = find_run(store, args.model, args.probe, args.layer, args.pooling, units=args.units)
    keys = import_labels(store, args.file, run, args.format, args.method)
    for key in keys:
        meta = store.label_runs(run.run_key)
        meta = meta[meta["label_key"] == key].iloc[-1]
        print(f"imported {meta['n_neurons']} neurons as method '{meta['method']}' into {run.layer} (label key {key})")
    args._result = {"label_keys": keys}
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import`` command."""
    p = subparsers.add_parser("import", help="store labels from a CLIP-Dissect/DnD CSV or a neuroviz JSON export")
    p.add_argument("file")
    add_run_arguments(p, one_layer=True)
    p.add_argument("--format", choices=FORMATS, help="default: guessed from the file")
    p.add_argument("--method", help="method name to store them under (default: imported:<file stem>, or the JSON's)")
    p.set_defaults(func=cmd_import)
