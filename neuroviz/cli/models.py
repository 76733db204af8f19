"""``python -m neuroviz models``: the probed models the registry knows."""

from __future__ import annotations

import argparse

from ._common import positive_int


def cmd_models(args: argparse.Namespace) -> int:
    """Print the model specs of a source (or all), offline ones with their description."""
    from .. import models

    names = models.list_models(args.source, args.filter)
    for name in names[: args.limit]:
        extra = f"  - {models.OFFLINE_MODELS[name.split(':', 1)[1]]}" if name.startswith("offline:") else ""
        print(name + extra)
    if len(names) > args.limit:
        print(f"... and {len(names) - args.limit} more (use --filter or --limit)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command."""
    p = subparsers.add_parser("models", help="list probed models the registry knows")
    p.add_argument("--source", choices=["offline", "torchvision", "timm", "open_clip"])
    p.add_argument("--filter", help="substring to match")
    p.add_argument("--limit", type=positive_int, default=200)
    p.set_defaults(func=cmd_models)
