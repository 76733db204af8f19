"""``python -m neuroviz analyze MODEL``: the share of label categories per layer (MILAN's analysis),
optionally with each category group's importance by ablation; ``--units sae:<key>`` analyses an
SAE's latents (or user directions) instead of the layer's neurons."""

from __future__ import annotations

import argparse
import json

from ..analysis import COUNTING_MODES, AnalysisConfig, ImportanceConfig
from ._common import comma_list, non_negative_int, open_model_and_probe_set, positive_int, progress_for, unit_float


def analysis_config(args: argparse.Namespace) -> AnalysisConfig:
    """The AnalysisConfig the ``analyze`` flags describe."""
    return AnalysisConfig(counting=args.counting, unlabelled=args.unlabelled, min_calibrated=args.min_calibrated,
                          embedding_fallback=args.fallback)


def importance_config(args: argparse.Namespace) -> ImportanceConfig:
    """The ImportanceConfig of the ``analyze`` flags; --max-images 0 means every image."""
    return ImportanceConfig(mode=args.mode, max_images=args.max_images or None, random_baseline=not args.no_random)


def cmd_analyze(args: argparse.Namespace) -> int:
    """Print (or --json) the category shares, and the importance table with --importance."""
    from ..analysis import category_shares, group_importance

    store, model, probe_set = open_model_and_probe_set(args)
    config = analysis_config(args)
    order = [name for name, _ in model.module.named_modules()]
    shares = category_shares(store, model.spec, probe_set.id, config, layer_order=order, methods=comma_list(args.methods),
                             units=args.units)
    table = shares.pivot_table(index=["method", "layer_index", "layer"], columns="category", values="share").reset_index()
    result = {"shares": shares.to_dict("records")}
    importance = None
    if args.importance:
        importance = group_importance(model, store, probe_set, args.importance, config, importance_config(args),
                                      layers=comma_list(args.layers), progress=progress_for(args, "ablating", "img"),
                                      units=args.units)
        result["importance"] = importance.to_dict("records")
    if args.json:
        print(json.dumps(result, default=str, indent=2))
    else:
        print(table.round(3).to_string(index=False))
        if importance is not None:
            print(importance.round(4).to_string(index=False))
    args._result = {"n_rows": len(shares)}
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` command."""
    p = subparsers.add_parser("analyze", help="share of neuron label categories per layer (and their importance by ablation)")
    p.add_argument("model")
    p.add_argument("--probe", default="demo", help="'demo', an image folder, an image list or a probe-set id")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--methods", help="comma-separated method names (default: all)")
    p.add_argument("--units", help="analyse a dictionary's units instead of the neurons, e.g. sae:<key> "
                                   "(python -m neuroviz units list)")
    p.add_argument("--counting", choices=COUNTING_MODES, default="head")
    p.add_argument("--unlabelled", choices=["exclude", "uninterpretable"], default="exclude",
                   help="neurons a method did not label: left out (default) or counted as uninterpretable")
    p.add_argument("--min-calibrated", type=unit_float, default=AnalysisConfig.min_calibrated)
    p.add_argument("--fallback", action="store_true", help="classify unmatched labels by text embedding")
    p.add_argument("--importance", metavar="METHOD", help="also ablate each category group of this method's labels")
    p.add_argument("--layers", help="comma-separated layers for --importance (default: all labelled)")
    p.add_argument("--mode", choices=["zero", "mean"], default="zero", help="ablation for --importance")
    p.add_argument("--max-images", type=non_negative_int, default=ImportanceConfig.max_images, help="0 = every probe image")
    p.add_argument("--no-random", action="store_true", help="skip the equal-size random-group baseline")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_analyze)
