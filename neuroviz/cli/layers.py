"""``python -m neuroviz layers MODEL``: a model's hookable layers with their output shapes."""

from __future__ import annotations

import argparse


def cmd_layers(args: argparse.Namespace) -> int:
    """Print each layer's module type, shape, neuron count and default pooling; * marks suggested ones."""
    from .. import models

    model = models.create(args.model, image_size=args.image_size)
    print(f"# {model.description}; input {model.preprocessing.image_size}px; weights {model.weights_id}")
    suggested = set(model.suggested_layers())
    for layer in model.layers():
        if not args.all and layer.layout.kind == "vector" and layer.name.count(".") > 1:
            continue
        mark = "*" if layer.name in suggested else " "
        print(f"{mark} {layer.name:40s} {layer.module_type:22s} {layer.shape!s:20s} neurons={layer.n_neurons} "
              f"pooling={layer.default_pooling}")
    print("(* = suggested default layers)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``layers`` command."""
    p = subparsers.add_parser("layers", help="list a model's hookable layers with output shapes")
    p.add_argument("model", help="model spec, e.g. offline:mobilenet_v2 or torchvision:resnet50@random")
    p.add_argument("--image-size", type=int)
    p.add_argument("--all", action="store_true", help="also list small vector layers deep inside blocks")
    p.set_defaults(func=cmd_layers)
