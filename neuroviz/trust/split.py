"""A seeded content-hash split of a probe set into a fit part and a score part.

Labels must be scored on images the method never saw while labelling. Image ids are content
hashes, so hashing ``seed:image_id`` puts an image in the same part whatever folder, order or
probe set it comes in, and adding images never moves the others.

The *fit run* is the run restricted to the fit part: activations of the fit images only, and
a top-k over them. Because the parent's top-k is sorted and every fit image outside it ranks
below all of it, the first ``k_fit`` fit images of each neuron's parent top-k are exactly the
neuron's top ``k_fit`` over the fit part; ``k_fit`` is the smallest count of fit images in any
neuron's parent top-k, so every map the fit run keeps is a real, stored one and no extraction
is rerun. The fit run is an ordinary run over an ordinary probe set (the fit images), so every
method labels it without change and cannot see a scoring image; its key records the parent
run and the split, and so do the keys of the labels made from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .. import column_scan
from ..errors import NeurovizError
from ..provenance import provenance_key
from ..store import RunInfo, Store

FIT_RUNS = "fit_runs"  # records namespace: fit run key -> {"parent": run key, "split": split}
MIN_FIT_K = 5  # below this many top images per neuron a fit run is not worth labelling


class SplitError(NeurovizError, ValueError):
    """A split that cannot be made on this probe set or run; the message says why."""


@dataclass(frozen=True)
class HeldOutSplit:
    """Which images a method may fit on; the rest score its labels."""

    seed: int = 0
    score_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.score_fraction < 1.0:
            raise SplitError(f"The score fraction must be between 0 and 1, got {self.score_fraction}.")

    def score_mask(self, image_ids: Sequence[str]) -> np.ndarray:
        """True for the images that score labels (never shown to a method that fits)."""
        cut = int(self.score_fraction * 2**64)
        return np.array([int.from_bytes(hashlib.sha256(f"{self.seed}:{i}".encode()).digest()[:8], "big") < cut
                         for i in image_ids], dtype=bool)

    def describe(self) -> str:
        return f"content-hash split seed {self.seed}, {self.score_fraction:.0%} scored"


def fit_run_key(run: RunInfo, split: HeldOutSplit) -> str:
    """The key of ``run``'s fit run under ``split`` (a function of both, so it never goes stale)."""
    return provenance_key({"fit_of": run.run_key, "split": asdict(split)})


def parent_of(store: Store, run: RunInfo) -> tuple[RunInfo, HeldOutSplit] | None:
    """(parent run, split) when ``run`` is a fit run, else None."""
    record = store.get_record(FIT_RUNS, run.run_key)
    if not record:
        return None
    parent = store.get_run(record["parent"])
    return (parent, HeldOutSplit(**record["split"])) if parent is not None else None


def fit_run(store: Store, run: RunInfo, split: HeldOutSplit) -> RunInfo:
    """The run restricted to the fit part of its probe set (made once, from the cached arrays)."""
    from ..datasets import ProbeImage, ProbeSet
    from ..sketches import NeuronStats

    key = fit_run_key(run, split)
    existing = store.get_run(key)
    if existing is not None:
        return existing
    files = store.probe_files(run.probe_set_id)
    score = split.score_mask(list(files.image_ids))
    fit_rows = np.flatnonzero(~score)
    if len(fit_rows) < 2 * MIN_FIT_K or score.sum() < 3:
        raise SplitError(f"The probe set has {len(files)} images: too few to split into a fit and a score part.")
    top = store.top_k(run.run_key)
    in_fit = ~score[top.image_idx]  # (neurons, k)
    k_fit = int(in_fit.sum(axis=1).min())
    if k_fit < MIN_FIT_K:
        raise SplitError(f"Some neuron has only {k_fit} of its top {run.k} images in the fit part; "
                         f"extract with a larger k (e.g. --k {2 * run.k}) to hold out images.")
    new_index = np.full(len(files), -1, dtype=np.int64)
    new_index[fit_rows] = np.arange(len(fit_rows))
    ranks = np.argsort(~in_fit, axis=1, kind="stable")[:, :k_fit]  # the first k_fit fit images, in rank order
    top_idx = new_index[np.take_along_axis(top.image_idx, ranks, axis=1)]
    top_val = np.take_along_axis(top.activation, ranks, axis=1)
    maps = None
    parent_maps = store.run_dir(run.run_key) / "maps.npy"
    if parent_maps.exists():
        all_maps = np.load(parent_maps, mmap_mode="r")
        maps = np.stack([np.asarray(all_maps[n][ranks[n]]) for n in range(run.n_neurons)])
    parent_name = next((p["name"] for p in store.probe_sets() if p["probe_set_id"] == run.probe_set_id), run.probe_set_id[:8])
    probe = ProbeSet(f"{parent_name} (fit part, seed {split.seed})", f"split:{run.probe_set_id}:{split.seed}:{split.score_fraction}",
                     [ProbeImage(files.image_ids[i], files.paths[i], files.labels[i]) for i in fit_rows])
    store.register_probe_set(probe)
    info = RunInfo(key, run.model_spec, run.weights_id, run.layer, run.pooling, probe.id, run.preprocess_id, k_fit,
                   run.code_version, len(fit_rows), run.n_neurons, run.map_shape, run.layer_kind)
    store.put_record(FIT_RUNS, key, {"parent": run.run_key, "split": asdict(split)})
    parent_acts = store.activations(run.run_key)
    rows_per_block = max(1, column_scan.ROW_BLOCK_BYTES // (4 * max(1, run.n_neurons)))

    def fit_blocks() -> Iterator[np.ndarray]:  # the fit rows of the parent's activations, a row block at a time
        for start in range(0, len(fit_rows), rows_per_block):
            yield column_scan.take_rows(parent_acts, fit_rows[start:start + rows_per_block])

    stats = NeuronStats(run.n_neurons, spatial=False)
    for block in fit_blocks():
        stats.update(block)
    store.write_run(info, fit_blocks, top_val, top_idx, [im.image_id for im in probe.images], maps, stats)
    return store.get_run(key) or info


def score_rows(store: Store, run: RunInfo, split: HeldOutSplit) -> np.ndarray:
    """Rows of ``run``'s activations that score labels (the images outside the fit part)."""
    return np.flatnonzero(split.score_mask([im["image_id"] for im in store.probe_images(run.probe_set_id)]))
