"""Typed requests for the background jobs the pages start: one dataclass per command.

A page fills a request from its widgets and hands it to the jobs UI, which runs
``python -m neuroviz <request.argv()>`` in its own process: exactly the command a person
would type, so whatever a page computes can be reproduced from a terminal. The flags live
here and nowhere else on the page side; tests/test_requests.py parses every request's argv
with the real command-line parser and checks it reads back the values the page meant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from .analysis import AnalysisConfig, AnalysisError, ImportanceConfig
from .synthesis import SynthesisConfig, SynthesisError, SynthesisRequest

# The synthesis hyperparameters the `synthesize` command exposes as flags.
SYNTHESIS_FLAGS = ("steps", "lr", "image_size", "tolerance", "diversity_weight", "tv_weight")


class JobRequest:
    """A command a page runs as a background job: its kind (the job list's label) and argv."""

    kind: ClassVar[str] = ""

    def argv(self) -> list[str]:
        """The arguments after ``python -m neuroviz``."""
        raise NotImplementedError


def _levels_arg(levels: Sequence[float]) -> str:
    return ",".join(repr(float(v)) for v in levels)  # repr round-trips, so the job computes the same key


@dataclass(frozen=True)
class ExtractRequest(JobRequest):
    """``extract``: record a model's activations over a probe set (empty layers: the suggested ones)."""

    kind: ClassVar[str] = "extract"
    model: str
    probe: str
    layers: tuple[str, ...] = ()
    pooling: str = "default"
    k: int = 50
    batch_size: int = 32
    engine: str = "inprocess"  # or "ray"
    shard_size: int | None = None
    address: str | None = None  # a Ray cluster: "auto" or HOST:PORT

    def argv(self) -> list[str]:
        argv = ["extract", self.model, "--probe", self.probe, "--pooling", self.pooling, "--k", str(int(self.k)),
                "--batch-size", str(int(self.batch_size))]
        if self.engine != "inprocess":
            argv += ["--engine", self.engine]
        if self.shard_size:
            argv += ["--shard-size", str(int(self.shard_size))]
        if self.address:
            argv += ["--address", self.address]
        return argv + (["--layers", ",".join(self.layers)] if self.layers else [])


@dataclass(frozen=True)
class LabelRequest(JobRequest):
    """``label``: describe the neurons of some layers with some methods (empty neurons: all)."""

    kind: ClassVar[str] = "label"
    model: str
    probe: str
    layers: tuple[str, ...]
    methods: tuple[str, ...]
    neurons: str = ""  # e.g. "0-15" or "3,5"
    concepts: str | None = None
    units: str = "neurons"  # or an SAE's / directions' units id (neuroviz.units)

    def argv(self) -> list[str]:
        argv = ["label", self.model, "--probe", self.probe, "--layers", ",".join(self.layers),
                "--methods", ",".join(self.methods)]
        if self.units != "neurons":
            argv += ["--units", self.units]
        if self.neurons.strip():
            argv += ["--neurons", self.neurons.strip().replace(" ", "")]
        if self.concepts:
            argv += ["--concepts", self.concepts]
        return argv


@dataclass(frozen=True)
class SynthesizeRequest(JobRequest):
    """``synthesize``: sample a neuron's inverse set; the job computes the same cache key as
    :func:`neuroviz.synthesis.plan_synthesis` does for ``request`` on ``run_key``."""

    kind: ClassVar[str] = "synthesize"
    request: SynthesisRequest
    model: str
    run_key: str

    def argv(self) -> list[str]:
        cfg, default = self.request.config, SynthesisConfig()
        hidden = {f.name for f in dataclasses.fields(cfg)} - set(SYNTHESIS_FLAGS)
        changed = sorted(name for name in hidden if getattr(cfg, name) != getattr(default, name))
        if changed:
            raise SynthesisError(f"The command line cannot set {', '.join(changed)}; "
                                 "call neuroviz.synthesis.synthesize directly.")
        r = self.request
        argv = ["synthesize", self.model, "--run-key", self.run_key, "--layer", r.layer, "--neuron", str(int(r.neuron)),
                "--levels", _levels_arg(r.levels), "--samples", str(r.n_samples), "--start", r.start,
                "--seed", str(r.seed), "--steps", str(cfg.steps), "--lr", repr(cfg.lr), "--image-size", str(cfg.image_size),
                "--tolerance", repr(cfg.tolerance), "--diversity-weight", repr(cfg.diversity_weight),
                "--tv-weight", repr(cfg.tv_weight)]
        if r.absolute:
            argv.append("--absolute")
        for t in r.also:
            argv += ["--and", f"{t.layer}:{int(t.neuron)}:{_levels_arg(t.levels)}"]
        return argv


@dataclass(frozen=True)
class AnalyzeRequest(JobRequest):
    """``analyze --importance``: ablate each category group of one method's labels; the job
    stores the table under :func:`neuroviz.analysis.importance_key` of the same settings."""

    kind: ClassVar[str] = "importance"
    model: str
    probe: str
    method: str
    config: AnalysisConfig = field(default_factory=AnalysisConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    layers: tuple[str, ...] = ()  # empty: every labelled layer
    units: str = "neurons"  # or a dictionary's units id: analyse its latents' labels (neuroviz.units)

    def argv(self) -> list[str]:
        c, imp = self.config, self.importance
        if c.min_calibrated is None:
            raise AnalysisError("The command line always applies a calibrated-score floor; give min_calibrated a value (0 for none).")
        argv = ["analyze", self.model, "--probe", self.probe, "--importance", self.method, "--mode", imp.mode,
                "--max-images", str(imp.max_images or 0), "--counting", c.counting, "--unlabelled", c.unlabelled,
                "--min-calibrated", repr(float(c.min_calibrated))]
        argv += ["--fallback"] if c.embedding_fallback else []
        argv += ["--no-random"] if not imp.random_baseline else []
        argv += ["--units", self.units] if self.units != "neurons" else []
        return argv + (["--layers", ",".join(self.layers)] if self.layers else [])


@dataclass(frozen=True)
class EditRequest(JobRequest):
    """``edit``: ablate neurons and compare predictions before and after (plus random groups);
    the job stores each comparison, read back with :func:`neuroviz.editing.stored_comparison`."""

    kind: ClassVar[str] = "edit"
    model: str
    probe: str  # a probe-set id (the run's), so the job evaluates on exactly the same images
    name: str
    neurons: tuple[tuple[str, tuple[int, ...]], ...]  # ((layer, (neuron, ...)), ...)
    mode: str = "zero"
    max_images: int | None = None
    random_groups: int = 0
    units: str = "neurons"  # or a dictionary's units id: the numbers are its latents (neuroviz.units)

    @classmethod
    def of(cls, model: str, probe: str, name: str, neurons: dict[str, Sequence[int]], mode: str = "zero",
           max_images: int | None = None, random_groups: int = 0, units: str = "neurons") -> EditRequest:
        """A request from the ``{layer: [neuron, ...]}`` mapping edits use."""
        frozen = tuple((layer, tuple(int(n) for n in ns)) for layer, ns in neurons.items() if ns)
        return cls(model, probe, name, frozen, mode, max_images or None, int(random_groups), units)

    def argv(self) -> list[str]:
        neurons = ";".join(f"{layer}:{','.join(str(n) for n in ns)}" for layer, ns in self.neurons)
        argv = ["edit", self.model, "--probe", self.probe, "--name", self.name, "--neurons", neurons, "--mode", self.mode]
        argv += ["--units", self.units] if self.units != "neurons" else []
        argv += ["--max-images", str(int(self.max_images))] if self.max_images else []
        return argv + (["--random-groups", str(int(self.random_groups))] if self.random_groups else [])


@dataclass(frozen=True)
class EvaluateRequest(JobRequest):
    """``evaluate``: score a layer's labels on held-out images (and keep the per-unit tables)."""

    kind: ClassVar[str] = "evaluate"
    model: str
    probe: str
    layer: str
    fit: tuple[str, ...] = field(default=())  # methods to label the fit part with first

    def argv(self) -> list[str]:
        argv = ["evaluate", self.model, "--probe", self.probe, "--layer", self.layer]
        return argv + (["--fit", ",".join(self.fit)] if self.fit else [])


@dataclass(frozen=True)
class SaeTrainRequest(JobRequest):
    """``sae train``: fit a sparse autoencoder to a layer and extract its latents (neuroviz.sae)."""

    kind: ClassVar[str] = "sae"
    model: str
    probe: str
    layer: str
    expansion: int = 4
    k: int = 32
    variant: str = "topk"
    epochs: int = 10

    def argv(self) -> list[str]:
        return ["sae", "train", self.model, "--probe", self.probe, "--layer", self.layer, "--expansion",
                str(int(self.expansion)), "--k", str(int(self.k)), "--variant", self.variant, "--epochs", str(int(self.epochs))]


@dataclass(frozen=True)
class DemoRequest(JobRequest):
    """``demo``: build the demo probe set, extract the demo model and label it."""

    kind: ClassVar[str] = "demo"

    def argv(self) -> list[str]:
        return ["demo"]


@dataclass(frozen=True)
class LayersRequest(JobRequest):
    """``layers``: list a model's hookable layers (the page shows the job's output; loading a
    model to list them takes seconds and torch, which pages never import)."""

    kind: ClassVar[str] = "layers"
    model: str

    def argv(self) -> list[str]:
        return ["layers", self.model]
