"""``python -m neuroviz edit MODEL``: ablate neurons (or an SAE's latents, ``--units``) and compare the
model's predictions before and after."""

from __future__ import annotations

import argparse

from ._common import CommandLineError, non_negative_int, open_model_and_probe_set, positive_int, progress_for


def cmd_edit(args: argparse.Namespace) -> int:
    """Build (or load) an edit, evaluate it on the probe set, optionally against random groups."""
    from .. import editing
    from ..audit import load_audit
    from ..units import NEURONS, load_dictionary

    store, model, probe_set = open_model_and_probe_set(args)
    units = load_dictionary(store, args.units).units_id if args.units and args.units != NEURONS else NEURONS
    if args.neurons or args.from_audit:
        if args.neurons:
            neurons = editing.parse_neuron_list(args.neurons)
        else:
            neurons = load_audit(store, args.from_audit).neurons_by_layer(units)
        edit = editing.make_edit(args.name or "cli-edit", model.spec, neurons, args.mode, store, probe_set.id,
                                 source={"audit": args.from_audit} if args.from_audit else None, units=units)
        if args.save:
            editing.save_edit(store, edit)
    elif args.name:
        edit = editing.load_edit(store, args.name)
    else:
        raise CommandLineError("Give --neurons, --from-audit or the --name of a saved edit.")
    cmp = editing.evaluate_edit(model, edit, probe_set, store, args.max_images, progress=progress_for(args, "predicting", "img"))
    for key, value in cmp.summary().items():
        print(f"{key:24s} {value}")
    for ch in cmp.changed[:20]:
        print(f"  {ch.image_id}  {ch.before_class} ({ch.before_confidence:.2f}) -> {ch.after_class} ({ch.after_confidence:.2f})")
    if args.random_groups > 0:
        controls = editing.evaluate_controls(model, edit, probe_set, store, args.random_groups, args.max_images,
                                             progress=progress_for(args, "random groups", "img"))
        print(f"\nthis edit vs {len(controls)} random groups of as many neurons per layer:")
        print(editing.control_table(cmp, controls).round(4).to_string(index=False))
    args._result = cmp.summary()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``edit`` command."""
    p = subparsers.add_parser("edit", help="ablate neurons and compare predictions before/after")
    p.add_argument("model")
    p.add_argument("--probe", default="demo")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--name", help="name of a saved edit to evaluate, or of the new edit to save")
    p.add_argument("--neurons", help="LAYER:N,N,...;LAYER:N (new edit)")
    p.add_argument("--from-audit", help="use the neurons of a saved audit")
    p.add_argument("--units", help="ablate units of a dictionary instead of neurons, e.g. sae:<key> "
                                   "(--neurons then names its layer and units: LAYER:U,U; python -m neuroviz units list)")
    p.add_argument("--mode", choices=["zero", "mean"], default="zero",
                   help="zero, or the probe-set mean (for units: their code set to its mean)")
    p.add_argument("--save", action="store_true")
    p.add_argument("--max-images", type=positive_int)
    p.add_argument("--random-groups", type=non_negative_int, default=0, metavar="N",
                   help="also ablate N random groups of as many neurons per layer (the control), and compare")
    p.set_defaults(func=cmd_edit)
