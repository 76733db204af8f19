"""Command line for description methods: ``label``, ``labels``, ``export`` and ``import``.

    python -m neuroviz label offline:mobilenet_v2 --probe demo --layers features.14,classifier.1 \\
        --methods clip_dissect --concepts words20k --multimodal conse
    python -m neuroviz labels offline:mobilenet_v2 --probe demo --layer classifier.1
    python -m neuroviz export offline:mobilenet_v2 --probe demo --layers classifier.1 \\
        --method clip_dissect --out descriptions.csv
    python -m neuroviz import descriptions.csv offline:mobilenet_v2 --probe demo --layer classifier.1

Runs (a layer's activations over a probe set) are found in the cache with :func:`find_run`,
which the dashboard and the workspace builder use too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from ..catalog import RunNotFoundError, find_run, resolve_probe_set_id, runs_for  # noqa: F401  (re-exported)
from ..backends.pool import BackendChoice, BackendPool, build_context
from ..store import RunInfo, Store
from ..errors import NeurovizError


# -- parsing helpers ----------------------------------------------------------------------------
def parse_neurons(text: str | None) -> list[int] | None:
    """'0,1,5' or '0-15,40' -> a sorted list; None means all neurons."""
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"'{part}' is not a neuron number or range (write e.g. 0,1,5 or 0-15).") from None
    return sorted(out)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def configs_for(method_names: Sequence[str], params: Sequence[str]) -> dict[str, object]:
    """Each method's config with the KEY=VALUE overrides that apply to it (unknown keys are errors)."""
    from .base import get_method

    pairs = {}
    for item in params:
        if "=" not in item:
            raise ValueError(f"--param takes KEY=VALUE, got '{item}'.")
        key, value = item.split("=", 1)
        pairs[key.strip()] = _parse_value(value.strip())
    used: set[str] = set()
    configs = {}
    for name in method_names:
        method = get_method(name)
        cls = method.config_class
        if not dataclasses.is_dataclass(cls):
            configs[name] = method.default_config()
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in pairs.items() if k in fields}
        used.update(mine)
        configs[name] = cls(**mine)
    unknown = set(pairs) - used
    if unknown:
        options = sorted({f.name for n in method_names if dataclasses.is_dataclass(get_method(n).config_class)
                          for f in dataclasses.fields(get_method(n).config_class)})
        raise ValueError(f"No chosen method has the parameter(s) {', '.join(sorted(unknown))}. Parameters: {', '.join(options)}.")
    return configs


# -- subcommands ---------------------------------------------------------------------------------
def cmd_label(args) -> int:
    from ..cli import _store
    from . import get_method, list_methods
    from .clip_dissect import reuse_probabilities

    store = _store(args)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        try:
            get_method(name)
        except KeyError:
            raise ValueError(f"Unknown method '{name}'. Methods: {', '.join(m.name for m in list_methods())}.") from None
    params = list(args.param)
    if args.similarity:
        if "clip_dissect" not in names:
            raise ValueError("--similarity applies to clip_dissect; add it to --methods.")
        params.append(f"similarity={args.similarity}")
    if args.segmentation_set:
        params.append(f"segmentation_set={json.dumps(str(Path(args.segmentation_set).expanduser().resolve()))}")
    configs = configs_for(names, params)
    layers = [l.strip() for l in args.layers.split(",") if l.strip()] if args.layers else None
    runs = runs_for(store, args.model, args.probe, layers, args.pooling)
    neurons = parse_neurons(args.neurons)
    pool = BackendPool(store, BackendChoice(args.multimodal, args.concepts, args.captioner, args.language_model))
    keys = []
    with reuse_probabilities():  # layers over the same probe set share CLIP-Dissect's p(c|x)
        _label_runs(args, store, runs, names, configs, neurons, pool, keys)
    args._result = {"label_keys": keys}
    return 0


def _label_runs(args, store: Store, runs: list[RunInfo], names: list[str], configs: dict, neurons, pool: BackendPool,
                keys: list[str]) -> None:
    from ..progress import TqdmProgress, chain
    from . import get_method, run_method

    for run in runs:
        for name in names:
            method = get_method(name)
            bar = TqdmProgress(f"{name} {run.layer}", "step")  # as cli.progress_for, but closable; steps: neurons, images or texts
            ctx = build_context(store, run, method.needs, pool, chain(bar, getattr(args, "_job_reporter", None)))
            wanted = neurons
            if wanted is None and method.per_neuron:
                raise ValueError(f"{method.title} is slow and runs on chosen neurons: add --neurons (e.g. 0-9).")
            try:
                key = run_method(name, ctx, configs[name], wanted)
            finally:
                bar.close()  # before any error message, so it is not glued to the bar
            keys.append(key)
            top = store.labels(run.run_key, method=name, top_only=True)
            top = top[top["label_key"] == key]
            if wanted is not None:
                top = top[top["neuron"].isin(wanted)]
            print(f"{run.layer}: {method.title} labelled {len(top)} neurons (label key {key})")
            for row in top.head(args.preview).itertuples():
                cal = "" if row.calibrated is None or row.calibrated != row.calibrated else f"  calibrated {row.calibrated:.2f}"
                print(f"  neuron {row.neuron:5d}  {row.label:30s}  score {row.score:.4g}{cal}")


def format_label_table(df, all_ranks: bool = False) -> str:
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


def cmd_labels(args) -> int:
    from ..cli import _store

    store = _store(args)
    run = find_run(store, args.model, args.probe, args.layer, args.pooling)
    df = store.labels(run.run_key, method=args.method)
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
    print(f"# {run.model_spec}  {run.layer}  ({run.n_neurons} neurons, run {run.run_key})")
    print(format_label_table(shown, all_ranks=True))
    if n_neurons > args.limit:
        print(f"... {n_neurons - args.limit} more neurons (use --limit or --neurons)")
    return 0


def cmd_export(args) -> int:
    from ..cli import _store
    from ..labels_io import export_labels

    store = _store(args)
    layers = [l.strip() for l in args.layers.split(",") if l.strip()] if args.layers else None
    runs = runs_for(store, args.model, args.probe, layers, args.pooling)
    if not layers:  # every layer that has labels by this method
        runs = [r for r in runs if (store.label_runs(r.run_key)["method"] == args.method).any()]
        if not runs:
            raise ValueError(f"No layer of {args.model} has labels by '{args.method}' yet.")
    path = export_labels(store, runs, args.method, args.out, args.format, args.label_key)
    print(f"wrote {path} ({', '.join(r.layer for r in runs)})")
    args._result = {"path": str(path)}
    return 0


def cmd_import(args) -> int:
    from ..cli import _store
    from ..labels_io import import_labels

    store = _store(args)
    run = find_run(store, args.model, args.probe, args.layer, args.pooling)
    keys = import_labels(store, args.file, run, args.format, args.method)
    for key in keys:
        meta = store.label_runs(run.run_key)
        meta = meta[meta["label_key"] == key].iloc[-1]
        print(f"imported {meta['n_neurons']} neurons as method '{meta['method']}' into {run.layer} (label key {key})")
    args._result = {"label_keys": keys}
    return 0


def register_cli(subparsers) -> None:
    """Add the label, labels, export and import subcommands."""
    from ..labels_io import FORMATS
    from .clip_dissect import SIMILARITY_FUNCTIONS

    def run_args(p, layers_flag: str = "--layers") -> None:
        p.add_argument("model", help="model spec, e.g. offline:mobilenet_v2")
        p.add_argument("--probe", default="demo", help="'demo', an image folder, an image list or a probe-set id")
        if layers_flag == "--layers":
            p.add_argument("--layers", help="comma-separated layer names (default: every extracted layer)")
        else:
            p.add_argument("--layer", required=True, help="layer name")
        p.add_argument("--pooling", help="only runs with this pooling (mean, max, cls, ...)")

    p = subparsers.add_parser("label", help="describe neurons with methods (CLIP-Dissect, ...); cached")
    run_args(p)
    p.add_argument("--methods", default="clip_dissect", help="comma-separated: clip_dissect, milan, dnd, netdissect")
    p.add_argument("--concepts", default="words20k", help="imagenet, words20k, demo_labels or a text file (one concept per line)")
    p.add_argument("--multimodal", help="multimodal backend (default: offline ConSE, not the probed network)")
    p.add_argument("--captioner", default="retrieval", help="captioner backend for methods that caption")
    p.add_argument("--language-model", default="gemma3-270m", help="language model for methods that need one")
    p.add_argument("--neurons", help="only these neurons, e.g. 0,1,5 or 0-15 (default: all)")
    p.add_argument("--similarity", choices=SIMILARITY_FUNCTIONS, help="CLIP-Dissect similarity function (default soft_wpmi)")
    p.add_argument("--segmentation-set", help="folder with images/ and masks/ for netdissect")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="override a method hyperparameter (repeatable)")
    p.add_argument("--preview", type=int, default=8, help="labels printed per layer")
    p.set_defaults(func=cmd_label)

    p = subparsers.add_parser("labels", help="print a layer's labels as a table")
    run_args(p, "--layer")
    p.add_argument("--method", help="only this method")
    p.add_argument("--neurons", help="only these neurons, e.g. 0-15")
    p.add_argument("--all-ranks", action="store_true", help="also the candidate labels (ranks 1..)")
    p.add_argument("--limit", type=int, default=50, help="neurons shown")
    p.set_defaults(func=cmd_labels)

    p = subparsers.add_parser("export", help="write labels as CLIP-Dissect CSV, DnD CSV or provenance JSON")
    run_args(p)
    p.add_argument("--method", default="clip_dissect")
    p.add_argument("--format", choices=FORMATS, help="default: from the file name (.json -> json, else clip_dissect)")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--label-key", help="a specific label run (default: the newest of the method)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("import", help="store labels from a CLIP-Dissect/DnD CSV or a neuroviz JSON export")
    p.add_argument("file")
    run_args(p, "--layer")
    p.add_argument("--format", choices=FORMATS, help="default: guessed from the file")
    p.add_argument("--method", help="method name to store them under (default: imported:<file stem>, or the JSON's)")
    p.set_defaults(func=cmd_import)
