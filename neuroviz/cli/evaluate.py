"""``python -m neuroviz evaluate MODEL --layer L``: compare description methods on one layer without people."""

from __future__ import annotations

import argparse

from ..evaluate import DEFAULT_BASELINES
from ._common import add_run_arguments, comma_list, store_from


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Print final-layer accuracy and simulation correlation per method, beside the constant baselines."""
    from ..backends.multimodal import create_multimodal, default_multimodal_for
    from ..catalog import find_run
    from ..evaluate import evaluate_run, format_markdown
    from ..models import create

    store = store_from(args)
    run = find_run(store, args.model, args.probe, args.layer, args.pooling, units=args.units)
    class_names = None
    try:
        class_names = create(run.model_spec).class_names
    except Exception as exc:  # the model may be a hub model without weights here; metrics that need classes are skipped
        print(f"note: no class names ({type(exc).__name__}: {exc}); final-layer metrics skipped")
    multimodal = create_multimodal(args.multimodal or default_multimodal_for(run.model_spec))
    rows = evaluate_run(store, run, multimodal, class_names, comma_list(args.methods), comma_list(args.baseline) or [],
                        args.split_seed, latest_only=not args.all_label_runs, common_neurons=args.common)
    print(f"# {run.model_spec}  {run.layer}  ({run.n_neurons} neurons); simulation with {multimodal.description}")
    if class_names is not None and len(class_names) != run.n_neurons:
        print(f"(final-layer metrics apply to a layer of {len(class_names)} neurons, one per class)")
    print(format_markdown(rows))
    if not any(r.label_key for r in rows):
        print(f"\nNo method has labelled this layer yet: "
              f"python -m neuroviz label {args.model} --probe {args.probe} --layers {args.layer}")
    args._result = {"rows": [r.__dict__ for r in rows]}
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command."""
    p = subparsers.add_parser("evaluate", help="compare description methods on one layer (final-layer accuracy, simulation r)")
    add_run_arguments(p, one_layer=True)
    p.add_argument("--methods", help="comma-separated (default: every method with labels for the layer)")
    p.add_argument("--multimodal", help="backend for simulation and text cosines (default: offline ConSE)")
    p.add_argument("--baseline", default=",".join(DEFAULT_BASELINES), help="constant label(s) for the baseline row(s)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--all-label-runs", action="store_true", help="every label run of a method, not only the newest")
    p.add_argument("--common", action="store_true", help="score every row on only the neurons all methods labelled")
    p.set_defaults(func=cmd_evaluate)
