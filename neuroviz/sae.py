"""Sparse autoencoders on a layer's spatial activations, trained with ``overcomplete``.

The SAE (overcomplete's TopKSAE or BatchTopKSAE: a linear encoder, a ReLU, the k largest
codes kept, a unit-norm dictionary) is fitted to the layer's activation vectors at every
position (conv pixel or token) of the probe set, so a latent has a map like a neuron. The
vectors are centred and divided by their root-mean-square norm first (stored with the
dictionary), which makes one learning rate fit every layer. When the probe set has more
positions than ``max_positions`` a seeded random subset is used (the result says so), and a
seeded 10 % of positions is held out to report reconstruction R^2 (explained variance).

The training loop is our own, not ``overcomplete.sae.train_sae``: that one prints per epoch
and offers no progress callback, and the pages need live loss and dead latents per step.
The model, the loss (MSE + overcomplete's AuxK term after Gao et al. 2024), the dead-latent
remedies and the learning-rate schedule are overcomplete's; what is ours is the choice among
them (``SaeConfig``): ``init="data"`` starts every latent on a seeded training position
(decoder row = that position's direction, encoder = the decoder transposed, so each latent
fires on part of the data from step one), ``reanimate`` adds overcomplete's
``reanimation_regularizer`` (it raises the pre-activations of latents silent in the batch, the
ones AuxK cannot reach: its ReLU blocks their gradient), and ``schedule="cosine"`` is
overcomplete's ``CosineScheduler`` (5 % warm-up, then cosine decay to a tenth of ``lr``).
The data start is what keeps latents alive: on the demo layer (features.18, 4x, k=32, batch 256,
6 epochs) it left 2 of 5,120 latents dead at held-out R^2 0.81, where the random start with AuxK
left 3,378 at R^2 0.76; the reanimation regulariser revives latents too, but on a generated set
it halved R^2.
``aux_penalty=0`` skips the AuxK term (and its cost). The trained weights become a
:class:`~neuroviz.units.Dictionary` (read without overcomplete), and :func:`train_and_extract`
extracts its unit run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import NeurovizError
from .progress import Progress
from .provenance import provenance_key
from .units import Dictionary, list_dictionaries, load_dictionary, per_position, save_dictionary, unit_transform

if TYPE_CHECKING:
    import torch

    from .datasets import ProbeSet
    from .models import ProbedModel
    from .store import RunInfo, Store

CODE_VERSION = "sae-1"
VARIANTS = ("topk", "batchtopk")
INITS = ("random", "data")
SCHEDULES = ("constant", "cosine")
# options added after the first dictionaries were made: left out of the provenance key at their
# defaults (which train exactly as before), so those dictionaries keep their keys
LATER_OPTIONS = ("init", "schedule", "reanimate")
HOLDOUT = 0.1  # share of positions held out for R^2


class SaeError(NeurovizError, ValueError):
    """SAE settings that cannot be trained (k larger than the latents, a vector layer ...)."""


@dataclass(frozen=True)
class SaeConfig:
    """What the user chooses. Defaults follow Gao et al. (2024) in spirit, sized for a CPU."""

    expansion: int = 4  # latents = expansion x the layer's neurons
    k: int = 32  # codes kept per position (TopK) or on average (BatchTopK)
    variant: str = "topk"
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 5e-4
    aux_penalty: float = 1 / 32  # the AuxK coefficient of Gao et al.
    max_positions: int = 200_000
    seed: int = 0
    init: str = "random"  # "data": latents start on seeded training positions (encoder = decoder transposed)
    schedule: str = "constant"  # "cosine": warm-up then cosine decay of the learning rate
    reanimate: float = 0.0  # weight of overcomplete's reanimation_regularizer (0 = off)

    def check(self, n_neurons: int) -> None:
        if self.variant not in VARIANTS:
            raise SaeError(f"Unknown SAE variant '{self.variant}'; choose {' or '.join(VARIANTS)}.")
        if self.init not in INITS:
            raise SaeError(f"Unknown SAE initialisation '{self.init}'; choose {' or '.join(INITS)}.")
        if self.schedule not in SCHEDULES:
            raise SaeError(f"Unknown learning-rate schedule '{self.schedule}'; choose {' or '.join(SCHEDULES)}.")
        if self.expansion < 1 or self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise SaeError("Expansion and epochs must be at least 1, the batch at least 2 and the learning rate positive.")
        if self.aux_penalty < 0 or self.reanimate < 0:
            raise SaeError("The AuxK and reanimation weights must be 0 or more.")
        if not 1 <= self.k <= self.expansion * n_neurons:
            raise SaeError(f"k={self.k} must lie between 1 and the number of latents ({self.expansion * n_neurons}).")


@dataclass(frozen=True)
class SaeMetrics:
    """How well the SAE fits: on held-out positions (R^2, L0) and on all of them (dead latents)."""

    r2: float  # 1 - SSE / total variance of held-out positions
    l0: float  # mean number of non-zero codes per held-out position
    dead: int  # latents never active on any collected position
    n_latents: int
    n_positions: int  # positions trained on (after subsampling)
    n_heldout: int
    subsampled_from: int | None  # the probe set's positions when a subset was used
    final_loss: float
    seconds: float


def dictionary_key(model: ProbedModel, layer: str, probe_set: ProbeSet, config: SaeConfig) -> str:
    """The provenance of an SAE: model and weights, layer, training images, hyperparameters."""
    return provenance_key({"kind": "sae", "model": model.spec, "weights": model.weights_id, "layer": layer,
                           "probe_set": probe_set.id, "preprocess": model.preprocessing.id,
                           "config": _key_config(config), "code": CODE_VERSION})


def _key_config(config: SaeConfig) -> dict:
    """The settings that name a dictionary: every field, less the later options left at their defaults."""
    settings, defaults = asdict(config), asdict(SaeConfig())
    return {name: value for name, value in settings.items() if name not in LATER_OPTIONS or value != defaults[name]}


def collect_positions(model: ProbedModel, probe_set: ProbeSet, layer: str, max_positions: int, seed: int,
                      batch_size: int = 32, progress: Progress | None = None,
                      device: str | None = None) -> tuple[np.ndarray, int]:
    """(positions x neurons) activation vectors of ``layer`` over the probe set, and how many
    positions the set has (a seeded subset of ``max_positions`` of them when it has more)."""
    import torch

    from .extract import image_loader
    from .hooks import LayerRecorder, to_batch_first

    info = model.layer(layer)
    if info.layout.kind == "vector":
        raise SaeError(f"Layer '{layer}' is a vector (no positions); an SAE here would see one sample per image. "
                       "Choose a conv or token layer.")
    per_image = int(np.prod(info.shape)) // info.n_neurons
    total = len(probe_set) * per_image
    keep = None
    if total > max_positions:
        keep = np.sort(np.random.default_rng(seed).choice(total, max_positions, replace=False))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = model.module.to(dev).eval()
    out = np.empty((len(keep) if keep is not None else total, info.n_neurons), dtype=np.float32)
    row, filled, done = 0, 0, 0
    with torch.inference_mode(), LayerRecorder(module, [layer]) as rec:
        for batch in image_loader(probe_set, model.transform, batch_size=batch_size):
            module(batch.to(dev))
            rows, _ = per_position(to_batch_first(rec.outputs[layer], info.layout), info.layout)
            rows_np = rows.float().cpu().numpy()
            if keep is not None:
                lo, hi = np.searchsorted(keep, [row, row + len(rows_np)])
                rows_np = rows_np[keep[lo:hi] - row]
            out[filled:filled + len(rows_np)] = rows_np
            filled += len(rows_np)
            row += len(rows)
            rec.outputs.clear()
            done += batch.shape[0]
            if progress:
                progress(done, len(probe_set), f"collecting {layer}: {done}/{len(probe_set)} images")
    return out[:filled], total


def train_sae(positions: np.ndarray, config: SaeConfig, progress: Progress | None = None,
              device: str | None = None) -> tuple[dict, SaeMetrics, list[float]]:
    """Train on ``positions`` (rows = activation vectors); returns the dictionary's arrays and
    settings (with the dead latents of each epoch), the metrics and the loss per step."""
    import torch
    from overcomplete.sae import BatchTopKSAE, TopKSAE
    from overcomplete.sae.losses import reanimation_regularizer, top_k_auxiliary_loss
    from overcomplete.sae.optimizer import CosineScheduler
    from overcomplete.sae.trackers import DeadCodeTracker

    n, dim = positions.shape
    config.check(dim)
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n)
    n_held = max(1, int(round(n * HOLDOUT))) if n >= 20 else 0
    held, train = order[:n_held], order[n_held:]
    center = positions[train].mean(axis=0)
    scale = float(math.sqrt(((positions[train] - center) ** 2).sum(axis=1).mean())) or 1.0
    x_train = torch.from_numpy((positions[train] - center) / scale)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    n_latents = config.expansion * dim
    batch = min(config.batch_size, len(train))
    if config.variant == "batchtopk":
        sae = BatchTopKSAE(dim, n_latents, top_k=config.k * batch, device=str(dev))
    else:
        sae = TopKSAE(dim, n_latents, top_k=config.k, device=str(dev))
    gen = torch.Generator().manual_seed(config.seed)
    if config.init == "data":
        _start_on_positions(sae, x_train, gen)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    steps_per_epoch = max(1, len(train) // batch)  # the ragged last batch is dropped (BatchTopK's k is per batch)
    total = steps_per_epoch * config.epochs
    scheduler = None
    if config.schedule == "cosine":
        scheduler = CosineScheduler(optimizer, config.lr, config.lr / 10, total, warmup_iters=max(1, total // 20),
                                    start_warmup_value=config.lr / 10)
        for group in optimizer.param_groups:
            group["lr"] = float(scheduler[0])  # the scheduler sets the rate after each step; this is the first one
    history: list[float] = []
    dead_per_epoch: list[int] = []
    sae.train()
    for epoch in range(config.epochs):
        perm = torch.randperm(len(train), generator=gen)
        fired = DeadCodeTracker(n_latents, dev)
        for step in range(steps_per_epoch):
            xb = x_train[perm[step * batch:(step + 1) * batch]].to(dev)
            optimizer.zero_grad()
            pre, codes, x_hat = sae(xb)
            dictionary = sae.get_dictionary()
            if config.aux_penalty:
                loss = top_k_auxiliary_loss(xb, x_hat, pre, codes, dictionary, penalty=config.aux_penalty)
            else:
                loss = (xb - x_hat).square().mean()  # what AuxK's loss is at weight 0, without its top-k and product
            if config.reanimate:
                loss = loss + reanimation_regularizer(xb, x_hat, pre, codes, dictionary, penalty=config.reanimate)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            fired.update(codes.detach())
            history.append(float(loss.item()))
            if progress:
                done = epoch * steps_per_epoch + step + 1
                dead_note = f" dead {dead_per_epoch[-1]}/{n_latents} last epoch" if dead_per_epoch else ""
                with torch.no_grad():  # the batch's explained variance: readable where the loss (~1e-4) is not
                    r2 = 1 - float((xb - x_hat).square().sum() / (xb - xb.mean(dim=0)).square().sum().clamp_min(1e-12))
                progress(done, total, f"epoch {epoch + 1}/{config.epochs} loss {history[-1]:.3g} R^2 {r2:.3f}{dead_note}")
        dead_per_epoch.append(int(round(fired.get_dead_ratio() * n_latents)))
    sae.eval()
    with torch.no_grad():
        linear = sae.encoder.final_block[0]
        arrays = {"encoder": linear.weight.detach().cpu().numpy().astype(np.float32),
                  "encoder_bias": linear.bias.detach().cpu().numpy().astype(np.float32),
                  "decoder": sae.get_dictionary().detach().cpu().numpy().astype(np.float32),
                  "center": center.astype(np.float32), "scale": scale}
    if config.variant == "batchtopk":
        arrays.update(sparsity="threshold", k=config.k, threshold=float(sae.running_threshold))
    else:
        arrays.update(sparsity="topk", k=config.k, threshold=0.0)
    probe = Dictionary("sae", "", arrays["encoder"], arrays["encoder_bias"], arrays["decoder"], arrays["center"],
                       scale, arrays["sparsity"], config.k, arrays["threshold"])
    r2, l0, dead = fit_metrics(probe, positions, held)
    metrics = SaeMetrics(r2, l0, dead, n_latents, len(train), n_held, None, history[-1] if history else float("nan"),
                         time.perf_counter() - started)
    arrays["dead_per_epoch"] = dead_per_epoch
    return arrays, metrics, history


def _start_on_positions(sae: Any, x_train: torch.Tensor, gen: torch.Generator) -> None:
    """Data-based start: each latent's decoder row is the direction of a seeded training position
    and its encoder row the same vector (bias 0), so every latent wins the top-k somewhere at once."""
    import torch

    n_latents = sae.get_dictionary().shape[0]
    picks = torch.randint(len(x_train), (n_latents,), generator=gen)
    atoms = x_train[picks].float()
    atoms = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-8)
    with torch.no_grad():
        sae.dictionary._weights.copy_(atoms)
        linear = sae.encoder.final_block[0]
        linear.weight.copy_(atoms)
        linear.bias.zero_()


def fit_metrics(dictionary: Dictionary, positions: np.ndarray, held: np.ndarray,
                chunk: int = 8192) -> tuple[float, float, int]:
    """(R^2 and L0 on the held-out rows, latents dead on every row)."""
    import torch

    active = np.zeros(dictionary.n_units, dtype=bool)
    sse, l0_sum = 0.0, 0.0
    held_set = np.zeros(len(positions), dtype=bool)
    held_set[held] = True
    held_mean = positions[held].mean(axis=0) if len(held) else positions.mean(axis=0)
    sst = float(((positions[held] - held_mean) ** 2).sum()) if len(held) else 0.0
    with torch.no_grad():
        for start in range(0, len(positions), chunk):
            x = torch.from_numpy(positions[start:start + chunk])
            z = dictionary.encode(x)
            active |= (z > 0).any(dim=0).numpy()
            mask = torch.from_numpy(held_set[start:start + chunk])
            if mask.any():
                zh = z[mask]
                sse += float(((x[mask] - dictionary.decode(zh)) ** 2).sum())
                l0_sum += float((zh != 0).sum())
    r2 = 1.0 - sse / sst if sst > 0 else float("nan")
    return r2, l0_sum / max(1, len(held)), int((~active).sum())


def train_dictionary(store: Store, model: ProbedModel, probe_set: ProbeSet, layer: str, config: SaeConfig,
                     progress: Progress | None = None, device: str | None = None) -> Dictionary:
    """The SAE of (model, layer, probe set, config): from the cache, else collected, trained and saved."""
    config.check(model.layer(layer).n_neurons)
    key = dictionary_key(model, layer, probe_set, config)
    if any(m["key"] == key for m in list_dictionaries(store)):
        return load_dictionary(store, key)
    store.register_probe_set(probe_set)
    half = _stage(progress, 0, "collect")
    positions, total = collect_positions(model, probe_set, layer, config.max_positions, config.seed,
                                         progress=half, device=device)
    arrays, metrics, history = train_sae(positions, config, _stage(progress, 1, "train"), device)
    if total > len(positions):
        metrics = SaeMetrics(**{**asdict(metrics), "subsampled_from": total})
    meta = {"model_spec": model.spec, "weights_id": model.weights_id, "layer": layer, "probe_set_id": probe_set.id,
            "preprocess_id": model.preprocessing.id, "hyperparams": asdict(config), "metrics": asdict(metrics),
            "loss_history": _thin(history), "dead_per_epoch": arrays["dead_per_epoch"], "created_at": time.time()}
    dictionary = Dictionary("sae", key, arrays["encoder"], arrays["encoder_bias"], arrays["decoder"], arrays["center"],
                            arrays["scale"], arrays["sparsity"], arrays["k"], arrays["threshold"], meta=meta)
    save_dictionary(store, dictionary)
    return load_dictionary(store, key)


def _stage(progress: Progress | None, index: int, name: str) -> Progress | None:
    """Progress of one of the two stages (collect, train) as half of the whole."""
    if progress is None:
        return None
    return lambda done, total, msg: progress(index * 1000 + int(1000 * done / max(1, total)), 2000, msg)


def _thin(history: list[float], keep: int = 500) -> list[float]:
    """At most ``keep`` points of the loss curve (evenly spaced) for the meta file."""
    if len(history) <= keep:
        return [round(v, 6) for v in history]
    idx = np.linspace(0, len(history) - 1, keep).round().astype(int)
    return [round(history[i], 6) for i in idx]


def extract_units(store: Store, model: ProbedModel, probe_set: ProbeSet, dictionary: Dictionary, k: int = 50,
                  pooling: str | None = None, batch_size: int = 32, progress: Progress | None = None,
                  device: str | None = None) -> RunInfo:
    """The unit run of ``dictionary`` over ``probe_set`` (cached like any extraction)."""
    from .extract import extract

    layer = dictionary.meta["layer"]
    info = model.layer(layer)
    dictionary.check_layer(info.n_neurons, layer)
    (run,) = extract(model, probe_set, [layer], store, pooling=pooling, k=k, batch_size=batch_size,
                     progress=progress, device=device, unit_transform=unit_transform(dictionary, info.layout))
    return run


def train_and_extract(store: Store, model: ProbedModel, probe_set: ProbeSet, layer: str, config: SaeConfig,
                      k: int = 50, progress: Progress | None = None, device: str | None = None) -> tuple[Dictionary, RunInfo]:
    """Train (or reuse) the SAE, then extract its latents' run: what ``sae train`` does."""
    dictionary = train_dictionary(store, model, probe_set, layer, config, progress, device)
    run = extract_units(store, model, probe_set, dictionary, k=k, progress=progress, device=device)
    return dictionary, run
