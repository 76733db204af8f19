"""``python -m neuroviz labels MODEL --layer L``: a layer's labels as a plain-text table."""

from __future__ import annotations

import argparse

import pandas as pd

from ._common import add_run_arguments, parse_neurons, positive_int, store_from


def format_label_table(df: pd.DataFrame, all_ranks: bool = False) -> str:
    """A plain-text table of labels (neuron, method, rank, label, score, calibrated)."""
    if df.empty:
        return "(no labels)"
    if not all_ranks:
        df = df[df["rank"] == 0]
    lines = [f"{'neuron':>6}  {'method':18s} {'rank':>4}  {'label':32s} {'score':>10}  {'calibrated':>10}"]
    for r in df.itertuples():
        score = "" if r.score is None or r.score != r.score else f"{r.score:.4g}"
        cal = "" if r.calibrated is None or r.calibrated != r.calibrated else f"{r.calibrated:.3f}"
        lines.append(f"{r.neuron:>6}  {str(r.method)[:18]:18s} {r.rank:>4}  {str(r.label)[:32]:32s} {score:>10}  {cal:>10}")
    return "\n".join(lines)


def cmd_labels(args: argparse.Namespace) -> int:
    """Print the labels of the first --limit neurons (rank 0, or every rank with --all-ranks)."""
    from ..catalog import find_run
    from ..methods.base import DEAD_CAPTION, dead_units
    from ..units import unit_word

    store = store_from(args)
    run = find_run(store, args.model, args.probe, args.layer, args.pooling, units=args.units)
    dead = dead_units(store, run)
    df = store.labels(run.run_key, method=args.method)
    df = df[~df["neuron"].isin(dead)]  # labels made before dead units were skipped describe nothing
    neurons = parse_neurons(args.neurons)
    if neurons is not None:
        df = df[df["neuron"].isin(neurons)]
    if df.empty:
        print(f"No labels for {args.layer}" + (f" by {args.method}" if args.method else "")
              + f". Make some: python -m neuroviz label {args.model} --probe {args.probe} --layers {args.layer}")
        return 0
    shown = df if args.all_ranks else df[df["rank"] == 0]
    n_neurons = shown["neuron"].nunique()
    shown = shown[shown["neuron"].isin(sorted(shown["neuron"].unique())[: args.limit])]
    word = unit_word(run.units).lower()
    print(f"# {run.model_spec}  {run.layer}  ({run.n_neurons} {word}s, run {run.run_key})")
    print(format_label_table(shown, all_ranks=True))
    if dead:
        print(f"{len(dead)} {word}{'s' if len(dead) != 1 else ''} unlabelled, {DEAD_CAPTION}: "
              + ", ".join(map(str, dead[:20])) + (" ..." if len(dead) > 20 else ""))
    if n_neurons > args.limit:
        print(f"... {n_neurons - args.limit} more {word}s (use --limit or --neurons)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``labels`` command."""
    p = subparsers.add_parser("labels", help="print a layer's labels as a table")
    add_run_arguments(p, one_layer=True)
    p.add_argument("--method", help="only this method")
    p.add_argument("--neurons", help="only these neurons, e.g. 0-15")
    p.add_argument("--all-ranks", action="store_true", help="also the candidate labels (ranks 1..)")
    p.add_argument("--limit", type=positive_int, default=50, help="neurons shown")
    p.set_defaults(func=cmd_labels)
