"""Sharded extraction: one shard of the probe set at a time, into files; then one reduce.

A run is split into shards (contiguous ranges of the probe set). :func:`extract_shard` turns
one shard into files under each layer's ``runs/<key>/partial/``, by itself (any process, any
machine that sees the cache)::

    partial/manifest.json            shard and chunk sizes: partial work of other sizes is dropped
    partial/shard-00003/             a finished shard (appears whole: written as a hidden folder, renamed)
        acts.npy                     the shard's images x neurons, float32
        topk.parquet                 neuron, rank, image_idx, activation: the shard's own top k
        maps.npy                     neurons x k x h x w float16, in that rank order
        stats.npz                    :class:`~neuroviz.sketches.NeuronStats` (moments, KLL sketches)
    partial/work-00003/              an unfinished shard: chunk-*.npy and the state-*.npz of the
                                     last chunk every layer finished (resumes from there)

:func:`reduce_run` merges the finished shards into the run the dashboard reads: the top k of
the union by a DuckDB ``QUALIFY row_number()`` over the shards' Parquet files read in place
(ties by image index, as a single pass orders them), the maps of the winners gathered from the
shards' arrays, activations concatenated in a stream, statistics merged. Every file is
written atomically and ``run.json`` last, so a reduce killed at any point loses nothing: the
shards stay until the run is committed, and the next call reduces again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import load_rgb
from .files import atomic_directory, atomic_save_npy, atomic_save_npy_blocks, atomic_savez, atomic_write_text, npy_header, npy_row_blocks
from .hooks import LayerRecorder, pool, spatial_map, to_batch_first
from .models import LayerInfo
from .progress import Progress
from .sketches import NeuronStats
from .store import _cursor, _write_parquet

MAP_MAX_SIDE = 32  # top-k maps are stored at most 32x32: enough for crops, masks and heatmaps
MAP_DTYPE = torch.float16  # and in half precision (maps.npy)
UnitTransform = Callable[[torch.Tensor], torch.Tensor]  # batch-first layer output -> units (neuroviz.units)


@dataclass(frozen=True)
class LayerPlan:
    """One layer of a run still to extract: what names it and where its shards go."""

    layer: str
    pooling: str
    run_key: str
    k: int  # top images kept per neuron (at most the number of images)
    partial: str  # the run's partial/ folder


@dataclass(frozen=True)
class Shard:
    """Images [start, stop) of the probe set: shard ``index`` of ``count``."""

    index: int
    count: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to extract any shard of a run (plain values: it travels to Ray actors)."""

    plans: tuple[LayerPlan, ...]
    paths: tuple[str, ...]  # every probe image, in probe-set order
    batch_size: int
    chunk_size: int
    num_workers: int = 0
    device: str | None = None
    unit_transform: Any = None  # neuroviz.units.UnitTransform: the layer's units instead of its neurons


def plan_shards(n_images: int, shard_size: int | None) -> list[Shard]:
    """Contiguous shards of ``shard_size`` images (one shard when None)."""
    size = max(1, shard_size or n_images or 1)
    count = max(1, -(-n_images // size))
    return [Shard(i, count, i * size, min(n_images, (i + 1) * size)) for i in range(count)]


def shard_dir(plan: LayerPlan, index: int) -> Path:
    return Path(plan.partial) / f"shard-{index:05d}"


def work_dir(plan: LayerPlan, index: int) -> Path:
    return Path(plan.partial) / f"work-{index:05d}"


def shard_done(plan: LayerPlan, index: int) -> bool:
    return (shard_dir(plan, index) / "stats.npz").exists()


def prepare_partial(plan: LayerPlan, manifest: dict) -> None:
    """Create ``partial/``; partial work cut with other sizes does not fit and is dropped."""
    partial = Path(plan.partial)
    partial.mkdir(parents=True, exist_ok=True)
    mpath = partial / "manifest.json"
    try:
        old = json.loads(mpath.read_text())
    except (OSError, ValueError):
        old = None
    if old is not None and old != manifest:
        shutil.rmtree(partial)
        partial.mkdir(parents=True)
    atomic_write_text(mpath, json.dumps(manifest))


# --------------------------------------------------------------------------------------
# Streaming top-k (within a shard)
# --------------------------------------------------------------------------------------
class StreamingTopK:
    """Top-k images per neuron, merged batch by batch, with their spatial maps.

    Entries live in k unsorted "slots" per neuron. A batch only writes the maps of the
    images that actually enter some neuron's top-k into the slots they evict, so after the
    first batches almost no map is copied: the cost follows the number of replacements, not
    neurons x k x map size. Ties go to the smaller image index (batches come in image order),
    as in the reduce, so shards merge to what one pass would keep. ``sorted()`` orders once.
    Maps are kept in float16, the precision they are stored in: slots only copy maps, so the
    stored values are the same as rounding at the end, at half the memory and copying.
    """

    def __init__(self, n_neurons: int, k: int, map_shape: tuple[int, int] | None):
        self.k = k
        self.values = torch.full((n_neurons, k), -torch.inf)
        self.indices = torch.full((n_neurons, k), -1, dtype=torch.long)
        self.maps = torch.zeros((n_neurons, k, *map_shape), dtype=MAP_DTYPE) if map_shape else None

    def update(self, pooled: torch.Tensor, maps: torch.Tensor | None, first_index: int,
               map_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Merge a batch: pooled is (B, neurons); maps (B, neurons, h, w), or map_fn(batch_idx,
        neuron_idx) -> (M, h, w) that computes only the maps of the entering images."""
        n, k = self.values.shape
        b = pooled.shape[0]
        cand = torch.cat([self.values, pooled.T.float()], dim=1)
        cand_idx = torch.cat([self.indices, torch.arange(first_index, first_index + b).expand(n, b)], dim=1)
        cand_idx = torch.where(cand_idx < 0, torch.iinfo(torch.long).max, cand_idx)  # empty slots lose ties
        by_index = torch.argsort(cand_idx, dim=1, stable=True)
        order = torch.gather(by_index, 1, torch.argsort(-torch.gather(cand, 1, by_index), dim=1, stable=True))
        sel = order[:, :k]
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
                self.maps[ev_neuron, ev_slot] = map_fn(in_batch, in_neuron).to(MAP_DTYPE)
            elif maps is not None:
                self.maps[ev_neuron, ev_slot] = maps[in_batch, in_neuron].to(MAP_DTYPE)

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
            self.maps = torch.from_numpy(np.array(state["maps"])).to(MAP_DTYPE)  # states saved before were float32


def shrink(maps: torch.Tensor) -> torch.Tensor:
    """Maps larger than MAP_MAX_SIDE averaged down to it (the size stored and sketched)."""
    h, w = maps.shape[-2:]
    if h <= MAP_MAX_SIDE and w <= MAP_MAX_SIDE:
        return maps
    return F.adaptive_avg_pool2d(maps, (min(h, MAP_MAX_SIDE), min(w, MAP_MAX_SIDE)))


def map_shape(info: LayerInfo) -> tuple[int, int] | None:
    """The stored size of a layer's maps (None: the layer has no square map)."""
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


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[i]))


def path_loader(paths: Sequence[str], transform, batch_size: int = 32, num_workers: int = 0):
    """Batches of preprocessed images, in order."""
    return torch.utils.data.DataLoader(_ImageDataset(paths, transform), batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers)


# --------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------
def _latest_state(folder: Path) -> int:
    """Highest chunk number with a complete state file in ``folder`` (-1 if none)."""
    best = -1
    for p in folder.glob("state-*.npz"):
        try:
            best = max(best, int(p.stem.split("-")[1]))
        except (IndexError, ValueError):
            continue
    return best


class _LayerWork:
    """One layer's running state over one shard."""

    def __init__(self, plan: LayerPlan, info: LayerInfo, shard: Shard, n_units: int | None = None):
        self.plan, self.info = plan, info
        self.work = work_dir(plan, shard.index)
        self.shape = map_shape(info)
        n = n_units or info.n_neurons
        self.top = StreamingTopK(n, min(plan.k, len(shard)), self.shape)
        self.stats = NeuronStats(n, spatial=self.shape is not None)
        self.pooled: list[np.ndarray] = []

    def save_chunk(self, chunk: int, with_state: bool = True) -> None:
        """The chunk's activations, and (unless the shard is finished next) the state to resume from."""
        atomic_save_npy(self.work / f"chunk-{chunk:05d}.npy", np.concatenate(self.pooled, axis=0))
        self.pooled.clear()
        if not with_state:
            return
        atomic_savez(self.work / f"state-{chunk:05d}.npz", **self.top.state(),
                     **{f"stats_{k}": v for k, v in self.stats.to_arrays().items()})

    def drop_state(self, chunk: int) -> None:
        (self.work / f"state-{chunk:05d}.npz").unlink(missing_ok=True)

    def load(self, chunk: int) -> None:
        with np.load(self.work / f"state-{chunk:05d}.npz") as state:
            arrays = dict(state)
        self.top.load({k: v for k, v in arrays.items() if not k.startswith("stats_")})
        self.stats = NeuronStats.from_arrays({k[len("stats_"):]: v for k, v in arrays.items() if k.startswith("stats_")})

    def finish(self, shard: Shard, n_chunks: int) -> None:
        """Write the shard's result folder (appears whole), then drop the chunk work."""
        values, indices, maps = self.top.sorted()
        n_neurons, k = indices.shape
        with atomic_directory(shard_dir(self.plan, shard.index)) as tmp:
            chunks = [self.work / f"chunk-{c:05d}.npy" for c in range(n_chunks)]
            rows = sum(npy_header(c)[0][0] for c in chunks)
            atomic_save_npy_blocks(tmp / "acts.npy", (rows, n_neurons), npy_row_blocks(chunks))
            if maps is not None:
                atomic_save_npy(tmp / "maps.npy", maps)
            _write_parquet(tmp / "topk.parquet", "shard_topk", {
                "neuron": np.repeat(np.arange(n_neurons, dtype=np.int32), k), "rank": np.tile(np.arange(k, dtype=np.int32), n_neurons),
                "image_idx": indices.reshape(-1).astype(np.int32), "activation": values.reshape(-1).astype(np.float32)})
            atomic_savez(tmp / "stats.npz", **self.stats.to_arrays())  # written last: marks the shard finished
        shutil.rmtree(self.work, ignore_errors=True)


def sketch_threads(n_layers: int, cpu_count: int | None = None) -> int:
    """Threads that feed the layers' sketches: one per layer, up to half the cores (1 on 2 cores).

    Each layer's sketches are fed by one thread in batch order, so the result does not depend on
    the count; on a GPU machine the CPU-side sketches would otherwise bound the throughput.
    """
    return max(1, min(n_layers, (cpu_count or os.cpu_count() or 1) // 2))


def extract_shard(model, job: ShardJob, shard: Shard, progress: Progress | None = None,
                  chunk_budget: int | None = None, unit_transform: UnitTransform | None = None) -> int:
    """Extract one shard of every layer of ``job`` not yet finished; resumes from its last chunk.

    ``model`` is a :class:`~neuroviz.models.ProbedModel`. ``chunk_budget`` stops after that many
    chunks (tests of resumption). ``unit_transform`` (default: the job's) turns each batch-first
    layer output into units (neuroviz.units) before pooling and maps. Returns the number of chunks written.
    """
    plans = [p for p in job.plans if not shard_done(p, shard.index)]
    if not plans:
        return 0
    chunk_size = job.chunk_size
    transform = unit_transform if unit_transform is not None else job.unit_transform
    n_units = getattr(transform, "n_units", None)
    works = [_LayerWork(p, model.layer(p.layer), shard, n_units) for p in plans]
    for w in works:
        w.work.mkdir(parents=True, exist_ok=True)
    resume = min(_latest_state(w.work) for w in works)
    if resume >= 0:
        for w in works:
            w.load(resume)
    position = shard.start + (resume + 1) * chunk_size
    n_chunks = -(-len(shard) // chunk_size)
    dev = torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = model.module.to(dev).eval()
    label = f"shard {shard.index + 1}/{shard.count}"

    def report(pos: int, prefix: str = "") -> None:
        if progress:
            progress(pos, shard.stop, f"{prefix}{label} · {pos - shard.start:,}/{len(shard):,} images")

    report(position, "resuming " if resume >= 0 else "")
    written = 0
    loader = path_loader(job.paths[position:shard.stop], model.transform, job.batch_size, job.num_workers) \
        if position < shard.stop else []
    # The sketches are fed on other threads (DataSketches releases the GIL), one batch behind
    # the forward pass: on a GPU their CPU work then hides behind the next batch.
    with torch.inference_mode(), LayerRecorder(module, [w.plan.layer for w in works]) as rec, \
            ThreadPoolExecutor(max_workers=sketch_threads(len(works)), thread_name_prefix="sketches") as sketcher:
        pending: list[Future] = []
        for batch in loader:
            module(batch.to(dev))
            updates = []
            for w in works:
                out = to_batch_first(rec.outputs[w.plan.layer], w.info.layout)
                if transform is not None:
                    out = transform(out)
                pooled = pool(out, w.info.layout, w.plan.pooling).float().cpu()
                smap = spatial_map(out, w.info.layout) if w.shape is not None else None
                small = shrink(smap.float()).cpu() if smap is not None else None

                def entering_maps(batch_idx, neuron_idx, small=small):
                    return small[batch_idx, neuron_idx]

                w.top.update(pooled, None, position - shard.start, entering_maps if small is not None else None)
                updates.append((w.stats, pooled.numpy(), small.numpy() if small is not None else None))
                w.pooled.append(pooled.numpy())
            rec.outputs.clear()  # release this batch's layer outputs before the next forward pass
            for done in pending:
                done.result()
            pending = [sketcher.submit(stats.update, pooled, maps, position) for stats, pooled, maps in updates]
            position += batch.shape[0]
            report(position)
            local = position - shard.start
            if local % chunk_size == 0 or position == shard.stop:
                for done in pending:
                    done.result()
                chunk = (local - 1) // chunk_size
                last = position == shard.stop  # the shard's files come next: a kill before them redoes this chunk
                for w in works:
                    w.save_chunk(chunk, with_state=not last)
                if not last:
                    for w in works:
                        w.drop_state(chunk - 1)
                written += 1
                if chunk_budget is not None and written >= chunk_budget and position < shard.stop:
                    return written
    for w in works:
        w.finish(shard, n_chunks)
    return written


# --------------------------------------------------------------------------------------
# The reduce
# --------------------------------------------------------------------------------------
@dataclass
class ReducedRun:
    """A layer's merged shards: what Store.write_run stores."""

    acts_blocks: Callable[[], Iterator[np.ndarray]]  # the shards' activations in row blocks, in order (a fresh stream per call)
    n_images: int
    top_values: np.ndarray
    top_indices: np.ndarray
    maps: np.ndarray | None
    stats: NeuronStats
    ready_files: dict[str, Path]  # run files a single shard holds as they are (linked, not rewritten)


def reduce_run(plan: LayerPlan, shards: Sequence[Shard], k: int) -> ReducedRun:
    """Merge a layer's finished shards (top k of the union, maps, statistics)."""
    folders = [shard_dir(plan, s.index) for s in shards]
    missing = [str(f) for f in folders if not (f / "stats.npz").exists()]
    if missing:
        raise FileNotFoundError(f"unfinished shards: {', '.join(missing)}")
    stats: NeuronStats | None = None
    for f in folders:
        with np.load(f / "stats.npz") as arrays:
            part = NeuronStats.from_arrays(arrays)
        if stats is None:
            stats = part
        else:
            stats.merge(part)
    assert stats is not None, "a run has at least one shard"
    files = [f / "topk.parquet" for f in folders]
    # the shard's image indices are local to it: add its start to get the probe-set index
    starts = {str(f / "topk.parquet"): s.start for f, s in zip(folders, shards)}
    rows = _top_rows(files, starts, k)
    n_neurons = stats.n_neurons
    k_eff = len(rows["neuron"]) // max(n_neurons, 1)
    top_indices = rows["global_idx"].to_numpy(dtype=np.int64).reshape(n_neurons, k_eff)
    top_values = rows["activation"].to_numpy(dtype=np.float32).reshape(n_neurons, k_eff)
    maps = None
    ready: dict[str, Path] = {}
    if len(folders) == 1:  # one shard: its activations and maps (top k in the run's order) are the run's
        ready["acts.npy"] = folders[0] / "acts.npy"
        if (folders[0] / "maps.npy").exists():
            ready["maps.npy"] = folders[0] / "maps.npy"
            maps = np.load(ready["maps.npy"], mmap_mode="r")  # for its shape: write_run links the file
    elif (folders[0] / "maps.npy").exists():
        first = np.load(folders[0] / "maps.npy", mmap_mode="r")
        maps = np.zeros((n_neurons, k_eff, *first.shape[2:]), dtype=np.float16)
        neuron_col = rows["neuron"].to_numpy(dtype=np.int64)
        slot_col = rows["rank"].to_numpy(dtype=np.int64)
        out_rank = np.tile(np.arange(k_eff), n_neurons)
        for name, group in rows.groupby("filename", sort=False).indices.items():
            shard_maps = np.load(Path(name).parent / "maps.npy", mmap_mode="r")
            maps[neuron_col[group], out_rank[group]] = shard_maps[neuron_col[group], slot_col[group]]

    def acts_blocks() -> Iterator[np.ndarray]:
        return npy_row_blocks([f / "acts.npy" for f in folders])

    return ReducedRun(acts_blocks, shards[-1].stop, top_values, top_indices, maps, stats, ready)


def _top_rows(files: Sequence[Path], starts: dict[str, int], k: int):
    """Per neuron, the k best rows of the shards' top-k files (ties: smaller image index)."""
    import pandas as pd

    offsets = pd.DataFrame({"filename": list(starts), "start": list(starts.values())})
    src_files = [str(f) for f in files]
    cur = _cursor()
    try:
        cur.register("shard_starts", offsets)
        return cur.execute("""
            SELECT t.neuron, t.rank, t.activation, t.filename, t.image_idx + s.start AS global_idx
            FROM read_parquet(?, filename = true) AS t JOIN shard_starts AS s USING (filename)
            QUALIFY row_number() OVER (PARTITION BY t.neuron ORDER BY t.activation DESC, global_idx) <= ?
            ORDER BY t.neuron, t.activation DESC, global_idx
        """, [src_files, int(k)]).df()
    finally:
        cur.close()

