"""``python -m neuroviz units``: add user directions as units, and list a workspace's dictionaries.

    python -m neuroviz units add offline:mobilenet_v2 --layer features.18 --directions cav.npy --names cav.txt
    python -m neuroviz units list
    python -m neuroviz units ablate offline:mobilenet_v2 --units sae:1a2b3c4d --unit 12 --max-images 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import non_negative_int, open_model_and_probe_set, positive_int, progress_for, store_from


def cmd_units_add(args: argparse.Namespace) -> int:
    """Store the directions as a dictionary and extract their unit run."""
    from ..sae import extract_units
    from ..units import UnitsError, directions_dictionary, read_names, read_vectors, save_dictionary, short_units

    store, model, probe_set = open_model_and_probe_set(args)
    info = model.layer(args.layer)
    vectors = read_vectors(args.directions)
    if vectors.shape[1] != info.n_neurons:
        raise UnitsError(f"{args.directions} holds vectors of size {vectors.shape[1]}; layer '{args.layer}' has "
                         f"{info.n_neurons} neurons.")
    dictionary = directions_dictionary(vectors, model.spec, model.weights_id, args.layer, read_names(args.names),
                                       Path(args.directions).name)
    save_dictionary(store, dictionary)
    run = extract_units(store, model, probe_set, dictionary, k=args.top_k, progress=progress_for(args, "directions"))
    print(f"{dictionary.title}: units {short_units(dictionary.units_id)}, run {run.run_key} "
          f"({run.n_neurons} units x {run.n_images} images)")
    args._result = {"dictionary": dictionary.key, "units": dictionary.units_id, "run": run.run_key}
    return 0


def cmd_units_list(args: argparse.Namespace) -> int:
    """Every dictionary of the workspace, with its title, layer and unit runs."""
    from ..units import NEURONS, list_dictionaries, load_dictionary, short_units

    store = store_from(args)
    metas = list_dictionaries(store, args.model)
    if not metas:
        print("No SAEs or directions in this cache; train one with `python -m neuroviz sae train`.")
    runs = [r for r in store.find_runs() if r.units != NEURONS]
    for meta in metas:
        d = load_dictionary(store, meta["key"])
        keys = [r.run_key for r in runs if r.units == d.units_id]
        print(f"{short_units(d.units_id):22s} {meta.get('model_spec')} {meta.get('layer')}: {d.title}  "
              f"runs {', '.join(keys) or 'none'}")
    args._result = {"dictionaries": [m["key"] for m in metas]}
    return 0


def cmd_units_ablate(args: argparse.Namespace) -> int:
    """Ablate units of a dictionary (their decoded contribution) and compare predictions."""
    from ..catalog import probe_set_for
    from ..editing import evaluate_unit_ablation
    from ..models import create
    from ..units import load_dictionary
    from ._common import parse_neurons

    store = store_from(args)
    dictionary = load_dictionary(store, args.units)
    model = create(dictionary.meta.get("model_spec", args.model), image_size=args.image_size)
    units = parse_neurons(args.unit) or []
    cmp = evaluate_unit_ablation(model, dictionary, units, probe_set_for(store, args.probe), store,
                                 max_images=args.max_images or None, progress=progress_for(args, "predictions"))
    print(f"ablated {dictionary.title} units {args.unit} at {dictionary.meta['layer']} over {cmp.n_images} images: "
          f"top-1 unchanged {cmp.agreement:.1%}, mean confidence {cmp.mean_confidence_before:.3f} -> "
          f"{cmp.mean_confidence_after:.3f}, {len(cmp.changed)} images changed class")
    args._result = cmp.summary()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``units`` command (``units add``, ``units list``)."""
    p = subparsers.add_parser("units", help="units beyond neurons: add user directions, list SAEs and directions")
    sub = p.add_subparsers(dest="units_command", metavar="SUBCOMMAND")
    sub.required = True
    a = sub.add_parser("add", help="add directions (.npy/.npz/.pt, one vector per unit) as units of a layer")
    a.add_argument("model", help="model spec, e.g. offline:mobilenet_v2")
    a.add_argument("--layer", required=True)
    a.add_argument("--directions", required=True, help=".npy, .npz or .pt file: units x neurons")
    a.add_argument("--names", help="text file, one unit name per line")
    a.add_argument("--probe", default="demo")
    a.add_argument("--top-k", type=positive_int, default=50, help="top images kept per unit")
    a.add_argument("--image-size", type=positive_int)
    a.set_defaults(func=cmd_units_add)
    ab = sub.add_parser("ablate", help="remove units' decoded contribution at their layer; predictions before/after")
    ab.add_argument("model", help="model spec (the dictionary's own is used when it records one)")
    ab.add_argument("--units", required=True, help="the dictionary, e.g. sae:<key> (python -m neuroviz units list)")
    ab.add_argument("--unit", required=True, help="units to ablate, e.g. 12 or 3,5,40-45")
    ab.add_argument("--probe", default="demo")
    ab.add_argument("--max-images", type=non_negative_int, default=0, help="an evenly spaced subset (0: all)")
    ab.add_argument("--image-size", type=positive_int)
    ab.set_defaults(func=cmd_units_ablate)
    ls = sub.add_parser("list", help="the SAEs and directions of this cache")
    ls.add_argument("--model", help="only this model")
    ls.set_defaults(func=cmd_units_list)
