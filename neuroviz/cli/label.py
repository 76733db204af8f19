"""``python -m neuroviz label MODEL``: describe neurons with methods (CLIP-Dissect, MILAN, DnD, NetDissect, Linear Explanations).

    python -m neuroviz label offline:mobilenet_v2 --probe demo --layers features.14,classifier.1 \\
        --methods clip_dissect --concepts words20k --multimodal conse

Labels are cached by provenance: labelling again with the same inputs computes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import CommandLineError, add_run_arguments, comma_list, non_negative_int, parse_neurons, store_from

if TYPE_CHECKING:
    from ..backends.pool import BackendPool
    from ..store import RunInfo, Store


def cmd_label(args: argparse.Namespace) -> int:
    """Label every chosen layer with every chosen method; print a preview of each."""
    from ..backends.pool import BackendChoice, BackendPool
    from ..catalog import runs_for
    from ..methods import get_method
    from ..methods.clip_dissect import reuse_probabilities
    from ..methods.params import configs_for

    store = store_from(args)
    names = comma_list(args.methods) or []
    neurons = parse_neurons(args.neurons)
    for name in names:  # unknown names and missing --neurons fail here, before any work
        method = get_method(name)
        if neurons is None and method.per_neuron:
            raise CommandLineError(f"{method.title} is slow and runs on chosen neurons: add --neurons (e.g. 0-9).")
    params = list(args.param)
    if args.similarity:
        if "clip_dissect" not in names:
            raise CommandLineError("--similarity applies to clip_dissect; add it to --methods.")
        params.append(f"similarity={args.similarity}")
    if args.segmentation_set:
        params.append(f"segmentation_set={json.dumps(str(Path(args.segmentation_set).expanduser().resolve()))}")
    configs = configs_for(names, params)
    runs = runs_for(store, args.model, args.probe, comma_list(args.layers), args.pooling, units=args.units)
    pool = BackendPool(store, BackendChoice(args.multimodal, args.concepts, args.captioner, args.language_model))
    keys: list[str] = []
    with reuse_probabilities():  # layers over the same probe set share CLIP-Dissect's p(c|x)
        for run in runs:
            for name in names:
                keys.append(_label_run(args, store, run, name, configs[name], neurons, pool))
    args._result = {"label_keys": keys}
    return 0


def _label_run(args: argparse.Namespace, store: Store, run: RunInfo, name: str, config: object, neurons: list[int] | None,
               pool: BackendPool) -> str:
    from ..backends.pool import build_context
    from ..methods import get_method, run_method
    from ..methods.base import DEAD_CAPTION, dead_units
    from ..progress import TqdmProgress, chain
    from ..units import unit_word

    method = get_method(name)
    bar = TqdmProgress(f"{name} {run.layer}", "step")  # as progress_for, but closable; steps: neurons, images or texts
    ctx = build_context(store, run, method.needs, pool, chain(bar, getattr(args, "_job_reporter", None)))
    try:
        key = run_method(name, ctx, config, neurons)
    finally:
        bar.close()  # before any error message, so it is not glued to the bar
    top = store.labels(run.run_key, method=name, top_only=True)
    top = top[top["label_key"] == key]
    if neurons is not None:
        top = top[top["neuron"].isin(neurons)]
    word = unit_word(run.units).lower()
    print(f"{run.layer}: {method.title} labelled {len(top)} {word}s (label key {key})")
    dead = [n for n in dead_units(store, run) if neurons is None or n in neurons]
    if dead:
        print(f"  skipped {len(dead)} {word}{'s' if len(dead) != 1 else ''}: {DEAD_CAPTION}")
    for row in top.head(args.preview).itertuples():
        cal = "" if row.calibrated is None or row.calibrated != row.calibrated else f"  calibrated {row.calibrated:.2f}"
        print(f"  {word} {row.neuron:5d}  {row.label:30s}  score {row.score:.4g}{cal}")
    return key


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``label`` command."""
    p = subparsers.add_parser("label", help="describe neurons with methods (CLIP-Dissect, ...); cached")
    add_run_arguments(p)
    p.add_argument("--methods", default="clip_dissect", help="comma-separated: clip_dissect, milan, dnd, netdissect, linear_explanations")
    p.add_argument("--concepts", default="words20k", help="imagenet, words20k, demo_labels or a text file (one concept per line)")
    p.add_argument("--multimodal", help="multimodal backend (default: offline ConSE, not the probed network)")
    p.add_argument("--captioner", default="retrieval", help="captioner backend for methods that caption")
    p.add_argument("--language-model", default="gemma3-270m", help="language model for methods that need one")
    p.add_argument("--neurons", help="only these neurons, e.g. 0,1,5 or 0-15 (default: all)")
    # No argparse choices: they live in methods.clip_dissect (which loads torch); a wrong name is
    # refused by its config, with the list, before any work.
    p.add_argument("--similarity", help="CLIP-Dissect similarity function: soft_wpmi (default), wpmi, rank_reorder, cos, cos3")
    p.add_argument("--segmentation-set", help="folder with images/ and masks/ for netdissect")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method hyperparameter (repeatable)")
    p.add_argument("--preview", type=non_negative_int, default=8, help="labels printed per layer")
    p.set_defaults(func=cmd_label)
