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

from ..errors import NeurovizError
from ..store import RunInfo, Store
from .metrics import DEFAULT_BOOTSTRAP, DEFAULT_TOP_FRACTION, METRICS, MetricScores, Prepared, bootstrap_weights, prepare, score_prepared
from .split import HeldOutSplit, parent_of


def normalise_label(text: str) -> str:
    """Lower case, underscores as spaces, single spaces: 'Great_White shark' == 'great white shark'."""
    return re.sub(r"\s+", " ", str(text).replace("_", " ")).strip().casefold()


_TERM = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s+(\S.*?)\s*$")
MIN_SCORING_IMAGES = 3


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
    """The images labels are scored on: activations of the layer and the backend's embeddings."""

    acts: np.ndarray  # (images, neurons)
    image_emb: np.ndarray  # (images, dim)
    image_ids: list[str]
    description: str
    image_classes: list[str] = field(default_factory=list)  # each image's class (normalised), "" when unlabelled

    def presence(self, label: str) -> np.ndarray | None:
        """Ground truth for a label that names one of the images' classes: True where the image is of it."""
        key = normalise_label(label)
        if not key or key not in set(self.image_classes):
            return None
        return np.array([c == key for c in self.image_classes], dtype=bool)


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
    fit_ids = {im["image_id"] for im, s in zip(store.probe_images(base.probe_set_id),
                                                split.score_mask([im["image_id"] for im in store.probe_images(base.probe_set_id)]))
               if not s}
    if score_run is not None:
        if (score_run.model_spec, score_run.weights_id, score_run.layer, score_run.pooling) != \
                (base.model_spec, base.weights_id, base.layer, base.pooling):
            raise ScoringError(f"Run {score_run.run_key} is not the same layer of the same model and pooling as {base.run_key}.")
        source = score_run
        ids = [im["image_id"] for im in store.probe_images(source.probe_set_id)]
        rows = np.array([i for i, image_id in enumerate(ids) if image_id not in fit_ids], dtype=np.int64)
        what = f"{len(rows)} images of probe set {source.probe_set_id[:8]} (not in the fit part)"
    else:
        source = base
        ids = [im["image_id"] for im in store.probe_images(source.probe_set_id)]
        rows = np.flatnonzero([i not in fit_ids for i in ids])
        what = f"{len(rows)} held-out images ({split.describe()})"
    if len(rows) < MIN_SCORING_IMAGES:
        raise ScoringError(f"Only {len(rows)} scoring images: too few to score labels (need {MIN_SCORING_IMAGES}).")
    emb = np.asarray(embeddings.image_embeddings(multimodal, store, source.probe_set_id), dtype=np.float32)[rows]
    acts = np.asarray(store.activations(source.run_key), dtype=np.float32)[rows]
    classes = [normalise_label(Path(im["label"]).name) if im["label"] else "" for im in store.probe_images(source.probe_set_id)]
    return ScoringImages(acts, emb, [ids[i] for i in rows], what, [classes[i] for i in rows])


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

    The units' activations are standardised, binarised and ranked once, and each distinct
    label's prediction once, however many label sets (baselines) share them. Without a
    ``store`` the texts are embedded by the backend directly (no cache).
    """
    texts = label_texts(label_sets)
    text_emb = embed_texts(store, multimodal, texts)
    row_of = {t: i for i, t in enumerate(texts)}
    distinct = sorted({label for ls in label_sets for label in ls.labels.values()})
    column = {label: j for j, label in enumerate(distinct)}
    similarity = np.asarray(multimodal.similarity(images.image_emb, text_emb), dtype=np.float32) if texts else None
    predictions = prepare(predicted_activations(multimodal, images.image_emb, text_emb, row_of, distinct, similarity), top_fraction)
    units = sorted({n for ls in label_sets for n in ls.labels})
    unit_column = {n: j for j, n in enumerate(units)}
    acts = prepare(images.acts[:, units], top_fraction, rank="auprc" in metrics)
    weights = bootstrap_weights(len(images.image_ids), n_boot, seed) if n_boot else np.zeros((0, len(images.image_ids)), np.float32)
    out = []
    for ls in label_sets:
        neurons = np.array(sorted(ls.labels), dtype=np.int64)
        labels = [ls.labels[int(n)] for n in neurons]
        predicted = predictions.columns(np.array([column[label] for label in labels], dtype=np.int64))
        truth = [images.presence(label) for label in labels] if any(images.image_classes) else []
        known = [t for t in truth if t is not None]
        if known and len(known) == len(labels):  # every label names an image class: ground-truth presence
            predicted = Prepared(predicted.z, np.stack(known, axis=1))
        a = acts.columns(np.array([unit_column[int(n)] for n in neurons], dtype=np.int64))
        scores = score_prepared(a, predicted, weights, seed, metrics, per_unit=per_unit)
        out.append(ScoredLabelSet(ls, neurons, scores))
    return out
