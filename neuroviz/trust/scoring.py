"""Every label set of a layer scored the same way, on the same held-out images.

A label's *predicted activation* on an image is the multimodal backend's image-text
similarity; a weighted label ("0.6 dog + 0.3 grass", Linear Explanations) predicts the same
weighted sum of its concepts' similarities. Concept presence for AUPRC, F1 and IoU is ground truth when every label of a set names one
of the images' classes (the probe set's labels: an oracle row, a classifier's output layer);
otherwise each label's own top predictions. Units are scored only on the *scoring images*:
the score part of the run's own probe set (see :mod:`.split`), or a second probe set's run of
the same layer (``score_run``), minus any image that is in the fit part.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import column_scan
from ..errors import NeurovizError
from ..store import RunInfo, Store
from .metrics import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_TOP_FRACTION,
    METRICS,
    MetricScores,
    Prepared,
    auprc_resampled_columns,
    bootstrap_weights,
    prepare,
    score_prepared,
)
from .split import HeldOutSplit, parent_of


def normalise_label(text: str) -> str:
    """Lower case, underscores as spaces, single spaces: 'Great_White shark' == 'great white shark'."""
    return re.sub(r"\s+", " ", str(text).replace("_", " ")).strip().casefold()


_TERM = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s+(\S.*?)\s*$")
MIN_SCORING_IMAGES = 3
SCORING_BLOCK_BYTES = 64 * 2**20  # a block of units (or labels) over every scoring image, while it is scored
# bytes per image and unit while a block is scored: activations and predictions standardised,
# binarised and ranked, and the metrics' temporaries
SCORING_BYTES_PER_CELL = 16


class ScoringError(NeurovizError, ValueError):
    """Labels that cannot be scored as asked (too few held-out images, a mismatched run)."""


@dataclass
class LabelSet:
    """One method's (or baseline's) label per unit of a layer."""

    name: str  # "clip_dissect", "baseline: depiction", "shuffled: clip_dissect", "oracle: class names"
    kind: str  # "method", "constant", "shuffled" or "oracle"
    labels: dict[int, str]
    label_key: str | None = None
    note: str = ""  # which label run: method, concept set, backends, date
    held_out: bool = True  # False when the method saw the scoring images while labelling


@dataclass
class ScoringImages:
    """The images labels are scored on: activations of the layer and the backend's embeddings.

    ``acts`` and ``image_emb`` are the source run's whole arrays (memory-mapped for a run) and
    ``rows`` the scoring images' rows of them: they are read a block of units or of images at a
    time (:meth:`unit_columns`, :meth:`predictions`), never whole.
    """

    acts: np.ndarray  # (images, neurons)
    image_emb: np.ndarray  # (images, dim)
    image_ids: list[str]
    description: str
    image_classes: list[str] = field(default_factory=list)  # each image's class (normalised), "" when unlabelled
    rows: np.ndarray | None = None  # the scoring images' rows of ``acts`` and ``image_emb`` (None: all, in order)

    def presence(self, label: str) -> np.ndarray | None:
        """Ground truth for a label that names one of the images' classes: True where the image is of it."""
        key = normalise_label(label)
        if not key or key not in set(self.image_classes):
            return None
        return np.array([c == key for c in self.image_classes], dtype=bool)

    def columns_per_block(self, bytes_per_cell: int = SCORING_BYTES_PER_CELL) -> int:
        """How many units (or labels) to score at once over every scoring image, within SCORING_BLOCK_BYTES."""
        return max(1, SCORING_BLOCK_BYTES // max(1, bytes_per_cell * len(self.image_ids)))

    def unit_columns(self, units: Sequence[int] | np.ndarray) -> np.ndarray:
        """(scoring images, len(units)) activations, read a row block at a time."""
        columns = column_scan.column_block(self.acts, np.asarray(units, dtype=np.int64))
        return columns if self.rows is None else columns[self.rows]

    def predictions(self, multimodal, text_emb: np.ndarray, row_of: dict[str, int], labels: Sequence[str]) -> np.ndarray:
        """(scoring images, len(labels)) predicted activations (:func:`predicted_activations`), a row block of
        image embeddings at a time."""
        index = np.arange(self.image_emb.shape[0]) if self.rows is None else np.asarray(self.rows, dtype=np.int64)
        out = np.empty((len(index), len(labels)), dtype=np.float32)
        if not len(labels):
            return out
        needed = sorted({text for label in labels for _, text in label_terms(label)})  # only these labels' texts
        texts, text_row = text_emb[[row_of[t] for t in needed]], {t: i for i, t in enumerate(needed)}
        step = max(1, column_scan.ROW_BLOCK_BYTES // (4 * (self.image_emb.shape[1] + len(needed) + len(labels))))
        for start in range(0, len(index), step):
            emb = column_scan.take_rows(self.image_emb, index[start:start + step])
            out[start:start + step] = predicted_activations(multimodal, emb, texts, text_row, labels)
        return out


@dataclass
class ScoredLabelSet:
    """One label set's metrics on the scoring images, per unit (``neurons``) and for the layer."""

    label_set: LabelSet
    neurons: np.ndarray
    scores: MetricScores

    def per_unit(self, metric: str) -> dict[int, float]:
        return dict(zip(self.neurons.tolist(), self.scores.values[metric].tolist()))


def label_terms(label: str) -> list[tuple[float, str]]:
    """'0.6 dog + 0.3 grass' -> [(0.6, 'dog'), (0.3, 'grass')]; a plain label -> [(1.0, label)]."""
    parts = str(label).split(" + ")
    terms = [_TERM.match(p) for p in parts]
    if len(parts) > 1 and all(terms):
        return [(float(m.group(1)), m.group(2)) for m in terms if m]
    return [(1.0, str(label))]


def label_texts(label_sets: Sequence[LabelSet]) -> list[str]:
    """Every text whose embedding the label sets need (the concepts of weighted labels)."""
    return sorted({text for ls in label_sets for label in ls.labels.values() for _, text in label_terms(label)})


def predicted_activations(multimodal, image_emb: np.ndarray, text_emb: np.ndarray, row_of: dict[str, int],
                          labels: Sequence[str], similarity: np.ndarray | None = None) -> np.ndarray:
    """(images, len(labels)) predicted activation of each label on each image (``similarity``:
    the image-text matrix of ``text_emb``, when the caller already has it)."""
    sim = np.asarray(multimodal.similarity(image_emb, text_emb) if similarity is None else similarity, dtype=np.float32)
    out = np.zeros((image_emb.shape[0], len(labels)), dtype=np.float32)
    for j, label in enumerate(labels):
        terms = label_terms(label)
        if len(terms) == 1:
            out[:, j] = sim[:, row_of[terms[0][1]]]
            continue
        for weight, text in terms:
            out[:, j] += weight * sim[:, row_of[text]]
    return out


def scoring_images(store: Store, run: RunInfo, multimodal, split: HeldOutSplit, score_run: RunInfo | None = None) -> ScoringImages:
    """The held-out images of ``run`` (its score part), or every image of ``score_run`` that is not
    in ``run``'s fit part. ``run`` may be a fit run: its parent's score part is then used."""
    from .. import embeddings

    parent = parent_of(store, run)
    base = parent[0] if parent else run
    base_files = store.probe_files(base.probe_set_id)
    base_ids = list(base_files.image_ids)
    fit_ids = {image_id for image_id, s in zip(base_ids, split.score_mask(base_ids)) if not s}
    if score_run is not None:
        if (score_run.model_spec, score_run.weights_id, score_run.layer, score_run.pooling) != \
                (base.model_spec, base.weights_id, base.layer, base.pooling):
            raise ScoringError(f"Run {score_run.run_key} is not the same layer of the same model and pooling as {base.run_key}.")
        source = score_run
        files = store.probe_files(source.probe_set_id)
        ids = list(files.image_ids)
        rows = np.array([i for i, image_id in enumerate(ids) if image_id not in fit_ids], dtype=np.int64)
        what = f"{len(rows)} images of probe set {source.probe_set_id[:8]} (not in the fit part)"
    else:
        source, files, ids = base, base_files, base_ids
        rows = np.flatnonzero([i not in fit_ids for i in ids])
        what = f"{len(rows)} held-out images ({split.describe()})"
    if len(rows) < MIN_SCORING_IMAGES:
        raise ScoringError(f"Only {len(rows)} scoring images: too few to score labels (need {MIN_SCORING_IMAGES}).")
    emb = embeddings.image_embeddings(multimodal, store, source.probe_set_id)  # memory-mapped, like the activations
    classes = [normalise_label(Path(files.labels[i]).name) if files.labels[i] else "" for i in rows]
    return ScoringImages(store.activations(source.run_key), emb, [ids[i] for i in rows], what, classes,
                         np.asarray(rows, dtype=np.int64))


def embed_texts(store: Store | None, multimodal, texts: list[str]) -> np.ndarray:
    """The backend's (cached) embeddings of ``texts``."""
    from .. import embeddings

    if not texts:
        return np.zeros((0, 1), dtype=np.float32)
    if store is None:
        return np.asarray(multimodal.encode_texts(texts), dtype=np.float32)
    return np.asarray(embeddings.text_embeddings(multimodal, store, texts), dtype=np.float32)


def score_label_sets(store: Store | None, images: ScoringImages, multimodal, label_sets: Sequence[LabelSet],
                     n_boot: int = DEFAULT_BOOTSTRAP, top_fraction: float = DEFAULT_TOP_FRACTION, seed: int = 0,
                     metrics: tuple[str, ...] = METRICS, per_unit: bool = True) -> list[ScoredLabelSet]:
    """Each label set's metrics on ``images``, with the same bootstrap resamples for every set.

    Units are scored a block at a time (:meth:`ScoringImages.columns_per_block`): a block's
    activations are standardised, binarised and ranked once, and each distinct label's
    prediction on it once, however many label sets (baselines) share them; every metric is
    per unit, so the blocks' scores join into the layer's (the linearised mean's resamples
    as the units-weighted sum of the blocks'). Without a ``store`` the texts are embedded by
    the backend directly (no cache).
    """
    texts = label_texts(label_sets)
    text_emb = embed_texts(store, multimodal, texts)
    row_of = {t: i for i, t in enumerate(texts)}
    units = sorted({n for ls in label_sets for n in ls.labels})
    weights = bootstrap_weights(len(images.image_ids), n_boot, seed) if n_boot else np.zeros((0, len(images.image_ids)), np.float32)
    neurons_of = [np.array(sorted(ls.labels), dtype=np.int64) for ls in label_sets]
    auprc_columns = [auprc_resampled_columns(len(neurons), seed) for neurons in neurons_of]
    parts: list[list[MetricScores]] = [[] for _ in label_sets]
    per_block = images.columns_per_block(SCORING_BYTES_PER_CELL * (1 + len(label_sets)))
    for start in range(0, len(units), per_block):
        block = units[start:start + per_block]
        unit_column = {n: j for j, n in enumerate(block)}
        acts = prepare(images.unit_columns(block), top_fraction, rank="auprc" in metrics)
        in_block = [(neurons >= block[0]) & (neurons <= block[-1]) for neurons in neurons_of]
        distinct = sorted({ls.labels[int(n)] for ls, neurons, mask in zip(label_sets, neurons_of, in_block) for n in neurons[mask]})
        column = {label: j for j, label in enumerate(distinct)}
        predictions = prepare(images.predictions(multimodal, text_emb, row_of, distinct), top_fraction)
        for ls, neurons, mask, sampled, found in zip(label_sets, neurons_of, in_block, auprc_columns, parts):
            if not mask.any():
                continue
            labels = [ls.labels[int(n)] for n in neurons[mask]]
            predicted = predictions.columns(np.array([column[label] for label in labels], dtype=np.int64))
            truth = [images.presence(label) for label in labels] if any(images.image_classes) else []
            known = [t for t in truth if t is not None]
            if known and len(known) == len(labels):  # every label names an image class: ground-truth presence
                predicted = Prepared(predicted.z, np.stack(known, axis=1))
            a = acts.columns(np.array([unit_column[int(n)] for n in neurons[mask]], dtype=np.int64))
            scores = score_prepared(a, predicted, weights, seed, metrics, max_auprc_resampled=0, per_unit=per_unit)
            if "auprc" in metrics:  # the layer's seeded sample of columns, those of them in this block
                first = int(np.flatnonzero(mask)[0])
                local = sampled[(sampled >= first) & (sampled < first + int(mask.sum()))] - first
                auprc = score_prepared(a.columns(local), predicted.columns(local), weights, seed, ("auprc",),
                                       max_auprc_resampled=None)
                scores.resamples["auprc"], scores.resampled["auprc"] = auprc.resamples["auprc"], local
            found.append(scores)
    return [ScoredLabelSet(ls, neurons, _joined(found, metrics)) for ls, neurons, found in zip(label_sets, neurons_of, parts)]


def _joined(parts: Sequence[MetricScores], metrics: tuple[str, ...]) -> MetricScores:
    """One label set's scores from those of its blocks of units (in unit order)."""
    if not parts:
        return MetricScores({m: np.zeros(0) for m in metrics}, {m: np.zeros((0, 0)) for m in metrics},
                            {m: np.zeros(0, np.int64) for m in metrics})
    sizes = [len(next(iter(p.values.values()))) for p in parts]
    offsets = np.cumsum([0, *sizes])[:-1]
    total = max(1, sum(sizes))
    keep = [m for m in metrics if parts and m in parts[0].values]
    values = {m: np.concatenate([p.values[m] for p in parts]) for m in keep}
    resamples = {m: np.concatenate([p.resamples[m] for p in parts], axis=1) if parts else np.zeros((0, 0)) for m in keep}
    resampled = {m: np.concatenate([p.resampled[m] + o for p, o in zip(parts, offsets)]).astype(np.int64) for m in keep}
    means = {m: np.sum([p.mean_resamples[m] * (size / total) for p, size in zip(parts, sizes)], axis=0)
             for m in keep if parts and all(m in p.mean_resamples for p in parts)}
    return MetricScores(values, resamples, resampled, means)
