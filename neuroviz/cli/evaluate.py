"""``python -m neuroviz evaluate MODEL --layer L``: compare description methods on one layer without people."""

from __future__ import annotations

import argparse

from ..evaluate import DEFAULT_BASELINES
from ._common import add_run_arguments, comma_list, non_negative_int, parse_neurons, store_from


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score every chosen label run and the baselines on held-out images; print the table and the warnings."""
    from ..backends.multimodal import create_multimodal, default_multimodal_for
    from ..catalog import find_run
    from ..evaluate import evaluate_layer, format_report
    from ..models import create

    store = store_from(args)
    run = find_run(store, args.model, args.probe, args.layer, args.pooling, units=args.units)
    score_run = (find_run(store, args.model, args.score_probe, args.layer, args.pooling, units=args.units)
                 if args.score_probe else None)
    class_names = None
    try:
        class_names = create(run.model_spec).class_names
    except Exception as exc:  # the model may be a hub model without weights here; metrics that need classes are skipped
        print(f"note: no class names ({type(exc).__name__}: {exc}); final-layer metrics skipped")
    multimodal = create_multimodal(args.multimodal or default_multimodal_for(run.model_spec))
    if args.fit:
        _label_fit_part(args, store, run)
    evaluation = evaluate_layer(store, run, multimodal, class_names, comma_list(args.methods), comma_list(args.baseline) or [],
                                args.split_seed, latest_only=not args.all_label_runs, common_neurons=args.common,
                                neurons=parse_neurons(args.neurons), label_runs=comma_list(args.label_runs),
                                score_run=score_run, n_boot=args.bootstrap, per_unit=not args.layer_intervals_only)
    print(f"# {run.model_spec}  {run.layer}  ({run.n_neurons} neurons); scored with {multimodal.description}")
    if class_names is not None and len(class_names) != run.n_neurons:
        print(f"(final-layer metrics apply to a layer of {len(class_names)} neurons, one per class)")
    print(format_report(evaluation))
    if not any(r.kind == "method" for r in evaluation.rows):
        print(f"\nNo method has labelled this layer yet: python -m neuroviz evaluate {args.model} --probe {args.probe} "
              f"--layer {args.layer} --fit clip_dissect  (labels the fit part, then scores on the held-out part)")
    if args.study:
        from ..trust.humans import format_humans_vs_metrics, humans_vs_metrics, save_humans_vs_metrics

        agreement = humans_vs_metrics(store, args.study, multimodal, args.split_seed, n_boot=args.bootstrap)
        save_humans_vs_metrics(store, args.study, agreement)  # the Study results page shows it
        print(f"\n## Humans against metrics (study {args.study}; scored on {agreement.images})\n")
        print(format_humans_vs_metrics(agreement))
    args._result = {"rows": [r.__dict__ for r in evaluation.rows], "neurons": evaluation.neurons}
    return 0


def _label_fit_part(args: argparse.Namespace, store, run) -> None:
    """Label the fit part of the probe set with ``--fit`` methods, so their labels never see a scoring image."""
    from ..backends.pool import BackendChoice, BackendPool, build_context
    from ..methods import get_method, run_method
    from ..methods.params import configs_for
    from ..trust.split import HeldOutSplit, fit_run

    names = comma_list(args.fit) or []
    configs = configs_for(names, args.param)
    fitted = fit_run(store, run, HeldOutSplit(args.split_seed))
    pool = BackendPool(store, BackendChoice(args.multimodal, args.concepts, "retrieval", "gemma3-270m"))
    for name in names:
        method = get_method(name)
        ctx = build_context(store, fitted, method.needs, pool, None)
        key = run_method(name, ctx, configs[name], parse_neurons(args.neurons))
        print(f"{method.title} labelled the fit part ({fitted.n_images} images; label key {key[:8]})")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command."""
    p = subparsers.add_parser("evaluate", help="score description methods on held-out images, beside baselines")
    add_run_arguments(p, one_layer=True)
    p.add_argument("--methods", help="comma-separated (default: every method with labels for the layer)")
    p.add_argument("--label-runs", help="comma-separated label-key prefixes (default: the newest run of each method)")
    p.add_argument("--neurons", help="only these neurons, e.g. 0,1,5 or 0-15 (default: all each run labelled)")
    p.add_argument("--multimodal", help="backend for simulation and text cosines (default: offline ConSE)")
    p.add_argument("--baseline", default=",".join(DEFAULT_BASELINES), help="constant label(s) for the baseline row(s)")
    p.add_argument("--split-seed", type=non_negative_int, default=0, help="seed of the content-hash fit/score split")
    p.add_argument("--score-probe", help="score on this second probe set (its run of the same layer) instead")
    p.add_argument("--fit", help="first label the fit part with these methods (comma-separated), e.g. clip_dissect")
    p.add_argument("--concepts", default="words20k", help="concept set for --fit methods")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a --fit method's hyperparameter (repeatable), e.g. source=label for linear_explanations")
    p.add_argument("--bootstrap", type=non_negative_int, default=200, help="image resamples for the 95%% intervals (0: none)")
    p.add_argument("--layer-intervals-only", action="store_true",
                   help="intervals for the layer means only (linearised bootstrap; much faster on wide layers)")
    p.add_argument("--study", help="also set this study's human win rates beside each method's held-out score")
    p.add_argument("--all-label-runs", action="store_true", help="every label run of a method, not only the newest")
    p.add_argument("--common", action="store_true",
                   help="only the neurons every chosen label run labelled (the list is printed)")
    p.set_defaults(func=cmd_evaluate)
