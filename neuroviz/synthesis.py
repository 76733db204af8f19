"""Inverse sets: sample many images that drive a neuron to a chosen level, by optimisation.

Hada & Carreira-Perpinan ("Sampling the 'inverse set' of a neuron: an approach to
understanding neural nets", arXiv:1910.04857, 2019) characterise a neuron by the region of
input space where its activation equals a level t, not only by the images that maximise it.
They draw many diverse points of that set by optimisation (the constraint
``a_n(x) = t`` as a penalty, a diversity term between the samples, images kept natural by an
image generator), which they find far faster than MCMC, with control over the level.

This module follows that recipe: the squared error ``((a_n(x) - t) / max)^2`` is a quadratic
penalty whose weight grows during the run (penalty continuation), and samples still off
target get an extra push once the random transforms stop; a sample stuck where the neuron
has no gradient (a ReLU silent everywhere) is re-drawn from noise. A natural-image
generator cannot be loaded offline, so naturalness comes from the feature-visualisation
toolkit of Olah et al. ("Feature Visualization", Distill 2017; Lucid): a Fourier image
parameterisation with 1/f scaling and decorrelated colour, random jitter/scale/rotation
while optimising, and total variation.
Diversity during optimisation is Lucid's: the cosine similarity between the samples' Gram
matrices at the target layer. Diversity is *reported* in another space, the input of the
probed model's last linear layer (pooled penultimate features of a CNN classifier; the
model output where there is no such layer), as the mean pairwise cosine distance.

Levels are fractions of the neuron's observed maximum over the run's probe set (or
absolute values); every error is ``|a_n(x) - t|`` divided by that maximum, so one
tolerance (5 %) means the same for every neuron. Several neurons (of one or several layers)
can be constrained at once: the intersection of their inverse sets.

Results are cached in the store by provenance: images as ``arrays/synthesis/<key>.npy``
(uint8, levels x samples x H x W x 3) and the per-sample report as the record
``("synthesis", key)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalog import check_weights, sibling_run
from .errors import NeurovizError
from .progress import Progress
from .provenance import provenance_key
from .store import RunInfo, Store

if TYPE_CHECKING:  # torch is imported where the optimisation runs: pages plan and show results without it
    import torch
    from torch import nn

    from .hooks import LayerRecorder
    from .models import LayerInfo, ProbedModel

CODE_VERSION = "synthesis-1"
REFERENCE = (
    "Hada & Carreira-Perpinan, Sampling the 'inverse set' of a neuron, arXiv:1910.04857 (2019); "
    "parameterisation, transforms and diversity after Olah et al., Feature Visualization, Distill 2017"
)
RECORD_NAMESPACE = "synthesis"
ARRAY_KIND = "synthesis"
DEFAULT_LEVELS = (0.25, 0.5, 0.75, 1.0)
STARTS = ("noise", "probe")
DIVERSITY_SPACE = "cosine distance between samples in the probed model's penultimate features (input of its last linear layer)"

# Square root of the colour covariance of ImageNet images (Lucid's constant): optimising
# decorrelated colour channels keeps the colours of the samples natural.
_COLOUR_SQRT_COV = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))


@functools.cache
def _colour_matrix() -> torch.Tensor:
    import torch

    sqrt_cov = torch.tensor(_COLOUR_SQRT_COV)
    return sqrt_cov / sqrt_cov.norm(dim=0).max()


class SynthesisError(NeurovizError, ValueError):
    """A synthesis request that cannot be served; the message says why and what to try."""


# ----------------------------------------------------------------------------------------
# requests, hyperparameters and results


@dataclass(frozen=True)
class SynthesisConfig:
    """Hyperparameters. The Fourier, colour-decorrelated image with jitter, scale and rotation
    is Lucid's (Olah et al. 2017, Adam at lr 0.05 there); the growing penalty weight follows the
    penalty method of Hada & Carreira-Perpinan. lr, the growth factor and the weights
    were tuned here on MobileNetV2 at 128 px (layers features.4 to features.18): lr 0.05 and
    a 100x growth gave saturated, speckled samples; a 10x growth doubled their diversity."""

    steps: int = 192  # upper bound; the run stops early once every sample is within tolerance
    lr: float = 0.02
    image_size: int = 128
    tolerance: float = 0.05  # |a - t| / observed max
    level_weight: float = 1.0  # weight of ((a - t) / max)^2 at the first step ...
    level_weight_growth: float = 10.0  # ... multiplied by this factor, geometrically, by the last step
    miss_boost: float = 1.5  # after the transforms end, a sample's weight grows by this at every check it misses
    diversity_weight: float = 0.5  # mean Gram-matrix cosine similarity between the samples of one level
    tv_weight: float = 1.0  # total variation of the [0, 1] image
    decay_power: float = 1.0  # spectrum scaled by 1 / f^decay_power
    init_std: float = 0.01  # std of the initial spectrum (noise start)
    jitter: float = 0.06  # random translation, as a fraction of the image side
    scale_range: tuple[float, float] = (0.9, 1.1)
    rotate_degrees: float = 10.0
    transform_until: float = 0.7  # random transforms for this fraction of the steps, then the clean image is polished
    check_every: int = 8  # steps between checks of the clean images against the tolerance
    min_steps: int = 24  # no early stop before this, so naturalness and diversity act at least a little
    max_level_fraction: float = 4.0  # levels above this many times the observed max are refused


# The page's first pass: 2 samples per level at 96 px, at most 96 steps, about a seventh of
# the work of the full request (4 samples at 128 px, 192 steps), so a first answer comes
# within a minute on 2 busy cores; the full request is one click away ("refine").
FIRST_PASS_SAMPLES = 2
FIRST_PASS = SynthesisConfig(steps=96, image_size=96)


@dataclass(frozen=True)
class NeuronTarget:
    """One neuron and the levels it should reach (fractions of its observed max, or absolute)."""

    layer: str
    neuron: int
    levels: tuple[float, ...] = DEFAULT_LEVELS


@dataclass(frozen=True)
class SynthesisRequest:
    """What to synthesise: a neuron's levels, optionally ANDed with other neurons' levels.

    ``also`` holds further targets for the intersection of inverse sets; their level lists
    pair up with ``levels`` position by position (a single level applies to every row).
    """

    layer: str
    neuron: int
    levels: tuple[float, ...] = DEFAULT_LEVELS
    also: tuple[NeuronTarget, ...] = ()
    absolute: bool = False  # levels are activation values instead of fractions of the observed max
    n_samples: int = 4
    start: str = "noise"  # "noise" or "probe" (probe images nearest to each level)
    seed: int = 0
    config: SynthesisConfig = field(default_factory=SynthesisConfig)

    @property
    def targets(self) -> tuple[NeuronTarget, ...]:
        return (NeuronTarget(self.layer, int(self.neuron), tuple(float(v) for v in self.levels)),) + tuple(self.also)

    def with_config(self, **changes: Any) -> SynthesisRequest:
        """A copy with some hyperparameters changed (steps, lr, image_size, ...)."""
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))


def first_pass_request(layer: str, neuron: int, **changes: Any) -> SynthesisRequest:
    """The quick request the Synthesise page starts with (see :data:`FIRST_PASS`)."""
    return dataclasses.replace(SynthesisRequest(layer, int(neuron), n_samples=FIRST_PASS_SAMPLES, config=FIRST_PASS), **changes)


def refined_request(request: SynthesisRequest) -> SynthesisRequest:
    """The same request with at least the full default's samples, image size and steps: what
    "refine" asks for after a first pass (equal to ``request`` when it is already that large)."""
    cfg, full = request.config, SynthesisConfig()
    return dataclasses.replace(request, n_samples=max(request.n_samples, SynthesisRequest.n_samples),
                               config=dataclasses.replace(cfg, steps=max(cfg.steps, full.steps),
                                                          image_size=max(cfg.image_size, full.image_size)))


@dataclass(frozen=True)
class ResolvedTarget:
    """A target with its run, pooling, scale (observed max) and absolute level per row."""

    layer: str
    neuron: int
    run_key: str
    pooling: str
    observed_max: float
    observed_min: float
    scale: float
    levels: tuple[float, ...]  # absolute activation per level row
    fractions: tuple[float, ...]  # the same levels as fractions of the scale


@dataclass(frozen=True)
class SynthesisPlan:
    """A validated request: resolved targets and the provenance key of its result."""

    request: SynthesisRequest
    model_spec: str
    weights_id: str
    probe_set_id: str
    targets: tuple[ResolvedTarget, ...]
    key: str

    @property
    def n_levels(self) -> int:
        return len(self.targets[0].levels)

    def level_names(self) -> list[str]:
        """'75%' for a single neuron; '75% / 0%' for an intersection."""
        return [" / ".join(f"{t.fractions[i]:.0%}" for t in self.targets) for i in range(self.n_levels)]


@dataclass
class SynthesisResult:
    """Samples per level with how close each came to its target(s).

    Arrays are indexed [level, sample] then [target] (target 0 is the main neuron).
    ``errors`` are |achieved - target| / observed max; ``within_tolerance`` requires every
    target of a sample to be within the tolerance. ``diversity[level]`` is the mean pairwise
    cosine distance of that level's samples (see DIVERSITY_SPACE).
    """

    key: str
    plan: SynthesisPlan
    images: np.ndarray  # uint8 (levels, N, H, W, 3)
    achieved: np.ndarray  # (levels, N, targets)
    errors: np.ndarray  # (levels, N, targets)
    within_tolerance: np.ndarray  # bool (levels, N)
    diversity: np.ndarray  # (levels,)
    start_image_idx: np.ndarray | None  # (levels, N) probe-image rows used as starts, or None
    steps_run: int
    timings: dict[str, float | str]  # seconds per phase, and the device name
    restarts: np.ndarray | None = None  # (levels, N) times a stuck sample was re-drawn from noise
    diversity_space: str = DIVERSITY_SPACE
    from_cache: bool = False

    @property
    def tolerance(self) -> float:
        return self.plan.request.config.tolerance

    @property
    def n_within(self) -> int:
        return int(self.within_tolerance.sum())

    def summary(self) -> str:
        """One honest line: how many samples hit their targets, and which levels missed."""
        total = self.within_tolerance.size
        text = f"{self.n_within}/{total} samples within {self.tolerance:.0%} of their target"
        missed = [f"{name}: {int((~row).sum())} not reached" for name, row in zip(self.plan.level_names(), self.within_tolerance) if (~row).any()]
        return text + ("; " + ", ".join(missed) if missed else "") + f" ({self.steps_run} steps)"

    def sample_rows(self) -> list[dict]:
        """One dict per sample, for tables and the JSON record."""
        rows = []
        for li in range(self.images.shape[0]):
            for si in range(self.images.shape[1]):
                row: dict[str, Any] = {"level": li, "sample": si, "within_tolerance": bool(self.within_tolerance[li, si])}
                for ti, t in enumerate(self.plan.targets):
                    tag = "" if ti == 0 else f"_{ti}"
                    row[f"target{tag}"] = t.levels[li]
                    row[f"achieved{tag}"] = float(self.achieved[li, si, ti])
                    row[f"error{tag}"] = float(self.errors[li, si, ti])
                if self.start_image_idx is not None:
                    row["start_image_idx"] = int(self.start_image_idx[li, si])
                if self.restarts is not None:
                    row["restarts"] = int(self.restarts[li, si])
                rows.append(row)
        return rows


# ----------------------------------------------------------------------------------------
# planning: validate the request and resolve levels against the probe set's statistics


def _scale(observed_max: float, observed_min: float) -> float:
    """The neuron's observed max when positive, else its observed range, else 1."""
    if observed_max > 0:
        return observed_max
    if observed_max > observed_min:
        return observed_max - observed_min
    return 1.0


def plan_synthesis(model: ProbedModel | None, request: SynthesisRequest, store: Store, run: RunInfo) -> SynthesisPlan:
    """Validate a request against the model and the run's statistics; resolve absolute levels.

    Raises SynthesisError (a ValueError) for bad requests, UnknownLayerError for unknown
    layers, RunNotFoundError for a target layer not extracted with the run's weights and
    WeightsChangedError when ``model`` no longer loads the run's weights. Cheap, and ``model``
    may be None (layers are then checked against the extracted runs only): pages call it to
    show errors and find a cached result without loading the model.
    """
    cfg = request.config
    if request.n_samples < 1:
        raise SynthesisError(f"Number of samples must be at least 1 (got {request.n_samples}).")
    if request.start not in STARTS:
        raise SynthesisError(f"Start must be one of {', '.join(STARTS)} (got '{request.start}').")
    if cfg.steps < 1 or cfg.lr <= 0 or cfg.image_size < 16 or not 0 < cfg.tolerance < 1:
        raise SynthesisError("Need steps >= 1, lr > 0, image_size >= 16 and 0 < tolerance < 1.")
    if model is not None:
        if model.spec != run.model_spec:
            raise SynthesisError(f"Run {run.run_key} was extracted from {run.model_spec}, not from the given model "
                                 f"{model.spec}. Choose a run of this model.")
        check_weights(model, run)
    targets = request.targets
    n_levels = max(len(t.levels) for t in targets)
    if n_levels == 0 or any(len(t.levels) == 0 for t in targets):
        raise SynthesisError("Give at least one level, e.g. 0.25,0.5,0.75,1.")
    seen = set()
    resolved: list[ResolvedTarget] = []
    for t in targets:
        ceiling = None
        if model is not None:
            model.layer(t.layer)  # UnknownLayerError with suggestions
            ceiling = activation_ceiling(model.module.get_submodule(t.layer))
        trun = sibling_run(store, run, t.layer)  # its observed range scales the levels
        if not 0 <= t.neuron < trun.n_neurons:
            raise SynthesisError(f"Layer {t.layer} has neurons 0..{trun.n_neurons - 1}; there is no neuron {t.neuron}.")
        if (t.layer, t.neuron) in seen:
            raise SynthesisError(f"Neuron {t.neuron} of {t.layer} is named twice; give each neuron once.")
        seen.add((t.layer, t.neuron))
        if len(t.levels) not in (1, n_levels):
            raise SynthesisError(
                f"Neuron {t.neuron} of {t.layer} has {len(t.levels)} levels but the others have {n_levels}; "
                "give the same number of levels for every neuron (or a single level that applies to all)."
            )
        stats = store.neuron_stats(trun.run_key)
        row = stats[stats["neuron"] == t.neuron]
        if row.empty:
            raise SynthesisError(f"Run {trun.run_key} has no statistics for neuron {t.neuron} of {t.layer}.")
        obs_max, obs_min = float(row["max"].iloc[0]), float(row["min"].iloc[0])
        scale = _scale(obs_max, obs_min)
        levels = tuple(float(v) for v in t.levels) * (n_levels if len(t.levels) == 1 else 1)
        if not request.absolute and obs_max <= 0:
            raise SynthesisError(
                f"Neuron {t.neuron} of {t.layer} never has a positive activation on the probe set (max {obs_max:.4g}), "
                f"so fractions of its max mean nothing. Give absolute levels between {obs_min:.4g} and {obs_max:.4g}."
            )
        absolute = levels if request.absolute else tuple(v * obs_max for v in levels)
        _check_reachable(t, absolute, obs_max, obs_min, scale, cfg.max_level_fraction, ceiling)
        resolved.append(ResolvedTarget(t.layer, t.neuron, trun.run_key, trun.pooling, obs_max, obs_min, scale,
                                       absolute, tuple(v / scale for v in absolute)))
    key = provenance_key({
        "model": run.model_spec, "weights": run.weights_id, "probe_set": run.probe_set_id,
        "targets": [(r.layer, r.neuron, r.run_key, r.pooling, r.levels) for r in resolved],
        "n_samples": request.n_samples, "start": request.start, "seed": request.seed,
        "config": request.config, "code": CODE_VERSION,
    })
    return SynthesisPlan(request, run.model_spec, run.weights_id, run.probe_set_id, tuple(resolved), key)


def activation_ceiling(layer: nn.Module) -> float | None:
    """The largest value a layer can output when it ends in a bounded activation (ReLU6 in
    MobileNets, Hardtanh, sigmoid, tanh), else None: levels above it can never be reached."""
    from torch import nn

    leaves = [m for m in layer.modules() if not list(m.children())]
    last = leaves[-1] if leaves else layer
    if isinstance(last, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return float(last.max_val)
    if isinstance(last, (nn.Sigmoid, nn.Tanh, nn.Softmax)):
        return 1.0
    return None


def _check_reachable(t: NeuronTarget, levels: Sequence[float], obs_max: float, obs_min: float, scale: float,
                     max_fraction: float, ceiling: float | None = None) -> None:
    for level in levels:
        if ceiling is not None and level > ceiling:
            top = ceiling / scale
            raise SynthesisError(
                f"Level {level:.4g} for neuron {t.neuron} of {t.layer} is above {ceiling:g}, the most this layer can "
                f"output (it ends in a bounded activation); that is {top:.2f}x the observed max. "
                f"Choose levels up to {math.floor(top * 100) / 100:g}."
            )
        if level > max(obs_max, 0.0) + (max_fraction - 1.0) * scale:
            raise SynthesisError(
                f"Level {level:.4g} for neuron {t.neuron} of {t.layer} is {level / scale:.1f}x its observed max "
                f"({obs_max:.4g}); synthesis is only trusted up to {max_fraction:g}x. Try levels such as "
                f"0.25,0.5,0.75,1 (fractions of the max), or at most {max_fraction:g}."
            )
        if obs_min >= 0 and level < 0:
            raise SynthesisError(
                f"Level {level:.4g} for neuron {t.neuron} of {t.layer} is negative, but this neuron never went below "
                f"{obs_min:.4g} on the probe set (likely after a ReLU). Use levels >= 0."
            )
        if obs_min < 0 and level < obs_min - (max_fraction - 1.0) * scale:
            raise SynthesisError(
                f"Level {level:.4g} for neuron {t.neuron} of {t.layer} is far below its observed min ({obs_min:.4g}). "
                f"Choose levels between {obs_min:.4g} and {obs_max:.4g}."
            )


# ----------------------------------------------------------------------------------------
# the image parameterisation


class FourierImage:
    """A batch of images as Fourier coefficients of decorrelated colour channels.

    Scaling the spectrum by 1/f makes every frequency equally easy to change, which keeps
    the optimiser from filling the image with high-frequency patterns (Olah et al. 2017).
    """

    def __init__(self, spectrum: torch.Tensor, size: int, decay_power: float):
        self.size = size
        self.spectrum = spectrum.requires_grad_(True)  # (B, 3, size, size//2+1, 2) real view
        self.freq_scale = _frequency_scale(size, decay_power, spectrum.device)

    @classmethod
    def noise(cls, batch: int, size: int, decay_power: float, std: float, generator: torch.Generator,
              device: torch.device) -> FourierImage:
        import torch

        shape = (batch, 3, size, size // 2 + 1, 2)
        return cls((torch.randn(shape, generator=generator) * std).to(device), size, decay_power)

    @classmethod
    def from_images(cls, images01: torch.Tensor, decay_power: float) -> FourierImage:
        """Invert the parameterisation so optimisation starts exactly at the given images."""
        import torch

        size = images01.shape[-1]
        logits = torch.logit(images01.clamp(0.02, 0.98))
        channels = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_colour_matrix().to(images01.device)), logits)
        spec = torch.fft.rfft2(channels, norm="ortho") / _frequency_scale(size, decay_power, images01.device)
        return cls(torch.view_as_real(spec).contiguous(), size, decay_power)

    def images(self) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1]."""
        import torch

        spec = torch.view_as_complex(self.spectrum) * self.freq_scale
        channels = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho")
        rgb = torch.einsum("ij,bjhw->bihw", _colour_matrix().to(channels.device), channels)
        return torch.sigmoid(rgb)


def _frequency_scale(size: int, decay_power: float, device: torch.device) -> torch.Tensor:
    import torch

    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    freqs = torch.sqrt(fx * fx + fy * fy).clamp(min=1.0 / size)
    return (1.0 / freqs ** decay_power).to(device)


def random_transform(images: torch.Tensor, cfg: SynthesisConfig, generator: torch.Generator) -> torch.Tensor:
    """Random jitter, scale and rotation of each image: samples must excite the neuron robustly,
    not through adversarial pixel patterns that a one-pixel shift destroys."""
    import torch
    import torch.nn.functional as F

    b = images.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(cfg.rotate_degrees)
    lo, hi = cfg.scale_range
    zoom = lo + torch.rand(b, generator=generator) * (hi - lo)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * cfg.jitter)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image (B,)."""
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return dx + dy


# ----------------------------------------------------------------------------------------
# reading the targets' activations


class _StopForward(Exception):
    """Raised by a hook once every target layer has fired: the rest of the network is not needed."""


class TargetActivations:
    """Runs the probed network on [0, 1] images and returns the targets' pooled activations.

    The forward pass stops after the last target layer (early layers cost a fraction of the
    network). It also returns the raw output of the first target's layer, for the diversity term.
    """

    def __init__(self, model: ProbedModel, targets: Sequence[ResolvedTarget], device: torch.device):
        import torch

        self.model = model
        self.module = model.module
        self.targets = list(targets)
        self.layers = list(dict.fromkeys(t.layer for t in targets))
        self.infos: dict[str, LayerInfo] = {name: model.layer(name) for name in self.layers}
        prep = model.preprocessing
        self.mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
        # Token models (ViTs) only take their native size; CNNs take any size.
        self.fixed_size = prep.image_size if any(l.layout.kind == "tokens" for l in model.layers()) else None
        self.neuron_index = torch.tensor([t.neuron for t in targets], device=device)

    def normalise(self, images01: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        if self.fixed_size and images01.shape[-1] != self.fixed_size:
            images01 = F.interpolate(images01, size=(self.fixed_size, self.fixed_size), mode="bilinear", align_corners=False)
        return (images01 - self.mean) / self.std

    def __call__(self, images01: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, targets) activations and the first target layer's batch-first output."""
        import torch

        from .hooks import LayerRecorder, pool, to_batch_first

        with torch.set_grad_enabled(grad), LayerRecorder(self.module, self.layers, detach=not grad) as rec:
            handles = [self.module.get_submodule(name).register_forward_hook(self._stop_when_done(rec)) for name in self.layers]
            try:
                self.module(self.normalise(images01))
            except _StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
            outputs = {name: to_batch_first(rec.outputs[name], self.infos[name].layout) for name in self.layers}
        columns = []
        for _i, t in enumerate(self.targets):
            pooled = pool(outputs[t.layer], self.infos[t.layer].layout, t.pooling)
            columns.append(pooled[:, t.neuron])
        return torch.stack(columns, dim=1), outputs[self.targets[0].layer]

    def _stop_when_done(self, rec: LayerRecorder):
        def hook(_module, _inputs, _output):
            if all(name in rec.outputs for name in self.layers):
                raise _StopForward()

        return hook


def gram_similarity(features: torch.Tensor) -> torch.Tensor:
    """(B, B) cosine similarity between the samples' Gram matrices: which channels fire
    together, wherever they fire (Lucid's diversity measure).

    For deep layers with many channels and few positions, <G_i, G_j> = ||F_i^T F_j||^2 is
    computed from the positions x positions products, never forming C x C matrices.
    """
    import torch.nn.functional as F

    if features.dim() == 4:
        maps = features.flatten(2).transpose(1, 2)  # (B, positions, C)
    elif features.dim() == 3:
        maps = features  # (B, tokens, D)
    else:
        flat = F.normalize(features.flatten(1), dim=1)
        return flat @ flat.T
    b, positions, channels = maps.shape
    maps = maps / positions
    if channels <= positions:
        gram = F.normalize((maps.transpose(1, 2) @ maps).flatten(1), dim=1)
        return gram @ gram.T
    stacked = maps.reshape(b * positions, channels)
    cross = (stacked @ stacked.T).reshape(b, positions, b, positions)
    inner = cross.pow(2).sum(dim=(1, 3))  # <G_i, G_j> for every pair
    norms = inner.diagonal().clamp_min(1e-30).sqrt()
    return inner / (norms[:, None] * norms[None, :])


def diversity_similarity(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean Gram-matrix cosine similarity of samples in the same group (Lucid's diversity
    objective, to be minimised). Zero when no group holds two samples."""
    import torch

    sim = gram_similarity(features)
    same = (groups[:, None] == groups[None, :]) & ~torch.eye(len(groups), dtype=torch.bool, device=features.device)
    if not same.any():
        return features.new_zeros(())
    return sim[same].mean()


def penultimate_features(model: ProbedModel, images01: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Embeddings for reporting diversity: the input of the network's last linear layer
    (pooled penultimate features of a CNN classifier), or its output where no linear layer
    takes a (B, D) input (e.g. a CLIP image tower)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    module = model.module
    device = next(module.parameters()).device
    mean = torch.tensor(model.preprocessing.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocessing.std, device=device).view(1, 3, 1, 1)
    fixed = model.preprocessing.image_size if any(l.layout.kind == "tokens" for l in model.layers()) else None
    seen: list[torch.Tensor] = []

    def grab(_module, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 2:
            seen.append(inputs[0].detach())

    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    out = []
    with torch.no_grad():
        for start in range(0, len(images01), batch_size):
            x = images01[start:start + batch_size].to(device)
            if fixed and x.shape[-1] != fixed:
                x = F.interpolate(x, size=(fixed, fixed), mode="bilinear", align_corners=False)
            seen.clear()
            handles = [m.register_forward_pre_hook(grab) for m in linears]
            try:
                y = module((x - mean) / std)
            finally:
                for h in handles:
                    h.remove()
            emb = seen[-1] if seen else (y if isinstance(y, torch.Tensor) else y[0])
            out.append(emb.flatten(1).float().cpu())
    return torch.cat(out).numpy()


def mean_pairwise_cosine_distance(embeddings: np.ndarray) -> float:
    """Average of 1 - cos over all pairs (0: identical directions; NaN for fewer than 2)."""
    if len(embeddings) < 2:
        return float("nan")
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sim = e @ e.T
    n = len(e)
    return float((n * n - sim.sum()) / (n * (n - 1)))  # the diagonal contributes n * (1 - 1) = 0


# ----------------------------------------------------------------------------------------
# probe images at each level


def probe_images_at_levels(store: Store, plan: SynthesisPlan, n: int) -> list[list[dict]]:
    """For each level row, the ``n`` probe images whose activations are nearest the targets.

    Distance = sum over targets of ((activation - target) / observed max)^2. Each dict has
    idx (row in the probe set), image_id, path, label, achieved (one value per target), error.
    """
    acts = np.stack([np.asarray(store.activations(t.run_key)[:, t.neuron], dtype=np.float64) for t in plan.targets], axis=1)
    scales = np.array([t.scale for t in plan.targets])
    images = store.probe_images(plan.probe_set_id)
    out = []
    for li in range(plan.n_levels):
        targets = np.array([t.levels[li] for t in plan.targets])
        err = np.abs(acts - targets) / scales
        order = np.argsort((err ** 2).sum(axis=1), kind="stable")[:n]
        out.append([dict(images[i], achieved=acts[i].tolist(), error=float(err[i].max())) for i in order])
    return out


def _load_start_images(store: Store, plan: SynthesisPlan, size: int, model: ProbedModel) -> tuple[torch.Tensor, np.ndarray]:
    import torch
    from torchvision import transforms as T

    from .datasets import load_rgb

    n = plan.request.n_samples
    prep = model.preprocessing.scaled(size)
    to_tensor = T.Compose([T.Resize(prep.resize_size, antialias=True), T.CenterCrop(size), T.ToTensor()])
    nearest = probe_images_at_levels(store, plan, n)
    if not nearest or not nearest[0]:
        raise SynthesisError("The probe set has no images to start from; use start='noise'.")
    tensors, idx = [], np.zeros((plan.n_levels, n), dtype=np.int64)
    for li, rows in enumerate(nearest):
        for si in range(n):
            row = rows[si % len(rows)]
            idx[li, si] = row["idx"]
            tensors.append(to_tensor(load_rgb(row["path"])))
    return torch.stack(tensors), idx


# ----------------------------------------------------------------------------------------
# the optimisation


def synthesize(model: ProbedModel, request: SynthesisRequest, store: Store, run: RunInfo,
               progress: Progress | None = None, device: str | None = None, use_cache: bool = True) -> SynthesisResult:
    """Sample ``n_samples`` images per level of the requested neuron(s), cached by provenance.

    ``run`` is an extraction of the main neuron's layer over a probe set: it gives the
    observed max that fractional levels refer to (and the probe images for start='probe').
    """
    import torch

    plan = plan_synthesis(model, request, store, run)
    if use_cache:
        cached = load_result(store, plan.key, plan)
        if cached is not None:
            if progress:
                progress(1, 1, "loaded from the cache")
            return cached
    t0, cpu0 = time.perf_counter(), time.process_time()
    cfg = request.config
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.module.to(dev).eval()
    generator = torch.Generator().manual_seed(request.seed)
    n_levels, n = plan.n_levels, request.n_samples
    batch = n_levels * n
    size = cfg.image_size

    start_idx = None
    if request.start == "probe":
        start_images, start_idx = _load_start_images(store, plan, size, model)
        param = FourierImage.from_images(start_images.to(dev), cfg.decay_power)
    else:
        param = FourierImage.noise(batch, size, cfg.decay_power, cfg.init_std, generator, dev)
    forward = TargetActivations(model, plan.targets, dev)
    # Row b of the batch is level b // n, sample b % n.
    targets = torch.tensor([[t.levels[li] for t in plan.targets] for li in range(n_levels) for _ in range(n)],
                           dtype=torch.float32, device=dev)
    scales = torch.tensor([t.scale for t in plan.targets], dtype=torch.float32, device=dev)
    groups = torch.arange(n_levels, device=dev).repeat_interleave(n)
    optimiser = torch.optim.Adam([param.spectrum], lr=cfg.lr)

    best_images = torch.zeros(batch, 3, size, size, device=dev)
    best_error = torch.full((batch,), math.inf, device=dev)
    ever_within = torch.zeros(batch, dtype=torch.bool, device=dev)
    last_acts: torch.Tensor | None = None
    boost = torch.ones(batch, device=dev)
    restarts = np.zeros(batch, dtype=np.int64)
    transform_steps = int(cfg.transform_until * cfg.steps)
    t_setup = time.perf_counter()
    step = 0
    n_within: int | None = None
    for step in range(1, cfg.steps + 1):
        images = param.images()
        seen = random_transform(images, cfg, generator) if step <= transform_steps else images
        acts, features = forward(seen)
        schedule = cfg.level_weight * cfg.level_weight_growth ** ((step - 1) / max(cfg.steps - 1, 1))
        level_loss = (schedule * boost * (((acts - targets) / scales) ** 2).sum(dim=1)).mean()
        loss = level_loss + cfg.tv_weight * total_variation(images).mean()
        if cfg.diversity_weight and n > 1:
            loss = loss + cfg.diversity_weight * diversity_similarity(features, groups)
        optimiser.zero_grad(set_to_none=True)
        (grad,) = torch.autograd.grad(loss, [param.spectrum])
        param.spectrum.grad = grad
        optimiser.step()

        if step % cfg.check_every == 0 or step == cfg.steps:
            with torch.no_grad():
                clean = _quantise(param.images())
                acts_clean = forward(clean, grad=False)[0]
                err = ((acts_clean - targets).abs() / scales).max(dim=1).values
                within = err <= cfg.tolerance
                # Keep the latest within-tolerance image of each sample (more time for diversity
                # and naturalness), or the closest one while it has never been within tolerance.
                take = within | (~ever_within & (err < best_error))
                best_images[take] = clean[take]
                best_error = torch.where(take, err, best_error)
                ever_within |= within
                if step > transform_steps:
                    # Penalty continuation per sample while polishing: only the samples that still
                    # miss their level get a stronger pull; the others keep room for diversity.
                    boost = torch.where(within, boost, boost * cfg.miss_boost)
                if step <= transform_steps:
                    stuck = _restart_stuck(param, optimiser, acts_clean, last_acts, targets, scales, cfg, generator)
                    restarts += stuck.cpu().numpy()
                last_acts = acts_clean
            n_within = int(within.sum())
            if step >= cfg.min_steps and bool(within.all()):
                break
        if progress:  # every step (a fraction of a second to a few seconds), not only at checks
            checked = f"{n_within}/{batch} within {cfg.tolerance:.0%} at the last check" if n_within is not None else "no check yet"
            progress(step, cfg.steps, f"step {step}/{cfg.steps}: {checked} (stops early when all are)")
    t_opt = time.perf_counter()

    with torch.no_grad():
        achieved = forward(best_images, grad=False)[0].cpu().numpy()
        embeddings = penultimate_features(model, best_images)
    errors = np.abs(achieved - targets.cpu().numpy()) / scales.cpu().numpy()
    within_tol = (errors <= cfg.tolerance).all(axis=1)
    diversity = np.array([mean_pairwise_cosine_distance(embeddings[li * n:(li + 1) * n]) for li in range(n_levels)])
    images_u8 = (best_images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    t_end = time.perf_counter()
    result = SynthesisResult(
        key=plan.key, plan=plan, images=images_u8.reshape(n_levels, n, size, size, 3),
        achieved=achieved.reshape(n_levels, n, -1), errors=errors.reshape(n_levels, n, -1),
        within_tolerance=within_tol.reshape(n_levels, n), diversity=diversity,
        start_image_idx=start_idx, steps_run=step, restarts=restarts.reshape(n_levels, n),
        timings={"setup_s": t_setup - t0, "optimise_s": t_opt - t_setup, "evaluate_s": t_end - t_opt,
                 "total_s": t_end - t0, "cpu_s": time.process_time() - cpu0, "device": str(dev)},
    )
    _save_result(store, result)
    if progress:
        progress(cfg.steps, cfg.steps, result.summary())
    return result


def _restart_stuck(param: FourierImage, optimiser: torch.optim.Optimizer, acts: torch.Tensor, last_acts: torch.Tensor | None,
                   targets: torch.Tensor, scales: torch.Tensor, cfg: SynthesisConfig, generator: torch.Generator) -> torch.Tensor:
    """Re-draw samples whose off-target activation has not moved by a single bit since the last
    check: a mean-pooled ReLU that is zero everywhere (or a saturated ReLU6) has no gradient,
    so such a sample would never reach its level. Returns the bool mask of restarted samples."""
    import torch

    if last_acts is None:
        return torch.zeros(len(acts), dtype=torch.bool, device=acts.device)
    off = (acts - targets).abs() / scales > cfg.tolerance
    stuck = ((acts == last_acts) & off).any(dim=1)
    if stuck.any():
        rows = stuck.nonzero().flatten()
        fresh = torch.randn((len(rows), *param.spectrum.shape[1:]), generator=generator) * cfg.init_std * 10
        with torch.no_grad():
            param.spectrum[rows] = fresh.to(param.spectrum.device)
        state = optimiser.state.get(param.spectrum, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name][rows] = 0
    return stuck


def _quantise(images01: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels so every check measures exactly the images that get saved."""
    return (images01.clamp(0, 1) * 255).round() / 255


# ----------------------------------------------------------------------------------------
# the cache


def _save_result(store: Store, result: SynthesisResult) -> None:
    store.save_array(ARRAY_KIND, result.key, result.images)
    store.put_record(RECORD_NAMESPACE, result.key, {
        "key": result.key, "code": CODE_VERSION, "plan": dataclasses.asdict(result.plan),
        "achieved": result.achieved.tolist(), "errors": result.errors.tolist(),
        "within_tolerance": result.within_tolerance.tolist(),
        "diversity": [None if math.isnan(d) else d for d in result.diversity.tolist()],
        "diversity_space": result.diversity_space,
        "start_image_idx": None if result.start_image_idx is None else result.start_image_idx.tolist(),
        "steps_run": result.steps_run, "timings": result.timings, "samples": result.sample_rows(),
        "restarts": None if result.restarts is None else result.restarts.tolist(),
        "summary": result.summary(),
    })


def _tuples_for_lists(fields: dict[str, Any]) -> dict[str, Any]:
    """A dataclass's fields read back from JSON, with its tuples (stored as lists) restored."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _plan_from_dict(d: dict) -> SynthesisPlan:
    req = dict(d["request"])
    req["config"] = SynthesisConfig(**_tuples_for_lists(req["config"]))
    req["also"] = tuple(NeuronTarget(a["layer"], a["neuron"], tuple(a["levels"])) for a in req["also"])
    req["levels"] = tuple(req["levels"])
    targets = tuple(ResolvedTarget(**_tuples_for_lists(t)) for t in d["targets"])
    return SynthesisPlan(SynthesisRequest(**req), d["model_spec"], d["weights_id"], d["probe_set_id"], targets, d["key"])


def load_result(store: Store, key: str, plan: SynthesisPlan | None = None) -> SynthesisResult | None:
    """A cached result by key (None when absent or incomplete)."""
    record = store.get_record(RECORD_NAMESPACE, key)
    if record is None or record.get("code") != CODE_VERSION:
        return None
    images = store.load_array(ARRAY_KIND, key)
    if images is None:
        return None
    start = record.get("start_image_idx")
    return SynthesisResult(
        key=key, plan=plan or _plan_from_dict(record["plan"]), images=images,
        achieved=np.asarray(record["achieved"], dtype=np.float32), errors=np.asarray(record["errors"], dtype=np.float32),
        within_tolerance=np.asarray(record["within_tolerance"], dtype=bool),
        diversity=np.asarray([np.nan if d is None else d for d in record["diversity"]], dtype=np.float64),
        start_image_idx=None if start is None else np.asarray(start, dtype=np.int64),
        steps_run=int(record["steps_run"]), timings=dict(record["timings"]),
        restarts=None if record.get("restarts") is None else np.asarray(record["restarts"], dtype=np.int64),
        diversity_space=record.get("diversity_space", DIVERSITY_SPACE), from_cache=True,
    )


# ----------------------------------------------------------------------------------------
# a picture of the result, and the command line


def render_grid(result: SynthesisResult, probe_rows: list[list[dict]] | None = None, tile: int = 128):
    """A PIL image: one row per level, the samples with their achieved activation (and a
    tick when within tolerance), then the real probe images nearest to that level."""
    from PIL import Image, ImageDraw

    from .datasets import load_rgb

    n_levels, n = result.images.shape[:2]
    n_probe = max((len(r) for r in probe_rows), default=0) if probe_rows else 0
    label_w, caption_h, gap = 110, 16, 12
    width = label_w + (n + n_probe) * tile + (gap if n_probe else 0)
    canvas = Image.new("RGB", (width, n_levels * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    names = result.plan.level_names()
    for li in range(n_levels):
        y = li * (tile + caption_h)
        targets = ", ".join(f"{t.levels[li]:.3g}" for t in result.plan.targets)
        draw.text((4, y + tile // 2 - 12), f"level {names[li]}", fill="black")
        draw.text((4, y + tile // 2 + 2), f"target {targets}", fill="black")
        for si in range(n):
            x = label_w + si * tile
            canvas.paste(Image.fromarray(result.images[li, si]).resize((tile, tile)), (x, y))
            mark = "ok" if result.within_tolerance[li, si] else "MISS"
            achieved = ", ".join(f"{v:.3g}" for v in result.achieved[li, si])
            draw.text((x + 2, y + tile + 2), f"{achieved} {mark}", fill="black" if mark == "ok" else "red")
        for pi, row in enumerate(probe_rows[li] if probe_rows else []):
            x = label_w + n * tile + gap + pi * tile
            try:
                img = load_rgb(row["path"]).resize((tile, tile))
            except OSError:
                continue
            canvas.paste(img, (x, y))
            draw.text((x + 2, y + tile + 2), "real " + ", ".join(f"{v:.3g}" for v in row["achieved"]), fill="blue")
    return canvas


def parse_levels(text: str) -> tuple[float, ...]:
    """'0.25,0.5,1' or '25%,50%' -> (0.25, 0.5, 1.0); a clear error for anything else."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            values.append(float(part[:-1]) / 100.0 if part.endswith("%") else float(part))
        except ValueError:
            raise SynthesisError(f"Levels must be comma-separated numbers such as 0.25,0.5,0.75,1 (got '{text}').") from None
    if not values:
        raise SynthesisError("Give at least one level, e.g. 0.25,0.5,0.75,1.")
    return tuple(values)


