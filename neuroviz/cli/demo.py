"""``python -m neuroviz demo``: build the offline demo workspace (setup.sh runs it)."""

from __future__ import annotations

import argparse

from ..demo import DEMO_DND_LAYER, DEMO_DND_NEURONS
from ._common import non_negative_int, store_from


def cmd_demo(args: argparse.Namespace) -> int:
    """Build (or reuse) the demo in the cache and say, step by step, what it took."""
    from ..demo import DEMO_MODEL, build_demo_workspace, say

    report = build_demo_workspace(store_from(args), labels=not args.no_labels, dnd_neurons=args.dnd_neurons)
    for step, value in report.items():
        say(f"{step}: {value}")
    say(f"ready: `streamlit run app.py` opens {DEMO_MODEL} on the demo probe set")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    p = subparsers.add_parser("demo", help="build the offline demo workspace (demo set, MobileNetV2 activations, labels)")
    p.add_argument("--no-labels", action="store_true", help="only the images and activations")
    p.add_argument("--dnd-neurons", type=non_negative_int, default=DEMO_DND_NEURONS,
                   help=f"DnD labels for the first N neurons of {DEMO_DND_LAYER}")
    p.set_defaults(func=cmd_demo)
