"""Record layer outputs by module name, and reduce them to one number per neuron.

Layers are found with ``model.get_submodule(name)`` and recorded with forward hooks: no
string is ever evaluated. A "neuron" is a channel of a conv map (B, C, H, W), a feature of
a token sequence (B, T, D) or of a vector (B, D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NeurovizError

POOLINGS = ("mean", "max", "cls", "tokens_mean")


class UnknownLayerError(NeurovizError, KeyError):
    """A layer name that the model does not have; the message suggests close names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def first_tensor(output: object) -> torch.Tensor:
    """Modules may return tuples or dicts; the first tensor is the layer's activation."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(output, dict):
        for item in output.values():
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"layer output of type {type(output).__name__} holds no tensor")


@dataclass(frozen=True)
class LayerLayout:
    """How to read one layer's output: which axis is the batch, and what kind it is."""

    kind: str  # "conv" (B,C,H,W), "tokens" (B,T,D), "vector" (B,D)
    batch_first: bool = True  # token layers of some CLIP towers are (T, B, D)
    has_cls: bool = True  # token sequences with a leading class token


def to_batch_first(out: torch.Tensor, layout: LayerLayout) -> torch.Tensor:
    if layout.kind == "tokens" and not layout.batch_first:
        return out.transpose(0, 1)
    return out


def default_pooling(layout: LayerLayout) -> str:
    return {"conv": "mean", "tokens": "cls" if layout.has_cls else "tokens_mean"}.get(layout.kind, "mean")


def pool(out: torch.Tensor, layout: LayerLayout, pooling: str) -> torch.Tensor:
    """Reduce a batch-first layer output to (B, neurons).

    conv maps: spatial "mean" (default) or "max"; tokens: "cls" (first token) or
    "tokens_mean" (mean over patch tokens); vectors pass through.
    """
    if layout.kind == "conv":
        if pooling == "max":
            return out.amax(dim=(2, 3))
        return out.mean(dim=(2, 3))
    if layout.kind == "tokens":
        if pooling == "cls" and layout.has_cls:
            return out[:, 0, :]
        patches = out[:, 1:, :] if layout.has_cls else out
        if pooling == "max":
            return patches.amax(dim=1)
        return patches.mean(dim=1)
    return out.reshape(out.shape[0], -1)


def spatial_map(out: torch.Tensor, layout: LayerLayout) -> torch.Tensor | None:
    """(B, neurons, h, w) activation maps, for crops, heatmaps and masks; None for vectors."""
    if layout.kind == "conv":
        return out
    if layout.kind == "tokens":
        patches = out[:, 1:, :] if layout.has_cls else out
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            return None
        return patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
    return None


def infer_layout(out: torch.Tensor, batch_size: int) -> LayerLayout:
    """Guess the layout of an output from a probe forward pass with a known batch size."""
    if out.dim() == 4:
        return LayerLayout("conv")
    if out.dim() == 3:
        batch_first = out.shape[0] == batch_size or out.shape[1] != batch_size
        tokens = out.shape[1] if batch_first else out.shape[0]
        # A square number of tokens means no class token (e.g. mean-pooled towers).
        has_cls = math.isqrt(tokens) ** 2 != tokens
        return LayerLayout("tokens", batch_first=batch_first, has_cls=has_cls)
    return LayerLayout("vector")


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that suggests the closest real names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        import difflib

        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownLayerError(
            f"Unknown layer '{name}'.{hint} List the layers with `python -m neuroviz layers MODEL`."
        ) from None


class LayerRecorder:
    """Context manager that keeps the output of each named layer from the last forward pass."""

    def __init__(self, model: nn.Module, layer_names: Sequence[str], detach: bool = True):
        self.model = model
        self.layer_names = list(layer_names)
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> LayerRecorder:
        for name in self.layer_names:
            module = resolve_layer(self.model, name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            tensor = first_tensor(output)
            self.outputs[name] = tensor.detach() if self.detach else tensor

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
