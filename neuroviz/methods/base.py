"""The common interface of description methods, the registry, and cached running.

A method turns one activation run (a layer of a model over a probe set) plus backends into
labels: ``LabelRow(neuron, rank, label, score, calibrated, extra)``. Its hyperparameters
live in one dataclass with the paper's defaults. The label key hashes the run, the method,
its hyperparameters, the backends' ids and the concept set, so no label is computed twice
and a changed input never serves a stale label.

Units that are never active on the probe set (every pooled activation exactly 0: an SAE's
dead latents, a ReLU channel that never fires) are not labelled: any label would describe
ties among zeros. :func:`dead_units` names them, :func:`run_method` skips them, and pages
show "dead (never active on this probe set)" in place of a label (:data:`DEAD_CAPTION`).

A method may also say how it looks at a neuron's activation maps (DnD's crops, MILAN's
exemplar masks): :meth:`DescriptionMethod.overlays` returns :class:`Overlay` objects, and
the neuron page offers every registered method's overlays, so a new method with an overlay
touches no page.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import NeurovizError
from ..progress import Progress
from ..provenance import provenance_key
from ..registry import Registry
from ..store import LabelRow, RunInfo, Store

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


class MethodError(NeurovizError, ValueError):
    """A method cannot label as asked: an unknown hyperparameter, a bad value, or a layer,
    neuron or input it cannot use. The message says what to change."""


@dataclass
class MethodContext:
    """Everything a method may use. Backends are optional; a method says which it needs."""

    store: Store
    run: RunInfo
    multimodal: Any = None  # backends.base.MultimodalBackend
    captioner: Any = None  # backends.base.Captioner
    language_model: Any = None  # backends.base.LanguageModel
    concepts: Any = None  # concepts.ConceptSet
    model: Any = None  # models.ProbedModel, created lazily by methods that re-run the network
    progress: Progress | None = None
    extra: dict = field(default_factory=dict)

    def probed_model(self):
        """The probed network of this run (created on first use, weights checked)."""
        from ..catalog import check_weights, probed_model_for

        if self.model is None:
            self.model = probed_model_for(self.store, self.run)
        check_weights(self.model, self.run)
        return self.model

    def backend_ids(self, needs: Sequence[str]) -> dict[str, str]:
        out = {}
        for kind in needs:
            backend = getattr(self, kind)
            if backend is None:
                raise ValueError(f"This method needs a {kind.replace('_', ' ')} backend.")
            out[kind] = backend.id
        return out

    def backend_descriptions(self, needs: Sequence[str]) -> str:
        return "; ".join(f"{k}: {getattr(self, k).description}" for k in needs if getattr(self, k) is not None)


class Overlay(ABC):
    """One way to draw a neuron's activation maps over its top images (the model's view).

    ``settings`` turns the neuron's maps (and its label's details from the overlay's method)
    into the few numbers the pictures depend on; they also key the cached pictures, so they
    must be JSON values. ``draw`` paints one image; ``caption`` says what the grid shows.
    An overlay that needs a quantile of the neuron's map cells over the whole probe set names
    it in ``map_quantile``; the page then adds ``extra["map_level"]`` from the run's sketch
    (:meth:`Store.mask_levels`) when the run has one.
    """

    key: str = ""  # unique over every method's overlays, e.g. "crops"
    title: str = ""  # the neuron page's name for it, e.g. "DnD crops"
    map_quantile: float | None = None  # e.g. MILAN's 0.99 mask level

    def settings(self, maps: np.ndarray, run: RunInfo, extra: dict) -> dict:
        """Per-neuron parameters from its top-k ``maps`` (k, h, w) and ``extra`` (the details of
        the method's answer for this neuron, {} when it has none)."""
        return {}

    @abstractmethod
    def draw(self, view: Image.Image, activation_map: np.ndarray, settings: dict) -> Image.Image:
        """``view`` (one top image as the model saw it) with this overlay of ``activation_map``."""

    def caption(self, settings: dict) -> str:
        """One line under the grid saying what the overlay shows."""
        return ""


class HeatmapOverlay(Overlay):
    """The map itself, blended over the image, on one colour scale for all the neuron's top
    images (0, or the lowest value, to the highest value of its top maps): every neuron has it."""

    key = "heatmap"
    title = "Heatmaps"

    def settings(self, maps: np.ndarray, run: RunInfo, extra: dict) -> dict:
        return {"range": [min(0.0, float(maps.min())), float(maps.max())]}

    def draw(self, view: Image.Image, activation_map: np.ndarray, settings: dict) -> Image.Image:
        from ..crops import heatmap_overlay

        low, high = settings["range"]
        return heatmap_overlay(view, activation_map, 0.5, (low, high))


class DescriptionMethod(ABC):
    """One description method. Subclasses set the class attributes and implement describe()."""

    name: str = ""  # registry key, e.g. "clip_dissect"
    title: str = ""  # shown in the UI, e.g. "CLIP-Dissect"
    reference: str = ""  # the paper
    needs: tuple[str, ...] = ()  # backend kinds: "multimodal", "captioner", "language_model", "concepts"
    config_class: type = object  # a dataclass with the paper's defaults
    per_neuron: bool = False  # slow methods (DnD) run on demand for chosen neurons
    code_version: str = "1"

    def default_config(self):
        return self.config_class()

    def label_key(self, ctx: MethodContext, config) -> str:
        concept_id = ctx.concepts.id if ("concepts" in self.needs and ctx.concepts is not None) else None
        return provenance_key({
            "run": ctx.run.run_key, "method": self.name, "code": self.code_version,
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else config,
            "backends": ctx.backend_ids([n for n in self.needs if n != "concepts"]), "concepts": concept_id,
        })

    @abstractmethod
    def describe(self, ctx: MethodContext, config, neurons: Sequence[int]) -> list[LabelRow]:
        """Labels for ``neurons`` (rank 0 = the method's answer, then candidates)."""

    def overlays(self) -> list[Overlay]:
        """How this method draws a neuron's maps on its top images (none unless it says)."""
        return []


METHODS: Registry[DescriptionMethod] = Registry("description method")
DEAD_CAPTION = "dead (never active on this probe set)"


def dead_units(store: Store, run: RunInfo) -> list[int]:
    """The run's neurons (or units) whose activation is 0 on every probe image (min = max = 0
    in the run's stats): the dead latents of an SAE. Labelling skips them."""
    stats = store.neuron_stats(run.run_key)
    if not len(stats):
        return []
    return sorted(int(n) for n in stats.loc[(stats["max"] == 0) & (stats["min"] == 0), "neuron"])


def register_method(cls: type[DescriptionMethod]) -> type[DescriptionMethod]:
    """Class decorator: make a method available by its ``name`` (its title describes it in listings)."""
    METHODS.add(cls.name, cls, description=cls.title)
    return cls


def get_method(name: str) -> DescriptionMethod:
    """The method registered as ``name``; an unknown name raises UnknownNameError with close names."""
    return METHODS.create(name)


def list_methods() -> list[DescriptionMethod]:
    """Every registered method, in registration order (import :mod:`neuroviz.methods` to register them all)."""
    return [entry.factory() for entry in METHODS]


def run_method(name: str, ctx: MethodContext, config=None, neurons: Sequence[int] | None = None) -> str:
    """Label ``neurons`` (default: all) with a method, computing only what is not cached.
    Dead units (:func:`dead_units`) are skipped: they get no label.

    Returns the label key; read the labels with ``ctx.store.labels(run_key, method=name)``.
    """
    method = get_method(name)
    config = config if config is not None else method.default_config()
    key = method.label_key(ctx, config)
    wanted = list(range(ctx.run.n_neurons)) if neurons is None else sorted(set(int(n) for n in neurons))
    for n in wanted:
        if not 0 <= n < ctx.run.n_neurons:
            raise MethodError(f"Neuron {n} does not exist: layer {ctx.run.layer} has neurons 0..{ctx.run.n_neurons - 1}.")
    have = set(ctx.store.labelled_neurons(key)) | set(dead_units(ctx.store, ctx.run))
    todo = [n for n in wanted if n not in have]
    if todo:
        rows = method.describe(ctx, config, todo)
        hyper = dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else dict(config)
        backends = ctx.backend_ids([n for n in method.needs if n != "concepts"])
        ctx.store.save_labels(
            key, ctx.run.run_key, method.name, backends, hyper,
            ctx.concepts.id if ctx.concepts is not None and "concepts" in method.needs else None,
            rows, ctx.backend_descriptions([n for n in method.needs if n != "concepts"]) or "none",
            replace_neurons=True,
        )
    return key
