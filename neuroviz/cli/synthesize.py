"""``python -m neuroviz synthesize MODEL --neuron N``: sample images that drive a neuron to
chosen levels (inverse sets, neuroviz.synthesis) and write them as a PNG grid.

The parser names no value from neuroviz.synthesis, which loads torch: hyperparameter flags
default to None (the SynthesisConfig default), and a wrong --start is refused by the plan.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._common import (
    CommandLineError,
    non_negative_float,
    non_negative_int,
    output_file,
    output_path,
    positive_float,
    positive_int,
    progress_for,
    store_from,
)
from .extract import POOLING_CHOICES

if TYPE_CHECKING:
    from ..models import ProbedModel
    from ..store import RunInfo, Store
    from ..synthesis import NeuronTarget, SynthesisRequest

# The SynthesisConfig fields the command line sets; the others keep their defaults.
CONFIG_FLAGS = ("steps", "lr", "image_size", "tolerance", "diversity_weight", "tv_weight")


def parse_also(text: str) -> NeuronTarget:
    """'LAYER:NEURON:LEVELS' (e.g. 'features.14:3:0,0,0.5,1') -> NeuronTarget."""
    from ..synthesis import NeuronTarget, parse_levels

    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        raise CommandLineError(f"--and takes LAYER:NEURON:LEVELS, e.g. features.14:3:0.1 (got '{text}').")
    layer, neuron, levels = parts
    try:
        index = int(neuron)
    except ValueError:
        raise CommandLineError(f"The neuron in '--and {text}' must be an integer.") from None
    return NeuronTarget(layer, index, parse_levels(levels))


def request_from_args(args: argparse.Namespace) -> SynthesisRequest:
    """The SynthesisRequest that a `synthesize` command line describes."""
    from ..synthesis import NeuronTarget, SynthesisConfig, SynthesisRequest, parse_levels

    also = [parse_also(text) for text in (args.also or [])]
    if args.neuron2 is not None:
        also.insert(0, NeuronTarget(args.layer2 or args.layer, args.neuron2, parse_levels(args.levels2)))
    config = SynthesisConfig(**{name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None})
    return SynthesisRequest(layer=args.layer, neuron=args.neuron, levels=parse_levels(args.levels), also=tuple(also),
                            absolute=args.absolute, n_samples=args.samples, start=args.start, seed=args.seed, config=config)


def find_or_extract_run(args: argparse.Namespace, store: Store, model: ProbedModel, layers: Sequence[str]) -> RunInfo:
    """The run whose statistics scale the levels: --run-key's; else the newest extraction of the
    first layer with this model's weights and pooling (whatever its top-k: only its statistics
    are needed) when every other layer has one too; else a new extraction of the layers."""
    from .. import extract
    from ..catalog import RunNotFoundError, get_run, latest_runs, probe_set_for, sibling_run

    if args.run_key:
        return get_run(store, args.run_key)
    probe_set = probe_set_for(store, args.probe)
    pooling = extract.resolve_pooling(model.layer(layers[0]), args.pooling)
    base = latest_runs(store, model.spec, probe_set.id, pooling, model.weights_id).get(layers[0])
    if base is not None:
        try:
            for layer in layers[1:]:
                sibling_run(store, base, layer)
            return base
        except RunNotFoundError:
            pass  # another target's layer is missing: the extraction below adds it and reuses the rest
    return extract.extract(model, probe_set, list(dict.fromkeys(layers)), store, pooling=args.pooling, k=args.k)[0]


def cmd_synthesize(args: argparse.Namespace) -> int:
    """Sample the inverse set (cached by provenance), write the PNG grid and print each level's errors."""
    from .. import models
    from ..catalog import get_run
    from ..files import atomic_open
    from ..synthesis import plan_synthesis, probe_images_at_levels, render_grid, synthesize

    store = store_from(args)
    if args.run_key and not args.layer:
        args.layer = get_run(store, args.run_key).layer
    if not args.layer:
        raise CommandLineError("Name the layer with --layer (list them with `python -m neuroviz layers MODEL`).")
    request = request_from_args(args)
    model = models.create(args.model)
    for t in request.targets:
        model.layer(t.layer)  # unknown layers fail before any extraction
    run = find_or_extract_run(args, store, model, [t.layer for t in request.targets])
    plan_synthesis(model, request, store, run)  # a bad request fails here, before a progress bar is drawn
    result = synthesize(model, request, store, run, progress=progress_for(args, "synthesizing", "step"),
                        device=args.device, use_cache=not args.no_cache)
    probe_rows = probe_images_at_levels(store, result.plan, args.probe_columns) if args.probe_columns else None
    with output_file(args.out or store.synthesis_dir() / f"{result.key}.png") as out, atomic_open(out, "wb") as fh:
        render_grid(result, probe_rows, tile=min(request.config.image_size, 160)).save(fh, format="PNG")
    print(("(cached) " if result.from_cache else "") + result.summary())
    for li, name in enumerate(result.plan.level_names()):
        errs = ", ".join(f"{e:.1%}" for e in result.errors[li].max(axis=1))
        print(f"  level {name}: max error per sample [{errs}], diversity {result.diversity[li]:.3f}")
    print(f"grid: {out}")
    args._result = {"key": result.key, "png": str(out), "within": result.n_within, "total": int(result.within_tolerance.size),
                    "summary": result.summary()}
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synthesize`` command."""
    p = subparsers.add_parser("synthesize", help="sample images that drive a neuron to given levels (inverse sets)")
    p.add_argument("model", help="model spec, e.g. offline:mobilenet_v2")
    p.add_argument("--layer", help="layer of the neuron (default: the layer of --run-key)")
    p.add_argument("--neuron", type=non_negative_int, required=True)
    p.add_argument("--levels", default="0.25,0.5,0.75,1", help="comma-separated fractions of the observed max (or 25%%,...)")
    p.add_argument("--absolute", action="store_true", help="levels are activation values, not fractions of the max")
    p.add_argument("--neuron2", type=non_negative_int, help="a second neuron that must hit --levels2 at the same time (intersection)")
    p.add_argument("--layer2", help="layer of --neuron2 (default: --layer)")
    p.add_argument("--levels2", default="0", help="levels of --neuron2, one per level of --levels, or a single one")
    p.add_argument("--and", dest="also", action="append", metavar="LAYER:NEURON:LEVELS",
                   help="another neuron that must hit its levels at the same time (repeatable), e.g. features.14:3:0.1")
    p.add_argument("--samples", type=positive_int, default=4, help="samples per level")
    p.add_argument("--start", default="noise", help="start from noise or from the nearest probe images (noise, probe)")
    p.add_argument("--probe", default="demo", help="probe set giving the observed max: 'demo', a folder or a list")
    p.add_argument("--run-key", help="use this extraction run (and its probe set) instead of --probe")
    p.add_argument("--pooling", default="default", choices=POOLING_CHOICES)
    p.add_argument("--k", type=positive_int, default=50, help="top-k of the extraction, when one is needed")
    p.add_argument("--steps", type=positive_int, help="optimisation steps, at most (default: SynthesisConfig's)")
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--tolerance", type=positive_float)
    p.add_argument("--diversity-weight", type=non_negative_float)
    p.add_argument("--tv-weight", type=non_negative_float)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--probe-columns", type=non_negative_int, default=3, help="real probe images shown beside each level")
    p.add_argument("--out", type=output_path, help="PNG path of the grid (default: cache/synthesis/<key>.png)")
    p.add_argument("--no-cache", action="store_true", help="recompute even when the result is cached")
    p.set_defaults(func=cmd_synthesize)
