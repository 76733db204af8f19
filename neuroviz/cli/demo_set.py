"""``python -m neuroviz demo-set``: the demo probe set, from images that ship in packages."""

from __future__ import annotations

import argparse

from ._common import progress_for, store_from


def cmd_demo_set(args: argparse.Namespace) -> int:
    """Build (or reuse) the demo images under the cache's demo/ folder."""
    from ..demo_set import build_demo_set

    store = store_from(args)
    report = build_demo_set(store.demo_dir(), force=args.force, progress=progress_for(args, "demo set", "img"))
    print(f"demo set: {report.n_images} images in {report.root} by source {report.by_source}; skipped {report.skipped}")
    for warning in report.warnings:
        print("warning:", warning)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo-set`` command."""
    p = subparsers.add_parser("demo-set", help="build the demo probe set from images that ship in packages")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_demo_set)
