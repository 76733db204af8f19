"""``python -m neuroviz cache``: what the workspace's cache holds (tables, probe sets, runs, labels)."""

from __future__ import annotations

import argparse

from ._common import store_from


def cmd_cache(args: argparse.Namespace) -> int:
    """Print table sizes, then one line per probe set, run and label run."""
    store = store_from(args)
    print(f"cache: {store.root}")
    for table, n in store.summary().items():
        print(f"  {table:14s} {n}")
    for ps in store.probe_sets():
        print(f"probe set {ps['probe_set_id']} '{ps['name']}': {ps['n_images']} images, {ps['n_skipped']} skipped")
    for r in store.find_runs():
        print(f"run {r.run_key}  {r.model_spec}  {r.layer}  pooling={r.pooling}  {r.n_neurons} neurons x {r.n_images} images")
    for _, row in store.label_runs().iterrows():
        print(f"labels {row['label_key']}  {row['method']}  run {row['run_key']}  {row['n_neurons']} neurons")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cache`` command."""
    p = subparsers.add_parser("cache", help="show what the cache holds")
    p.set_defaults(func=cmd_cache)
