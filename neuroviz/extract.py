"""Batched, resumable extraction of several layers in one pass.

For every requested layer it records the pooled activation of every neuron on every image,
a streaming top-k per neuron with the spatial map kept only for those k images (for crops,
heatmaps and masks), and per-neuron quantiles and histograms (computed by the store).

Resumable: images are processed in chunks; after each chunk every layer's pooled chunk and
its running top-k state are written through temp files and renames, and the previous state
is deleted only once all layers hold the new one. A killed run (even ``kill -9``) restarts
from the last chunk that every layer finished, and ends with exactly the arrays an
uninterrupted run would have produced.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import ProbeSet, load_rgb
from .errors import NeurovizError
from .files import atomic_save_npy, atomic_savez, atomic_write_text
from .hooks import LayerLayout, LayerRecorder, pool, spatial_map, to_batch_first
from .images import record_view
from .models import LayerInfo, ProbedModel
from .progress import Progress
from .provenance import provenance_key
from .store import RunInfo, Store

if TYPE_CHECKING:
    from .units import UnitTransform

CODE_VERSION = "extract-1"
MAP_MAX_SIDE = 32  # top-k maps are stored at most 32x32: enough for crops, masks and heatmaps


class ExtractionError(NeurovizError, ValueError):
    """A request that cannot be extracted (bad pooling, empty probe set); says why."""


VALID_POOLINGS = {"conv": ("mean", "max"), "tokens": ("cls", "tokens_mean", "max"), "vector": ("mean",)}


def resolve_pooling(layer: LayerInfo, pooling: str | None) -> str:
    """The pooling for a layer: the requested one if it fits the layer's kind, else its default."""
    if pooling is None or pooling == "default":
        return layer.default_pooling
    if layer.layout.kind == "vector":
        return "mean"  # vectors have nothing to pool
    if pooling not in VALID_POOLINGS[layer.layout.kind]:
        raise ExtractionError(
            f"Pooling '{pooling}' does not apply to layer {layer.name} ({layer.layout.kind}); "
            f"choose one of {', '.join(VALID_POOLINGS[layer.layout.kind])}."
        )
    return pooling


def run_key_for(model: ProbedModel, layer: str, pooling: str, probe_set: ProbeSet, k: int,
                units_key: str | None = None) -> str:
    """The provenance key of one layer's extraction (of its neurons, or of the units ``units_key`` names)."""
    key = provenance_key({
        "model": model.spec, "weights": model.weights_id, "layer": layer, "pooling": pooling,
        "probe_set": probe_set.id, "preprocess": model.preprocessing.id, "k": k,
        "code": CODE_VERSION, "map_max_side": MAP_MAX_SIDE,
    })
    return key if units_key is None else provenance_key({"run": key, "units": units_key})


@dataclass
class _LayerPlan:
    info: LayerInfo
    pooling: str
    run_key: str
    k: int
    partial: Path


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[i]))


def image_loader(probe_set: ProbeSet, transform, start: int = 0, batch_size: int = 32, num_workers: int = 0):
    """Batches of preprocessed images from index ``start`` on, in probe-set order."""
    ds = _ImageDataset([im.path for im in probe_set.images[start:]], transform)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


class StreamingTopK:
    """Top-k images per neuron, merged batch by batch, with their spatial maps.

    Entries live in k unsorted "slots" per neuron. A batch only writes the maps of the
    images that actually enter some neuron's top-k into the slots they evict, so after the
    first batches almost no map is copied: the cost follows the number of replacements, not
    neurons x k x map size. ``sorted()`` orders the slots by activation once, at the end.
    """

    def __init__(self, n_neurons: int, k: int, map_shape: tuple[int, int] | None):
        self.k = k
        self.values = torch.full((n_neurons, k), -torch.inf)
        self.indices = torch.full((n_neurons, k), -1, dtype=torch.long)
        self.maps = torch.zeros((n_neurons, k, *map_shape)) if map_shape else None

    def update(self, pooled: torch.Tensor, maps: torch.Tensor | None, first_index: int,
               map_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Merge a batch: pooled is (B, neurons); maps (B, neurons, h, w), or map_fn(batch_idx,
        neuron_idx) -> (M, h, w) that computes only the maps of the entering images."""
        n, k = self.values.shape
        b = pooled.shape[0]
        cand = torch.cat([self.values, pooled.T.float()], dim=1)
        _, sel = torch.topk(cand, k, dim=1, sorted=False)
        from_batch = sel >= k
        if not bool(from_batch.any()):
            return
        keep = torch.zeros((n, k + b), dtype=torch.bool)
        keep.scatter_(1, sel, True)
        evicted = ~keep[:, :k]  # slots whose entry dropped out; as many per neuron as entrants
        entering = keep[:, k:]
        ev_neuron, ev_slot = evicted.nonzero(as_tuple=True)  # row-major: ordered by neuron
        in_neuron, in_batch = entering.nonzero(as_tuple=True)
        self.values[ev_neuron, ev_slot] = pooled[in_batch, in_neuron].float()
        self.indices[ev_neuron, ev_slot] = in_batch + first_index
        if self.maps is not None:
            if map_fn is not None:
                self.maps[ev_neuron, ev_slot] = map_fn(in_batch, in_neuron)
            elif maps is not None:
                self.maps[ev_neuron, ev_slot] = maps[in_batch, in_neuron].float()

    def sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(values, indices, maps) with each neuron's entries in descending activation."""
        # two stable sorts: by image index, then by activation, so ties keep image order
        by_image = torch.argsort(self.indices, dim=1, stable=True)
        order = torch.gather(by_image, 1, torch.argsort(-torch.gather(self.values, 1, by_image), dim=1, stable=True))
        values, indices = torch.gather(self.values, 1, order), torch.gather(self.indices, 1, order)
        maps = None
        if self.maps is not None:
            maps = self.maps[torch.arange(order.shape[0])[:, None], order].numpy()
        return values.numpy(), indices.numpy(), maps

    def state(self) -> dict[str, np.ndarray]:
        out = {"values": self.values.numpy(), "indices": self.indices.numpy()}
        if self.maps is not None:
            out["maps"] = self.maps.numpy()
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.values = torch.from_numpy(np.array(state["values"]))
        self.indices = torch.from_numpy(np.array(state["indices"]))
        if "maps" in state:
            self.maps = torch.from_numpy(np.array(state["maps"]))


def _shrink(maps: torch.Tensor) -> torch.Tensor:
    h, w = maps.shape[-2:]
    if h <= MAP_MAX_SIDE and w <= MAP_MAX_SIDE:
        return maps
    return F.adaptive_avg_pool2d(maps, (min(h, MAP_MAX_SIDE), min(w, MAP_MAX_SIDE)))


def _map_shape(info: LayerInfo) -> tuple[int, int] | None:
    if info.layout.kind == "conv":
        h, w = info.shape[1], info.shape[2]
    elif info.layout.kind == "tokens":
        tokens = info.shape[0] - (1 if info.layout.has_cls else 0)
        side = int(tokens ** 0.5)
        if side * side != tokens:
            return None
        h = w = side
    else:
        return None
    return (min(h, MAP_MAX_SIDE), min(w, MAP_MAX_SIDE))


def _latest_state(partial: Path) -> int:
    """Highest chunk number with a complete state file in ``partial`` (-1 if none)."""
    best = -1
    for p in partial.glob("state-*.npz"):
        try:
            best = max(best, int(p.stem.split("-")[1]))
        except (IndexError, ValueError):
            continue
    return best


def extract(model: ProbedModel, probe_set: ProbeSet, layers: Sequence[str], store: Store,
            pooling: str | None = None, k: int = 50, batch_size: int = 32, chunk_size: int = 256,
            progress: Progress | None = None, num_workers: int = 0, device: str | None = None,
            stop_after_chunks: int | None = None, unit_transform: UnitTransform | None = None) -> list[RunInfo]:
    """Extract ``layers`` over ``probe_set`` into ``store``; cached layers are not recomputed.

    Returns the RunInfo of every requested layer. ``stop_after_chunks`` stops early (for
    tests of resumption) without finishing the run. ``unit_transform`` (one layer only) turns
    the layer's batch-first output into units (neuroviz.units) before pooling and maps; it belongs to
    one layer, so give one (``neuroviz.sae.extract_units`` does).
    """
    if not layers:
        raise ExtractionError("Choose at least one layer.")
    if chunk_size % batch_size:
        chunk_size = max(batch_size, (chunk_size // batch_size) * batch_size)
    store.register_probe_set(probe_set)
    n_images = len(probe_set)
    k_eff = min(k, n_images)
    plans: list[_LayerPlan] = []
    done: dict[str, RunInfo] = {}
    for name in dict.fromkeys(layers):
        info = model.layer(name)
        pooling_l = resolve_pooling(info, pooling)
        key = run_key_for(model, name, pooling_l, probe_set, k, getattr(unit_transform, "key", None))
        cached = store.get_run(key)
        if cached is not None:
            done[name] = cached
        else:
            plans.append(_LayerPlan(info, pooling_l, key, k_eff, store.partial_dir(key)))
    if not plans:
        if progress:
            progress(n_images, n_images, "all layers cached")
        return [done[name] for name in dict.fromkeys(layers)]

    manifest = {"chunk_size": chunk_size, "n_images": n_images, "probe_set": probe_set.id}
    trackers: dict[str, StreamingTopK] = {}
    for plan in plans:
        plan.partial.mkdir(parents=True, exist_ok=True)
        mpath = plan.partial / "manifest.json"
        if mpath.exists() and json.loads(mpath.read_text()) != manifest:
            shutil.rmtree(plan.partial)  # chunking changed: the old partial work does not fit
            plan.partial.mkdir(parents=True)
        atomic_write_text(mpath, json.dumps(manifest))
        trackers[plan.run_key] = StreamingTopK(getattr(unit_transform, "n_units", plan.info.n_neurons), plan.k,
                                               _map_shape(plan.info))
    resume_chunk = min(_latest_state(p.partial) for p in plans)
    if resume_chunk >= 0:
        for plan in plans:
            with np.load(plan.partial / f"state-{resume_chunk:05d}.npz") as state:
                trackers[plan.run_key].load(dict(state))
    start = (resume_chunk + 1) * chunk_size
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = model.module.to(dev).eval()
    layouts: dict[str, LayerLayout] = {p.info.name: p.info.layout for p in plans}
    if progress:
        progress(min(start, n_images), n_images, "resuming" if start else "starting")

    chunk_pooled: dict[str, list[np.ndarray]] = {p.run_key: [] for p in plans}
    position = start
    chunks_written = 0
    loader = image_loader(probe_set, model.transform, start, batch_size, num_workers) if start < n_images else []
    with torch.inference_mode(), LayerRecorder(module, [p.info.name for p in plans]) as rec:
        for batch in loader:
            module(batch.to(dev))
            for plan in plans:
                out = _as_units(to_batch_first(rec.outputs[plan.info.name], layouts[plan.info.name]), unit_transform)
                pooled = pool(out, plan.info.layout, plan.pooling).float().cpu()
                smap = spatial_map(out, plan.info.layout)

                def entering_maps(batch_idx, neuron_idx, smap=smap):
                    # only the maps of images that enter a top-k are shrunk and copied
                    return _shrink(smap[batch_idx.to(smap.device), neuron_idx.to(smap.device)][:, None].float())[:, 0].cpu()

                trackers[plan.run_key].update(pooled, None, position, entering_maps if smap is not None else None)
                chunk_pooled[plan.run_key].append(pooled.numpy())
            rec.outputs.clear()  # release this batch's layer outputs before the next forward pass
            position += batch.shape[0]
            if progress:
                progress(position, n_images, f"{position}/{n_images} images")
            if position % chunk_size == 0 or position == n_images:
                chunk = (position - 1) // chunk_size
                _write_chunk(plans, trackers, chunk_pooled, chunk)
                chunks_written += 1
                if stop_after_chunks is not None and chunks_written >= stop_after_chunks and position < n_images:
                    return []

    # how the model cropped its inputs, by preprocessing id: pages draw the model's view of each
    # image and methods re-create the model at this size without loading it to find out
    record_view(store, model.preprocessing)
    image_ids = [im.image_id for im in probe_set.images]
    n_chunks = (n_images + chunk_size - 1) // chunk_size
    for plan in plans:
        acts = np.concatenate([np.load(plan.partial / f"chunk-{c:05d}.npy") for c in range(n_chunks)], axis=0)
        values, indices, maps = trackers[plan.run_key].sorted()
        run_info = RunInfo(plan.run_key, model.spec, model.weights_id, plan.info.name, plan.pooling, probe_set.id,
                       model.preprocessing.id, k, CODE_VERSION, n_images, values.shape[0],
                       tuple(maps.shape[2:]) if maps is not None else None, plan.info.layout.kind,
                       units=getattr(unit_transform, "units_id", "neurons"))
        store.finish_run(run_info, acts, values, indices, image_ids, maps)
        shutil.rmtree(plan.partial, ignore_errors=True)
        finished = store.get_run(plan.run_key)
        assert finished is not None, f"finish_run just recorded run {plan.run_key}"
        done[plan.info.name] = finished
    if progress:
        progress(n_images, n_images, "done")
    return [done[name] for name in dict.fromkeys(layers)]


def _as_units(out: torch.Tensor, unit_transform: UnitTransform | None) -> torch.Tensor:
    return out if unit_transform is None else unit_transform(out)


def _write_chunk(plans: list[_LayerPlan], trackers: dict[str, StreamingTopK],
                 chunk_pooled: dict[str, list[np.ndarray]], chunk: int) -> None:
    """Persist one finished chunk for every layer, then drop the previous states."""
    for plan in plans:
        atomic_save_npy(plan.partial / f"chunk-{chunk:05d}.npy", np.concatenate(chunk_pooled[plan.run_key], axis=0))
        chunk_pooled[plan.run_key].clear()
        atomic_savez(plan.partial / f"state-{chunk:05d}.npz", **trackers[plan.run_key].state())
    for plan in plans:
        old = plan.partial / f"state-{chunk - 1:05d}.npz"
        if old.exists():
            old.unlink()
