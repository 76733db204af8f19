"""``python -m neuroviz units``: add user directions as units, and list a workspace's dictionaries.

    python -m neuroviz units add offline:mobilenet_v2 --layer features.18 --directions cav.npy --names cav.txt
    python -m neuroviz units list
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import open_model_and_probe_set, progress_for, store_from


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
    a.add_argument("--top-k", type=int, default=50, help="top images kept per unit")
    a.add_argument("--image-size", type=int)
    a.set_defaults(func=cmd_units_add)
    ls = sub.add_parser("list", help="the SAEs and directions of this cache")
    ls.add_argument("--model", help="only this model")
    ls.set_defaults(func=cmd_units_list)
