"""Batched, resumable, sharded extraction of several layers in one pass over the images.

For every requested layer it records the pooled activation of every neuron on every image,
a top-k per neuron with the spatial map kept only for those k images (for crops, heatmaps
and masks), and mergeable statistics (:mod:`neuroviz.sketches`: moments, KLL sketches of the
pooled activations and of the map cells, from which MILAN's mask level comes).

The probe set is cut into shards (:mod:`neuroviz.shards`), run by an engine
(:mod:`neuroviz.engines`: this process by default, or a Ray cluster) and merged by one
reduce into the run the dashboard reads. Without ``shard_size`` the whole set is one shard:
today's single pass. Resumable at two levels: a finished shard is never redone, and within a
shard the work resumes from the last chunk that every layer finished (even after ``kill -9``),
ending with exactly the arrays an uninterrupted run would have produced.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

from . import engines, shards
from .datasets import ProbeSet
from .errors import NeurovizError
from .images import record_view
from .models import LayerInfo, ProbedModel
from .progress import Progress
from .provenance import provenance_key
from .shards import MAP_MAX_SIDE, LayerPlan, ShardJob, StreamingTopK, UnitTransform, path_loader
from .store import RunInfo, Store

__all__ = ["CODE_VERSION", "MAP_MAX_SIDE", "ExtractionError", "StreamingTopK", "extract", "image_loader",
           "resolve_pooling", "run_key_for"]

CODE_VERSION = "extract-1"  # unchanged by sharding and sketches: the stored arrays and tables are the same


class ExtractionError(NeurovizError, ValueError):
    """A request that cannot be extracted (bad pooling, empty probe set, bad sizes); says why."""


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


def image_loader(probe_set: ProbeSet, transform, start: int = 0, batch_size: int = 32, num_workers: int = 0):
    """Batches of preprocessed images from index ``start`` on, in probe-set order."""
    return path_loader([im.path for im in probe_set.images[start:]], transform, batch_size, num_workers)


def _recreate(spec: str, image_size: int, weights_id: str) -> ProbedModel:
    """The model again, in another process (a Ray actor): the same weights or an error."""
    from .models import create

    model = create(spec, image_size=image_size)
    if model.weights_id != weights_id:
        raise ExtractionError(f"Model {spec} loaded with other weights on a Ray worker; its shards would not match.")
    return model


def extract(model: ProbedModel, probe_set: ProbeSet, layers: Sequence[str], store: Store,
            pooling: str | None = None, k: int = 50, batch_size: int = 32, chunk_size: int = 256,
            progress: Progress | None = None, num_workers: int = 0, device: str | None = None,
            stop_after_chunks: int | None = None, engine: str = "inprocess", shard_size: int | None = None,
            address: str | None = None, unit_transform: UnitTransform | None = None) -> list[RunInfo]:
    """Extract ``layers`` over ``probe_set`` into ``store``; cached layers are not recomputed.

    Returns the RunInfo of every requested layer. ``engine`` runs the shards: "inprocess" or
    "ray" (``address``: "auto", "HOST:PORT", or None for a new local cluster). ``shard_size``
    cuts the probe set into shards of that many images (a multiple of ``batch_size``; default:
    one shard in process, 16 shards on Ray). ``stop_after_chunks`` stops early (for tests
    of resumption) without finishing the run. ``unit_transform`` (one layer only) turns the
    layer's batch-first output into units (neuroviz.units) before pooling and maps
    (``neuroviz.sae.extract_units`` gives one).
    """
    if not layers:
        raise ExtractionError("Choose at least one layer.")
    for name, value in (("k", k), ("batch size", batch_size), ("chunk size", chunk_size), ("shard size", shard_size)):
        if value is not None and int(value) < 1:
            raise ExtractionError(f"The {name} must be at least 1 (got {value}).")
    engines.check_engine(engine)
    if chunk_size % batch_size:
        chunk_size = max(batch_size, (chunk_size // batch_size) * batch_size)
    store.register_probe_set(probe_set)
    n_images = len(probe_set)
    if not n_images:
        raise ExtractionError("The probe set has no images.")
    k_eff = min(k, n_images)
    plans: list[LayerPlan] = []
    done: dict[str, RunInfo] = {}
    infos: dict[str, LayerInfo] = {}
    owned: set[str] = set()  # runs this process alone writes: only it may clear their leftovers
    with contextlib.ExitStack() as locks:
        for name in dict.fromkeys(layers):
            info = model.layer(name)
            pooling_l = resolve_pooling(info, pooling)
            key = run_key_for(model, name, pooling_l, probe_set, k, getattr(unit_transform, "key", None))
            if locks.enter_context(store.run_writer_lock(key)):
                owned.add(key)
                store.clean_run_leftovers(key)  # a killed writer's temporary files; partial/ of a committed run
            cached = store.get_run(key)
            if cached is not None:
                done[name] = cached
            else:
                infos[name] = info
                plans.append(LayerPlan(name, pooling_l, key, k_eff, str(store.partial_dir(key))))
        if not plans:
            if progress:
                progress(n_images, n_images, "all layers cached")
            return [done[name] for name in dict.fromkeys(layers)]
        size = _shard_size(engine, shard_size, n_images, batch_size)
        chunk_size = min(chunk_size, size)
        all_shards = shards.plan_shards(n_images, size)
        manifest = {"chunk_size": chunk_size, "shard_size": size, "n_images": n_images, "probe_set": probe_set.id}
        for plan in plans:
            shards.prepare_partial(plan, manifest)
        job = ShardJob(tuple(plans), tuple(im.path for im in probe_set.images), batch_size, chunk_size, num_workers, device,
                       unit_transform)
        todo = [s for s in all_shards if not all(shards.shard_done(p, s.index) for p in plans)]
        done_images = n_images - sum(len(s) for s in todo)
        if progress:
            progress(done_images, n_images, f"{len(all_shards) - len(todo)}/{len(all_shards)} shards done, resuming"
                     if done_images else f"starting {len(all_shards)} shard{'s' if len(all_shards) > 1 else ''}")
        factory = functools.partial(_recreate, model.spec, model.preprocessing.image_size, model.weights_id)
        engines.run_shards(engine, model, factory, job, todo, n_images, done_images, progress, address, stop_after_chunks)
        if not all(shards.shard_done(p, s.index) for p in plans for s in all_shards):
            return []  # stopped early (stop_after_chunks)

        # how the model cropped its inputs, by preprocessing id: pages draw the model's view of each
        # image and methods re-create the model at this size without loading it to find out
        record_view(store, model.preprocessing)
        image_ids = [im.image_id for im in probe_set.images]
        for plan in plans:
            if progress:
                progress(n_images, n_images, f"merging {len(all_shards)} shard{'s' if len(all_shards) > 1 else ''} of {plan.layer}")
            info = infos[plan.layer]
            reduced = shards.reduce_run(plan, all_shards, k_eff)
            run_info = RunInfo(plan.run_key, model.spec, model.weights_id, plan.layer, plan.pooling, probe_set.id,
                               model.preprocessing.id, k, CODE_VERSION, n_images,
                               getattr(unit_transform, "n_units", info.n_neurons),
                               tuple(reduced.maps.shape[2:]) if reduced.maps is not None else None, info.layout.kind,
                               units=getattr(unit_transform, "units_id", "neurons"))
            store.write_run(run_info, reduced.acts_blocks, reduced.top_values, reduced.top_indices, image_ids,
                            reduced.maps, reduced.stats, ready_files=reduced.ready_files)
            if plan.run_key in owned:
                store.clean_run_leftovers(plan.run_key)  # the shards, now that run.json is committed
            finished = store.get_run(plan.run_key)
            assert finished is not None, f"write_run just recorded run {plan.run_key}"
            done[plan.layer] = finished
    if progress:
        progress(n_images, n_images, "done")
    return [done[name] for name in dict.fromkeys(layers)]


def _shard_size(engine: str, shard_size: int | None, n_images: int, batch_size: int) -> int:
    """Images per shard, a multiple of the batch size (batches then never straddle shards, so
    every engine and shard size sees the same batches and computes the same numbers)."""
    if shard_size is None:
        shard_size = n_images if engine == "inprocess" else max(batch_size, -(-n_images // 16))
    return max(batch_size, -(-int(shard_size) // batch_size) * batch_size)
