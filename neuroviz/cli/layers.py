"""``python -m neuroviz layers MODEL``: the layers worth probing first; ``--all`` lists every
hookable module (a MobileNetV2 has over 200, most of them parts inside blocks)."""

from __future__ import annotations

import argparse

from ._common import positive_int


def cmd_layers(args: argparse.Namespace) -> int:
    """Print each layer's module type, shape, neuron count and default pooling: by default the
    suggested layers and the output layer, with --all every one (* marks the suggested)."""
    from .. import models

    model = models.create(args.model, image_size=args.image_size)
    print(f"# {model.description}; input {model.preprocessing.image_size}px; weights {model.weights_id}")
    every = model.layers()
    suggested = set(model.suggested_layers())
    shown = every if args.all else [layer for layer in every if layer.name in suggested or layer is every[-1]]
    for layer in shown:
        mark = "*" if layer.name in suggested else " "
        print(f"{mark} {layer.name:40s} {layer.module_type:22s} {layer.shape!s:20s} neurons={layer.n_neurons} "
              f"pooling={layer.default_pooling}")
    hidden = len(every) - len(shown)
    print("(* = suggested default layers" + (f"; {hidden} more with --all)" if hidden else ")"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``layers`` command."""
    p = subparsers.add_parser("layers", help="list a model's suggested layers (--all: every hookable one) with output shapes")
    p.add_argument("model", help="model spec, e.g. offline:mobilenet_v2 or torchvision:resnet50@random")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--all", action="store_true", help="every hookable module, also those inside blocks")
    p.set_defaults(func=cmd_layers)
