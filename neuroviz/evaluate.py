"""Compare description methods on one layer without people (METHODS.md, "Automatic quality metrics").

For every method that labelled the run (its rank-0 labels), plus a constant-label baseline:

- final-layer accuracy: the share of output neurons whose label is their class name
  (case, underscores and spacing ignored), and the mean text-embedding cosine between
  label and class name (text side of the multimodal backend). Only for layers with one
  neuron per class of the model;
- simulation correlation (Linear Explanations, Oikarinen 2024/25; passes the Neuron_Eval
  sanity checks, ICML 2025): predict each neuron's activation on an image as the backend's
  image-text similarity between the image and the neuron's label; Pearson r with the real
  activations over the evaluation half of the probe set, averaged over neurons. A neuron
  whose activations (or predictions) do not vary there scores r = 0.

The evaluation half is chosen by a seeded hash of each image id (50/50), so it is stable
when images are added. Methods that label from the whole probe set (CLIP-Dissect does) have
seen these images; it is a held-out split only for labels made from the other half. The
constant baseline ("depiction") exposes metrics that reward a label unrelated to the
neuron: a method must beat it to mean anything. When class names exist, an "oracle" row
labels every output neuron with its class name: the ceiling of this backend's simulation.
Use a different multimodal backend for evaluation than for labelling where possible:
CLIP-Dissect picks labels with the same image-text similarity that simulation uses.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import NeurovizError
from .store import RunInfo, Store
from .study.statistics import mean_sem

DEFAULT_BASELINES = ("depiction",)


class EvaluationError(NeurovizError, ValueError):
    """An evaluation that cannot be made on this layer's labels or probe set; the message says why."""


@dataclass
class EvaluationRow:
    """One method's (or baseline's) scores on one layer."""

    name: str  # method name, "baseline: <label>" or "oracle: class names"
    label_key: str | None
    n_neurons: int
    final_layer_accuracy: float | None = None
    final_layer_cosine: float | None = None
    simulation_correlation: float | None = None
    simulation_sem: float | None = None  # standard error over neurons
    n_eval_images: int = 0


def normalise_label(text: str) -> str:
    """Lower case, underscores as spaces, single spaces: 'Great_White shark' == 'great white shark'."""
    return re.sub(r"\s+", " ", str(text).replace("_", " ")).strip().casefold()


def evaluation_split(image_ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """Boolean mask of the evaluation half: a seeded hash of each image id, stable under additions."""
    return np.array([hashlib.sha256(f"{seed}:{i}".encode()).digest()[0] & 1 == 1 for i in image_ids], dtype=bool)


def pearson_columns(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair (images x neurons); 0 where either column is constant."""
    a = actual - actual.mean(axis=0, keepdims=True)
    p = predicted - predicted.mean(axis=0, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=0) * (p * p).sum(axis=0))
    num = (a * p).sum(axis=0)
    return np.where(denom > 1e-12, num / np.where(denom > 1e-12, denom, 1.0), 0.0)


def evaluate_run(store: Store, run: RunInfo, multimodal, class_names: Sequence[str] | None = None,
                 methods: Sequence[str] | None = None, baselines: Sequence[str] = DEFAULT_BASELINES,
                 split_seed: int = 0, include_oracle: bool = True, latest_only: bool = True,
                 common_neurons: bool = False) -> list[EvaluationRow]:
    """Score the label runs of ``run`` (the newest per method, or all) and the constant baselines.

    A method with several label runs (other hyperparameters, backends or code versions) is
    shown as ``method [label key prefix]`` when they are all evaluated. ``common_neurons``
    scores every row on only the neurons that all methods labelled, so that methods run on
    a few neurons (MILAN, DnD) are compared with the others on the same neurons.
    """
    from . import embeddings

    label_runs = store.label_runs(run.run_key)  # oldest first
    if methods:
        label_runs = label_runs[label_runs["method"].isin(list(methods))]
    if latest_only:
        label_runs = label_runs.drop_duplicates("method", keep="last")
    repeated = set(label_runs["method"][label_runs["method"].duplicated()])
    top = store.labels(run.run_key, top_only=True)
    final_layer = class_names is not None and len(class_names) == run.n_neurons
    names: Sequence[str] = class_names or ()  # indexed only when final_layer (so class_names is given)

    label_sets: list[tuple[str, str | None, dict[int, str]]] = []
    for meta in label_runs.itertuples():
        rows = top[top["label_key"] == meta.label_key]
        if len(rows):
            name = f"{meta.method} [{str(meta.label_key)[:8]}]" if meta.method in repeated else str(meta.method)
            label_sets.append((name, str(meta.label_key), dict(zip(rows["neuron"].astype(int), rows["label"].astype(str)))))
    all_neurons: Sequence[int] = range(run.n_neurons)
    if common_neurons and label_sets:
        shared = set.intersection(*(set(labels) for _, _, labels in label_sets))
        if not shared:
            raise EvaluationError("The methods labelled no neuron in common; run them on the same neurons or drop --common.")
        label_sets = [(name, key, {n: labels[n] for n in shared}) for name, key, labels in label_sets]
        all_neurons = sorted(shared)
    for text in baselines:
        label_sets.append((f"baseline: {text}", None, {n: text for n in all_neurons}))
    if final_layer and include_oracle:
        label_sets.append(("oracle: class names", None, {n: str(names[n]) for n in all_neurons}))

    images = store.probe_images(run.probe_set_id)
    held = evaluation_split([im["image_id"] for im in images], split_seed)
    if held.sum() < 3:
        raise EvaluationError(f"The probe set has {len(images)} images: too few to hold out an evaluation half (need 6 or more).")
    image_emb = np.asarray(embeddings.image_embeddings(multimodal, store, run.probe_set_id), dtype=np.float32)[held]
    acts = np.asarray(store.activations(run.run_key), dtype=np.float32)[held]

    texts = sorted({label for _, _, labels in label_sets for label in labels.values()}
                   | ({str(c) for c in names} if final_layer else set()))
    text_emb = np.asarray(embeddings.text_embeddings(multimodal, store, texts), dtype=np.float32)
    row_of = {t: i for i, t in enumerate(texts)}

    out = []
    for name, key, labels in label_sets:
        neurons = np.array(sorted(labels), dtype=np.int64)
        label_rows = np.array([row_of[labels[n]] for n in neurons], dtype=np.int64)
        predicted = np.asarray(multimodal.similarity(image_emb, text_emb[label_rows]), dtype=np.float32)
        r = pearson_columns(acts[:, neurons], predicted)
        mean_r, sem_r = mean_sem(r)
        row = EvaluationRow(name, key, len(neurons), simulation_correlation=mean_r, simulation_sem=sem_r,
                            n_eval_images=int(held.sum()))
        if final_layer:
            truth = [str(names[n]) for n in neurons]
            row.final_layer_accuracy = float(np.mean([normalise_label(labels[n]) == normalise_label(t) for n, t in zip(neurons, truth)]))
            a = text_emb[label_rows]
            b = text_emb[[row_of[t] for t in truth]]
            row.final_layer_cosine = float(np.mean(np.sum(a * b, axis=1) / np.maximum(
                np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))
        out.append(row)
    return out


def format_markdown(rows: Sequence[EvaluationRow]) -> str:
    """A markdown table of evaluation rows (empty cells where a metric does not apply)."""
    def cell(value: float | None, digits: int = 3) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    lines = ["| method | neurons | final-layer accuracy | cosine to class name | simulation r | ± sem |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.n_neurons} | {cell(r.final_layer_accuracy)} | {cell(r.final_layer_cosine)} | "
                     f"{cell(r.simulation_correlation)} | {cell(r.simulation_sem)} |")
    if rows:
        lines.append(f"\nSimulation on {rows[0].n_eval_images} evaluation images (seeded 50/50 split of the probe set).")
    return "\n".join(lines)
