"""Linear Explanations (Oikarinen & Weng, "Linear Explanations for Individual Neurons", ICML 2024).

A unit is explained as a sparse non-negative combination of concepts, shown "0.6 dog + 0.3
grass": its activation on an image is predicted as the same combination of the concepts'
activations on it. Two sources of concept activations, as in the paper:

- ``source="multimodal"`` (their LE(SigLIP)): the multimodal backend's image-concept
  similarity for every concept of the concept set;
- ``source="label"`` (their LE(label)): the probe set's image labels, one-hot (a concept is
  present on an image labelled with it); needs a labelled probe set.

Fitting, per unit, on the images of ``ctx.run`` only (label a fit run to hold images out):
concept columns and the activations are standardised; the ``width`` concepts most positively
correlated with the unit are the candidates (the reference ranks them with an elastic net);
then forward selection adds, one at a time, the candidate most correlated with the residual
and refits non-negative least squares on the chosen ones (``scipy.optimize.nnls``), while the
fit's correlation rises by at least ``tolerance`` (reference: 0.02) and at most ``max_terms``
(reference: 10). The reference picks among ``width`` candidates by a correlation on a
validation split with an unconstrained fit per candidate (Adam); here the non-negativity is
the paper's, and every step works on the candidates' Gram matrix (no image-sized work after
the first product), which is what lets thousands of units be explained in seconds.

Weights are returned in the units of the raw concept activations, scaled to sum to 1, so the
label "0.6 dog + 0.3 grass" is read by :func:`neuroviz.trust.scoring.label_terms` and scored
like any other label (the same weighted sum of image-text similarities).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..store import LabelRow
from .base import DescriptionMethod, MethodContext, MethodError, register_method

SOURCES = ("multimodal", "label")
_FULL_GRAM_CONCEPTS = 4096  # up to this many concepts, one Gram matrix serves every unit


@dataclass
class LinearExplanationConfig:
    """Hyperparameters of Linear Explanations (reference defaults where it has them)."""

    source: str = "multimodal"  # "multimodal" (LE(SigLIP)-style) or "label" (LE(label))
    max_terms: int = 10  # reference max_length
    tolerance: float = 0.02  # minimum rise of the fit's correlation to add a concept
    width: int = 64  # candidate concepts per unit (those most correlated with it)
    decimals: int = 2  # weights shown with this many decimals
    min_weight: float = 0.005  # terms whose weight rounds below this are dropped from the label

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise MethodError(f"Unknown source '{self.source}'. Choose one of {', '.join(SOURCES)}.")
        if self.max_terms < 1 or self.width < 1:
            raise MethodError("max_terms and width must be at least 1.")


@dataclass
class LinearExplanation:
    """One unit's explanation: concepts (rows of the concept matrix), raw weights, fit correlation."""

    concepts: list[int]
    weights: list[float]
    fit_r: float


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (x - mean) / std, std


def _select(gram: np.ndarray, corr: np.ndarray, max_terms: int, tolerance: float) -> tuple[list[int], np.ndarray, float]:
    """Non-negative forward selection in Gram space: ``gram`` (w x w) correlations among candidates,
    ``corr`` (w,) their correlations with the unit. Returns chosen rows, their weights, fit r."""
    from scipy.optimize import nnls

    chosen: list[int] = []
    weights = np.zeros(0)
    fit_r = 0.0
    while len(chosen) < max_terms:
        gradient = corr - (gram[:, chosen] @ weights if chosen else 0.0)
        gradient[chosen] = -np.inf
        j = int(np.argmax(gradient))
        if gradient[j] <= 1e-9:
            break
        trial = chosen + [j]
        g = gram[np.ix_(trial, trial)] + 1e-6 * np.eye(len(trial))
        chol = np.linalg.cholesky(g)
        w, _ = nnls(chol.T, np.linalg.solve(chol, corr[trial]))
        variance = float(w @ g @ w)  # of the fit, in units of the (standardised) unit's variance
        r = float(w @ corr[trial]) / np.sqrt(variance) if variance > 1e-12 else 0.0  # corr(fit, unit)
        if chosen and r - fit_r < tolerance:
            break
        chosen, weights, fit_r = trial, w, r
    keep = weights > 0
    return [c for c, k in zip(chosen, keep) if k], weights[keep], fit_r


def explain_units(acts: np.ndarray, concept_acts: np.ndarray, config: LinearExplanationConfig | None = None) -> list[LinearExplanation]:
    """A Linear Explanation of every column of ``acts`` (images x units) from ``concept_acts`` (images x concepts)."""
    config = config or LinearExplanationConfig()
    n = acts.shape[0]
    z, std = _standardise(np.asarray(concept_acts, dtype=np.float32))
    a, _ = _standardise(np.asarray(acts, dtype=np.float32))
    corr = (a.T @ z) / n  # (units, concepts)
    width = min(config.width, z.shape[1])
    full_gram = (z.T @ z) / n if z.shape[1] <= _FULL_GRAM_CONCEPTS else None
    out = []
    for u in range(a.shape[1]):
        top = np.argpartition(-corr[u], width - 1)[:width] if width < z.shape[1] else np.arange(z.shape[1])
        top = top[np.argsort(-corr[u, top])]
        gram = full_gram[np.ix_(top, top)] if full_gram is not None else (z[:, top].T @ z[:, top]) / n
        rows, w, fit_r = _select(np.asarray(gram, np.float64), np.asarray(corr[u, top], np.float64), config.max_terms, config.tolerance)
        raw = w / std[top[rows]] if len(rows) else w
        out.append(LinearExplanation([int(top[r]) for r in rows], raw.tolist(), fit_r))
    return out


def format_explanation(names: Sequence[str], explanation: LinearExplanation, decimals: int = 2,
                       min_weight: float = 0.005) -> tuple[str, list[tuple[str, float]]]:
    """'0.67 dog + 0.33 grass' (weights scaled to sum 1, largest first; one term: just its name) and the terms."""
    total = float(sum(explanation.weights))
    if total <= 0:
        return "", []
    terms = sorted(((names[c], w / total) for c, w in zip(explanation.concepts, explanation.weights)), key=lambda t: -t[1])
    terms = [(name, round(w, decimals)) for name, w in terms if round(w, decimals) >= min_weight]
    if len(terms) == 1:  # "1.00 car" says nothing more than "car" (and "3 dogs" must stay a plain label)
        return terms[0][0], terms
    return " + ".join(f"{w:.{decimals}f} {name}" for name, w in terms), terms


@register_method
class LinearExplanations(DescriptionMethod):
    """A sparse non-negative combination of concepts fitted to each unit's activations."""

    name = "linear_explanations"
    title = "Linear Explanations"
    reference = "Oikarinen & Weng, Linear Explanations for Individual Neurons, ICML 2024"
    needs = ("multimodal", "concepts")
    config_class = LinearExplanationConfig
    per_neuron = False
    code_version = "1"

    def describe(self, ctx: MethodContext, config: LinearExplanationConfig, neurons: Sequence[int]) -> list[LabelRow]:
        """Rank 0: the combination; ranks 1..: its terms alone, by weight."""
        names, concept_acts = self.concept_activations(ctx, config)
        acts = np.asarray(ctx.store.activations(ctx.run.run_key), dtype=np.float32)[:, list(neurons)]
        rows: list[LabelRow] = []
        for neuron, explanation in zip(neurons, explain_units(acts, concept_acts, config)):
            label, terms = format_explanation(names, explanation, config.decimals, config.min_weight)
            if not label:
                rows.append(LabelRow(int(neuron), 0, "(no concept fits)", 0.0, None, {"terms": [], "source": config.source}))
                continue
            extra = {"terms": [[t, w] for t, w in terms], "fit_r": round(explanation.fit_r, 5), "source": config.source}
            rows.append(LabelRow(int(neuron), 0, label, float(explanation.fit_r), None, extra))
            rows += [LabelRow(int(neuron), rank, t, float(w), None, {"weight": w}) for rank, (t, w) in enumerate(terms, start=1)]
        return rows

    @staticmethod
    def concept_activations(ctx: MethodContext, config: LinearExplanationConfig) -> tuple[list[str], np.ndarray]:
        """(concept names, images x concepts) for the run's images, from the backend or the image labels."""
        if config.source == "label":
            labels = [im["label"] or "" for im in ctx.store.probe_images(ctx.run.probe_set_id)]
            names = sorted({label for label in labels if label})
            if len(names) < 2:
                raise MethodError("Linear Explanations with source=label needs a probe set whose images carry labels "
                                  "(an image-folder with one folder per class); this one has none. Use source=multimodal.")
            column = {name: j for j, name in enumerate(names)}
            onehot = np.zeros((len(labels), len(names)), dtype=np.float32)
            for i, label in enumerate(labels):
                if label:
                    onehot[i, column[label]] = 1.0
            return names, onehot
        from .. import embeddings

        image_emb = np.asarray(embeddings.image_embeddings(ctx.multimodal, ctx.store, ctx.run.probe_set_id, ctx.progress), np.float32)
        text_emb = np.asarray(embeddings.text_embeddings(ctx.multimodal, ctx.store, ctx.concepts), np.float32)
        return list(ctx.concepts.concepts), np.asarray(ctx.multimodal.similarity(image_emb, text_emb), dtype=np.float32)
